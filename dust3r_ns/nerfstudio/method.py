"""nerfstudio method `dust3r-splatfacto`: splatfacto trained on the `dust3r` dataparser's cameras and seed points.

Headline command: ``ns-train dust3r-splatfacto --data photos/``. Differences from splatfacto's defaults: the
`dust3r` dataparser (seed points always on), joint pose refinement on (the model's camera optimizer, SO3xR3; off
with ``--pipeline.model.camera-optimizer.mode off``) with a learning-rate schedule for DUSt3R's pose errors (a short
warm-up, then decay over the full schedule; larger rates moved well-posed cameras away from the truth in
`dust3r-ns bench splat`), the machine defaults to CPU
when CUDA is absent (then the model's pure-PyTorch rasterizer is used: slow, for tests and demos; the seed point
cap is then 20k instead of 100k).

Importing this module (nerfstudio does so whenever it discovers its methods: `ns-train`, `ns-eval`, `ns-export`,
`ns-viewer`, `ns-render`) adds the numpy globals of nerfstudio's own checkpoints to torch's weights-only allow-list:
nerfstudio stores numpy float64 learning rates in its `.ckpt` files and loads them with `torch.load`'s default
(weights-only since torch 2.6), which refuses them otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanagerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.pipelines.base_pipeline import VanillaPipelineConfig
from nerfstudio.plugins.types import MethodSpecification

from dust3r_ns.nerfstudio.dataparser import Dust3rDataParserConfig
from dust3r_ns.nerfstudio.model import Dust3rSplatfactoModelConfig
from dust3r_ns.pipeline import PointsConfig

MAX_ITERS = 30_000

NS_CHECKPOINT_GLOBALS = (np.core.multiarray.scalar, np.dtype, np.dtypes.Float64DType)
"""What a nerfstudio checkpoint pickles besides tensors: numpy float64 scalars (learning rates in
`optimizers/*/param_groups/*/lr` and `schedulers/*/_last_lr`), rebuilt from their dtype and raw bytes."""


def allow_checkpoint_globals() -> None:
    """Add `NS_CHECKPOINT_GLOBALS` (only those) to torch's weights-only allow-list; a no-op when already there."""
    allowed = torch.serialization.get_safe_globals()
    missing = [g for g in NS_CHECKPOINT_GLOBALS if g not in allowed]
    if missing:
        torch.serialization.add_safe_globals(missing)


allow_checkpoint_globals()  # once per process: this module is imported once, before nerfstudio loads a checkpoint


def _adam(lr: float, final: float | None = None, warmup: int = 0) -> dict:
    sched = None
    if final is not None:
        sched = ExponentialDecaySchedulerConfig(lr_final=final, max_steps=MAX_ITERS, warmup_steps=warmup,
                                                lr_pre_warmup=0 if warmup else 1e-8)
    return {"optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15), "scheduler": sched}


def make_config() -> TrainerConfig:
    """The `dust3r-splatfacto` trainer configuration (device chosen from CUDA availability)."""
    cuda = torch.cuda.is_available()
    return TrainerConfig(
        method_name="dust3r-splatfacto",
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=MAX_ITERS,
        mixed_precision=False,
        machine=MachineConfig(device_type="cuda" if cuda else "cpu"),
        pipeline=VanillaPipelineConfig(
            datamanager=FullImageDatamanagerConfig(
                # fewer seed points on the CPU path (the dense rasterizer's cost grows with the Gaussian count)
                dataparser=Dust3rDataParserConfig(points=PointsConfig(max_points=100_000 if cuda else 20_000)),
                cache_images_type="uint8"),
            model=Dust3rSplatfactoModelConfig(),
        ),
        optimizers={
            "means": _adam(1.6e-4, 1.6e-6),
            "features_dc": _adam(0.0025),
            "features_rest": _adam(0.0025 / 20),
            "opacities": _adam(0.05),
            "scales": _adam(0.005),
            "quats": _adam(0.001),
            "camera_opt": _adam(3e-4, 1e-5, warmup=50),
            "bilateral_grid": _adam(2e-3, 1e-4, warmup=1000),
        },
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15),
        vis="viewer",
    )


dust3r_splatfacto = MethodSpecification(
    config=make_config(),
    description="Gaussian splatting (splatfacto) initialised from DUSt3R poses, intrinsics and points; "
                "runs on CPU (slowly) when CUDA is absent.",
)
