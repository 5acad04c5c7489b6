"""Global image descriptors from the encoder's tokens, for retrieval pair graphs (`pairs.retrieval_edges`).

VLAD over the patch tokens: tokens are projected on their top `dim` principal directions (fitted on a sample of
all images' tokens), a `k`-word codebook is fitted by k-means on the same sample, and each image's descriptor is
the concatenation over words of the summed residuals (token - word) of its tokens assigned to that word, each
word's block power-normalised (signed square root) and L2-normalised, the whole vector L2-normalised. Images that
show the same surfaces from nearby viewpoints share words and residuals; their descriptors' cosine similarity is
high. Deterministic for a given `seed`.
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_PER_IMAGE = 64      # tokens per image used to fit the projection and the codebook
SAMPLE_MAX = 20_000        # at most this many tokens in the fit


def _assign(z: np.ndarray, words: np.ndarray) -> np.ndarray:
    """Nearest word of each row of z [M, d] among words [k, d]."""
    d2 = (z * z).sum(1)[:, None] - 2 * z @ words.T + (words * words).sum(1)[None]
    return d2.argmin(1)


def vlad_descriptors(tokens: list[torch.Tensor], k: int = 16, dim: int = 32, iters: int = 20, seed: int = 0
                     ) -> np.ndarray:
    """[N, k * dim] unit descriptors of N images from their encoder tokens (each [T_i, C])."""
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
    out = np.zeros((len(feats), k * proj.shape[1]))
    for i, f in enumerate(feats):
        z = (f - mean) @ proj
        a = _assign(z, words)
        v = np.zeros((k, proj.shape[1]))
        np.add.at(v, a, z - words[a])
        v = np.sign(v) * np.sqrt(np.abs(v))
        v /= np.linalg.norm(v, axis=1, keepdims=True) + 1e-12
        v = v.ravel()
        out[i] = v / (np.linalg.norm(v) + 1e-12)
    return out
