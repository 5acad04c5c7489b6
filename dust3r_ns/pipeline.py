"""The job every entry point runs: photos -> views -> pair graph -> `PairPredictions` -> `Reconstruction`.

The options are declared here once, as small frozen dataclasses that the CLI subcommands, `reconstruct` and the
nerfstudio dataparser embed: `NetworkConfig` (which checkpoint, where, how), `PairsConfig` (preprocessing size and
pair graph), `align.AlignConfig` (the aligner), `PointsConfig` (which points count as the reconstruction's),
`CamerasConfig` (known intrinsics / poses) and `MasksConfig` (per-photo masks).
The functions below are the steps, each usable alone; `reconstruct_images` chains them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence

import numpy as np
import torch
import tyro

from dust3r_ns import distributed
from dust3r_ns.align import AlignConfig, global_align
from dust3r_ns import conventions as cv
from dust3r_ns.export.bundle import bundle_adjust
from dust3r_ns.export.colmap import read_colmap
from dust3r_ns.export.nerfstudio_json import read_transforms_json
from dust3r_ns.export.tracks import TracksConfig, build_tracks
from dust3r_ns.images import ImageInfo, View, list_images, load_images
from dust3r_ns.inference import inference_graph
from dust3r_ns.masks import MaskError, mask_file, mask_to_net, read_mask
from dust3r_ns.model.checkpoint import load_model
from dust3r_ns.pairs import default_scene_graph
from dust3r_ns.predictions import STORE_DTYPES, PairPredictions
from dust3r_ns.scene import Reconstruction
from dust3r_ns.video import VideoConfig, frames_folder, is_video

DEFAULT_WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class NetworkConfig:
    """Which DUSt3R checkpoint runs, where and how."""

    model: Optional[str] = None
    """Checkpoint: .pth, Hugging Face folder, or hub name; None: the bundled model (synthetic scenes only)."""
    device: Optional[str] = None
    """Torch device of the network; None: cuda when available, else cpu."""
    batch_size: int = 8
    """Pairs per decoder batch (bounds memory)."""
    amp: Optional[Literal["bf16", "fp16"]] = None
    """Mixed precision for encoder and decoder (heads stay float32); None: float32."""
    store: Literal["float32", "float16", "disk"] = "float32"
    """Storage of the pair predictions: float16 halves their memory and files (align them with --align.dtype
    float16 to keep it halved); disk writes them (float16) into a pair store folder as they are decoded and the
    alignment streams them from there (for more pairs than memory holds; fast mode on the CPU)."""


@dataclass(frozen=True)
class PairsConfig:
    """How photos become network inputs and which pairs the network sees."""

    image_size: Annotated[Optional[int], tyro.conf.arg(aliases=("--size",))] = None
    """Network image size (224 or 512); None: from the model."""
    full_frame: bool = False
    """At size 224, feed the whole frame (short side 224, long side cropped to a multiple of 16) instead of the
    reference's centre square, which leaves a 4:3 photo's outer quarter out of the poses and the points."""
    scene_graph: Optional[str] = None
    """complete, swin-k, logwin-k, oneref-k (+ -noncyclic); None: chosen from the number of images."""
    ordered: bool = False
    """The photos are frames of one sequence in file-name order (frames extracted from a video): the default graph
    adds a sequential window and the alignment trusts neighbouring frames more (a video file always is; so is the
    input of a swin/logwin scene graph)."""


@dataclass(frozen=True)
class PointsConfig:
    """Which reconstructed pixels become the point cloud (exports, splat seeds)."""

    conf_thr: float = 3.0
    """Confidence threshold of the points."""
    max_points: int = 100_000
    """Point cap (voxel down-sampling keeps the most confident point per voxel); 0: no cap."""

    def __post_init__(self) -> None:
        if self.max_points < 0:
            raise ValueError(f"max_points must be >= 0 (0 = no cap), got {self.max_points}")
        if not math.isfinite(self.conf_thr):
            raise ValueError(f"conf_thr must be a finite number (confidences are >= 1), got {self.conf_thr}")


# Embedded in command configs: network, pair and point options keep their short flags (--model, --size, ...);
# alignment options are --align.NAME (with the older spellings --align-mode, --niter, ... as aliases).
Network = Annotated[NetworkConfig, tyro.conf.OmitArgPrefixes]
Pairs = Annotated[PairsConfig, tyro.conf.OmitArgPrefixes]
Points = Annotated[PointsConfig, tyro.conf.OmitArgPrefixes]
Video = Annotated[VideoConfig, tyro.conf.OmitArgPrefixes]


REAL_MODEL = "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt"
REAL_MODEL_CLI = f"dust3r-ns reconstruct photos/ --model {REAL_MODEL}"
"""The command lines the bundled-model note shows (tests/test_docs.py parses them)."""
REAL_MODEL_NS = f"ns-train dust3r-splatfacto --data photos/ dust3r --model {REAL_MODEL}"


def default_model_source() -> str:
    """The bundled model (trained on synthetic scenes only), with a note saying so."""
    found = sorted(p for p in DEFAULT_WEIGHTS.glob("*") if (p / "config.json").exists())
    if not found:
        raise ValueError("no model given and no bundled model installed; pass --model with a .pth file, a Hugging "
                         "Face folder (config.json + model.safetensors) or a hub name such as "
                         "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    print(f"note: using the bundled model {found[0].name}: it only knows synthetic scenes; for real photos pass "
          f"an official checkpoint (a hub name, a downloaded .pth or a Hugging Face folder), e.g. `{REAL_MODEL_CLI}` "
          f"or `{REAL_MODEL_NS}`", file=sys.stderr)
    return str(found[0])


def check_device(device: Optional[str], flag: str = "--device") -> None:
    """Refuse a device this machine cannot run (ValueError naming `flag`): unknown names, CUDA without a usable GPU,
    a CUDA index past the GPU count, MPS where it is absent. None (automatic choice) always passes."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{flag} {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: no CUDA GPU is available to torch here; pass {flag} cpu or leave "
                             f"{flag} out (automatic: cuda when available, else cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); choose one of them")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"{flag} {device}: MPS is not available here; pass {flag} cpu or leave {flag} out")
    elif dev.type != "cpu":
        raise ValueError(f"{flag} {device}: unsupported device type {dev.type!r}; use cpu, cuda or cuda:N")


