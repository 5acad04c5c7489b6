"""Global image descriptors from the encoder's tokens, for retrieval pair graphs (`pairs.retrieval_edges`).

VLAD over the patch tokens: tokens are projected on their top `dim` principal directions (fitted on a sample of
all images' tokens), a `k`-word codebook is fitted by k-means on the same sample, and each image's descriptor is
the concatenation over words of the summed residuals (token - word) of its tokens assigned to that word, each
word's block power-normalised (signed square root) and L2-normalised, the whole vector L2-normalised. Images that
show the same surfaces from nearby viewpoints share words and residuals; their descriptors' cosine similarity is
high. Deterministic for a given `seed`.

With the tokens' patch positions and `grid` g > 1, the descriptor also has one VLAD (same projection and words)
per cell of a g x g split of the image, each cell's vector unit-normalised and the whole divided by sqrt(1 + g^2)
so the global VLAD and the layout count equally (cosine = (global + sum of cells) / (1 + g^2)). The global VLAD
is blind to where things are: two views from opposite sides of a room see the same objects, mirrored, and score
as neighbours (on a rendered 350-degree loop of 50 frames, 19% of retrieval-8's pairs were more than 60 degrees
apart; with the 2 x 2 layout 9%), pairs that a pair network answers with a confident, wrong, small rotation.
"""

from __future__ import annotations

import numpy as np
import torch

from dust3r_ns.pairs import FAR_MIN_SIMILARITY, RETRIEVAL_K, is_retrieval, similarity_ranks

RECIPE = f"vlad-k16-d32-grid2-far{FAR_MIN_SIMILARITY:g}"
"""How a retrieval graph chooses its pairs: `vlad_descriptors` as the engine calls it (its defaults, with the
tokens' positions) and the far links' similarity floor; cache keys of pair predictions include it (`graph_key`)."""
SEQUENCE_GAP = 0.15
"""Images in index (file-name) order form a sequence when the median index distance to their most similar images
is below this fraction of their number (`looks_sequential`): half of a shuffled set's (1 - 1/sqrt(2) ~ 0.29)."""
SAMPLE_PER_IMAGE = 64      # tokens per image used to fit the projection and the codebook
SAMPLE_MAX = 20_000        # at most this many tokens in the fit


def graph_key(scene_graph: str | None) -> str:
    """The part of a cache key that names a scene graph's pairs: the name, plus `RECIPE` for a retrieval graph or for
    '' (the default graph, a retrieval one above 12 images), so caches from another recipe are not reused."""
    if not scene_graph or is_retrieval(scene_graph):
        return f"{scene_graph or ''}@{RECIPE}"
    return scene_graph


def looks_sequential(desc: np.ndarray, k: int = RETRIEVAL_K) -> bool:
    """True when the images, in index order, form a sequence by content (frames of a video, photos taken walking
    around): over the links from each image to its k most similar ones (cosine of the unit descriptors `desc`
    [N, D]), the median index distance |i - j| is below `SEQUENCE_GAP` x N. For images in random order |i - j| is
    distributed as the distance of two random indices (median ~ 0.29 N); along a sequence, content neighbours are
    index neighbours (median ~ k / 4 at best, so short sequences, N < ~ 2 k, are never found)."""
    n = len(desc)
    if n < 3:
        return False
    top = similarity_ranks(desc)[1][:, :k]                # [N, k]
    return bool(np.median(np.abs(top - np.arange(n)[:, None])) < SEQUENCE_GAP * n)


def _assign(z: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Nearest word of each row of z [M, d] among words [k, d]."""
    d2 = (z * z).sum(1)[:, None] - 2 * z @ words.T + (words * words).sum(1)[None]
    return d2.argmin(1)


def _vlad(z: np.ndarray, a: np.ndarray, words: np.ndarray) -> np.ndarray:
    """[k * d] unit VLAD of projected tokens z [T, d] assigned to words a [T] (words [k, d])."""
    v = np.zeros(words.shape)
    np.add.at(v, a, z - words[a])
    v = np.sign(v) * np.sqrt(np.abs(v))
    v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
    v = v.ravel()
    return v / (np.linalg.norm(v) + 1e-12)


def vlad_descriptors(tokens: list[torch.Tensor], k: int = 16, dim: int = 32, iters: int = 20, seed: int = 0,
                     positions: list[torch.Tensor] | None = None, grid: int = 2) -> np.ndarray:
    """[N, (1 + g^2) k d] descriptors of N images from their encoder tokens (each [T_i, C]; d = min(dim, C); unit
    when every cell has tokens): the global VLAD, then with `positions` (each [T_i, 2], the tokens' patch (row,
    column)) and g = `grid` > 1 one VLAD per cell of a g x g split (module doc); without positions or with grid 1,
    the global VLAD alone."""
    rng = np.random.default_rng(seed)
    feats = [t.detach().float().cpu().numpy() for t in tokens]
    per = max(1, min(SAMPLE_PER_IMAGE, SAMPLE_MAX // max(1, len(feats))))
    sample = np.concatenate([f[rng.choice(len(f), min(per, len(f)), replace=False)] for f in feats])
    mean = sample.mean(0)
    _, _, vt = np.linalg.svd(sample - mean, full_matrices=False)
    proj = vt[: min(dim, vt.shape[0])].T                                  # [C, d]
    zs = (sample - mean) @ proj
    k = min(k, len(zs))
    words = zs[rng.choice(len(zs), k, replace=False)]
    for _ in range(iters):                                                # Lloyd's k-means
        a = _assign(zs, words)
        for c in range(k):
            if (a == c).any():
                words[c] = zs[a == c].mean(0)
    g = grid if positions is not None and grid > 1 else 1
    if positions is not None and len(positions) != len(feats):
        raise ValueError(f"vlad_descriptors: {len(positions)} position arrays for {len(feats)} token arrays")
    blocks = 1 + g * g if g > 1 else 1
    out = np.zeros((len(feats), blocks, k * proj.shape[1]))
    for i, f in enumerate(feats):
        z = (f - mean) @ proj                                             # [T, d]
        a = _assign(z, words)                                             # [T]
        out[i, 0] = _vlad(z, a, words)
        if g > 1:
            pos = positions[i].detach().cpu().numpy().astype(np.float64)  # [T, 2] (row, column)
            lo, hi = pos.min(0), pos.max(0)
            cell = np.minimum((g * (pos - lo) / (hi - lo + 1)).astype(np.int64), g - 1)   # [T, 2] in 0..g-1
            cid = cell[:, 0] * g + cell[:, 1]
            for c in range(g * g):
                m = cid == c
                if m.any():
                    out[i, 1 + c] = _vlad(z[m], a[m], words)
    return out.reshape(len(feats), -1) / np.sqrt(blocks)
