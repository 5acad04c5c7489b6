"""Pose accuracy of a (trained or untrained) model on held-out synthetic scenes, at the model's own resolution.

Renders N views per held-out scene on a camera path (synth.camera_path), feeds them to the network at exactly the
rendered size (no 224/512 preprocessing, so a 128x128 model sees what it was trained on), aligns with the fast
global aligner and reports mean RRA / ATE (dust3r_ns.metrics.pose_metrics) over the scenes, plus the test
criterion Regr3D_ScaleShiftInv on held-out pairs.

    python -m dust3r_ns.train.pose_eval MODEL [--untrained] [--scenes 5] [--views 8] [--size 128]
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch


@dataclass
class PoseEvalConfig:
    model: str
    """Checkpoint (.pth / HF folder)."""
    untrained: bool = False
    """Evaluate the model's architecture with random weights (seed 0) instead."""
    scenes: int = 5
    views: int = 8
    baseline: str = "moderate"
    seed: int = 100_000
    """First held-out scene seed (training scenes come from a different generator stream)."""
    size: int = 128
    pairs: int = 64
    """Held-out pairs for Regr3D_ScaleShiftInv (SyntheticScenes seed 1_000_003, as the trainer's test set)."""


def views_from_renders(rgbs) -> list[dict]:
    import numpy as np

    out = []
    for i, rgb in enumerate(rgbs):
        img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
        H, W = rgb.shape[:2]
        out.append(dict(img=img, true_shape=np.int32([[H, W]]), idx=i, instance=str(i)))
    return out


def pose_eval(model, cfg: PoseEvalConfig) -> dict:
    from ..align import global_align
    from ..inference import inference
    from ..metrics import pose_metrics
    from ..pairs import make_pairs
    from ..synth import camera_path, make_scene, render

    per = []
    for k in range(cfg.scenes):
        scene = make_scene(cfg.seed + k)
        c2w, K = camera_path(scene, cfg.views, cfg.baseline, seed=k, H=cfg.size, W=cfg.size)
        views = views_from_renders([render(scene, c2w[i], K[i], cfg.size, cfg.size)["rgb"] for i in range(cfg.views)])
        out = inference(make_pairs(views, "complete"), model, device="cpu", verbose=False)
        rec = global_align(out, mode="fast", verbose=False)
        per.append(pose_metrics(rec.c2w, c2w))
    res = {key: float(statistics.mean(float(p[key]) for p in per)) for key in per[0]}
    if cfg.pairs:
        from torch.utils.data import DataLoader

        from .datasets import PairBatchSampler, SyntheticScenes, collate_pairs
        from .loop import evaluate

        test = SyntheticScenes(cfg.pairs, (cfg.size, cfg.size), 1_000_003)
        loader = DataLoader(test, batch_sampler=PairBatchSampler(len(test), 8, shuffle=False), collate_fn=collate_pairs)
        from contextlib import nullcontext
        res.update({f"test_{k}": v for k, v in evaluate(model, loader, torch.device("cpu"), nullcontext, 1).items()})
    return res


def main() -> None:
    import tyro

    from ..model.checkpoint import build_model, load_model

    cfg = tyro.cli(PoseEvalConfig)
    model = load_model(cfg.model)
    if cfg.untrained:
        torch.manual_seed(0)
        model = build_model(model.config).eval()
    res = pose_eval(model, cfg)
    print(f"{'untrained' if cfg.untrained else cfg.model}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
