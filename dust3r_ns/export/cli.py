"""`dust3r-ns export` subcommand: a saved Reconstruction (.npz) -> COLMAP / PLY / transforms.json / GLB folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Tuple

import tyro

from ..pipeline import Points, PointsConfig, warn_empty_points
from .dataset import FORMATS, export_dataset

Format = Literal[FORMATS]  # type: ignore[valid-type]  # the registry's format names (`dataset.WRITERS` keys)


@dataclass
class ExportConfig:
    """Export a reconstruction saved by `dust3r-ns reconstruct` (a .npz) as a dataset folder."""

    recon: tyro.conf.Positional[Path]
    """Reconstruction file (.npz) written by `dust3r-ns reconstruct` (OUT/reconstruction.npz)."""
    out: Path
    """Output folder (images/, sparse/0/, transforms.json, sparse_pc.ply, scene.glb)."""
    formats: Tuple[Format, ...] = FORMATS
    """Which outputs to write (any of the registered export formats)."""
    images: Optional[Path] = None
    """Folder with the original images (copied upright into out/images); none copied when omitted."""
    points: Points = PointsConfig()
    """Point cloud of the exports (--conf-thr, --max-points)."""
    text: bool = False
    """Write the COLMAP model as text instead of binary."""
    shared_camera: bool = False
    """One COLMAP camera for all images (needs equal image sizes)."""
    masks: Optional[Path] = None
    """Folder of the photos' masks (<stem>.png) written to out/masks; None: the folder the reconstruction used,
    when it still exists."""


def run(cfg: ExportConfig) -> dict[str, Path]:
    """Load the reconstruction, export it, print what was written; returns {format: path}."""
    from ..scene import Reconstruction

    recon = Reconstruction.load(cfg.recon)
    warn_empty_points(recon, cfg.points.conf_thr)
    masks = cfg.masks
    if masks is None and recon.meta.get("masks_dir") and Path(str(recon.meta["masks_dir"])).is_dir():
        masks = Path(str(recon.meta["masks_dir"]))
    written = export_dataset(
        recon, cfg.out, formats=cfg.formats, images=cfg.images, conf_thr=cfg.points.conf_thr,
        max_points=cfg.points.max_points, text=cfg.text, shared_camera=cfg.shared_camera, masks=masks,
    )
    for fmt, path in written.items():
        print(f"{fmt}: {path}")
    return written
