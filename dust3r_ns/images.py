"""Image loading and DUSt3R preprocessing (sizes 224 and 512), identical to the reference's uint8 output.

Size 512: resize so the long side is 512 (LANCZOS when shrinking, BICUBIC otherwise), then centre-crop both sides
to multiples of 16 (square images are cropped to 4:3). Size 224: resize the short side to ~224, then centre-crop a
square; with ``full_frame`` (not the reference's choice) the long side is instead centre-cropped to a multiple of 16
only, so a 4:3 photo keeps 288 of its 299 columns rather than the middle 224. Each view also records how to map
pixels back to the original image:
``net = (orig + 0.5) * (sx, sy) - 0.5 - (x0, y0)`` (``transform`` = (sx, sy, x0, y0)).

Decoding (`decode_rgb`): EXIF orientation applied, then 8-bit RGB: 16/32-bit integer greyscale is scaled by
255/65535 (``round(v / 257)``, so 16-bit white stays white), float greyscale in [0, 1] by 255, every other mode by
PIL's conversion (palette, CMYK, grey with or without alpha; alpha is dropped). Dataset copies (`rgb_file_name`,
`stored_as_rgb`) hold exactly these pixels: a file is copied byte for byte only when it is an upright 8-bit RGB
JPEG/PNG, every other one is saved as an RGB PNG named `<name>.png`. Downscales (`downscale_size`,
`auto_downscale`, `save_downscaled`) follow nerfstudio: folder `images_<f>`, size floor(W / f) x floor(H / f),
automatic f = the smallest power of 2 that brings the long side to at most 1600 px.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
MIN_SIDE = 16
MAX_AUTO_RESOLUTION = 1600
"""nerfstudio's automatic downscale brings the long side of the photos to at most this many pixels."""
DOWNSCALES = (2, 4, 8)
"""The downscaled copies a dataset export writes (`images_2`, `images_4`, `images_8`), as `ns-process-data`."""


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


def to_rgb8(im: Image.Image) -> Image.Image:
    """An image of any PIL mode as 8-bit RGB (high-bit-depth greyscale scaled, not clipped; alpha dropped)."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I (16-bit PNG/TIFF greyscale decode to these)
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8), "L").convert("RGB")
    return im.convert("RGB")


def _is_8bit_rgb_file(im: Image.Image) -> bool:
    """True for a JPEG/PNG that every loader decodes as the same 8-bit RGB array (call before `load`)."""
    raw = [str(t[3]) for t in getattr(im, "tile", ()) or ()]  # read first: getexif() loads a PNG
    if any("16" in r for r in raw):  # 16-bit PNG ("RGB;16B"): other loaders return uint16
        return False
    if im.format not in ("JPEG", "PNG") or im.mode != "RGB" or getattr(im, "n_frames", 1) != 1:
        return False
    return im.getexif().get(0x0112, 1) in (None, 1)


def stored_as_rgb(path: str | os.PathLike) -> bool:
    """Whether the file's stored pixels are what `decode_rgb` returns, in a format every loader reads alike."""
    with Image.open(path) as im:
        return _is_8bit_rgb_file(im)


def rgb_file_name(name: str, as_is: bool) -> str:
    """File name of an image's dataset copy: `name` for a byte copy (`as_is`) or a .png file, else `<name>.png`."""
    return name if as_is or name.lower().endswith(".png") else f"{name}.png"