def resolve_device(device: Optional[str], flag: str = "--device") -> str:
    """The device to use: as given (checked by `check_device`), or cuda when available, else cpu."""
    check_device(device, flag)
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


BAD_NAME_CHARS = {chr(c) for c in range(32)} | {chr(127)}
"""Characters no exported file name may hold: control characters (a newline or tab splits COLMAP's `images.txt`
records; transforms.json and the cache manifest would carry them into paths)."""


def image_files(images: Sequence[str | Path] | str | Path) -> list[Path]:
    """The image files the pipeline will read: the listed files, or the images of one folder (by extension)."""
    if isinstance(images, (str, Path)):
        images = [images]
    images = [Path(p) for p in images]
    return list_images(images[0]) if len(images) == 1 and images[0].is_dir() else images


def check_image_names(images: Sequence[str | Path] | str | Path) -> list[Path]:
    """Refuse, before any computation, image files whose names cannot be exported (control characters such as
    a newline); returns the files (see `image_files`)."""
    files = image_files(images)
    for f in files:
        if BAD_NAME_CHARS & set(f.name):
            raise ValueError(f"{f.parent / repr(f.name)[1:-1]}: the file name holds a control character "
                             f"({repr(f.name)}), which COLMAP and transforms.json cannot store; rename the file")
    return files


def image_size_of(net: torch.nn.Module) -> int:
    """Preprocessing size implied by the model: 224 for 224 models, else 512."""
    size = net.config["img_size"]
    side = max(size) if isinstance(size, (tuple, list)) else int(size)
    return 224 if side <= 224 else 512


def one_input(images: Sequence[str | Path] | str | Path) -> Sequence[str | Path] | str | Path:
    """A list of one path as that path (a folder or a video clip), else `images` as given."""
    if not isinstance(images, (str, Path)):
        images = list(images)
        if len(images) == 1:
            return images[0]
    return images


