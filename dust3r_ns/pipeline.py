"""The job every entry point runs: photos -> views -> pair graph -> `PairPredictions` -> `Reconstruction`.

The options are declared here once, as small frozen dataclasses that the CLI subcommands, `reconstruct` and the
nerfstudio dataparser embed: `NetworkConfig` (which checkpoint, where, how), `PairsConfig` (preprocessing size and
pair graph), `align.AlignConfig` (the aligner) and `PointsConfig` (which points count as the reconstruction's).
The functions below are the steps, each usable alone; `reconstruct_images` chains them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

import torch
import tyro

from dust3r_ns.align import AlignConfig, global_align
from dust3r_ns.images import View, list_images, load_images
from dust3r_ns.inference import inference
from dust3r_ns.model.checkpoint import load_model
from dust3r_ns.pairs import default_scene_graph, make_pairs
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.scene import Reconstruction

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


@dataclass(frozen=True)
class PairsConfig:
    """How photos become network inputs and which pairs the network sees."""

    image_size: Annotated[Optional[int], tyro.conf.arg(aliases=("--size",))] = None
    """Network image size (224 or 512); None: from the model."""
    scene_graph: Optional[str] = None
    """complete, swin-k, logwin-k, oneref-k (+ -noncyclic); None: chosen from the number of images."""


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


def load_network(cfg: NetworkConfig) -> torch.nn.Module:
    """The checkpoint of `cfg.model` (or the bundled one) on `cfg.device`, ready for inference."""
    return load_model(cfg.model or default_model_source(), device=resolve_device(cfg.device))


def image_size_of(net: torch.nn.Module) -> int:
    """Preprocessing size implied by the model: 224 for 224 models, else 512."""
    size = net.config["img_size"]
    side = max(size) if isinstance(size, (tuple, list)) else int(size)
    return 224 if side <= 224 else 512


def load_views(images: Sequence[str | Path] | str | Path, pairs: PairsConfig, net: torch.nn.Module) -> list[View]:
    """Preprocessed views of image files or of one folder, at the configured size (default: the model's)."""
    if not isinstance(images, (str, Path)):
        images = list(images)
        if len(images) == 1:
            images = images[0]
    return load_images(images, size=pairs.image_size or image_size_of(net))


def run_pairs(images, network: NetworkConfig = NetworkConfig(), pairs: PairsConfig = PairsConfig(),
              verbose: bool = True) -> PairPredictions:
    """Load the model and the images, build the pair graph and run the engine on every pair (image names and the
    device are checked first)."""
    check_image_names(images)
    check_device(network.device)
    net = load_network(network)
    views = load_views(images, pairs, net)
    graph = pairs.scene_graph or default_scene_graph(len(views))
    pair_list = make_pairs(views, scene_graph=graph, symmetrize=True)
    if verbose:
        print(f"{len(views)} images, scene graph {graph}: {len(pair_list)} ordered pairs", file=sys.stderr)
    return inference(pair_list, net, device=resolve_device(network.device), batch_size=network.batch_size,
                     amp=network.amp, verbose=verbose)


def align(preds: PairPredictions, cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
          device: Optional[str] = None, verbose: bool = True) -> Reconstruction:
    """Global alignment of the predictions; the aligner's device defaults to `device` (the network's)."""
    check_device(cfg.device, "--align.device")
    cfg = cfg.replace(device=cfg.device or resolve_device(device))
    rec = global_align(preds, cfg, conf_thr=points.conf_thr, verbose=verbose)
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
                       verbose: bool = True) -> tuple[PairPredictions, Reconstruction]:
    """Photos -> (pair predictions, reconstruction)."""
    preds = run_pairs(images, network, pairs, verbose)
    return preds, align(preds, align_cfg, points, network.device, verbose)