def downscale_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """nerfstudio's downscaled size (floor rounding): (W // factor, H // factor), at least 1 pixel."""
    return max(1, int(size[0]) // int(factor)), max(1, int(size[1]) // int(factor))


def auto_downscale(sizes, max_res: int = MAX_AUTO_RESOLUTION) -> int:
    """nerfstudio's automatic choice: the smallest power of 2 that brings the longest side to <= max_res."""
    long_side = max(max(int(w), int(h)) for w, h in sizes)
    f = 1
    while long_side / f > max_res:
        f *= 2
    return f


def save_rgb(img: Image.Image, path: str | os.PathLike, fmt: str | None = None) -> None:
    """Save an RGB image: JPEG (quality 95) for .jpg/.jpeg names, else PNG, unless `fmt` says."""
    fmt = fmt or ("JPEG" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "PNG")
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def save_downscaled(img: Image.Image, path: str | os.PathLike, factor: int, fmt: str | None = None) -> tuple[int, int]:
    """Save `img` (8-bit RGB) reduced by `factor` to `downscale_size` (Lanczos) at `path`; return the size."""
    size = downscale_size(img.size, factor)
    save_rgb(img.resize(size, Image.LANCZOS), path, fmt)
    return size


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image file upright (EXIF orientation applied) as 8-bit RGB (`to_rgb8`); PIL's errors pass."""
    path = Path(path)
    if path.suffix.lower() in (".heic", ".heif"):
        register_heif()
    with Image.open(path) as im:
        im.load()
        return to_rgb8(ImageOps.exif_transpose(im))


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image file upright (EXIF orientation applied) as 8-bit RGB (`decode_rgb`), or raise ImageError
    naming the file."""
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
        img = decode_rgb(path)
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


def preprocess(img: Image.Image, size: int, square_ok: bool = False, label: str = "image", full_frame: bool = False):
    """Reference resize + crop of an upright RGB image. Returns (cropped PIL image, transform (sx, sy, x0, y0)).

    `full_frame` (size 224 only): both sides centre-cropped to multiples of 16 instead of the square crop (module
    doc). `label` names the image in errors (its path)."""
    size = check_size(size)
    W1, H1 = img.size
    if size == 224:
        resized = _resize_long_side(img, round(size * max(W1 / H1, H1 / W1)))
    else:
        resized = _resize_long_side(img, size)
    W, H = resized.size
    cx, cy = W // 2, H // 2
    if size == 224 and not full_frame:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if size == 512 and not square_ok and W == H:
            halfh = 3 * halfw // 4
        box = (cx - halfw, cy - halfh, cx + halfw, cy + halfh)
    if box[2] - box[0] < MIN_SIDE or box[3] - box[1] < MIN_SIDE:
        raise ImageError(f"{label}: image of {W1}x{H1} pixels leaves a {box[2] - box[0]}x{box[3] - box[1]} crop "
                         f"at size {size}; its aspect ratio is too extreme, crop it first")
    transform = np.array([W / W1, H / H1, box[0], box[1]], dtype=np.float64)
    return resized.crop(box), transform


@dataclass(frozen=True, eq=False)
class ImageInfo:
    """What the pipeline keeps of one input image after preprocessing: its name and file, the original (upright)
    size, the resize/crop transform from original to network pixels and the network-resolution colours."""

    name: str
    path: str                   # "" for in-memory images
    orig_size: tuple[int, int]  # (W, H) of the upright original
    transform: np.ndarray       # [4] float64 (sx, sy, x0, y0): net = (orig + 0.5) * (sx, sy) - 0.5 - (x0, y0)
    rgb: np.ndarray             # [H, W, 3] uint8 at network resolution

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) at network resolution."""
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@dataclass(eq=False)
class View:
    """One network input: image `idx` of a run, its normalised tensor and its `ImageInfo`."""

    idx: int
    img: torch.Tensor           # [1, 3, H, W] float32 in [-1, 1]
    info: ImageInfo

    @property
    def true_shape(self) -> np.ndarray:
        """[1, 2] int32 (H, W), as the reference's views carry it."""
        return np.int32([self.img.shape[-2:]])

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def path(self) -> str:
        return self.info.path

    @property
    def rgb(self) -> np.ndarray:
        return self.info.rgb

    @property
    def orig_size(self) -> tuple[int, int]:
        return self.info.orig_size

    @property
    def transform(self) -> np.ndarray:
        return self.info.transform

    def to_reference(self) -> dict:
        """The reference implementation's view dict (`img`, `true_shape`, `idx`, `instance`)."""
        return dict(img=self.img, true_shape=self.true_shape, idx=self.idx, instance=str(self.idx))


def normalize(rgb: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [1, 3, H, W] float32 network input (x / 255 - 0.5) / 0.5, as the reference."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]


def make_view(idx: int, rgb: np.ndarray | None = None, img: torch.Tensor | None = None, name: str | None = None,
              path: str = "", orig_size: tuple[int, int] | None = None, transform: np.ndarray | None = None) -> View:
    """The one place a `View` is built: from network-resolution colours `rgb` [H, W, 3] uint8 (the tensor is their
    normalisation) or from a ready tensor `img` [1, 3, H, W] in [-1, 1] (the colours are its de-normalisation).
    Without `orig_size`/`transform` the original image is the network image (identity transform)."""
    if rgb is None and img is None:
        raise ImageError(f"view {idx}: give the colours (rgb) or the network tensor (img)")
    if img is None:
        img = normalize(rgb)
    img = img.reshape(1, *img.shape[-3:])
    if rgb is None:
        rgb = ((img[0].detach().float().cpu().permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    H, W = rgb.shape[:2]
    if tuple(img.shape[-2:]) != (H, W):
        raise ImageError(f"view {idx}: colours {rgb.shape[:2]} and tensor {tuple(img.shape[-2:])} differ in size")
    info = ImageInfo(name=f"image_{idx:04d}" if name is None else str(name), path=str(path),
                     orig_size=(W, H) if orig_size is None else (int(orig_size[0]), int(orig_size[1])),
                     transform=np.array([1.0, 1.0, 0.0, 0.0]) if transform is None
                     else np.asarray(transform, dtype=np.float64).reshape(4),
                     rgb=rgb)
    return View(idx=int(idx), img=img, info=info)


def _view(img: Image.Image, size: int, idx: int, name: str, path: str, square_ok: bool, full_frame: bool) -> View:
    orig_size = img.size
    crop, transform = preprocess(img, size, square_ok, label=path or name, full_frame=full_frame)
    return make_view(idx, rgb=np.array(crop, dtype=np.uint8), name=name, path=path, orig_size=orig_size,
                     transform=transform)


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


def load_images(paths_or_folder, size: int = 512, square_ok: bool = False, verbose: bool = False,
                full_frame: bool = False) -> list[View]:
    """Load and preprocess images: a folder (undecodable files skipped with a warning) or a list of files (strict);
    `square_ok`, `full_frame`: `preprocess`.

    Returns one `View` per image, indexed 0..N-1 in input order (a folder: sorted by name).
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
            view = _view(open_rgb(path), size, len(views), name, str(path), square_ok, full_frame)
        except ImageError as e:
            if strict:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
            continue
        names.add(name)
        views.append(view)
        if verbose:
            h, w = view.info.shape
            print(f"loaded {path} {view.orig_size} -> {w}x{h}")
    if not views:
        raise ImageError(f"{paths_or_folder}: none of the {len(files)} image files could be read; see the warnings")
    return views


def images_from_arrays(arrays, size: int = 512, square_ok: bool = False, full_frame: bool = False) -> list[View]:
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
        views.append(_view(Image.fromarray(a), size, i, f"image_{i:03d}.png", "", square_ok, full_frame))
    return views