def ordered_input(images: Sequence[str | Path] | str | Path, pairs: PairsConfig) -> bool:
    """True when the images are frames of one sequence: one video clip, or `pairs.ordered`."""
    one = one_input(images)
    return pairs.ordered or (isinstance(one, (str, Path)) and is_video(one))


def load_views(images: Sequence[str | Path] | str | Path, pairs: PairsConfig, net: torch.nn.Module,
               video: VideoConfig = VideoConfig()) -> list[View]:
    """Preprocessed views of image files, of one folder, or of one video clip's sampled frames (`video`), at the
    configured size (default: the model's)."""
    images = one_input(images)
    if isinstance(images, (str, Path)) and is_video(images):
        images = frames_folder(images, video)
    return load_images(images, size=pairs.image_size or image_size_of(net), full_frame=pairs.full_frame)


def run_pairs(images, network: NetworkConfig = NetworkConfig(), pairs: PairsConfig = PairsConfig(),
              verbose: bool = True, video: VideoConfig = VideoConfig(), shard_dir: str | Path | None = None,
              store_path: str | Path | None = None) -> Optional[PairPredictions]:
    """Load the model and the images (or a clip's frames), build the pair graph and run the engine on every pair.

    Under torchrun (WORLD_SIZE > 1) the pairs are sharded over the ranks (`distributed.sharded_inference`, shards
    in `shard_dir`, default `.dust3r_shards` in the working folder): rank 0 returns the predictions, the others
    None. With `network.store` 'disk' the predictions go into a pair store folder at `store_path` (default
    `.dust3r_pairs` in the working folder; replaced when it exists)."""
    check_image_names(images)
    rank, size = distributed.world()
    device = distributed.rank_device(resolve_device(network.device))
    net = load_model(network.model or default_model_source(), device=device)
    views = load_views(images, pairs, net, video)
    ordered = ordered_input(images, pairs)
    graph = pairs.scene_graph or default_scene_graph(len(views), ordered)
    on_disk = network.store == "disk"
    store_dtype = torch.float16 if on_disk else STORE_DTYPES[network.store]
    if size > 1:
        if on_disk:
            raise ValueError("--store disk is not available under torchrun; use float16")
        preds = distributed.sharded_inference(views, net, graph, shard_dir or ".dust3r_shards", device=device,
                                              batch_size=network.batch_size, amp=network.amp, verbose=verbose,
                                              store_dtype=store_dtype, ordered=ordered)
    else:
        preds = inference_graph(views, net, graph, device=device, batch_size=network.batch_size, amp=network.amp,
                                verbose=verbose, store_dtype=store_dtype,
                                store_path=(store_path or ".dust3r_pairs") if on_disk else None, ordered=ordered)
    if verbose and preds is not None:
        print(f"{len(views)} {'frames in sequence' if preds.ordered else 'images'}, scene graph {graph}: "
              f"{preds.n_edges} ordered pairs"
              + (f" on {size} processes" if size > 1 else ""), file=sys.stderr)
    return preds


def align(preds: PairPredictions, cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
          device: Optional[str] = None, verbose: bool = True, known_K=None, known_c2w=None) -> Reconstruction:
    """Global alignment of the predictions (known intrinsics in original-image pixels and known poses fixed, see
    `global_align`); the aligner's device defaults to `device` (the network's). Warns when no point survives
    `points.conf_thr`."""
    check_device(cfg.device, "--align.device")
    cfg = cfg.replace(device=cfg.device or resolve_device(device))
    rec = global_align(preds, cfg, known_K=known_K, K_space="orig", known_c2w=known_c2w, conf_thr=points.conf_thr,
                       verbose=verbose)
    warn_empty_points(rec, points.conf_thr)
    return rec


def warn_empty_points(rec: Reconstruction, conf_thr: float) -> int:
    """Print a warning on stderr when no pixel of `rec` has confidence above `conf_thr` (the point cloud would be
    empty); returns the number of such pixels."""
    kept = sum(int(m.sum()) for m in rec.masks(conf_thr))
    if kept == 0:
        top = max((float(c.max()) for c in rec.confs if c.size), default=float("nan"))
        print(f"warning: no reconstructed pixel has confidence above --conf-thr {conf_thr:g} (the highest is "
              f"{top:.3g}): the point cloud is empty; lower --conf-thr (cameras and depth maps are kept)",
              file=sys.stderr)
    return kept


