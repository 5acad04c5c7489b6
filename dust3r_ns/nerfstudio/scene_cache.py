"""Photos folder -> cached DUSt3R reconstruction for the nerfstudio dataparser (no nerfstudio imports here).

`list_images` finds and checks the photos of a folder; `load_or_build` returns the `Reconstruction` for them,
reusing a cache entry keyed by the image contents, the model identity and the options that change the result.
A cache entry is a folder ``<cache_dir>/<key[:20]>/`` holding ``manifest.json``, ``reconstruction.npz`` and, for
photos nerfstudio cannot load as they are (EXIF rotation, unusual modes or formats), upright 8-bit PNG copies in
``images/``. Entries are assembled in a temporary folder and renamed into place (atomic); on read they are
validated and rebuilt with a warning when stale or corrupt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from dust3r_ns.fileio import default_permissions
from dust3r_ns.images import IMAGE_EXTENSIONS, register_heif

CACHE_KIND = "dust3r_ns.nerfstudio.cache"
CACHE_VERSION = 1
# what nerfstudio's loader (PIL, no EXIF handling, np.uint8 cast) reads correctly as it is
_NS_FORMATS = ("JPEG", "PNG")
_NS_MODES = ("RGB", "RGBA", "L")


class SceneError(ValueError):
    """Bad input folder/photos or an unusable reconstruction for the nerfstudio dataparser."""


@dataclass
class PhotoInfo:
    """One input photo: its path, upright size (W, H) and whether nerfstudio needs an upright 8-bit copy."""

    path: Path
    size: tuple[int, int]
    needs_copy: bool


@dataclass
class CachedScene:
    """Result of `load_or_build`: the reconstruction, the files nerfstudio should load, the entry, hit or miss."""

    rec: Any
    image_files: list[Path]
    entry: Path
    hit: bool


def inspect_photo(path: Path) -> PhotoInfo:
    """Open and decode one photo; raise SceneError naming the file when it is not a readable image."""
    from PIL import Image, ImageOps

    if path.suffix.lower() in (".heic", ".heif"):
        register_heif()
    try:
        with Image.open(path) as im:
            im.load()
            orient = im.getexif().get(0x0112, 1)
            size = ImageOps.exif_transpose(im).size if orient not in (None, 1) else im.size
            needs = orient not in (None, 1) or im.format not in _NS_FORMATS or im.mode not in _NS_MODES
    except Exception as e:  # PIL raises many types for bad files
        hint = " (install pillow-heif for HEIC photos)" if path.suffix.lower() in (".heic", ".heif") else ""
        raise SceneError(f"{path}: not a readable image ({type(e).__name__}: {e}){hint}; remove it from the folder "
                         "or replace it with a JPEG/PNG") from e
    return PhotoInfo(path=path, size=(int(size[0]), int(size[1])), needs_copy=bool(needs))


def list_images(folder: Path) -> list[PhotoInfo]:
    """The photos of `folder` (non-recursive, sorted, hidden files skipped), each checked; at least 2 needed."""
    folder = Path(folder)
    if not folder.exists():
        raise SceneError(f"{folder}: no such folder; pass --data with a folder of photos")
    if not folder.is_dir():
        raise SceneError(f"{folder}: --data must be a folder of photos, not a file")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    photos = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not photos:
        what = f"only {len(files)} non-image file(s) such as {files[0].name}" if files else "nothing"
        raise SceneError(f"{folder}: no photos found ({what}); put at least 2 images "
                         f"({', '.join(sorted(IMAGE_EXTENSIONS))}) in the folder")
    if len(photos) < 2:
        raise SceneError(f"{folder}: only one photo ({photos[0].name}); DUSt3R needs at least 2 overlapping photos")
    return [inspect_photo(p) for p in photos]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_identity(model: str) -> str:
    """A string that changes when the model changes: path + size + mtime of local files, else the hub name."""
    p = Path(model).expanduser()
    if p.is_file():
        st = p.stat()
        return f"file:{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    if p.is_dir():
        parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(p.iterdir()) if f.is_file()]
        return f"dir:{p.resolve()}:" + ",".join(parts)
    return f"hub:{model}"


def cache_key(photos: Sequence[PhotoInfo], model_id: str, options: dict[str, Any]) -> tuple[str, list[str]]:
    """(sha256 key, per-image content hashes) over image names + contents, model identity and options."""
    hashes = [_file_sha256(ph.path) for ph in photos]
    payload = {"kind": CACHE_KIND, "version": CACHE_VERSION, "model": model_id, "options": options,
               "images": [[ph.path.name, h] for ph, h in zip(photos, hashes)]}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return key, hashes


def default_cache_dir(data: Path) -> Path:
    """``<data>/.dust3r_cache`` when the photo folder is writable, else ``$XDG_CACHE_HOME/dust3r_ns/nerfstudio``."""
    data = Path(data)
    if os.access(data, os.W_OK | os.X_OK):
        return data / ".dust3r_cache"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dust3r_ns" / "nerfstudio"


def _copy_name(path: Path) -> str:
    return f"{path.name}.png"


def _write_upright_copy(src: Path, dst: Path) -> tuple[int, int]:
    from PIL import Image, ImageOps

    if src.suffix.lower() in (".heic", ".heif"):
        register_heif()
    with Image.open(src) as im:
        up = ImageOps.exif_transpose(im)
        keep_alpha = up.mode in ("RGBA", "LA", "PA") or (up.mode == "P" and "transparency" in up.info)
        up = up.convert("RGBA" if keep_alpha else "RGB")
        up.save(dst, format="PNG")
        return up.size


def _read_manifest(entry: Path) -> dict:
    try:
        man = json.loads((entry / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SceneError(f"unreadable manifest.json ({e})") from e
    if not isinstance(man, dict) or man.get("kind") != CACHE_KIND or man.get("version") != CACHE_VERSION:
        raise SceneError("manifest.json has a different kind/version")
    return man


def _validate_entry(entry: Path, key: str, photos: Sequence[PhotoInfo]):
    """Return the cached Reconstruction if `entry` is complete and matches; raise SceneError otherwise."""
    from dust3r_ns.scene import Reconstruction

    man = _read_manifest(entry)
    if man.get("key") != key:
        raise SceneError("manifest key does not match the photos/model/options")
    rec = Reconstruction.load(entry / "reconstruction.npz")  # validated; raises ReconstructionError (ValueError)
    if len(rec) != len(photos):
        raise SceneError(f"cached reconstruction has {len(rec)} images, expected {len(photos)}")
    sizes = np.array([ph.size for ph in photos], dtype=np.int64)
    if not np.array_equal(rec.orig_sizes, sizes):
        raise SceneError("cached image sizes differ from the photos")
    for ph in photos:
        if ph.needs_copy:
            copy = entry / "images" / _copy_name(ph.path)
            if not copy.is_file():
                raise SceneError(f"missing upright copy {copy.name}")
    return rec


def _image_files(entry: Path, photos: Sequence[PhotoInfo]) -> list[Path]:
    return [entry / "images" / _copy_name(ph.path) if ph.needs_copy else ph.path for ph in photos]


def _write_entry(root: Path, entry: Path, key: str, hashes: list[str], photos: Sequence[PhotoInfo], rec,
                 options: dict[str, Any], model_id: str) -> None:
    """Assemble the entry in a temporary folder next to it and rename it into place.

    The entry's files are written inside the temporary folder (the reconstruction with `fileio.atomic_file`), which
    then gets the permissions the umask gives new folders and files (`fileio.default_permissions`); an existing
    entry is moved aside, replaced in one rename, then deleted.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".tmp", dir=root))
    except OSError as e:
        raise SceneError(f"cannot write the cache in {root} ({e}); pass --cache-dir with a writable folder") from e
    trash: Optional[Path] = None
    try:
        rec.save(tmp / "reconstruction.npz")
        if any(ph.needs_copy for ph in photos):
            (tmp / "images").mkdir()
        for ph in photos:
            if ph.needs_copy:
                size = _write_upright_copy(ph.path, tmp / "images" / _copy_name(ph.path))
                if tuple(size) != tuple(ph.size):
                    raise SceneError(f"{ph.path}: upright copy is {size}, expected {ph.size}")
        manifest = {"kind": CACHE_KIND, "version": CACHE_VERSION, "key": key, "model": model_id,
                    "options": options, "images": [[ph.path.name, h, list(ph.size), ph.needs_copy]
                                                   for ph, h in zip(photos, hashes)]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))  # written last: marks completeness
        default_permissions(tmp)
        if entry.exists():
            trash = root / f".{entry.name}.old{os.getpid()}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(entry, trash)
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


