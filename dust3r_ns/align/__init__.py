"""Global alignment of pairwise DUSt3R predictions into one reconstruction (baseline = reference schedule, fast = ours)."""

from .api import estimate_memory, global_align
from .config import AlignConfig
from .data import AlignError

__all__ = ["global_align", "estimate_memory", "AlignConfig", "AlignError"]