def reconstruct_images(images, network: NetworkConfig = NetworkConfig(), pairs: PairsConfig = PairsConfig(),
                       align_cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
                       verbose: bool = True, video: VideoConfig = VideoConfig()
                       ) -> tuple[PairPredictions, Reconstruction]:
    """Photos (or a video clip) -> (pair predictions, reconstruction)."""
    preds = run_pairs(images, network, pairs, verbose, video)
    return preds, align(preds, align_cfg, points, network.device, verbose)


# ---------------------------------------------------------------------------------------------- known cameras, masks
@dataclass(frozen=True)
class CamerasConfig:
    """Known cameras, fixed during the alignment (the rest are estimated)."""

    focal: Optional[float] = None
    """Known focal length in original-image pixels, shared by all photos (principal point at the image centre)."""
    cameras: Optional[Path] = None
    """Known cameras matched to the photos by file name: a COLMAP model (folder or one of its files), a nerfstudio
    transforms.json, or a cameras.json (images, c2w OpenCV camera-to-world, K, width, height)."""
    cameras_fix: Literal["all", "intrinsics", "poses"] = "all"
    """What the cameras file fixes: intrinsics and poses, intrinsics only, or poses only (--focal overrides its
    intrinsics)."""

    def __post_init__(self) -> None:
        if self.focal is not None and not self.focal > 0:
            raise ValueError(f"--focal must be a positive focal length in pixels, got {self.focal}")


@dataclass(frozen=True)
class MasksConfig:
    """Per-photo masks (nerfstudio naming: masks/<photo stem>.png, one channel, 0 = ignore)."""

    masks: Optional[Path] = None
    """Mask folder; None: a masks/ folder inside the photo folder, or beside it when the photos are in images/."""
    use_masks: bool = True
    """Use the masks (False: ignore a masks/ folder): masked pixels get no weight in the alignment and no points."""


Cameras = Annotated[CamerasConfig, tyro.conf.OmitArgPrefixes]
Masks = Annotated[MasksConfig, tyro.conf.OmitArgPrefixes]


