"""One-call export of a Reconstruction as a dataset folder for splatting tools.

Layout of `out_dir`:
    images/<name>        upright copies of the original images (when image sources are given)
    sparse/0/            COLMAP model (cameras, images, points3D; binary or text)
    transforms.json      nerfstudio cameras (`ns-train splatfacto --data out_dir` reads it and the PLY)
    sparse_pc.ply        the point cloud (nerfstudio's `ply_file_path`, 3DGS initialisation)
    scene.glb            point cloud + camera frusta for viewing
The point cloud is extracted once and shared by all formats.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import atomic_file
from ._common import ExportError, get_pointcloud, validate_recon
from .colmap import write_colmap
from .glb import write_glb
from .nerfstudio_json import write_transforms_json
from .ply import write_ply

__all__ = ["export_dataset", "copy_images", "FORMATS"]

FORMATS = ("colmap", "ply", "nerfstudio", "glb")


def copy_images(recon: Any, sources: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Copy the original images to `out_dir/<name>` so that COLMAP/nerfstudio see them as the reconstruction did.

    sources: a folder holding `recon.names`, or one path per image in reconstruction order. Files without EXIF
    rotation are copied byte for byte; rotated ones are re-saved upright (JPEG quality 95) without the tag.
    Each result must have the reconstruction's original size.
    """
    from PIL import Image, ImageOps

    n = validate_recon(recon)
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        if not folder.is_dir():
            raise ExportError(f"images folder {folder} does not exist")
        paths = [folder / name for name in recon.names]
    else:
        paths = [Path(p) for p in sources]
        if len(paths) != n:
            raise ExportError(f"got {len(paths)} image paths for a reconstruction of {n} images")
    out_dir = Path(out_dir)
    for src, name, (w, h) in zip(paths, recon.names, np.asarray(recon.orig_sizes)):
        if not src.is_file():
            raise ExportError(f"image {src} not found; pass the folder or the paths of the original images")
        dst = out_dir / name
        try:
            with Image.open(src) as im:
                orient = im.getexif().get(0x0112, 1)
                if orient in (1, None):
                    size = im.size
                    upright = None
                else:
                    upright = ImageOps.exif_transpose(im)
                    size = upright.size
        except OSError as e:
            raise ExportError(f"cannot read image {src}: {e}") from e
        if tuple(size) != (int(w), int(h)):
            raise ExportError(f"image {src} is {size[0]}x{size[1]} (upright) but the reconstruction expects {w}x{h}; "
                              "wrong image for this reconstruction?")
        with atomic_file(dst, "image copy", error=ExportError) as tmp:
            if upright is None:
                shutil.copyfile(src, tmp)
            else:
                fmt = Image.registered_extensions().get(dst.suffix.lower(), "PNG")
                kw = {"quality": 95} if fmt == "JPEG" else {}
                upright.save(tmp, format=fmt, **kw)
    return out_dir


def export_dataset(
    recon: Any,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    conf_thr: float | None = None,
    max_points: int | None = None,
    text: bool = False,
    shared_camera: bool = False,
) -> dict[str, Path]:
    """Export `recon` into `out_dir` (layout in the module docstring); returns {format: path written}.

    formats: any of "colmap", "ply", "nerfstudio", "glb". images: folder or per-image paths of the original
    images to copy into `out_dir/images` (skipped when None). conf_thr/max_points: point-cloud options passed to
    `recon.pointcloud` (its defaults when None; max_points=0: no cap).
    """
    validate_recon(recon)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(FORMATS)}")
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    points = get_pointcloud(recon, conf_thr, max_points)
    if images is not None:
        written["images"] = copy_images(recon, images, out_dir / "images")
    if "colmap" in formats:
        written["colmap"] = write_colmap(recon, out_dir / "sparse" / "0", text=text, shared_camera=shared_camera,
                                         points=points)
    if "ply" in formats:
        written["ply"] = write_ply(out_dir / "sparse_pc.ply", points[0], points[1])
    if "nerfstudio" in formats:
        written["nerfstudio"] = write_transforms_json(
            recon, out_dir, ply_name="sparse_pc.ply" if "ply" in formats else None, write_ply_file=False
        )
    if "glb" in formats:
        shapes = np.array([np.asarray(d).shape[:2] for d in recon.depths], dtype=np.int64)
        written["glb"] = write_glb(out_dir / "scene.glb", points[0], points[1], np.asarray(recon.c2w),
                                   np.asarray(recon.K), shapes[:, ::-1])
    return written

