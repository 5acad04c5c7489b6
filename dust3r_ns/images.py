"""Image loading and DUSt3R preprocessing (sizes 224 and 512), identical to the reference's uint8 output.

Size 512: resize so the long side is 512 (LANCZOS when shrinking, BICUBIC otherwise), then centre-crop both sides
to multiples of 16 (square images are cropped to 4:3). Size 224: resize the short side to ~224, then centre-crop a
square. Each view also records how to map pixels back to the original image:
``net = (orig + 0.5) * (sx, sy) - 0.5 - (x0, y0)`` (``transform`` = (sx, sy, x0, y0)).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
MIN_SIDE = 16


class ImageError(ValueError):
    """A file that cannot be used as an input image (one line: path, problem, fix)."""


def register_heif() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with PIL; False when the optional extra is not installed."""
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file upright (EXIF orientation applied) as RGB, or raise ImageError naming the file."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder; pass image files or a single folder")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: empty file (0 bytes); remove it or replace it with the real image")
    if path.suffix.lower() in (".heic", ".heif") and not register_heif():
        raise ImageError(f"{path}: HEIC images need the optional extra; run pip install 'dust3r_ns[heic]' "
                         "or convert the file to JPEG/PNG")
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: image too large to decode safely ({str(e).splitlines()[0][:80]}); "
                         "downscale it first") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a readable image ({type(e).__name__}: {str(e).splitlines()[0][:80]}); "
                         "remove it or re-export it as JPEG/PNG") from None
    if min(img.size) < MIN_SIDE:
        raise ImageError(f"{path}: image is {img.size[0]}x{img.size[1]} pixels, too small (< {MIN_SIDE} px); "
                         "remove it")
    return img


def _resize_long_side(img: Image.Image, long_side: int) -> Image.Image:
    S = max(img.size)
    interp = Image.LANCZOS if S > long_side else Image.BICUBIC
    new = tuple(int(round(x * long_side / S)) for x in img.size)
    return img.resize(new, interp)


def check_size(size: int) -> int:
    """The network input size: 224 or 512 (the published models)."""
    if isinstance(size, bool) or size not in (224, 512):
        raise ValueError(f"image size must be 224 or 512 (the published models' sizes), got {size!r}")
    return int(size)


def preprocess(img: Image.Image, size: int, square_ok: bool = False, label: str = "image"):
    """Reference resize + crop of an upright RGB image. Returns (cropped PIL image, transform (sx, sy, x0, y0)).

    `label` names the image in errors (its path)."""
    size = check_size(size)
    W1, H1 = img.size
    if size == 224:
        resized = _resize_long_side(img, round(size * max(W1 / H1, H1 / W1)))
    else:
        resized = _resize_long_side(img, size)
    W, H = resized.size
    cx, cy = W // 2, H // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if not square_ok and W == H:
            halfh = 3 * halfw // 4
        box = (cx - halfw, cy - halfh, cx + halfw, cy + halfh)
    if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
        raise ImageError(f"{label}: image of {W1}x{H1} pixels leaves a {box[2] - box[0]}x{box[3] - box[1]} crop "
                         f"at size {size}; its aspect ratio is too extreme, crop it first")
    transform = np.array([W / W1, H / H1, box[0], box[1]], dtype=np.float64)
    return resized.crop(box), transform


def _view(img: Image.Image, size: int, idx: int, name: str, path: str, square_ok: bool) -> dict:
    orig_size = img.size
    crop, transform = preprocess(img, size, square_ok, label=path or name)
    rgb = np.array(crop, dtype=np.uint8)
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    return dict(img=x[None], true_shape=np.int32([rgb.shape[:2]]), idx=idx, instance=str(idx), path=path,
                name=name, orig_size=np.int64(orig_size), transform=transform, rgb=rgb)


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files of a folder (by extension), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder; pass a folder of images or the image files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ImageError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                         "put the photos there or pass the files")
    return files


def load_images(paths_or_folder, size: int = 512, square_ok: bool = False, verbose: bool = False) -> list[dict]:
    """Load and preprocess images: a folder (undecodable files skipped with a warning) or a list of files (strict).

    Returns the reference view dicts (`img` (1,3,H,W) in [-1,1], `true_shape` (1,2), `idx`, `instance`) with
    `path`, `name`, `orig_size` (W,H), `transform` (sx, sy, x0, y0) and `rgb` (H,W,3 uint8).
    """
    size = check_size(size)
    if isinstance(paths_or_folder, (str, os.PathLike)) and Path(paths_or_folder).is_dir():
        files, strict = list_images(paths_or_folder), False
    else:
        files = [Path(p) for p in ([paths_or_folder] if isinstance(paths_or_folder, (str, os.PathLike))
                                   else paths_or_folder)]
        strict = True
        if not files:
            raise ImageError("no images given; pass image files or a folder of images")
    views, names = [], set()
    for path in files:
        name = path.name
        if name in names:
            raise ImageError(f"{path}: another input has the same file name {name!r}; rename one of them")
        try:
            view = _view(open_rgb(path), size, len(views), name, str(path), square_ok)
        except ImageError as e:
            if strict:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        names.add(name)
        views.append(view)
        if verbose:
            h, w = view["rgb"].shape[:2]
            print(f"loaded {path} {tuple(view['orig_size'].tolist())} -> {w}x{h}")
    if not views:
        raise ImageError(f"{paths_or_folder}: none of the {len(files)} image files could be read; see the warnings")
    return views


def images_from_arrays(arrays, size: int = 512, square_ok: bool = False) -> list[dict]:
    """Same preprocessing for in-memory uint8 (H,W,3) arrays, named image_000.png, ..."""
    size = check_size(size)
    views = []
    for i, a in enumerate(arrays):
        a = np.asarray(a)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
            raise ImageError(f"array {i}: expected uint8 (H, W, 3), got {a.dtype} {a.shape}; convert it first")
        if min(a.shape[:2]) < MIN_SIDE:
            raise ImageError(f"array {i}: image is {a.shape[1]}x{a.shape[0]} pixels, too small (< {MIN_SIDE} px); "
                             "use a larger image")
        views.append(_view(Image.fromarray(a), size, i, f"image_{i:03d}.png", "", square_ok))
    return views