def read_cameras_file(path: str | Path) -> dict[str, Any]:
    """Cameras of a COLMAP model, a nerfstudio transforms.json or a cameras.json, in package conventions.

    Returns dict(names list[str] (file names), c2w (N,4,4) OpenCV camera-to-world, K_orig (N,3,3) package pixels,
    sizes (N,2) (W,H) or None when the file gives none)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"--cameras {path}: no such file or folder; pass a COLMAP model folder, a transforms.json "
                         "or a cameras.json")
    colmap_dir = path if path.is_dir() else path.parent if path.stem in ("cameras", "images", "points3D") \
        and path.suffix in (".bin", ".txt") else None
    if colmap_dir is not None:
        c = read_colmap(colmap_dir)
        return dict(names=[Path(n).name for n in c["names"]], c2w=c["c2w"], K_orig=c["K_orig"], sizes=c["sizes"])
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"--cameras {path}: not a COLMAP model or a readable JSON file ({e})") from None
    if isinstance(meta, dict) and "frames" in meta:
        t = read_transforms_json(path)
        return dict(names=[Path(n).name for n in t["file_paths"]], c2w=t["c2w"], K_orig=t["K_orig"], sizes=t["sizes"])
    try:
        names = [Path(str(n)).name for n in meta["images"]]
        c2w = np.asarray(meta["c2w"], dtype=np.float64).reshape(len(names), 4, 4)
        K = np.asarray(meta["K"], dtype=np.float64).reshape(len(names), 3, 3)
        sizes = None
        if "width" in meta and "height" in meta:
            sizes = np.tile([int(meta["width"]), int(meta["height"])], (len(names), 1))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"--cameras {path}: a cameras.json needs 'images', 'c2w' (OpenCV camera-to-world 4x4 per "
                         f"image) and 'K' (3x3 per image) of equal length ({type(e).__name__}: {e})") from None
    if not (np.isfinite(c2w).all() and np.isfinite(K).all()):
        raise ValueError(f"--cameras {path}: c2w/K contain non-finite values")
    return dict(names=names, c2w=c2w, K_orig=K, sizes=sizes)


def known_cameras(cfg: CamerasConfig, images: Sequence[ImageInfo]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(known_K (N,3,3) in original-image pixels, known_c2w (N,4,4)) for `global_align`, NaN for unknown images;
    None when nothing is known. A cameras file's intrinsics are rescaled (about pixel corners) when its image size
    differs from the photo's by a uniform factor."""
    n = len(images)
    K = np.full((n, 3, 3), np.nan)
    P = np.full((n, 4, 4), np.nan)
    if cfg.cameras is not None:
        cams = read_cameras_file(cfg.cameras)
        index = {name: k for k, name in enumerate(cams["names"])}
        matched = [(i, index[im.name]) for i, im in enumerate(images) if im.name in index]
        if not matched:
            raise ValueError(f"--cameras {cfg.cameras}: none of its {len(index)} images "
                             f"({', '.join(list(index)[:3])}, ...) is one of the photos ({images[0].name}, ...); "
                             "the file must name the photos by file name")
        for i, k in matched:
            if cfg.cameras_fix in ("all", "poses"):
                P[i] = cams["c2w"][k]
            if cfg.cameras_fix in ("all", "intrinsics"):
                Kk = cams["K_orig"][k]
                if cams["sizes"] is not None:
                    (wf, hf), (w, h) = cams["sizes"][k], images[i].orig_size
                    sx, sy = w / wf, h / hf
                    if abs(sx / sy - 1) > 0.01:
                        raise ValueError(f"--cameras {cfg.cameras}: image {images[i].name} is {wf}x{hf} there but "
                                         f"the photo is {w}x{h} (another aspect ratio); use the file of these photos")
                    Kk = cv.K_orig_to_net(Kk, np.array([sx, sy, 0.0, 0.0]))   # rescaling about pixel corners
                K[i] = Kk
        print(f"{cfg.cameras}: known {cfg.cameras_fix} for {len(matched)} of {n} photos", file=sys.stderr)
    if cfg.focal is not None:
        for i, im in enumerate(images):
            w, h = im.orig_size
            K[i] = [[cfg.focal, 0, (w - 1) / 2], [0, cfg.focal, (h - 1) / 2], [0, 0, 1]]
    has_K, has_P = np.isfinite(K).all((1, 2)).any(), np.isfinite(P).all((1, 2)).any()
    return (K if has_K else None), (P if has_P else None)


def masks_folder(cfg: MasksConfig, images: Sequence[ImageInfo], photo_folder: Path | None = None) -> Path | None:
    """The mask folder: the configured one, else masks/ in the photos' folder (`photo_folder`, default the folder
    of the images' files) or beside it when that folder is named images; None when masks are off or absent."""
    if not cfg.use_masks:
        return None
    if cfg.masks is not None:
        if not Path(cfg.masks).is_dir():
            raise MaskError(f"--masks {cfg.masks}: no such folder; pass the folder of the masks (<photo stem>.png)")
        return Path(cfg.masks)
    if photo_folder is None:
        folders = {Path(im.path).parent for im in images if im.path}
        if len(folders) != 1 or not all(im.path for im in images):
            return None
        photo_folder = folders.pop()
    for cand in (photo_folder / "masks", photo_folder.parent / "masks" if photo_folder.name == "images" else None):
        if cand is not None and cand.is_dir():
            return cand
    return None


def load_masks(folder: Path, images: Sequence[ImageInfo]) -> list[np.ndarray]:
    """Each photo's mask (`folder/<stem>.png`) at network resolution (bool, True = use)."""
    out = []
    for im in images:
        path = mask_file(folder, im.name)
        mask = read_mask(path, im.orig_size)
        try:
            out.append(mask_to_net(mask, im.transform, im.shape))
        except MaskError as e:
            raise MaskError(f"{path}: {e}; the photo's crop transform does not fit its size") from None
        if not out[-1].any():
            raise MaskError(f"{path}: the mask leaves no pixel of the network image (after resize and crop); mark "
                            "more of the photo or drop it")
    return out


