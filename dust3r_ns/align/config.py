"""`AlignConfig`: the global-alignment options, declared once (the CLI, `reconstruct` and the nerfstudio dataparser
embed it; `global_align` takes it or the same names as keywords)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional

import torch
import tyro

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class RobustConfig:
    """Wrong pairs (outlier edges): found by consensus over the pose graph before the solve and by misfit after it,
    and dropped; consensus rejections that the solved poses explain are re-admitted (`dust3r_ns.align.robust`)."""

    enabled: bool = True
    """Detect and drop outlier edges (the graph stays connected and every image keeps an edge of its own)."""
    inlier_deg: float = 15.0
    """Consensus: an edge supports a rotation hypothesis when its relative rotation is within this (degrees)."""
    reject_deg: float = 10.0
    """Smallest rotation residual (degrees) at which an edge is rejected."""
    reject_factor: float = 4.0
    """Reject edges whose rotation residual exceeds this times the weighted median residual (if above reject_deg)."""
    scale_tol: float = 0.5
    """Reject edges whose relative log-scale disagrees with the consensus by more than this."""
    hypotheses: int = 32
    """Spanning-tree hypotheses of the consensus search."""
    gamma: float = 4.0
    """Consensus weight of an edge: (pair confidence score / median score) ** gamma."""
    misfit_factor: float = 4.0
    """After the solve: edges whose misfit exceeds this times the median misfit are dropped and the solve rerun."""
    rounds: int = 1
    """Misfit rounds after the solve (0: consensus only)."""
    readmit: bool = True
    """After the solve: edges rejected by the consensus that agree with the solved poses come back, the solve resumed."""
    readmit_deg: float = 30.0
    """Re-admit when the edge's rotation residual against the solved poses is below this (degrees), or below
    reject_factor times the weighted median residual of the kept edges if that is larger."""
    trial_deg: float = 20.0
    """A re-admitted edge stays when its residual against the poses re-solved with it is below this (degrees), or
    below reject_factor times the weighted median residual of the kept edges if that is larger; else it goes out
    again (inf: every re-admitted edge stays)."""
    sequence_window: int = 2
    """Ordered input (a video or --ordered): edges between frames at most this many apart get sequence_weight."""
    sequence_weight: float = 10.0
    """Consensus weight factor of those edges (neighbouring frames overlap; 1: no sequence prior)."""
    seed: int = 0
    """Seed of the perturbed spanning trees (results are deterministic)."""


@dataclass(frozen=True)
class AlignConfig:
    """How pairwise predictions are aligned into one reconstruction."""

    mode: Annotated[Literal["fast", "baseline"], tyro.conf.arg(aliases=("--align-mode",))] = "fast"
    """Solver: 'fast' (closed-form IRLS blocks, coarse-to-fine) or 'baseline' (the reference's Adam schedule)."""
    niter: Annotated[Optional[int], tyro.conf.arg(aliases=("--niter", "--align-niter"))] = None
    """Iteration cap (baseline: Adam steps, default 300; fast: outer iterations, default 100)."""
    shared_focal: Annotated[bool, tyro.conf.arg(aliases=("--shared-focal",))] = False
    """One focal length for all images (same camera and zoom)."""
    optimize_pp: bool = False
    """Also optimise the principal points of images without known intrinsics."""
    device: Annotated[Optional[str], tyro.conf.arg(aliases=("--align-device",))] = None
    """Torch device of the alignment; None: the network's device (cpu when aligning on its own)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the pair predictions during alignment (float16 halves their memory; maths stays float32)."""
    tol: float = 1e-5
    """Fast mode: stop when the loss falls by less than this (relative) per iteration."""
    stride: Optional[int] = None
    """Fast mode: pixel sub-sampling stride of the coarse phase; None: automatic."""
    lr: float = 0.01
    """Baseline mode: Adam learning rate."""
    metric_iter: int = 10
    """Fast mode with >= 2 known poses: iteration cap of the metric phase."""
    global_step: bool = True
    """Fast mode: start from rotation/scale/translation averaging over all edges (else the spanning tree alone)."""
    memory_limit_bytes: Optional[int] = None
    """Memory budget for the estimate check; None: the device's available memory."""
    robust: RobustConfig = RobustConfig()
    """Outlier-edge handling (more than two images)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **options: Any) -> "AlignConfig":
        """A copy with `options` changed (field names; `dtype` may also be a torch dtype)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown alignment option(s) {unknown}; AlignConfig has {sorted(names)}")
        if isinstance(options.get("robust"), bool):
            options["robust"] = dataclasses.replace(self.robust, enabled=options["robust"])
        dtype = options.get("dtype")
        if isinstance(dtype, torch.dtype):
            by_value = {v: k for k, v in DTYPES.items()}
            if dtype not in by_value:
                raise ValueError(f"dtype must be torch.float32/float16/bfloat16, got {dtype}")
            options["dtype"] = by_value[dtype]
        return dataclasses.replace(self, **options) if options else self
