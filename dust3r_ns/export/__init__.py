"""Exporters of a Reconstruction: COLMAP sparse model, PLY point cloud, nerfstudio transforms.json, GLB scene.

`WRITERS` is the registry of dataset formats (name -> writer) used by `export_dataset` and `dust3r-ns export`.
"""

from ._common import ExportError
from .colmap import read_colmap, write_colmap
from .dataset import FORMATS, WRITERS, DatasetOptions, copy_images, export_dataset
from .glb import write_glb
from .nerfstudio_json import read_transforms_json, write_transforms_json
from .ply import read_ply, write_ply

__all__ = [
    "ExportError",
    "FORMATS",
    "WRITERS",
    "DatasetOptions",
    "copy_images",
    "export_dataset",
    "write_colmap",
    "read_colmap",
    "write_glb",
    "write_ply",
    "read_ply",
    "write_transforms_json",
    "read_transforms_json",
]
