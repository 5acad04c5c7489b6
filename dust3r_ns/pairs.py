"""Scene graphs: which image pairs DUSt3R runs on (complete, swin-k, logwin-k, oneref-k, -noncyclic variants).

Edges are unordered pairs listed as in the reference (complete: (i, j) for every j < i); `symmetrize` appends every
pair in the other order, so each edge is predicted from both sides. One image gives the monocular pair (0, 0)
(twice when symmetrized, as the reference runs the duplicated image in both view slots), whatever the graph name.
Names without K use K=3 (swin, logwin) and K=0 (oneref, the reference image index).
"""

from __future__ import annotations

import re

GRAPH_HELP = "complete, swin-K, logwin-K, oneref-K (swin/logwin also with a -noncyclic suffix), K >= 1"


def _parse(scene_graph: str) -> tuple[str, int, bool]:
    if not isinstance(scene_graph, str):
        raise ValueError(f"scene graph must be a string like 'complete' or 'swin-3', got {scene_graph!r}")
    m = re.fullmatch(r"(complete|swin|logwin|oneref)(?:-(\d+))?(-noncyclic)?", scene_graph.strip())
    if m is None or (m.group(1) in ("complete", "oneref") and m.group(3)):
        raise ValueError(f"unknown scene graph {scene_graph!r}; use {GRAPH_HELP}")
    kind, k, noncyclic = m.group(1), m.group(2), bool(m.group(3))
    default = 0 if kind == "oneref" else 3
    k = default if k is None else int(k)
    if kind in ("swin", "logwin") and k < 1:
        raise ValueError(f"scene graph {scene_graph!r}: the window must be >= 1")
    return kind, k, not noncyclic


def _parse_prefilter(prefilter: str | None) -> tuple[str, int] | None:
    if prefilter is None or prefilter == "":
        return None
    m = re.fullmatch(r"(seq|cyc)(\d+)", str(prefilter).strip())
    if m is None or int(m.group(2)) < 1:
        raise ValueError(f"unknown pair prefilter {prefilter!r}; use seqN (keep |i-j| <= N) or cycN (cyclic "
                         "index distance <= N), N >= 1, or None")
    return m.group(1), int(m.group(2))


def graph_edges(n: int, scene_graph: str = "complete", symmetrize: bool = True,
                prefilter: str | None = None) -> list[tuple[int, int]]:
    """Index pairs of the scene graph over n images.

    `prefilter` 'seqN' keeps pairs with |i - j| <= N, 'cycN' pairs with cyclic index distance <= N (for videos).
    """
    if n < 1:
        raise ValueError("no images: a scene graph needs at least one image")
    kind, k, cyclic = _parse(scene_graph)
    filt = _parse_prefilter(prefilter)
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
    if filt is not None:
        mode, dmax = filt
        edges = [(i, j) for i, j in edges
                 if (abs(i - j) if mode == "seq" else min(abs(i - j), n - abs(i - j))) <= dmax]
    if symmetrize:
        edges = edges + [(j, i) for i, j in edges]
    return edges


def make_pairs(views: list, scene_graph: str = "complete", symmetrize: bool = True,
               prefilter: str | None = None) -> list[tuple]:
    """(view_i, view_j) tuples of the scene graph over the given views (dicts from `load_images`)."""
    if not isinstance(views, (list, tuple)):
        raise ValueError(f"make_pairs needs a list of views (from load_images), got {type(views).__name__}")
    return [(views[i], views[j]) for i, j in graph_edges(len(views), scene_graph, symmetrize, prefilter)]


def default_scene_graph(n: int) -> str:
    """complete up to 12 images (at most 132 ordered pairs); beyond, a cyclic log-window (O(n log n) pairs)
    whose offsets 1, 2, 4, ... reach across the sequence: logwin-k with 2**(k-1) < n/2."""
    if n <= 12:
        return "complete"
    k = 1
    while 2 ** k < n // 2 and k < 6:
        k += 1
    return f"logwin-{k}"
