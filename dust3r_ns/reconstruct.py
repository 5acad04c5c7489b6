"""`dust3r-ns reconstruct`: photos in, splat-ready scene out (pair inference -> global alignment -> exports).

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
from typing import Literal, Optional

import numpy as np
import tyro


@dataclass
class ReconstructConfig:
    """Reconstruct cameras, intrinsics and a coloured point cloud from unposed photos."""

    images: tyro.conf.Positional[list[Path]]
    """Image files or one folder of images."""
    out: Path = Path("dust3r_out")
    """Output folder."""
    overwrite: bool = False
    """Replace an existing output folder."""
    model: Optional[str] = None
    """Checkpoint: .pth, Hugging Face folder, or hub name; default: the bundled model."""
    size: Optional[int] = None
    """Network image size (224 or 512); default: from the model."""
    scene_graph: Optional[str] = None
    """complete, swin-k, logwin-k, oneref-k (+ -noncyclic); default: chosen from the number of images."""
    device: str = "cpu"
    """Torch device for the network."""
    align_device: Optional[str] = None
    """Torch device for the alignment (default: same as --device)."""
    batch_size: int = 8
    """Pairs per decoder batch (bounds memory)."""
    amp: Optional[Literal["bf16", "fp16"]] = None
    """Mixed precision for encoder/decoder (heads stay float32); default float32."""
    align_mode: Literal["fast", "baseline"] = "fast"
    """Global alignment: 'fast' (ours) or 'baseline' (the reference's Adam schedule)."""
    niter: Optional[int] = None
    """Alignment iteration cap (default: the mode's own)."""
    shared_focal: bool = False
    """One focal length for all images (same camera)."""
    conf_thr: float = 3.0
    """Confidence threshold for the exported points."""
    max_points: int = 100_000
    """Point cap for the exported cloud (voxel down-sampling); 0 = no cap."""
    text: bool = False
    """Write the COLMAP model as text instead of binary."""


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


def _default_permissions(root: Path) -> None:
    """Temp files/folders are created private (0600/0700); give the finished output the user's usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def run(cfg: ReconstructConfig):
    from dust3r_ns.align import global_align
    from dust3r_ns.cli import run_pairs
    from dust3r_ns.export.dataset import export_dataset

    _check_out(cfg)
    t0 = time.perf_counter()
    views, output = run_pairs(cfg.images, cfg.model, cfg.size, cfg.scene_graph, cfg.device, cfg.batch_size, cfg.amp)
    t_net = time.perf_counter() - t0
    rec = global_align(output, mode=cfg.align_mode, device=cfg.align_device or cfg.device, niter=cfg.niter,
                       shared_focal=cfg.shared_focal, conf_thr=cfg.conf_thr, verbose=True)
    t_align = time.perf_counter() - t0 - t_net

    parent = cfg.out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.out.name}.", dir=parent))
    try:
        paths = [Path(v["path"]) for v in views]
        export_dataset(rec, tmp / "scene", images=paths, conf_thr=cfg.conf_thr, max_points=cfg.max_points,
                       text=cfg.text, shared_camera=cfg.shared_focal and len({tuple(s) for s in rec.orig_sizes}) == 1)
        scene = tmp / "scene"
        rec.save(scene / "reconstruction.npz")
        for sub, maps in (("depth", rec.depths), ("conf", rec.confs)):
            (scene / sub).mkdir()
            for name, m in zip(rec.names, maps):
                np.save(scene / sub / f"{Path(name).stem}.npy", m)
        _default_permissions(scene)
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

    xyz, _, _ = rec.pointcloud(conf_thr=cfg.conf_thr, max_points=cfg.max_points or None)
    focal = rec.K_orig[:, 0, 0]
    rows = [
        ("images", f"{len(rec.names)}"),
        ("pairs", f"{len(output['view1']['idx'])}"),
        ("network", f"{t_net:.1f} s"),
        ("alignment", f"{t_align:.1f} s ({rec.meta.get('mode')}, {rec.meta.get('iterations')} it)"),
        ("focal (orig px)", f"{focal.min():.1f} .. {focal.max():.1f}"),
        ("points", f"{len(xyz)}"),
        ("output", str(cfg.out)),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=sys.stderr)
    return rec
