"""dust3r_ns: DUSt3R pose-free reconstruction (network, pair inference, global alignment) for nerfstudio.

The pipeline's steps, importable from the package itself::

    from dust3r_ns import load_model, load_images, make_pairs, inference, global_align, Reconstruction

Names are resolved on first use (PEP 562), so `import dust3r_ns.conventions` does not load torch models.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_model": "dust3r_ns.model.checkpoint",
    "load_images": "dust3r_ns.images",
    "make_view": "dust3r_ns.images",
    "View": "dust3r_ns.images",
    "ImageInfo": "dust3r_ns.images",
    "make_pairs": "dust3r_ns.pairs",
    "inference": "dust3r_ns.inference",
    "PairPredictions": "dust3r_ns.predictions",
    "global_align": "dust3r_ns.align",
    "AlignConfig": "dust3r_ns.align",
    "Reconstruction": "dust3r_ns.scene",
    "NetworkConfig": "dust3r_ns.pipeline",
    "PairsConfig": "dust3r_ns.pipeline",
    "PointsConfig": "dust3r_ns.pipeline",
    "reconstruct_images": "dust3r_ns.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dust3r_ns' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
