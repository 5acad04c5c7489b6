"""One-call export of a Reconstruction as a dataset folder for splatting tools, through a registry of writers.

Layout of `out_dir` (export format in brackets):
    images/<name>        the images as the reconstruction saw them, 8-bit RGB, upright (when image sources are
                         given): an upright 8-bit RGB JPEG/PNG byte for byte, any other file as `<name>.png`
    images_2/, _4/, _8/  the same images downscaled (nerfstudio's naming and floor rounding, Lanczos)
    masks/<stem>.png     the photos' masks (when a mask folder is given; transforms.json names them as mask_path)
    sparse/0/            [colmap] COLMAP model (cameras, images, points3D; binary or text)
    sparse_pc.ply        [ply] the point cloud (nerfstudio's `ply_file_path`, 3DGS initialisation)
    transforms.json      [nerfstudio] cameras (`ns-train splatfacto --data out_dir` reads it and the PLY)
    scene.glb            [glb] point cloud + camera frusta for viewing
    reconstruction.npz, depth/, conf/   the full reconstruction (`reconstruction=True`, as `reconstruct` writes)
`WRITERS` maps each format name to its writer `(recon, out_dir, options) -> path written`; `export_dataset` runs
the selected ones in registry order (the PLY before transforms.json, which references it). The point cloud is
extracted once and shared by all formats. The dataset is assembled in a temporary folder and swapped in whole
(`fileio.atomic_dir`): a failed or killed export leaves `out_dir` as it was. Image names that change (`<name>.png`)
are the names every format writes (COLMAP image names, transforms.json file paths, the saved reconstruction).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .. import images as imgs
from ..fileio import atomic_dir, atomic_file
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
                out_dir: str | os.PathLike, downscales: Sequence[int] = imgs.DOWNSCALES) -> list[str]:
    """Write the images as the reconstruction saw them to `out_dir/<name>`; return the file names written.

    sources: a folder holding `recon.names`, or one path per image in reconstruction order. Each image is decoded
    as the network input is (`images.decode_rgb`: upright, 8-bit RGB) and must have the reconstruction's original
    size. An upright 8-bit RGB JPEG/PNG is copied byte for byte under its name; any other file (EXIF rotation,
    palette, CMYK, 16-bit, alpha, GIF/TIFF/WebP/HEIC ...) is saved as an RGB PNG named `images.rgb_file_name`.
    downscales: factors f of the reduced copies written to `<out_dir>_<f>/<file name>` (nerfstudio's layout).
    """
    from PIL import Image

    n = validate_recon(recon)
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        if not folder.is_dir():
            raise ExportError(f"images folder {folder} does not exist; pass the folder of the original images")
        paths = [folder / name for name in recon.names]
    else:
        paths = [Path(p) for p in sources]
        if len(paths) != n:
            raise ExportError(f"got {len(paths)} image paths for a reconstruction of {n} images")
    out_dir = Path(out_dir)
    written: list[str] = []
    for src, name, (w, h) in zip(paths, recon.names, np.asarray(recon.orig_sizes)):
        if not src.is_file():
            raise ExportError(f"image {src} not found; pass the folder or the paths of the original images")
        try:
            as_is = imgs.stored_as_rgb(src)
            img = imgs.decode_rgb(src)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise ExportError(f"cannot read image {src} ({type(e).__name__}: {e}); pass the original images") from e
        if tuple(img.size) != (int(w), int(h)):
            raise ExportError(f"image {src} is {img.size[0]}x{img.size[1]} (upright) but the reconstruction expects "
                              f"{w}x{h}; wrong image for this reconstruction?")
        fname = imgs.rgb_file_name(name, as_is)
        if fname in written or (fname != name and fname in recon.names):
            raise ExportError(f"image {src}: its RGB copy {fname} collides with another image's name; rename it")
        with atomic_file(out_dir / fname, "image copy", error=ExportError) as tmp:
            if as_is:
                shutil.copyfile(src, tmp)
            else:
                imgs.save_rgb(img, tmp, "PNG")
        fmt = "JPEG" if as_is and Path(fname).suffix.lower() in (".jpg", ".jpeg") else "PNG"
        for f in downscales:
            with atomic_file(out_dir.parent / f"{out_dir.name}_{f}" / fname, "downscaled image",
                             error=ExportError) as tmp:
                imgs.save_downscaled(img, tmp, f, fmt)
        written.append(fname)
    return written


def _save_reconstruction(recon: Reconstruction, out_dir: Path) -> None:
    """`reconstruction.npz` plus `depth/<stem>.npy` and `conf/<stem>.npy` per image (network resolution)."""
    recon.save(out_dir / "reconstruction.npz")
    for sub, maps in (("depth", recon.depths), ("conf", recon.confs)):
        (out_dir / sub).mkdir()
        for name, m in zip(recon.names, maps):
            np.save(out_dir / sub / f"{Path(name).stem}.npy", m)


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
    downscales: Sequence[int] = imgs.DOWNSCALES,
    reconstruction: bool = False,
    replace: bool = False,
    masks: str | os.PathLike | None = None,
    depth_tol: float = 0.02,
) -> dict[str, Path]:
    """Export `recon` into `out_dir` (layout in the module docstring) in one step; returns {format: path written}.

    formats: any of the `WRITERS` keys (`FORMATS`). images: folder or per-image paths of the original images to
    write into `out_dir/images` (+ `images_<f>` for f in `downscales`) (returned as "images"; skipped when None).
    conf_thr/max_points: point-cloud options passed to `recon.pointcloud` (its defaults when None; max_points=0:
    no cap). reconstruction: also save the reconstruction, depth and confidence maps (returned as
    "reconstruction"). An existing `out_dir` keeps the files this export does not write (a written folder such
    as `images/` or `sparse/0/` replaces the old one), or none of them with `replace=True`. Any failure, a full
    disk included, raises ExportError and leaves `out_dir` as it was. masks: folder of the photos' masks to write
    into `out_dir/masks` (returned as "masks"; transforms.json then names them). depth_tol: COLMAP multi-view
    tracks (`tracks.build_tracks`; 0: single-image tracks).
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
    managed: list[str] = ["sparse/0"] if "colmap" in formats else []
    try:
        with atomic_dir(out_dir, managed, "dataset", error=ExportError, replace=replace) as tmp:
            ds = recon
            if images is not None:
                names = copy_images(recon, images, tmp / "images", downscales)
                managed += ["images"] + [f"images_{f}" for f in downscales]
                written["images"] = tmp / "images"
                if names != list(recon.names):
                    ds = dataclasses.replace(recon, names=names)
            if masks is not None:
                written["masks"] = copy_masks(recon, masks, tmp / "masks")
                managed += ["masks"]
            for name, write in WRITERS.items():
                if name in opts.formats:
                    written[name] = write(ds, tmp, opts)
            if reconstruction:
                _save_reconstruction(ds, tmp)
                managed += ["depth", "conf"]
                written["reconstruction"] = tmp / "reconstruction.npz"
            tmp_dir = tmp
    except OSError as e:
        raise ExportError(f"writing the dataset {out_dir} failed ({e}); it was left as it was: free disk space or "
                          "choose another output folder") from e

    def final(path: Path) -> Path:  # where a path inside the temporary folder ended up
        path = Path(path)
        return out_dir / path.relative_to(tmp_dir) if path.is_relative_to(tmp_dir) else path

    return {k: final(v) for k, v in written.items()}
