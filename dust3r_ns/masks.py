"""Per-photo masks in nerfstudio's naming: `masks/<photo stem>.png`, one channel, 0 = ignore, non-zero = use.

`read_mask` reads and checks one mask at the photo's (upright) size; `mask_to_net` maps it onto the network image
with the photo's resize/crop transform (sx, sy, x0, y0) (`images.preprocess`): the mask is box-filtered to the
resized size (round(W sx), round(H sy)) and cropped at (x0, y0), and a network pixel is used when at least half of
its footprint is; `write_mask` stores a mask as an 8-bit PNG (0 / 255, atomic).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from dust3r_ns.fileio import atomic_file

__all__ = ["MaskError", "mask_file", "read_mask", "mask_to_net", "write_mask"]


class MaskError(ValueError):
    """A mask file that is missing, unreadable or does not fit its photo (one line: path, problem, fix)."""


def mask_file(masks_dir: str | os.PathLike, image_name: str) -> Path:
    """The mask of photo `image_name`: `<masks_dir>/<stem>.png` (nerfstudio's naming)."""
    return Path(masks_dir) / f"{Path(image_name).stem}.png"


def read_mask(path: str | os.PathLike, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask (True = use the pixel) from a one-channel image of `size` (W, H), the upright photo's."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such mask; add one (one-channel PNG, 0 = ignore, same size as the photo) for "
                        "every photo or remove the masks folder")
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except Exception as e:  # PIL raises many types for bad files
        raise MaskError(f"{path}: not a readable mask image ({type(e).__name__}: {str(e)[:80]}); re-save it as a "
                        "one-channel PNG") from None
    if arr.ndim != 2:
        raise MaskError(f"{path}: mask has {arr.shape[2] if arr.ndim == 3 else arr.ndim} channels; save it as a "
                        "one-channel (greyscale) PNG, 0 = ignore (nerfstudio reads one channel only)")
    if (arr.shape[1], arr.shape[0]) != (int(size[0]), int(size[1])):
        raise MaskError(f"{path}: mask is {arr.shape[1]}x{arr.shape[0]} but its photo is {size[0]}x{size[1]} "
                        "(upright); resize the mask to the photo")
    mask = arr != 0
    if not mask.any():
        raise MaskError(f"{path}: mask ignores every pixel (all 0); mark the pixels to use with non-zero values or "
                        "drop the photo")
    return mask


def mask_to_net(mask: np.ndarray, transform: np.ndarray, net_shape: tuple[int, int]) -> np.ndarray:
    """Original-resolution bool mask -> network-resolution (h, w) bool mask with the photo's resize/crop transform
    (a network pixel is used when at least half of its footprint is)."""
    H, W = mask.shape
    sx, sy, x0, y0 = (float(t) for t in np.asarray(transform, dtype=np.float64).reshape(4))
    size = (int(round(W * sx)), int(round(H * sy)))
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    if size != (W, H):
        im = im.resize(size, Image.BOX)
    h, w = (int(s) for s in net_shape)
    x0i, y0i = int(round(x0)), int(round(y0))
    if x0i < 0 or y0i < 0 or x0i + w > size[0] or y0i + h > size[1]:
        raise MaskError(f"mask crop ({x0i}, {y0i}, {w}x{h}) lies outside the resized mask {size[0]}x{size[1]}")
    return np.asarray(im)[y0i:y0i + h, x0i:x0i + w] >= 128


def write_mask(path: str | os.PathLike, mask: np.ndarray, error: type[Exception] = MaskError) -> Path:
    """Write a bool mask as an 8-bit one-channel PNG (255 = use, 0 = ignore), atomically."""
    path = Path(path)
    img = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255, mode="L")
    with atomic_file(path, "mask", error=error) as tmp:
        img.save(tmp, format="PNG")
    return path