def apply_masks(preds: PairPredictions, masks: Sequence[np.ndarray]) -> PairPredictions:
    """Predictions whose masked pixels have confidence 1 (log-weight 0: no weight in the alignment); point maps
    are shared, confidences copied."""
    if len(masks) != preds.n_images:
        raise MaskError(f"{len(masks)} masks for {preds.n_images} images")
    if preds.on_disk:
        raise MaskError(f"{preds.store_path}: photo masks need the pair predictions in memory; use --store float16")
    m = [torch.as_tensor(np.asarray(x, bool)) for x in masks]

    def masked(confs, side: int):
        idx = preds.edges[:, side]
        if preds.uniform:
            keep = torch.stack([m[int(k)] for k in idx]).to(confs.device)
            return torch.where(keep, confs, torch.ones((), dtype=confs.dtype, device=confs.device))
        return [torch.where(m[int(k)].to(c.device), c, torch.ones((), dtype=c.dtype, device=c.device))
                for k, c in zip(idx, confs)]

    return PairPredictions(images=preds.images, edges=preds.edges, pts1=preds.pts1, pts2=preds.pts2,
                           conf1=masked(preds.conf1, 0), conf2=masked(preds.conf2, 1), ordered=preds.ordered)


def inputs_fingerprint(cameras: CamerasConfig, mask_dir: Path | None, names: Sequence[str]) -> dict[str, Any]:
    """What of the known cameras and masks changes a reconstruction (options and file contents), for cache keys."""
    def digest(p: Path) -> str:
        h = hashlib.sha256()
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes())
        return h.hexdigest()

    out: dict[str, Any] = {"focal": cameras.focal, "cameras_fix": cameras.cameras_fix,
                           "cameras": digest(Path(cameras.cameras)) if cameras.cameras is not None else None}
    out["masks"] = [digest(mask_file(mask_dir, n)) if mask_file(mask_dir, n).is_file() else None
                    for n in names] if mask_dir is not None else None
    return out


def align_inputs(preds: PairPredictions, cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
                 cameras: CamerasConfig = CamerasConfig(), masks: MasksConfig = MasksConfig(),
                 device: Optional[str] = None, verbose: bool = True, photo_folder: Path | None = None
                 ) -> Reconstruction:
    """`align` with the photos' masks (masked pixels weigh nothing and give no points; stored in the result's
    `image_masks`, their folder in meta 'masks_dir') and the known cameras fixed (`known_cameras`). photo_folder: where to look for masks/ (default:
    the folder of the images' files)."""
    folder = masks_folder(masks, preds.images, photo_folder)
    image_masks = None
    if folder is not None:
        image_masks = load_masks(folder, preds.images)
        if verbose:
            print(f"using the masks in {folder} (0 = ignore; --no-use-masks to ignore them)", file=sys.stderr)
    if image_masks is not None:
        preds = apply_masks(preds, image_masks)
    known_K, known_c2w = known_cameras(cameras, preds.images)
    rec = align(preds, cfg, points, device, verbose, known_K=known_K, known_c2w=known_c2w)
    if image_masks is None:
        return rec
    return dataclasses.replace(rec, image_masks=image_masks, meta=dict(rec.meta, masks_dir=str(Path(folder).resolve())))


def refine_tracks(rec: Reconstruction, tracks: TracksConfig = TracksConfig(), points: PointsConfig = PointsConfig(),
                  verbose: bool = True) -> Reconstruction:
    """With `tracks.bundle_adjust`: the reconstruction with poses (and focals) refined by bundle adjustment on the
    multi-view tracks of its point cloud (`export.bundle.bundle_adjust`); else `rec` unchanged."""
    if not tracks.bundle_adjust:
        return rec
    pts = rec.pointcloud(conf_thr=points.conf_thr, max_points=points.max_points or None)
    tr = build_tracks(rec, pts, conf_thr=points.conf_thr, depth_tol=tracks.depth_tol)
    refined, report = bundle_adjust(rec, tr, refine_focal=tracks.refine_focal)
    if verbose:
        print(f"bundle adjustment on {int(report['points'])} multi-view points: mean reprojection error "
              f"{report['error_before_px']:.3f} -> {report['error_after_px']:.3f} px, cameras moved "
              f"{report['center_shift_pct']:.2f}% of their spread, focals {report['focal_change_pct']:.2f}%",
              file=sys.stderr)
    return refined
