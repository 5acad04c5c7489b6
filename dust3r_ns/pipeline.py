"""The job every entry point runs: photos -> views -> pair graph -> `PairPredictions` -> `Reconstruction`.

The options are declared here once, as small frozen dataclasses that the CLI subcommands, `reconstruct` and the
nerfstudio dataparser embed: `NetworkConfig` (which checkpoint, where, how), `PairsConfig` (preprocessing size and
pair graph), `align.AlignConfig` (the aligner) and `PointsConfig` (which points count as the reconstruction's).
The functions below are the steps, each usable alone; `reconstruct_images` chains them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Optional, Sequence

import torch
import tyro

from dust3r_ns import distributed
from dust3r_ns.align import AlignConfig, global_align
from dust3r_ns.images import View, load_images
from dust3r_ns.inference import inference_graph
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
    store: Literal["float32", "float16"] = "float32"
    """Storage of the pair predictions: float16 halves their memory and files (align them with --align.dtype
    float16 to keep it halved)."""


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


# Embedded in command configs: network, pair and point options keep their short flags (--model, --size, ...);
# alignment options are --align.NAME (with the older spellings --align-mode, --niter, ... as aliases).
Network = Annotated[NetworkConfig, tyro.conf.OmitArgPrefixes]
Pairs = Annotated[PairsConfig, tyro.conf.OmitArgPrefixes]
Points = Annotated[PointsConfig, tyro.conf.OmitArgPrefixes]
Video = Annotated[VideoConfig, tyro.conf.OmitArgPrefixes]


def default_model_source() -> str:
    """The bundled model (trained on synthetic scenes only), with a note saying so."""
    found = sorted(p for p in DEFAULT_WEIGHTS.glob("*") if (p / "config.json").exists())
    if not found:
        raise ValueError("no model given and no bundled model installed; pass --model with a .pth file, a Hugging "
                         "Face folder (config.json + model.safetensors) or a hub name such as "
                         "naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt")
    print(f"note: using the bundled model {found[0].name}: it only knows synthetic scenes; for real photos pass "
          "--model naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt (or a downloaded .pth / HF folder)", file=sys.stderr)
    return str(found[0])


def resolve_device(device: Optional[str]) -> str:
    """The device to use: as given, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def image_size_of(net: torch.nn.Module) -> int:
    """Preprocessing size implied by the model: 224 for 224 models, else 512."""
    size = net.config["img_size"]
    side = max(size) if isinstance(size, (tuple, list)) else int(size)
    return 224 if side <= 224 else 512


def load_views(images: Sequence[str | Path] | str | Path, pairs: PairsConfig, net: torch.nn.Module,
               video: VideoConfig = VideoConfig()) -> list[View]:
    """Preprocessed views of image files, of one folder, or of one video clip's sampled frames (`video`), at the
    configured size (default: the model's)."""
    if not isinstance(images, (str, Path)):
        images = list(images)
        if len(images) == 1:
            images = images[0]
    if isinstance(images, (str, Path)) and is_video(images):
        images = frames_folder(images, video)
    return load_images(images, size=pairs.image_size or image_size_of(net))


def run_pairs(images, network: NetworkConfig = NetworkConfig(), pairs: PairsConfig = PairsConfig(),
              verbose: bool = True, video: VideoConfig = VideoConfig(), shard_dir: str | Path | None = None
              ) -> Optional[PairPredictions]:
    """Load the model and the images (or a clip's frames), build the pair graph and run the engine on every pair.

    Under torchrun (WORLD_SIZE > 1) the pairs are sharded over the ranks (`distributed.sharded_inference`, shards
    in `shard_dir`, default `.dust3r_shards` in the working folder): rank 0 returns the predictions, the others
    None."""
    rank, size = distributed.world()
    device = distributed.rank_device(resolve_device(network.device))
    net = load_model(network.model or default_model_source(), device=device)
    views = load_views(images, pairs, net, video)
    ordered = isinstance(images, (str, Path)) and is_video(images)   # video frames come in order
    graph = pairs.scene_graph or default_scene_graph(len(views), ordered)
    if size > 1:
        preds = distributed.sharded_inference(views, net, graph, shard_dir or ".dust3r_shards", device=device,
                                              batch_size=network.batch_size, amp=network.amp, verbose=verbose,
                                              store_dtype=STORE_DTYPES[network.store])
    else:
        preds = inference_graph(views, net, graph, device=device, batch_size=network.batch_size, amp=network.amp,
                                verbose=verbose, store_dtype=STORE_DTYPES[network.store])
    if verbose and preds is not None:
        print(f"{len(views)} images, scene graph {graph}: {preds.n_edges} ordered pairs"
              + (f" on {size} processes" if size > 1 else ""), file=sys.stderr)
    return preds


def align(preds: PairPredictions, cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
          device: Optional[str] = None, verbose: bool = True) -> Reconstruction:
    """Global alignment of the predictions; the aligner's device defaults to `device` (the network's)."""
    cfg = cfg.replace(device=cfg.device or resolve_device(device))
    return global_align(preds, cfg, conf_thr=points.conf_thr, verbose=verbose)


def reconstruct_images(images, network: NetworkConfig = NetworkConfig(), pairs: PairsConfig = PairsConfig(),
                       align_cfg: AlignConfig = AlignConfig(), points: PointsConfig = PointsConfig(),
                       verbose: bool = True, video: VideoConfig = VideoConfig()
                       ) -> tuple[PairPredictions, Reconstruction]:
    """Photos (or a video clip) -> (pair predictions, reconstruction)."""
    preds = run_pairs(images, network, pairs, verbose, video)
    return preds, align(preds, align_cfg, points, network.device, verbose)
