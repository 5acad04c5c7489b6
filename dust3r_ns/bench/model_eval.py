"""`dust3r-ns bench model`: a model's end-to-end pose accuracy on held-out synthetic scenes (network + aligner).

For each held-out scene: render N views on a camera path (`synth.camera_path`) at exactly the network size (no
224/512 preprocessing, so a 128x128 model sees what it was trained on), run the pair engine on the complete graph
and the fast aligner, and compare with the ground truth (`metrics.pose_metrics`: mean/max relative rotation error,
relative translation direction error, ATE as % of the camera spread after Sim(3)). Then the test criterion
Regr3D_ScaleShiftInv on held-out pairs. Several models can be compared in one run (e.g. the bundled model vs the
same architecture untrained).
"""

from __future__ import annotations

import json
import statistics
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch


@dataclass
class ModelEvalConfig:
    models: list[str] = field(default_factory=list)
    """Checkpoints to evaluate (.pth, HF folder, hub name); default: the bundled model."""
    untrained: bool = True
    """Also evaluate the first model's architecture with random weights (seed 0: the 'before training' baseline)."""
    scenes: int = 5
    """Held-out scenes (seeds from `seed`)."""
    views: int = 8
    """Views per scene."""
    baseline: str = "moderate"
    """Camera path: small, moderate or wide."""
    seed: int = 100_000
    """First scene seed (training scenes come from a different generator stream)."""
    size: int = 224
    """Network input size; views are rendered at this square size."""
    pairs: int = 64
    """Held-out pairs for the test criterion Regr3D_ScaleShiftInv (SyntheticScenes seed 1_000_003, the trainer's
    test set); 0: skip."""
    json_out: Optional[Path] = None
    """Optional JSON file for the results."""


@torch.no_grad()
def evaluate(model, cfg: ModelEvalConfig) -> dict:
    """Mean pose metrics over the held-out scenes, plus Regr3D_ScaleShiftInv on held-out pairs ('test_*' keys)."""
    from dust3r_ns.align import global_align
    from dust3r_ns.images import make_view
    from dust3r_ns.inference import inference
    from dust3r_ns.metrics import pose_metrics
    from dust3r_ns.pairs import make_pairs
    from dust3r_ns.synth import camera_path, make_scene, render

    model = model.to("cpu")
    per = []
    for k in range(cfg.scenes):
        scene = make_scene(cfg.seed + k)
        c2w, K = camera_path(scene, cfg.views, cfg.baseline, seed=k, H=cfg.size, W=cfg.size)
        views = [make_view(i, rgb=render(scene, c2w[i], K[i], cfg.size, cfg.size)["rgb"]) for i in range(cfg.views)]
        preds = inference(make_pairs(views, "complete"), model, device="cpu", verbose=False)
        rec = global_align(preds, mode="fast", verbose=False)
        per.append(pose_metrics(rec.c2w, c2w))
    res = {key: float(statistics.mean(float(p[key]) for p in per)) for key in per[0]}
    if cfg.pairs:
        from torch.utils.data import DataLoader

        from dust3r_ns.train.datasets import PairBatchSampler, SyntheticScenes, collate_pairs
        from dust3r_ns.train.loop import evaluate as test_loss

        test = SyntheticScenes(cfg.pairs, (cfg.size, cfg.size), 1_000_003)
        loader = DataLoader(test, batch_sampler=PairBatchSampler(len(test), 8, shuffle=False), collate_fn=collate_pairs)
        res.update({f"test_{k}": v for k, v in test_loss(model, loader, torch.device("cpu"), nullcontext, 1).items()})
    return res


def run(cfg: ModelEvalConfig) -> dict:
    from dust3r_ns.model.checkpoint import build_model, load_model
    from dust3r_ns.pipeline import default_model_source

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
