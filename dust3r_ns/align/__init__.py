"""Global alignment of pairwise DUSt3R predictions into one reconstruction (baseline = reference schedule, fast = ours).

Layout, by role:
    api.py        `global_align`, `estimate_memory`: options, memory check, 1/2-image paths, result assembly
    data.py       `PairData`: the pair predictions stacked per edge (`parse_output`), `AlignError`
    problem.py    the problem: unknowns (`State`), `Constraints`, world points, the objective, scale gauge
    init.py       initialisation: spanning-tree chaining (`mst_init`), with averaging.py (pose-graph averaging)
    edges.py      block step: edge similarities (weighted Umeyama, scale-gauged), then joint.py's step
    joint.py      block step: joint Gauss-Newton step on cameras, depth-map scales and edges
    cameras.py    block step: camera pose/focal/pp by Levenberg-Marquardt on point-to-ray distances
    depths.py     block step: per-image targets, closed-form depths, weighted-median depths
    fast.py       the fast loop: coarse-to-fine block-coordinate IRLS with acceleration (`solve_fast`)
    baseline.py   the reference schedule: Adam on the objective (`solve_baseline`)
    moments.py    accumulated Procrustes moments and the gauged scale solve; pinhole.py: pixel grid, focal helpers
Low-level rotation/Procrustes maths lives in `dust3r_ns.geometry`.
"""

from .api import estimate_memory, global_align
from .config import AlignConfig
from .data import AlignError

__all__ = ["global_align", "estimate_memory", "AlignConfig", "AlignError"]
