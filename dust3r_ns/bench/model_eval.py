"""`dust3r-ns bench model`: a model's end-to-end pose accuracy on held-out synthetic scenes (network + aligner).

For each held-out scene: render N views on a camera path, run the pair engine (complete graph) and the fast
aligner, and compare with the ground truth: mean/max relative rotation error (RRA), relative translation direction
error (RTA), ATE (% of camera spread, after Sim(3)) and focal error. Several models can be compared in one run
(e.g. the bundled model vs the same architecture untrained).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class ModelEvalConfig:
    models: list[str] = field(default_factory=list)
    """Checkpoints to evaluate (.pth, HF folder, hub name); default: the bundled model."""
    untrained: bool = True
    """Also evaluate the first model's architecture with random weights (the 'before training' baseline)."""
    scenes: int = 5
    """Held-out scenes (seeds from `seed`)."""
    views: int = 8
    """Views per scene."""
    baseline: str = "moderate"
    """Camera path: small, moderate or wide."""
    seed: int = 100_000
    """First scene seed (training uses other seeds)."""
    size: int = 224
    """Network input size; views are rendered at this square size."""
    device: str = "cpu"
    """Torch device."""
    json_out: Optional[Path] = None
    """Optional JSON file for the results."""


def evaluate(model, cfg: ModelEvalConfig) -> dict:
    from dust3r_ns.align import global_align
    from dust3r_ns.images import images_from_arrays
    from dust3r_ns.inference import inference
    from dust3r_ns.metrics import focal_error_pct, pose_metrics
    from dust3r_ns.pairs import make_pairs
    from dust3r_ns.synth import camera_path, make_scene, render

    per_scene = []
    for k in range(cfg.scenes):
        scene = make_scene(cfg.seed + k)
        c2w, K = camera_path(scene, cfg.views, cfg.baseline, seed=k, H=cfg.size, W=cfg.size)
        rgbs = [render(scene, c2w[i], K[i], cfg.size, cfg.size)["rgb"] for i in range(cfg.views)]
        views = images_from_arrays(rgbs, size=cfg.size)
        out = inference(make_pairs(views, "complete"), model, device=cfg.device, verbose=False)
        rec = global_align(out, mode="fast", verbose=False)
        m = pose_metrics(rec.c2w, c2w)
        m["focal_err_pct"] = float(focal_error_pct(rec.K[:, 0, 0], K[:, 0, 0]))
        per_scene.append(m)
    keys = per_scene[0].keys()
    return {k: float(statistics.mean(float(s[k]) for s in per_scene)) for k in keys}


def run(cfg: ModelEvalConfig) -> dict:
    from dust3r_ns.cli import default_model_source
    from dust3r_ns.model.checkpoint import build_model, load_model

    sources = cfg.models or [default_model_source()]
    results = {}
    for src in sources:
        model = load_model(src, device=cfg.device)
        results[src] = evaluate(model, cfg)
        if cfg.untrained and src == sources[0]:
            torch.manual_seed(0)
            results["untrained"] = evaluate(build_model(model.config).to(cfg.device), cfg)
    print(f"{cfg.scenes} held-out scenes x {cfg.views} views ({cfg.baseline} baseline), size {cfg.size}, fast aligner")
    print(f"{'model':>40} {'RRA mean':>9} {'RRA max':>8} {'RTA mean':>9} {'ATE %':>7} {'focal %':>8}")
    for name, r in results.items():
        print(f"{str(name)[-40:]:>40} {r['rra_mean_deg']:>9.2f} {r['rra_max_deg']:>8.2f} {r['rta_mean_deg']:>9.2f} "
              f"{r['ate_pct']:>7.2f} {r['focal_err_pct']:>8.2f}")
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(results, indent=1))
    return results
