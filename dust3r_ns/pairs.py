"""Scene graphs: which image pairs DUSt3R runs on (complete, swin-k, logwin-k, oneref-k, -noncyclic variants, and
retrieval-k[+swin-w], chosen by image content).

Edges are unordered pairs listed as in the reference (complete: (i, j) for every j < i); `symmetrize` appends every
pair in the other order, so each edge is predicted from both sides. One image gives the monocular pair (0, 0)
(twice when symmetrized, as the reference runs the duplicated image in both view slots), whatever the graph name.
Names without K use K=3 (swin, logwin) and K=0 (oneref, the reference image index).
"""

from __future__ import annotations

import re

import numpy as np

GRAPH_HELP = ("complete, swin-K, logwin-K, oneref-K (swin/logwin also with a -noncyclic suffix), retrieval-K, "
              "retrieval-K+far[-F] or retrieval-K+swin-W (K nearest images by content, plus far links per image at "
              "similarity ranks 2K, 4K, ... (F of them, or all that exist), plus a sequential window W for ordered "
              "input), K >= 1")
RETRIEVAL = re.compile(r"retrieval(?:-(\d+))?(?:\+far(?:-(\d+))?)?(?:\+swin-(\d+))?")
RETRIEVAL_K = 8    # neighbours per image when the name gives none
FAR_MIN_SIMILARITY = 0.0
"""A far link needs a descriptor cosine above this: more alike than unrelated images (whose VLAD residuals do not
correlate). On a closed loop the ranks beyond half the images are the other side of the loop (a rendered 350-degree
loop of 200 frames: rank 128 links 122 degrees apart, median cosine -0.04), which a pair network answers with
confident, wrong rotations; along an open 1000-frame path the rank-512 links are 38 degrees apart and 92% of them
stay."""


def is_retrieval(scene_graph: str) -> bool:
    """True for a content-based graph (`retrieval-K[+swin-W]`), whose pairs need image descriptors."""
    return isinstance(scene_graph, str) and RETRIEVAL.fullmatch(scene_graph.strip()) is not None


def declares_order(scene_graph: str) -> bool:
    """True for graphs built on the photos' order, which the name says are frames of one sequence: swin-K and
    logwin-K (cyclic or not) and retrieval-K[+far]+swin-W."""
    if is_retrieval(scene_graph):
        return _parse_retrieval(scene_graph)[2] > 0
    return _parse(scene_graph)[0] in ("swin", "logwin")


def _parse_retrieval(scene_graph: str) -> tuple[int, int | None, int]:
    """(K, F, W) of `retrieval-K[+far[-F]][+swin-W]`: F = 0 without far links, None for `+far` alone (every doubling
    rank that exists)."""
    s = scene_graph.strip()
    m = RETRIEVAL.fullmatch(s)
    if m is None:
        raise ValueError(f"unknown scene graph {scene_graph!r}; use {GRAPH_HELP}")
    k = RETRIEVAL_K if m.group(1) is None else int(m.group(1))
    f = (None if "+far" in s else 0) if m.group(2) is None else int(m.group(2))
    w = 0 if m.group(3) is None else int(m.group(3))
    if k < 1 or (m.group(2) is not None and f < 1) or (m.group(3) is not None and w < 1):
        raise ValueError(f"scene graph {scene_graph!r}: K, F and W must be >= 1")
    return k, f, w


def _parse(scene_graph: str) -> tuple[str, int, bool]:
    if not isinstance(scene_graph, str):
        raise ValueError(f"scene graph must be a string like 'complete' or 'swin-3', got {scene_graph!r}")
    if is_retrieval(scene_graph):
        _parse_retrieval(scene_graph)
        raise ValueError(f"scene graph {scene_graph!r} ranks pairs by image content: it needs the images' "
                         "descriptors (pipeline.run_pairs or inference.inference_graph), not just their count")
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


def similarity_ranks(desc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S [N, N] cosine similarities of the unit descriptors `desc` [N, D] with -inf on the diagonal, order [N, N-1]
    each image's others from most to least similar, ties by index)."""
    desc = np.asarray(desc, dtype=np.float64)
    S = desc @ desc.T
    np.fill_diagonal(S, -np.inf)
    return S, np.argsort(-S, axis=1, kind="stable")[:, : len(desc) - 1]


def retrieval_edges(desc: np.ndarray, scene_graph: str = "retrieval", symmetrize: bool = True
                    ) -> list[tuple[int, int]]:
    """Edges of a retrieval graph over unit descriptors `desc` [N, D] (cosine similarity S = desc desc^T).

    Each image is paired with its K most similar images; `+far-F` adds, per image, the images at similarity ranks
    2K, 4K, ..., 2^F K (1-based, those that exist and have cosine > `FAR_MIN_SIMILARITY`; `+far`: all of them, about
    log2(N / K)): still overlapping views, but farther apart, so long sequences
    are held by links that skip many small steps (the content analogue of logwin-K; a pair model's systematic
    error on small steps would otherwise add up along the chain). The maximum spanning tree of S is added so the
    graph is connected whatever the clusters; `+swin-W` adds the pairs (i, i+1..i+W) of an ordered sequence.
    O(N (K + F)) pairs (`+far`: O(N (K + log N))).
    """
    k, far, w = _parse_retrieval(scene_graph)
    n = len(desc)
    if n == 1:
        return [(0, 0)] * (2 if symmetrize else 1)
    S, order = similarity_ranks(desc)                   # [N, N], [N, N-1]
    found: set[tuple[int, int]] = set()
    ranks = list(range(min(k, n - 1)))
    f = 1
    while (far is None or f <= far) and (k << f) <= n - 1:     # far links at ranks 2K, 4K, ... (1-based)
        ranks.append((k << f) - 1)
        f += 1
    near = min(k, n - 1)
    for i in range(n):
        for r, j in enumerate(order[i, ranks]):
            if r < near or S[i, j] > FAR_MIN_SIMILARITY:
                found.add((min(i, int(j)), max(i, int(j))))
    # maximum spanning tree (Prim, O(N^2)): connectivity
    in_tree = np.zeros(n, bool)
    in_tree[0] = True
    best, parent = S[0].copy(), np.zeros(n, np.int64)
    for _ in range(n - 1):
        cand = np.where(in_tree, -np.inf, best)
        j = int(np.argmax(cand))
        found.add((min(j, int(parent[j])), max(j, int(parent[j]))))
        in_tree[j] = True
        better = S[j] > best
        best = np.where(better, S[j], best)
        parent = np.where(better, j, parent)
    for i in range(n):
        for d in range(1, w + 1):
            if i + d < n:
                found.add((i, i + d))
    edges = sorted(found)
    if symmetrize:
        edges = edges + [(j, i) for i, j in edges]
    return edges


def default_scene_graph(n: int, ordered: bool = False) -> str:
    """complete up to 12 images (at most 132 ordered pairs); beyond, a retrieval graph (each image with its
    `RETRIEVAL_K` most similar images and far links at doubling similarity ranks, O(n log n) pairs), plus a
    sequential window of 2 for ordered input (video)."""
    if n <= 12:
        return "complete"
    return f"retrieval-{RETRIEVAL_K}+far" + ("+swin-2" if ordered else "")
