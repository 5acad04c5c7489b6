"""Shared helpers for the exporters: the exporters' error class, Reconstruction validation, image checks.

Atomic writes come from `dust3r_ns.fileio` (with `error=ExportError`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import conventions as cv
from ..scene import Reconstruction


class ExportError(ValueError):
    """Raised for invalid inputs to an exporter or an output location that cannot be written."""


def validate_recon(recon: Reconstruction) -> int:
    """Check the fields the exporters read from a Reconstruction; return the number of images."""
    try:
        names = list(recon.names)
        sizes = np.asarray(recon.orig_sizes)
        transforms = np.asarray(recon.transforms, dtype=np.float64)
        c2w = np.asarray(recon.c2w, dtype=np.float64)
        K = np.asarray(recon.K, dtype=np.float64)
    except AttributeError as e:
        raise ExportError(f"the reconstruction lacks a field the exporters need: {e}") from e
    n = len(names)
    if n == 0:
        raise ExportError("the reconstruction has no images; nothing to export")
    checks = [
        (sizes.shape == (n, 2), f"orig_sizes must be ({n}, 2) (W, H), got {sizes.shape}"),
        (transforms.shape == (n, 4), f"transforms must be ({n}, 4), got {transforms.shape}"),
        (c2w.shape == (n, 4, 4), f"c2w must be ({n}, 4, 4), got {c2w.shape}"),
        (K.shape == (n, 3, 3), f"K must be ({n}, 3, 3), got {K.shape}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ExportError(f"invalid reconstruction: {msg}")
    if len(set(names)) != n:
        raise ExportError("invalid reconstruction: image names are not unique")
    for name in names:
        if not name or "\n" in name or name.strip() != name:
            raise ExportError(f"invalid reconstruction: unusable image name {name!r}")
    if not (np.all(np.isfinite(c2w)) and np.all(np.isfinite(K)) and np.all(np.isfinite(transforms))):
        raise ExportError("invalid reconstruction: poses, intrinsics or transforms contain NaN/inf")
    if np.any(sizes <= 0):
        raise ExportError("invalid reconstruction: orig_sizes must be positive")
    R = c2w[:, :3, :3]
    if np.max(np.abs(R @ np.swapaxes(R, 1, 2) - np.eye(3))) > 1e-5 or np.any(np.linalg.det(R) <= 0):
        raise ExportError("invalid reconstruction: c2w rotations are not orthonormal (det +1)")
    return n


def intrinsics_orig(recon: Reconstruction) -> np.ndarray:
    """(N, 3, 3) intrinsics in ORIGINAL-image pixels, package convention (top-left pixel centre at 0, 0)."""
    return cv.K_net_to_orig(np.asarray(recon.K, dtype=np.float64), np.asarray(recon.transforms, dtype=np.float64))


def get_pointcloud(
    recon: Reconstruction, conf_thr: float | None, max_points: int | None, points: tuple | None = None
) -> tuple[np.ndarray, ...]:
    """Return `points` = (xyz, rgb, src) if given, else call `recon.pointcloud` with only the options given.

    max_points=0 means no cap (passed to pointcloud as None).
    """
    if points is not None:
        if conf_thr is not None or max_points is not None:
            raise ExportError("give either points=(xyz, rgb, src) or conf_thr/max_points, not both")
        xyz, rgb, src = points
    else:
        kw: dict[str, Any] = {}
        if conf_thr is not None:
            kw["conf_thr"] = conf_thr
        if max_points is not None:
            kw["max_points"] = max_points if max_points > 0 else None
        xyz, rgb, src = recon.pointcloud(**kw)
    xyz = np.asarray(xyz)
    rgb = np.asarray(rgb)
    src = np.asarray(src)
    m = xyz.shape[0]
    if xyz.shape != (m, 3) or rgb.shape != (m, 3) or src.shape != (m, 3):
        raise ExportError(f"pointcloud() returned inconsistent shapes {xyz.shape}, {rgb.shape}, {src.shape}")
    return xyz, rgb, src


def check_images(recon: Reconstruction, images_dir: str | os.PathLike) -> None:
    """Check that every image exists in `images_dir` with the reconstruction's original size, as stored.

    COLMAP and nerfstudio read pixels as stored and ignore EXIF orientation, while the reconstruction uses the
    EXIF-oriented image, so an image whose stored size differs is rejected with the fix in the message.
    """
    from PIL import Image  # local import: only needed for this check

    images_dir = Path(images_dir)
    if not images_dir.is_dir():
        raise ExportError(f"images folder {images_dir} does not exist")
    for name, (w, h) in zip(recon.names, np.asarray(recon.orig_sizes)):
        p = images_dir / name
        if not p.is_file():
            raise ExportError(f"image {p} not found; images_dir must contain the original images under their names")
        try:
            with Image.open(p) as im:
                stored = im.size
                orient = im.getexif().get(0x0112, 1)
        except OSError as e:
            raise ExportError(f"cannot read image {p}: {e}") from e
        if tuple(stored) != (int(w), int(h)):
            hint = (
                " (the file has an EXIF rotation; save an upright copy without it, e.g. PIL.ImageOps.exif_transpose)"
                if orient not in (1, None)
                else ""
            )
            raise ExportError(f"image {p} is {stored[0]}x{stored[1]} but the reconstruction expects {w}x{h}{hint}")
        if orient not in (1, None):
            raise ExportError(
                f"image {p} has EXIF orientation {orient}, which COLMAP/nerfstudio ignore; "
                "save an upright copy without it (PIL.ImageOps.exif_transpose)"
            )
