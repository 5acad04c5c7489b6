"""Procedural ray-cast scenes with ground truth, camera paths and oracle DUSt3R-style pair predictions."""

from .cameras import BASELINE_DEG, camera_path, intrinsics, look_at, random_pair
from .oracle import NoiseConfig, camera_points, oracle_pairs
from .render import cast, render, render_views
from .scene import Box, Cylinder, Scene, Sphere, Texture, make_scene

__all__ = ["Scene", "Texture", "Sphere", "Box", "Cylinder", "make_scene", "render", "render_views", "cast",
           "camera_path", "random_pair", "look_at", "intrinsics", "BASELINE_DEG", "NoiseConfig", "oracle_pairs",
           "camera_points"]
