"""glTF binary (.glb) scene of a reconstruction with trimesh: coloured point cloud + camera frusta as lines.

The world is turned 180 degrees about x (y and z negated, `conventions.OPENCV_TO_GLTF_WORLD`) by default, so a
reconstruction in OpenCV-like axes (y down, z forward) appears upright in glTF viewers (y up). Frusta: apex at the
camera centre, the image rectangle at `frustum_depth` in front, and a small triangle above the top edge marking "up".
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from .. import conventions as cv
from ..fileio import atomic_file
from ._common import ExportError

__all__ = ["write_glb", "load_glb", "frustum_segments", "GLB_WORLD_FLIP"]

GLB_WORLD_FLIP = cv.OPENCV_TO_GLTF_WORLD  # OpenCV-like world -> y-up glTF world (the conventions constant)


def _default_depth(xyz: np.ndarray, centres: np.ndarray) -> float:
    if len(centres) > 1:
        d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        d[np.eye(len(centres), dtype=bool)] = np.inf
        nn = np.min(d, axis=1)
        nn = nn[np.isfinite(nn) & (nn > 0)]
        if nn.size:
            return float(0.5 * np.median(nn))
    if len(xyz) > 1:
        ext = np.percentile(xyz, 95, axis=0) - np.percentile(xyz, 5, axis=0)
        if np.max(ext) > 0:
            return float(0.05 * np.max(ext))
    return 0.1


def frustum_segments(c2w: np.ndarray, K: np.ndarray, sizes: np.ndarray, depth: float) -> np.ndarray:
    """Line segments (N, 11, 2, 3) of camera frusta in world coordinates (OpenCV c2w, K for pixel sizes (W, H))."""
    n = len(c2w)
    W = sizes[:, 0].astype(np.float64)
    H = sizes[:, 1].astype(np.float64)
    # Pixel-area corners in the package convention (pixel centres on the integer grid).
    u = np.stack([-0.5 + 0 * W, W - 0.5, W - 0.5, -0.5 + 0 * W], axis=-1)
    v = np.stack([-0.5 + 0 * H, -0.5 + 0 * H, H - 0.5, H - 0.5], axis=-1)
    # "Up" marker: a triangle above the top edge (image up = -v).
    u = np.concatenate([u, np.stack([0.3 * W, 0.5 * W, 0.7 * W], -1) - 0.5], axis=-1)
    v = np.concatenate([v, np.stack([-0.5 - 0.05 * H, -0.5 - 0.25 * H, -0.5 - 0.05 * H], -1)], axis=-1)
    pix = np.stack([u, v, np.ones_like(u)], axis=-1)  # (N, 7, 3)
    rays = np.einsum("nij,nkj->nki", np.linalg.inv(K), pix)
    pts_cam = rays / rays[..., 2:3] * depth
    pts = np.einsum("nij,nkj->nki", c2w[:, :3, :3], pts_cam) + c2w[:, None, :3, 3]
    apex = c2w[:, :3, 3]
    c = [pts[:, k] for k in range(7)]
    segs = [
        (apex, c[0]), (apex, c[1]), (apex, c[2]), (apex, c[3]),
        (c[0], c[1]), (c[1], c[2]), (c[2], c[3]), (c[3], c[0]),
        (c[4], c[5]), (c[5], c[6]), (c[6], c[4]),
    ]
    return np.stack([np.stack(s, axis=1) for s in segs], axis=1).reshape(n, len(segs), 2, 3)


def write_glb(
    path: str | os.PathLike,
    xyz: np.ndarray,
    rgb: np.ndarray,
    c2w: np.ndarray,
    K: np.ndarray,
    sizes: np.ndarray,
    frustum_depth: float | None = None,
    opengl_world: bool = True,
) -> Path:
    """Write a .glb with the points (M, 3) + colours (M, 3) uint8 and one frustum per camera, atomically.

    c2w: (N, 4, 4) OpenCV camera-to-world; K: (N, 3, 3) intrinsics for images of `sizes` (N, 2) (W, H) (network
    or original pixels, as long as they match). frustum_depth: frustum length in world units (default: half the
    median nearest-camera distance). opengl_world: rotate the world 180 degrees about x for y-up viewers.
    """
    import trimesh

    xyz = np.asarray(xyz, dtype=np.float64)
    rgb = np.asarray(rgb)
    c2w = np.asarray(c2w, dtype=np.float64)
    K = np.asarray(K, dtype=np.float64)
    sizes = np.asarray(sizes)
    if xyz.ndim != 2 or xyz.shape[1] != 3 or rgb.shape != xyz.shape:
        raise ExportError(f"write_glb({path}): xyz and rgb must both be (M, 3), got {xyz.shape} and {rgb.shape}")
    n = len(c2w)
    if c2w.shape != (n, 4, 4) or K.shape != (n, 3, 3) or sizes.shape != (n, 2):
        raise ExportError(f"write_glb({path}): need c2w (N,4,4), K (N,3,3), sizes (N,2); got "
                          f"{c2w.shape}, {K.shape}, {sizes.shape}")
    if not (np.all(np.isfinite(xyz)) and np.all(np.isfinite(c2w)) and np.all(np.isfinite(K))):
        raise ExportError(f"write_glb({path}): NaN/inf in points, poses or intrinsics")
    if rgb.dtype != np.uint8:
        rgb = (np.round(np.clip(rgb, 0, 1) * 255) if np.issubdtype(rgb.dtype, np.floating) else rgb).astype(np.uint8)
    depth = float(frustum_depth) if frustum_depth is not None else _default_depth(xyz, c2w[:, :3, 3])
    world = cv.OPENCV_TO_GLTF_WORLD if opengl_world else np.eye(4)

    scene = trimesh.Scene()
    if len(xyz):
        colors = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)
        scene.add_geometry(trimesh.PointCloud(xyz @ world[:3, :3].T, colors=colors), geom_name="points")
    if n:
        segs = frustum_segments(c2w, K, sizes, depth) @ world[:3, :3].T
        hues = np.linspace(0.0, 1.0, n, endpoint=False)
        for i in range(n):
            path_i = trimesh.load_path(segs[i])
            rgb_i = (255 * np.clip(np.abs(((hues[i] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)).astype(np.uint8)
            path_i.colors = np.tile(np.append(rgb_i, 255), (len(path_i.entities), 1))
            scene.add_geometry(path_i, geom_name=f"camera_{i:04d}")
    if not scene.geometry:
        raise ExportError(f"write_glb({path}): nothing to write (no points and no cameras)")
    data = scene.export(file_type="glb")
    path = Path(path)
    with atomic_file(path, "GLB file", error=ExportError) as tmp:
        tmp.write_bytes(data)
    return path


def load_glb(path: str | os.PathLike):
    """Load a .glb back as a trimesh.Scene (for checks)."""
    import trimesh

    return trimesh.load(io.BytesIO(Path(path).read_bytes()), file_type="glb", force="scene")

