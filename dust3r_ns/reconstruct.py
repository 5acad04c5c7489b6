"""`dust3r-ns reconstruct`: photos (or saved pair predictions) in, splat-ready scene out (pipeline -> exports).

Writes into ``--out``: ``images/`` (the inputs, upright), ``sparse/0`` (COLMAP), ``sparse_pc.ply``,
``transforms.json`` (nerfstudio), ``scene.glb``, ``reconstruction.npz`` (the full aligner result) and
``depth/``/``conf/`` maps as ``.npy``. The folder is assembled next to its final place and renamed into it.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from dust3r_ns.align import AlignConfig
from dust3r_ns.export.dataset import export_dataset
from dust3r_ns.fileio import default_permissions
from dust3r_ns.export.tracks import TracksConfig
from dust3r_ns.pipeline import Network, NetworkConfig, Pairs, PairsConfig, Points, PointsConfig, run_pairs
from dust3r_ns.pipeline import Cameras, CamerasConfig, Masks, MasksConfig, align_inputs, refine_tracks
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.scene import Reconstruction


@dataclass
class ReconstructConfig:
    """Reconstruct cameras, intrinsics and a coloured point cloud from unposed photos (or saved pair predictions)."""

    images: tyro.conf.Positional[list[Path]]
    """Image files, one folder of images, or one pair predictions .npz written by `dust3r-ns infer`."""
    out: Path = Path("dust3r_out")
    """Output folder."""
    overwrite: bool = False
    """Replace an existing output folder."""
    network: Network = NetworkConfig()
    """Checkpoint and device of the network."""
    pairs: Pairs = PairsConfig()
    """Image size and pair graph."""
    align: AlignConfig = AlignConfig()
    """Global alignment."""
    points: Points = PointsConfig()
    """Point cloud of the exports."""
    text: bool = False
    """Write the COLMAP model as text instead of binary."""
    cameras: Cameras = CamerasConfig()
    """Known focal / cameras file (fixed in the alignment)."""
    masks: Masks = MasksConfig()
    """Photo masks (masks/<stem>.png, 0 = ignore)."""
    tracks: TracksConfig = TracksConfig()
    """COLMAP multi-view tracks and optional bundle adjustment."""


def predictions_input(images: list[Path]) -> Path | None:
    """The pair predictions file when the input is one `.npz`, else None (photos)."""
    return images[0] if len(images) == 1 and images[0].suffix == ".npz" else None


def _check_out(cfg: ReconstructConfig) -> None:
    out = cfg.out
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"{out}: output folder exists; pass --overwrite to replace it or choose another --out")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output folder ({e.strerror}); choose another --out") from None
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"{parent}: output location is not writable; choose another --out")


def run(cfg: ReconstructConfig) -> Reconstruction:
    _check_out(cfg)
    t0 = time.perf_counter()
    saved = predictions_input(cfg.images)
    if saved is not None:
        preds = PairPredictions.load(saved)
        print(f"{saved}: {preds.n_images} images, {preds.n_edges} pairs (saved predictions)", file=sys.stderr)
    else:
        preds = run_pairs(cfg.images, cfg.network, cfg.pairs)
    t_net = time.perf_counter() - t0
    folder = cfg.images[0] if len(cfg.images) == 1 and cfg.images[0].is_dir() else None
    rec = align_inputs(preds, cfg.align, cfg.points, cfg.cameras, cfg.masks, cfg.network.device, photo_folder=folder)
    rec = refine_tracks(rec, cfg.tracks, cfg.points)
    t_align = time.perf_counter() - t0 - t_net
    conf_thr, max_points = cfg.points.conf_thr, cfg.points.max_points

    parent = cfg.out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", dir=parent))
    try:
        paths = [Path(im.path) for im in preds.images] if all(im.path for im in preds.images) else None
        export_dataset(rec, tmp / "scene", images=paths, conf_thr=conf_thr, max_points=max_points, text=cfg.text,
                       shared_camera=cfg.align.shared_focal and len({tuple(s) for s in rec.orig_sizes}) == 1,
                       masks=rec.meta.get("masks_dir"), depth_tol=cfg.tracks.depth_tol)
        scene = tmp / "scene"
        rec.save(scene / "reconstruction.npz")
        for sub, maps in (("depth", rec.depths), ("conf", rec.confs)):
            (scene / sub).mkdir()
            for name, m in zip(rec.names, maps):
                np.save(scene / sub / f"{Path(name).stem}.npy", m)
        default_permissions(scene)
        if cfg.out.exists():
            old = parent / f".{cfg.out.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cfg.out, old)
            os.replace(scene, cfg.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(scene, cfg.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    xyz, _, _ = rec.pointcloud(conf_thr=conf_thr, max_points=max_points or None)
    focal = rec.K_orig[:, 0, 0]
    rows = [
        ("images", f"{len(rec.names)}"),
        ("pairs", f"{preds.n_edges}"),
        ("network", f"{t_net:.1f} s"),
        ("alignment", f"{t_align:.1f} s ({rec.meta.get('mode')}, {rec.meta.get('iterations')} it)"),
        ("focal (orig px)", f"{focal.min():.1f} .. {focal.max():.1f}"),
        ("points", f"{len(xyz)}"),
        ("output", str(cfg.out)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=sys.stderr)
    return rec
