"""`dust3r-ns reconstruct`: photos (or saved pair predictions) in, splat-ready scene out (pipeline -> exports).

Writes into ``--out``: ``images/`` (the inputs as the network saw them: upright 8-bit RGB) and ``images_2/4/8``,
``sparse/0`` (COLMAP), ``sparse_pc.ply``, ``transforms.json`` (nerfstudio), ``scene.glb``, ``reconstruction.npz``
(the full aligner result) and ``depth/``/``conf/`` maps as ``.npy``. The folder is assembled next to its final
place and swapped in whole (`export.export_dataset`); an `--overwrite` killed midway leaves the old folder, or
it is put back by the next run. Photos are reconstructed through the cache the nerfstudio dataparser uses
(`dust3r_ns.cache`): the same photos, model and options are computed once for both.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from dust3r_ns.align import AlignConfig
from dust3r_ns.export.dataset import export_dataset
from dust3r_ns import distributed
from dust3r_ns.export.tracks import TracksConfig
from dust3r_ns.fileio import recover_dir
from dust3r_ns.cache import (Cache, CacheConfig, PhotoInfo, build_reconstruction, cache_dir_for,
                                              inspect_photos, list_images, load_or_build, model_identity,
                                              reconstruction_options)
from dust3r_ns.pipeline import (Cameras, CamerasConfig, Masks, MasksConfig, Network, NetworkConfig, Pairs,
                                PairsConfig, Points, PointsConfig, Video, align_inputs, default_model_source,
                                inputs_fingerprint, masks_folder, ordered_input, refine_tracks, run_pairs)
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.scene import Reconstruction
from dust3r_ns.video import VideoConfig, frames_folder, is_video


@dataclass
class ReconstructConfig:
    """Reconstruct cameras, intrinsics and a coloured point cloud from unposed photos (or saved pair predictions)."""

    images: tyro.conf.Positional[list[Path]]
    """Image files, one folder of images, one video clip, or one pair predictions .npz written by `dust3r-ns infer`."""
    out: Path = Path("dust3r_out")
    """Output folder."""
    overwrite: bool = False
    """Replace an existing output folder."""
    network: Network = NetworkConfig()
    """Checkpoint and device of the network."""
    pairs: Pairs = PairsConfig()
    """Image size and pair graph."""
    video: Video = VideoConfig()
    """Frame sampling when the input is one video clip (--fps, --num-frames, --min-sharpness)."""
    align: AlignConfig = AlignConfig()
    """Global alignment."""
    points: Points = PointsConfig()
    """Point cloud of the exports."""
    cache: Cache = CacheConfig()
    """Reconstruction cache shared with the nerfstudio dataparser (--cache-dir, --use-cache)."""
    text: bool = False
    """Write the COLMAP model as text instead of binary."""
    cameras: Cameras = CamerasConfig()
    """Known focal / cameras file (fixed in the alignment)."""
    masks: Masks = MasksConfig()
    """Photo masks (masks/<stem>.png, 0 = ignore)."""
    tracks: TracksConfig = TracksConfig()
    """COLMAP multi-view tracks and optional bundle adjustment."""


def predictions_input(images: list[Path]) -> Path | None:
    """The pair predictions file when the input is one `.npz` or a pair store folder (`dust3r-ns infer
    --store disk`), else None (photos)."""
    if len(images) == 1 and images[0].is_dir() and (images[0] / "meta.npz").is_file():
        return images[0]
    return images[0] if len(images) == 1 and images[0].suffix == ".npz" else None


def photo_list(images: list[Path]) -> list[PhotoInfo]:
    """The photos of one folder (unreadable files skipped with a warning) or the given files, each checked."""
    if len(images) == 1 and Path(images[0]).is_dir():
        return list_images(Path(images[0]), skip_unreadable=True)
    return inspect_photos(images)


def _check_out(cfg: ReconstructConfig) -> None:
    out = cfg.out
    recover_dir(out)  # an earlier --overwrite killed between its two renames
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"{out}: output folder exists; pass --overwrite to replace it or choose another --out")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror}); choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: output location is not writable; choose another --out")


def run(cfg: ReconstructConfig) -> Reconstruction | None:
    _check_out(cfg)
    t0 = time.perf_counter()
    saved = predictions_input(cfg.images)
    rows = []
    if saved is not None:
        preds = PairPredictions.load(saved)
        preds.ordered = preds.ordered or cfg.pairs.ordered
        print(f"{saved}: {preds.n_images} images, {preds.n_edges} pairs (saved predictions)", file=sys.stderr)
        rec = align_inputs(preds, cfg.align, cfg.points, cfg.cameras, cfg.masks, cfg.network.device)
        sources = [Path(im.path) for im in preds.images] if all(im.path for im in preds.images) else None
        rows.append(("pairs", f"{preds.n_edges}"))
        how = "aligned"
    elif distributed.world()[1] > 1:
        # under torchrun the pairs are sharded over the ranks (no cache: the ranks would race for its entry);
        # rank 0 aligns and exports
        preds = run_pairs(cfg.images, cfg.network, cfg.pairs, video=cfg.video,
                          shard_dir=cfg.out.resolve().parent / f".{cfg.out.name}.shards")
        if preds is None:   # another rank: its share is done
            return None
        rec = align_inputs(preds, cfg.align, cfg.points, cfg.cameras, cfg.masks, cfg.network.device)
        sources = [Path(im.path) for im in preds.images]
        rows.append(("pairs", f"{preds.n_edges}"))
        how = f"sharded over {distributed.world()[1]} processes"
    else:
        images = cfg.images
        pairs = dataclasses.replace(cfg.pairs, ordered=ordered_input(images, cfg.pairs))   # (a clip's frames)
        if len(images) == 1 and is_video(images[0]):
            images = [frames_folder(images[0], cfg.video)]
        photos = photo_list(images)
        folder = Path(images[0]) if len(images) == 1 and Path(images[0]).is_dir() else Path(photos[0].path).parent
        model = cfg.network.model or default_model_source()
        network = dataclasses.replace(cfg.network, model=model)
        inputs = None
        if cfg.cameras != CamerasConfig() or masks_folder(cfg.masks, [], folder) is not None:
            inputs = inputs_fingerprint(cfg.cameras, masks_folder(cfg.masks, [], folder),
                                        [ph.path.name for ph in photos])
        options = reconstruction_options(network, pairs, cfg.align, cfg.points, inputs)
        cache_dir = cache_dir_for(photos, cfg.cache)
        scene = load_or_build(
            photos, cache_dir, model_identity(model), options,
            lambda paths: build_reconstruction(paths, network, pairs, cfg.align, cfg.points,
                                               label=", ".join(str(p) for p in cfg.images), cameras=cfg.cameras,
                                               masks=cfg.masks, photo_folder=folder, store_dir=cache_dir),
            use_cache=cfg.cache.use_cache)
        rec = scene.rec
        sources = [ph.path for ph in photos]
        how = f"reused {scene.entry}" if scene.hit else f"computed, cached in {scene.entry}"
    rec = refine_tracks(rec, cfg.tracks, cfg.points)
    t_rec = time.perf_counter() - t0

    conf_thr, max_points = cfg.points.conf_thr, cfg.points.max_points
    export_dataset(rec, cfg.out, images=sources, conf_thr=conf_thr, max_points=max_points, text=cfg.text,
                   shared_camera=cfg.align.shared_focal and len({tuple(s) for s in rec.orig_sizes}) == 1,
                   reconstruction=True, replace=True, masks=rec.meta.get("masks_dir"), depth_tol=cfg.tracks.depth_tol)

    xyz, _, _ = rec.pointcloud(conf_thr=conf_thr, max_points=max_points or None)
    focal = rec.K_orig[:, 0, 0]
    rows = [("images", f"{len(rec.names)}"), *rows,
            ("reconstruction", f"{t_rec:.1f} s ({how})"),
            ("alignment", f"{rec.meta.get('mode')}, {rec.meta.get('iterations')} it"),
            ("focal (orig px)", f"{focal.min():.1f} .. {focal.max():.1f}"),
            ("points", f"{len(xyz)}"),
            ("output", str(cfg.out))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=sys.stderr)
    return rec