def load_or_build(photos: Sequence[PhotoInfo], cache_dir: Path, model_id: str, options: dict[str, Any],
                  build: Callable[[list[Path]], Any], use_cache: bool = True) -> CachedScene:
    """The reconstruction of `photos`, from the cache when a valid entry exists, else `build(paths)` + store.

    `build` receives the photo paths (in order) and returns a `Reconstruction` whose images are in that order.
    """
    key, hashes = cache_key(photos, model_id, options)
    root = Path(cache_dir)
    entry = root / key[:20]
    if use_cache and entry.exists():
        try:
            rec = _validate_entry(entry, key, photos)
            print(f"dust3r: reusing cached reconstruction {entry}", file=sys.stderr)
            return CachedScene(rec=rec, image_files=_image_files(entry, photos), entry=entry, hit=True)
        except (ValueError, OSError) as e:  # SceneError, ReconstructionError, broken files
            warnings.warn(f"dust3r cache entry {entry} is unusable ({e}); recomputing the reconstruction",
                          stacklevel=2)
    rec = build([ph.path for ph in photos])
    if len(rec) != len(photos):
        raise SceneError(f"the reconstruction has {len(rec)} images for {len(photos)} photos")
    sizes = np.array([ph.size for ph in photos], dtype=np.int64)
    if not np.array_equal(np.asarray(rec.orig_sizes), sizes):
        raise SceneError(f"reconstruction image sizes {np.asarray(rec.orig_sizes).tolist()} differ from the upright "
                         f"photo sizes {sizes.tolist()}")
    _write_entry(root, entry, key, hashes, photos, rec, options, model_id)
    return CachedScene(rec=rec, image_files=_image_files(entry, photos), entry=entry, hit=False)
