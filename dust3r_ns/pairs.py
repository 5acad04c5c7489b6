"""Scene graphs: which image pairs DUSt3R runs on (complete, swin-k, logwin-k, oneref-k, -noncyclic variants).

Edges are unordered pairs listed as in the reference (complete: (i, j) for every j < i); `symmetrize` appends every
pair in the other order, so each edge is predicted from both sides. One image gives the monocular pair (0, 0).
"""

from __future__ import annotations

import re

GRAPH_HELP = "complete, swin-K, logwin-K, oneref-K (swin/logwin also with a -noncyclic suffix), K >= 1"


def _parse(scene_graph: str) -> tuple[str, int, bool]:
    m = re.fullmatch(r"(complete|swin|logwin|oneref)(?:-(\d+))?(-noncyclic)?", scene_graph.strip())
    if m is None or (m.group(1) in ("complete", "oneref") and m.group(3)):
        raise ValueError(f"unknown scene graph {scene_graph!r}; use {GRAPH_HELP}")
    kind, k, noncyclic = m.group(1), m.group(2), bool(m.group(3))
    default = 0 if kind == "oneref" else 3
    k = default if k is None else int(k)
    if kind in ("swin", "logwin") and k < 1:
        raise ValueError(f"scene graph {scene_graph!r}: the window must be >= 1")
    return kind, k, not noncyclic


def graph_edges(n: int, scene_graph: str = "complete", symmetrize: bool = True) -> list[tuple[int, int]]:
    """Index pairs of the scene graph over n images."""
    if n < 1:
        raise ValueError("no images: a scene graph needs at least one image")
    kind, k, cyclic = _parse(scene_graph)
    if n == 1:
        return [(0, 0)] * (2 if symmetrize else 1)
    if kind == "complete":
        edges = [(i, j) for i in range(n) for j in range(i)]
    elif kind == "oneref":
        if k >= n:
            raise ValueError(f"scene graph {scene_graph!r}: reference image {k} does not exist ({n} images)")
        edges = [(k, j) for j in range(n) if j != k]
    else:
        offsets = range(1, k + 1) if kind == "swin" else [2**e for e in range(k)]
        found = set()
        for i in range(n):
            for d in offsets:
                j = i + d
                if j >= n:
                    if not cyclic:
                        continue
                    j %= n
                if i != j:
                    found.add((min(i, j), max(i, j)))
        edges = sorted(found)
    if symmetrize:
        edges = edges + [(j, i) for i, j in edges]
    return edges


def make_pairs(views: list, scene_graph: str = "complete", symmetrize: bool = True) -> list[tuple]:
    """(view_i, view_j) tuples of the scene graph over the given views (dicts from `load_images`)."""
    return [(views[i], views[j]) for i, j in graph_edges(len(views), scene_graph, symmetrize)]


def default_scene_graph(n: int) -> str:
    """complete up to 12 images (at most 132 ordered pairs); beyond, a cyclic log-window (O(n log n) pairs)
    whose offsets 1, 2, 4, ... reach across the sequence: logwin-k with 2**(k-1) < n/2."""
    if n <= 12:
        return "complete"
    k = 1
    while 2 ** k < n // 2 and k < 6:
        k += 1
    return f"logwin-{k}"
