"""Toy oracle pair predictions from known cameras and smooth depth maps (no rendering): tests and benchmark smoke
runs.

Each image has its own smooth depth map; pair (i, j) predicts image i's and image j's points in camera i's frame,
times a random per-pair scale, optionally with multiplicative Gaussian noise. Visibility is ignored (every pixel of
j is "seen"), so noise-free predictions are exactly consistent with one reconstruction.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dust3r_ns.geometry import look_at

_UP = np.array([0.0, 1.0, 0.0])   # the toy world's up direction (cameras: image rows point along -y)


def make_pairs_output(n=5, shapes=None, noise=0.0, seed=0, focal_factor=0.9, edges=None, meta=False):
    """Cameras on an arc looking at the origin, smooth depth maps, oracle pair predictions with random pair scales.

    shapes: per-image (H, W) (default (24, 32) each); edges: ordered pairs (default all); meta: add names,
    original sizes and crop transforms to the views. Returns (output dict in the pair-inference layout,
    ground truth dict: c2w [N, 4, 4], K [N, 3, 3], depth list of [H, W]).
    """
    g = np.random.default_rng(seed)
    shapes = shapes or [(24, 32)] * n
    c2w, Ks, depths, Xw = [], [], [], []
    for k in range(n):
        a = 0.5 * math.pi * k / max(n, 2) + g.normal(0, 0.03)
        C = np.array([3 * math.sin(a), g.normal(0, 0.2), -3 * math.cos(a)])
        c2w.append(look_at(C, g.normal(0, 0.1, 3), _UP))
        H, W = shapes[k]
        f = focal_factor * max(H, W) * g.uniform(0.95, 1.05)
        K = np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])
        v, u = np.mgrid[0:H, 0:W].astype(float)
        d = 3 + 0.4 * np.sin(3 * u / W + g.uniform(0, 6)) + 0.3 * np.cos(4 * v / H + g.uniform(0, 6))
        pc = np.stack([(u - W / 2) / f * d, (v - H / 2) / f * d, d], -1)
        Xw.append(pc @ c2w[k][:3, :3].T + c2w[k][:3, 3])
        Ks.append(K)
        depths.append(d)
    if edges is None:
        edges = [(i, j) for i in range(n) for j in range(n) if i != j]
    P1, P2, C1, C2 = [], [], [], []
    for i, j in edges:
        w2c = np.linalg.inv(c2w[i])
        sc = g.uniform(0.5, 2.0)
        p1 = (Xw[i] @ w2c[:3, :3].T + w2c[:3, 3]) * sc
        p2 = (Xw[j] @ w2c[:3, :3].T + w2c[:3, 3]) * sc
        if noise:
            p1 = p1 * (1 + noise * g.standard_normal(p1.shape))
            p2 = p2 * (1 + noise * g.standard_normal(p2.shape))
        P1.append(torch.tensor(p1, dtype=torch.float32))
        P2.append(torch.tensor(p2, dtype=torch.float32))
        C1.append(torch.tensor(1 + np.exp(g.uniform(0, 2, p1.shape[:2])), dtype=torch.float32))
        C2.append(torch.tensor(1 + np.exp(g.uniform(0, 2, p2.shape[:2])), dtype=torch.float32))
    uniform = len(set(shapes)) == 1
    st = (lambda x: torch.stack(x)) if uniform else (lambda x: [t[None] for t in x])
    v1 = dict(idx=[e[0] for e in edges], true_shape=torch.tensor([shapes[e[0]] for e in edges]))
    v2 = dict(idx=[e[1] for e in edges], true_shape=torch.tensor([shapes[e[1]] for e in edges]))
    if meta:
        for v, col in ((v1, 0), (v2, 1)):
            v["name"] = [f"img{e[col]}.jpg" for e in edges]
            v["orig_size"] = [np.array([shapes[e[col]][1] * 4, shapes[e[col]][0] * 4]) for e in edges]
            v["transform"] = [np.array([0.25, 0.25, 0.0, 0.0]) for e in edges]
    out = dict(view1=v1, view2=v2, pred1=dict(pts3d=st(P1), conf=st(C1)),
               pred2=dict(pts3d_in_other_view=st(P2), conf=st(C2)))
    return out, dict(c2w=np.stack(c2w), K=np.stack(Ks), depth=depths)
