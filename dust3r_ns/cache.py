"""Photos -> cached DUSt3R reconstruction, shared by `dust3r-ns reconstruct` and the nerfstudio dataparser.

`list_images` finds and checks the photos of a folder; `load_or_build` returns the `Reconstruction` for them,
reusing a cache entry keyed by the image contents, the model identity and the options that change the result
(`reconstruction_options`); `build_reconstruction` is the computation both commands run on a miss, so running
`reconstruct` and `ns-train` on the same photos with the same options computes DUSt3R once.

A cache entry is a folder ``<cache_dir>/<key[:20]>/`` holding ``manifest.json``, ``reconstruction.npz`` and, for
photos that are not upright 8-bit RGB JPEG/PNG files (EXIF rotation, palette, CMYK, 16-bit, alpha, other
formats), 8-bit RGB PNG copies of what the network saw in ``images/`` (`images.rgb_file_name`). Downscaled images
(`downscaled_files`) are added later as ``images_<f>/``. Entries are assembled in a temporary folder and swapped
into place (`fileio.atomic_dir`: the umask's permissions, atomic, a killed writer's leftovers cleaned later); on
read they are validated and rebuilt with a warning when stale or corrupt. When another process finishes the same
entry first, its entry is used.

`open_reconstruction` reads a `reconstruct`/`export` output folder (or its ``reconstruction.npz``) instead: the
reconstruction and the images in its ``images/`` folder, no network.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
import tyro

from dust3r_ns import fileio
from dust3r_ns.images import (IMAGE_EXTENSIONS, decode_rgb, downscale_size, register_heif, rgb_file_name,
                              save_downscaled, stored_as_rgb)

CACHE_KIND = "dust3r_ns.nerfstudio.cache"
CACHE_VERSION = 1
RECONSTRUCTION_FILE = "reconstruction.npz"


class SceneError(ValueError):
    """Bad input folder/photos or an unusable reconstruction for the nerfstudio dataparser."""


@dataclass(frozen=True)
class CacheConfig:
    """Where reconstructions of photo folders are cached (shared by `dust3r-ns reconstruct` and the dataparser)."""

    cache_dir: Optional[Path] = None
    """Reconstruction cache folder; None = <photos>/.dust3r_cache (or ~/.cache/dust3r_ns/nerfstudio if read-only)."""
    use_cache: bool = True
    """Reuse a cached reconstruction of the same photos, model and options (False = always recompute)."""


Cache = Annotated[CacheConfig, tyro.conf.OmitArgPrefixes]


@dataclass
class PhotoInfo:
    """One input photo: its path, upright size (W, H) and whether loaders need an 8-bit RGB copy of it."""

    path: Path
    size: tuple[int, int]
    needs_copy: bool


@dataclass
class CachedScene:
    """A reconstruction and the images its cameras describe: from the cache (`entry`, hit or miss) or from a
    reconstruction folder (`entry` = that folder)."""

    rec: Any
    image_files: list[Path]
    entry: Path
    hit: bool


def inspect_photo(path: Path) -> PhotoInfo:
    """Open and decode one photo; raise SceneError naming the file when it is not a readable image."""
    if path.suffix.lower() in (".heic", ".heif"):
        register_heif()
    try:
        as_is = stored_as_rgb(path)
        size = decode_rgb(path).size
    except Exception as e:  # PIL raises many types for bad files
        hint = " (install pillow-heif for HEIC photos)" if path.suffix.lower() in (".heic", ".heif") else ""
        raise SceneError(f"{path}: not a readable image ({type(e).__name__}: {e}){hint}; remove it from the folder "
                         "or replace it with a JPEG/PNG") from e
    return PhotoInfo(path=path, size=(int(size[0]), int(size[1])), needs_copy=not as_is)


def list_images(folder: Path, skip_unreadable: bool = False) -> list[PhotoInfo]:
    """The photos of `folder` (non-recursive, sorted, hidden files skipped), each checked; at least 2 needed.

    skip_unreadable: skip undecodable files with a warning instead of raising SceneError.
    """
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
    infos = []
    for p in photos:
        try:
            infos.append(inspect_photo(p))
        except SceneError as e:
            if not skip_unreadable:
                raise
            warnings.warn(f"skipping {e}", stacklevel=2)
    if len(infos) < 2:
        which = f"only one photo ({infos[0].path.name})" if infos else "no readable photo"
        raise SceneError(f"{folder}: {which}; DUSt3R needs at least 2 overlapping photos")
    return infos


def inspect_photos(paths: Sequence[Path]) -> list[PhotoInfo]:
    """Explicit photo files, in the given order, each checked (names must be unique)."""
    paths = [Path(p) for p in paths]
    names = [p.name for p in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SceneError(f"{dup[0]}: several inputs have this file name; rename them")
    for p in paths:
        if not p.is_file():
            raise SceneError(f"{p}: no such file; check the path")
    return [inspect_photo(p) for p in paths]


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


def reconstruction_options(network, pairs, align, points, inputs: Optional[dict] = None) -> dict[str, Any]:
    """The options that change the reconstruction (part of the cache key; device and memory budget are not);
    `inputs`: the fingerprint of known cameras and masks when used (`pipeline.inputs_fingerprint`)."""
    al = {k: v for k, v in dataclasses.asdict(align).items() if k not in ("device", "memory_limit_bytes")}
    from dust3r_ns.align.robust import SEQUENCE_RULE
    from dust3r_ns.pairs import declares_order, is_retrieval
    from dust3r_ns.retrieval import SEQUENCE_GAP, graph_key

    out = {"pairs": dataclasses.asdict(pairs), "align": al, "conf_thr": points.conf_thr, "amp": network.amp,
           "graph": graph_key(pairs.scene_graph)}
    content = not pairs.scene_graph or is_retrieval(pairs.scene_graph)
    if content:                                                     # a content graph also reads the photos' order
        out["sequence_gap"] = SEQUENCE_GAP
    if content or pairs.ordered or declares_order(pairs.scene_graph):   # (input the sequence prior may apply to)
        out["sequence_rule"] = SEQUENCE_RULE
    if inputs:
        out["inputs"] = inputs
    return out


def build_reconstruction(paths: Sequence[Path], network, pairs, align_cfg, points, label: str = "", cameras=None,
                         masks=None, photo_folder: Optional[Path] = None, store_dir: Optional[Path] = None):
    """Pair inference + global alignment of `paths` (in order), with known `cameras` and photo `masks`
    (`pipeline.align_inputs`; masks looked for in `photo_folder`); SceneError when the alignment fails.
    With `network.store` 'disk' the pair store lives in a private folder under `store_dir` (the cache folder;
    default: the working folder) and is removed after the alignment, whatever happens."""
    import torch

    from dust3r_ns.pipeline import CamerasConfig, MasksConfig, align_inputs, resolve_device, run_pairs

    network = dataclasses.replace(network, device=resolve_device(network.device))
    print(f"dust3r: reconstructing {len(paths)} photos on {network.device} (cached afterwards)", file=sys.stderr)
    tmp = None
    if network.store == "disk":
        Path(store_dir or ".").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".pairs-", dir=store_dir or "."))
    try:
        preds = run_pairs([str(p) for p in paths], network, pairs, store_path=tmp / "pairs" if tmp else None)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        rec = align_inputs(preds, align_cfg, points, cameras or CamerasConfig(), masks or MasksConfig(),
                           network.device, photo_folder=photo_folder)
    except ValueError as e:  # AlignError / ReconstructionError: unusable predictions
        raise SceneError(f"{label or 'photos'}: global alignment failed ({e}); the model's predictions for these "
                         "photos are unusable: check --model (the bundled model only knows synthetic scenes), the "
                         "photos' overlap, or try --align.mode baseline") from e
    finally:
        if tmp is not None:   # (--store disk: the pair store served this alignment only)
            shutil.rmtree(tmp, ignore_errors=True)
    del preds
    if network.device.startswith("cuda"):
        torch.cuda.empty_cache()  # give the network's memory back before splatting starts
    return rec


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


def cache_dir_for(photos: Sequence[PhotoInfo], cfg: CacheConfig) -> Path:
    """The configured cache folder, else the default one of the photos' folder (of the first photo's folder)."""
    return Path(cfg.cache_dir) if cfg.cache_dir is not None else default_cache_dir(photos[0].path.parent)


def _copy_name(path: Path) -> str:
    return rgb_file_name(path.name, as_is=False)


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
    rec = Reconstruction.load(entry / RECONSTRUCTION_FILE)  # validated; raises ReconstructionError (ValueError)
    if len(rec) != len(photos):
        raise SceneError(f"cached reconstruction has {len(rec)} images, expected {len(photos)}")
    sizes = np.array([ph.size for ph in photos], dtype=np.int64)
    if not np.array_equal(rec.orig_sizes, sizes):
        raise SceneError("cached image sizes differ from the photos")
    for ph in photos:
        if ph.needs_copy:
            copy = entry / "images" / _copy_name(ph.path)
            if not copy.is_file():
                raise SceneError(f"missing RGB copy {copy.name}")
    return rec


def _image_files(entry: Path, photos: Sequence[PhotoInfo]) -> list[Path]:
    return [entry / "images" / _copy_name(ph.path) if ph.needs_copy else ph.path for ph in photos]


def _write_entry(entry: Path, key: str, hashes: list[str], photos: Sequence[PhotoInfo], rec,
                 options: dict[str, Any], model_id: str) -> None:
    """Assemble the entry in a temporary folder and swap it into place (`fileio.atomic_dir`, umask permissions)."""
    try:
        with fileio.atomic_dir(entry, what="cache entry", error=SceneError, replace=True) as tmp:
            rec.save(tmp / RECONSTRUCTION_FILE)
            for ph in photos:
                if ph.needs_copy:
                    img = decode_rgb(ph.path)
                    if tuple(img.size) != tuple(ph.size):
                        raise SceneError(f"{ph.path}: decoded as {img.size}, expected {ph.size}; did it change?")
                    (tmp / "images").mkdir(exist_ok=True)
                    img.save(tmp / "images" / _copy_name(ph.path), format="PNG")
            manifest = {"kind": CACHE_KIND, "version": CACHE_VERSION, "key": key, "model": model_id,
                        "options": options, "images": [[ph.path.name, h, list(ph.size), ph.needs_copy]
                                                       for ph, h in zip(photos, hashes)]}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except OSError as e:
        raise SceneError(f"cannot write the cache entry {entry} ({e}); free disk space or pass --cache-dir with a "
                         "writable folder") from e


def load_or_build(photos: Sequence[PhotoInfo], cache_dir: Path, model_id: str, options: dict[str, Any],
                  build: Callable[[list[Path]], Any], use_cache: bool = True) -> CachedScene:
    """The reconstruction of `photos`, from the cache when a valid entry exists, else `build(paths)` + store.

    `build` receives the photo paths (in order) and returns a `Reconstruction` whose images are in that order.
    If another process stored the same entry while `build` ran, that entry is used (ours is dropped).
    """
    key, hashes = cache_key(photos, model_id, options)
    entry = Path(cache_dir) / key[:20]
    fileio.recover_dir(entry)
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
    if use_cache and entry.exists():  # another process finished the same entry meanwhile: use it
        try:
            theirs = _validate_entry(entry, key, photos)
            print(f"dust3r: another process stored {entry} meanwhile; using it", file=sys.stderr)
            return CachedScene(rec=theirs, image_files=_image_files(entry, photos), entry=entry, hit=True)
        except (ValueError, OSError):
            pass
    _write_entry(entry, key, hashes, photos, rec, options, model_id)
    return CachedScene(rec=rec, image_files=_image_files(entry, photos), entry=entry, hit=False)


# ---------------------------------------------------------------- reconstruction folders
def find_reconstruction(data: Path) -> Optional[Path]:
    """The `reconstruction.npz` that `data` names (the file, or a folder holding one), else None (photos)."""
    data = Path(data)
    fileio.recover_dir(data)  # an `--overwrite` killed between its renames
    if data.is_file() and data.suffix == ".npz":
        return data
    if data.is_dir() and (data / RECONSTRUCTION_FILE).is_file():
        return data / RECONSTRUCTION_FILE
    return None


def open_reconstruction(npz: Path) -> CachedScene:
    """A saved reconstruction and the images of its folder's `images/` (checked: present, 8-bit RGB, the size
    the cameras describe)."""
    from PIL import Image

    from dust3r_ns.scene import Reconstruction

    npz = Path(npz)
    try:
        rec = Reconstruction.load(npz)
    except (ValueError, OSError) as e:
        raise SceneError(f"{npz}: not a usable reconstruction ({e}); run dust3r-ns reconstruct again") from e
    folder = npz.parent
    files = [folder / "images" / name for name in rec.names]
    for f, (w, h) in zip(files, np.asarray(rec.orig_sizes)):
        if not f.is_file():
            raise SceneError(f"{f}: missing; the reconstruction's images must be in {folder / 'images'} (export "
                             f"with --images PHOTOS, or pass the photo folder as --data)")
        try:
            ok = stored_as_rgb(f)
            with Image.open(f) as im:
                size = im.size
        except Exception as e:  # PIL raises many types for bad files
            raise SceneError(f"{f}: not a readable image ({type(e).__name__}: {e}); export the dataset again") from e
        if size != (int(w), int(h)) or not ok:
            raise SceneError(f"{f}: is {size[0]}x{size[1]}{'' if ok else ' and not 8-bit RGB'} but the cameras "
                             f"describe {w}x{h} RGB; export the dataset again with dust3r-ns export --images")
    print(f"dust3r: reusing the reconstruction {npz} (no network; model/pair/align options are not used)",
          file=sys.stderr)
    return CachedScene(rec=rec, image_files=files, entry=folder, hit=True)


# ---------------------------------------------------------------- downscales
def _downscales_valid(files: Sequence[Path], sizes: Sequence[tuple[int, int]]) -> bool:
    from PIL import Image

    try:
        for f, size in zip(files, sizes):
            with Image.open(f) as im:
                if im.size != tuple(size):
                    return False
    except Exception:  # missing or unreadable: rewrite
        return False
    return True


def downscaled_masks(scene: CachedScene, mask_dir: Path, factor: int) -> list[Path]:
    """The photos' masks (`<mask_dir>/<stem>.png`) at the size of their `images_<factor>` (nearest neighbour,
    written once into `<entry>/masks_<factor>/`), so nerfstudio loads mask and image of equal size."""
    from PIL import Image

    from dust3r_ns.masks import mask_file

    full = [mask_file(mask_dir, name) for name in scene.rec.names]
    if factor == 1:
        return full
    folder = scene.entry / f"masks_{factor}"
    files = [folder / f.name for f in full]
    sizes = [downscale_size(tuple(s), factor) for s in np.asarray(scene.rec.orig_sizes)]
    if _downscales_valid(files, sizes):
        return files
    try:
        with fileio.atomic_dir(folder, what="downscaled masks", error=SceneError, replace=True) as tmp:
            for src, size in zip(full, sizes):
                with Image.open(src) as im:
                    im.convert("L").resize(size, Image.NEAREST).save(tmp / src.name, format="PNG")
    except OSError as e:
        raise SceneError(f"cannot write {folder} ({e}); make it writable, free disk space or pass "
                         "--downscale-factor 1") from e
    return files


def downscaled_files(scene: CachedScene, factor: int) -> list[Path]:
    """`<entry>/images_<factor>/<file name>` for each image of `scene` (the cache entry, or the reconstruction
    folder), written from its full-size images (decoded as the network saw them) when missing or of the wrong
    size (`images.downscale_size`)."""
    if factor == 1:
        return list(scene.image_files)
    folder = scene.entry / f"images_{factor}"
    files = [folder / f.name for f in scene.image_files]
    sizes = [downscale_size(tuple(s), factor) for s in np.asarray(scene.rec.orig_sizes)]
    if _downscales_valid(files, sizes):
        return files
    print(f"dust3r: writing {len(files)} images downscaled by {factor} to {folder}", file=sys.stderr)
    try:
        with fileio.atomic_dir(folder, what="downscaled images", error=SceneError, replace=True) as tmp:
            for src, size in zip(scene.image_files, sizes):
                f = Path(src)
                fmt = "JPEG" if f.suffix.lower() in (".jpg", ".jpeg") else "PNG"
                got = save_downscaled(decode_rgb(src), tmp / f.name, factor, fmt)
                if got != size:
                    raise SceneError(f"{src}: decoded size changed; expected {size} after downscaling by {factor}")
    except OSError as e:
        raise SceneError(f"cannot write {folder} ({e}); make it writable, free disk space or pass "
                         "--downscale-factor 1") from e
    return files
