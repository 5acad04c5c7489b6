"""`dust3r-ns bench tracks`: multi-view COLMAP tracks and bundle adjustment on synthetic ground truth.

Per scene (seed): a ray-cast scene seen by N cameras, oracle pair predictions with the default noise (scaled by
`noise`), fast global alignment, the point cloud and its tracks (`export.tracks.build_tracks`), then pycolmap bundle
adjustment on the tracks (`export.bundle.bundle_adjust`). Reports the track statistics and the pose errors
(`metrics.pose_metrics`: ATE % of the camera spread, RRA degrees) and focal error (%) before and after bundle
adjustment. Accuracy only (no timings).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from dust3r_ns.align import global_align
from dust3r_ns.bench.align import make_case
from dust3r_ns.export.bundle import bundle_adjust
from dust3r_ns.export.tracks import build_tracks
from dust3r_ns.metrics import focal_error_pct, pose_metrics


@dataclass
class TracksBenchConfig:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    """Synthetic scenes (one per seed)."""
    n: int = 8
    """Cameras per scene (complete pair graph)."""
    size: str = "96x128"
    """Network resolution HxW."""
    noise: float = 0.01
    """Oracle noise level (the default NoiseConfig scaled by noise / 0.01)."""
    conf_thr: float = 3.0
    """Confidence threshold of the point cloud and of the observations."""
    max_points: int = 20_000
    """Point cap of the cloud that gets tracks."""
    depth_tol: float = 0.02
    """Relative depth agreement of an observation."""
    loss: str = "cauchy"
    """Robust loss of the bundle adjustment."""
    refine_focal: bool = False
    """Refine focal lengths in the bundle adjustment (as `--tracks.refine-focal`)."""
    json_out: str = ""
    """Optional path for the results as JSON."""


def run_case(cfg: TracksBenchConfig, seed: int) -> dict:
    """One scene: tracks and pose/focal errors before and after bundle adjustment."""
    H, W = (int(x) for x in cfg.size.split("x"))
    out, gt = make_case("synth", cfg.n, H, W, "complete", cfg.noise, seed)
    rec = global_align(out, mode="fast", conf_thr=cfg.conf_thr, verbose=False)
    pts = rec.pointcloud(conf_thr=cfg.conf_thr, max_points=cfg.max_points)
    tr = build_tracks(rec, pts, conf_thr=cfg.conf_thr, depth_tol=cfg.depth_tol)
    ba, report = bundle_adjust(rec, tr, refine_focal=cfg.refine_focal, loss=cfg.loss)
    res = dict(seed=seed, **{f"tracks_{k}": v for k, v in tr.summary().items()}, **report)
    for tag, r in (("before", rec), ("after", ba)):
        pm = pose_metrics(r.c2w, gt["c2w"])
        res.update({f"{k}_{tag}": v for k, v in pm.items() if k in ("ate_pct", "rra_mean_deg", "rra_max_deg")})
        res[f"focal_err_pct_{tag}"] = focal_error_pct(r.focals, gt["K"][:, 0, 0])
    return res


def run(cfg: TracksBenchConfig) -> list[dict]:
    rows = [run_case(cfg, s) for s in cfg.seeds]
    keys = ("tracks_mean_track_length", "tracks_mean_error_px", "error_before_px", "error_after_px",
            "ate_pct_before", "ate_pct_after", "rra_mean_deg_before", "rra_mean_deg_after",
            "focal_err_pct_before", "focal_err_pct_after")
    print("seed  " + "  ".join(keys))
    for r in rows:
        print(f"{r['seed']:<4}  " + "  ".join(f"{r[k]:.4g}" for k in keys))
    print("mean  " + "  ".join(f"{np.mean([r[k] for r in rows]):.4g}" for k in keys))
    if cfg.json_out:
        with open(cfg.json_out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows
