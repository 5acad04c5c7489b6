"""`dust3r-ns bench model`: a model's end-to-end pose accuracy on held-out synthetic scenes (network + aligner), reusing `dust3r_ns.train.pose_eval`.

For each held-out scene: render N views on a camera path, run the pair engine (complete graph) and the fast
aligner, and compare with the ground truth: mean/max relative rotation error (RRA), relative translation direction
error (RTA), ATE (% of camera spread, after Sim(3)). Several models can be compared in one run
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
    pairs: int = 64
    """Held-out pairs for the test criterion Regr3D_ScaleShiftInv (0: skip)."""
    json_out: Optional[Path] = None
    """Optional JSON file for the results."""


def evaluate(model, cfg: ModelEvalConfig) -> dict:
    """Mean pose metrics over the held-out scenes + Regr3D_ScaleShiftInv on held-out pairs (train.pose_eval)."""
    from dust3r_ns.train.pose_eval import PoseEvalConfig, pose_eval

    return pose_eval(model.to("cpu"), PoseEvalConfig(model="", scenes=cfg.scenes, views=cfg.views,
                                                     baseline=cfg.baseline, seed=cfg.seed, size=cfg.size,
                                                     pairs=cfg.pairs))


def run(cfg: ModelEvalConfig) -> dict:
    from dust3r_ns.cli import default_model_source
    from dust3r_ns.model.checkpoint import build_model, load_model

    sources = cfg.models or [default_model_source()]
    results = {}
    for src in sources:
        model = load_model(src)
        results[src] = evaluate(model, cfg)
        if cfg.untrained and src == sources[0]:
            torch.manual_seed(0)
            results["untrained"] = evaluate(build_model(model.config).eval(), cfg)
    print(f"{cfg.scenes} held-out scenes x {cfg.views} views ({cfg.baseline} baseline), size {cfg.size}, fast aligner")
    for name, r in results.items():
        print(f"{str(name)[-40:]}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(results, indent=1))
    return results
