"""One-call export of a Reconstruction as a dataset folder for splatting tools, through a registry of writers.

Layout of `out_dir` (export format in brackets):
    images/<name>        upright copies of the original images (when image sources are given)
    masks/<stem>.png     the photos' masks (when a mask folder is given; transforms.json names them as mask_path)
    sparse/0/            [colmap] COLMAP model (cameras, images, points3D; binary or text)
    sparse_pc.ply        [ply] the point cloud (nerfstudio's `ply_file_path`, 3DGS initialisation)
    transforms.json      [nerfstudio] cameras (`ns-train splatfacto --data out_dir` reads it and the PLY)
    scene.glb            [glb] point cloud + camera frusta for viewing
`WRITERS` maps each format name to its writer `(recon, out_dir, options) -> path written`; `export_dataset` runs
the selected ones in registry order (the PLY before transforms.json, which references it). The point cloud is
extracted once and shared by all formats.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..fileio import atomic_file
from ..scene import Reconstruction
from ._common import ExportError, get_pointcloud, validate_recon
from .colmap import write_colmap
from .glb import write_glb
from .nerfstudio_json import write_transforms_json
from .ply import write_ply

__all__ = ["export_dataset", "copy_images", "FORMATS", "WRITERS", "DatasetOptions", "DatasetWriter"]

PLY_NAME = "sparse_pc.ply"


@dataclass(frozen=True)
class DatasetOptions:
    """What a dataset writer reads besides the reconstruction and the dataset folder."""

    points: tuple[np.ndarray, np.ndarray, np.ndarray]
    """The shared point cloud (xyz, rgb, src), a `Reconstruction.pointcloud` result."""
    formats: tuple[str, ...]
    """All formats written in this export (a writer may reference another's output)."""
    text: bool = False
    """COLMAP: text files instead of binary."""
    shared_camera: bool = False
    """COLMAP: one camera for all images."""
    depth_tol: float = 0.02
    """COLMAP: relative depth agreement of the points' multi-view tracks (0: single-image tracks)."""
    conf_thr: float | None = None
    """COLMAP tracks: confidence threshold of the observing pixels (None: the reconstruction's)."""
    masks_subdir: str | None = None
    """nerfstudio: the folder of the exported masks (each frame's mask_path), None when none were exported."""


DatasetWriter = Callable[[Reconstruction, Path, DatasetOptions], Path]


def write_dataset_colmap(recon: Reconstruction, out_dir: Path, opts: DatasetOptions) -> Path:
    """COLMAP model in `out_dir/sparse/0`."""
    return write_colmap(recon, out_dir / "sparse" / "0", text=opts.text, shared_camera=opts.shared_camera,
                        points=opts.points, depth_tol=opts.depth_tol)


def write_dataset_ply(recon: Reconstruction, out_dir: Path, opts: DatasetOptions) -> Path:
    """The point cloud as `out_dir/sparse_pc.ply`."""
    return write_ply(out_dir / PLY_NAME, opts.points[0], opts.points[1])


def write_dataset_nerfstudio(recon: Reconstruction, out_dir: Path, opts: DatasetOptions) -> Path:
    """`out_dir/transforms.json`, referencing the PLY when the "ply" format is written too."""
    return write_transforms_json(recon, out_dir, ply_name=PLY_NAME if "ply" in opts.formats else None,
                                 write_ply_file=False, masks_subdir=opts.masks_subdir)


def write_dataset_glb(recon: Reconstruction, out_dir: Path, opts: DatasetOptions) -> Path:
    """`out_dir/scene.glb`: the point cloud and the camera frusta (network-pixel intrinsics and image sizes)."""
    shapes = np.array([np.asarray(d).shape[:2] for d in recon.depths], dtype=np.int64)
    return write_glb(out_dir / "scene.glb", opts.points[0], opts.points[1], np.asarray(recon.c2w),
                     np.asarray(recon.K), shapes[:, ::-1])


WRITERS: dict[str, DatasetWriter] = {
    "colmap": write_dataset_colmap,
    "ply": write_dataset_ply,
    "nerfstudio": write_dataset_nerfstudio,
    "glb": write_dataset_glb,
}
"""Export formats in writing order: name -> writer (the keys are `FORMATS` and the CLI's `--formats` choices)."""

FORMATS = tuple(WRITERS)


def copy_images(recon: Reconstruction, sources: str | os.PathLike | Sequence[str | os.PathLike],
                out_dir: str | os.PathLike) -> Path:
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


def copy_masks(recon: Reconstruction, masks_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write each image's mask (`masks_dir/<stem>.png`, checked against the original size) to
    `out_dir/<stem>.png` as an 8-bit one-channel PNG (255 = use, 0 = ignore), as nerfstudio reads masks."""
    from ..masks import MaskError, mask_file, read_mask, write_mask

    validate_recon(recon)
    for name, (w, h) in zip(recon.names, np.asarray(recon.orig_sizes)):
        try:
            mask = read_mask(mask_file(masks_dir, name), (int(w), int(h)))
        except MaskError as e:
            raise ExportError(str(e)) from None
        write_mask(mask_file(out_dir, name), mask, error=ExportError)
    return Path(out_dir)


def export_dataset(
    recon: Reconstruction,
    out_dir: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    conf_thr: float | None = None,
    max_points: int | None = None,
    text: bool = False,
    shared_camera: bool = False,
    masks: str | os.PathLike | None = None,
    depth_tol: float = 0.02,
) -> dict[str, Path]:
    """Export `recon` into `out_dir` (layout in the module docstring); returns {format: path written}.

    formats: any of the `WRITERS` keys (`FORMATS`). images: folder or per-image paths of the original images to
    copy into `out_dir/images` (returned as "images"; skipped when None). conf_thr/max_points: point-cloud options
    passed to `recon.pointcloud` (its defaults when None; max_points=0: no cap). masks: folder of the photos'
    masks to write into `out_dir/masks` (returned as "masks"; transforms.json then names them). depth_tol: COLMAP
    multi-view tracks (`tracks.build_tracks`; 0: single-image tracks).
    """
    validate_recon(recon)
    formats = tuple(formats)
    unknown = [f for f in formats if f not in WRITERS]
    if unknown:
        raise ExportError(f"unknown export format(s) {unknown}; choose from {list(WRITERS)}")
    out_dir = Path(out_dir)
    written: dict[str, Path] = {}
    opts = DatasetOptions(points=get_pointcloud(recon, conf_thr, max_points), formats=formats, text=text,
                          shared_camera=shared_camera, depth_tol=depth_tol, conf_thr=conf_thr,
                          masks_subdir="masks" if masks is not None else None)
    if images is not None:
        written["images"] = copy_images(recon, images, out_dir / "images")
    if masks is not None:
        written["masks"] = copy_masks(recon, masks, out_dir / "masks")
    for name, write in WRITERS.items():
        if name in opts.formats:
            written[name] = write(recon, out_dir, opts)
    return written
