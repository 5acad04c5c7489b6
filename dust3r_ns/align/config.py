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

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def replace(self, **options: Any) -> "AlignConfig":
        """A copy with `options` changed (field names; `dtype` may also be a torch dtype)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown alignment option(s) {unknown}; AlignConfig has {sorted(names)}")
        dtype = options.get("dtype")
        if isinstance(dtype, torch.dtype):
            by_value = {v: k for k, v in DTYPES.items()}
            if dtype not in by_value:
                raise ValueError(f"dtype must be torch.float32/float16/bfloat16, got {dtype}")
            options["dtype"] = by_value[dtype]
        return dataclasses.replace(self, **options) if options else self
