"""Fast mode: block-coordinate IRLS on the reference objective, coarse-to-fine.

Each outer iteration (all closed-form or tiny dense solves, vectorised over edges and images):
  1. per-edge similarity by weighted Umeyama to the current world points (IRLS weights log-conf / distance),
  2. edge-scale normalisation (scale gauge),
  3. per-image target = IRLS-weighted mean of the transformed pair point maps,
  4. per-image camera (rotation, centre, log-focal[, pp]) by Levenberg-Marquardt on point-to-ray distances with the
     depth eliminated, then 5. closed-form depth (closest point on each pixel ray).
The iterations run on point maps sub-sampled by `stride`; then a few full-resolution (edges, depth) iterations.
Stops early when the relative loss change falls below `tol`.
"""

from __future__ import annotations

import math
import time

import torch

from .core import (Constraints, State, areas, depth_from_targets, edge_chunk, fit_cameras, fit_edges,
                   normalize_edge_scales, objective, world_points, apply_sim)
from .data import PairData


def auto_stride(H: int, W: int, target: int = 3072) -> int:
    """Largest power-of-two stride leaving at least `target` pixels per image."""
    s = 1
    while (H // (2 * s)) * (W // (2 * s)) >= target:
        s *= 2
    return s


def _irls_eps(st: State) -> float:
    pos = st.depth[st.depth > 0]
    return 1e-3 * float(pos.median()) if pos.numel() else 1e-3


@torch.no_grad()
def accumulate_targets(data: PairData, st: State, X: torch.Tensor, eps: float, stride: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """IRLS-weighted mean of the edges' transformed point maps per image: Y (N,h,w,3), A (N,h,w) total weight."""
    N, h, w, _ = X.shape
    Ysum = torch.zeros_like(X)
    A = torch.zeros(N, h, w, device=X.device, dtype=X.dtype)
    ch = edge_chunk(data, (1 << 22) * stride ** 2)
    for a in range(0, data.n_edges, ch):
        sl = slice(a, a + ch)
        e = data.edges[sl]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            p = pts[sl, ::stride, ::stride]
            Yp = apply_sim(st.s[sl], st.R[sl], st.t[sl], p)
            wt = data.weights(side, sl)[:, ::stride, ::stride]
            wt = wt / (X[e[:, col]] - Yp).norm(dim=-1).clamp_min(eps)
            Ysum.index_add_(0, e[:, col], Yp * wt[..., None])
            A.index_add_(0, e[:, col], wt)
    Y = Ysum / A.clamp_min(1e-30)[..., None]
    return Y, A


@torch.no_grad()
def solve_fast(data: PairData, st: State, cons: Constraints, max_iter: int = 60, tol: float = 1e-4,
               stride: int | None = None, fine_iter: int = 3, cam_iters: int = 2, verbose: bool = False) -> dict:
    """Run the fast solver in place on `st`. Returns stats (iterations, losses, times)."""
    H, W = data.HW
    stride = auto_stride(H, W) if stride is None else max(1, int(stride))
    t0 = time.perf_counter()
    pose_free = None
    prev = math.inf
    n_it = 0
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc=f"align fast (stride {stride})", leave=False)
    losses = []
    for it in range(max_iter):
        n_it = it + 1
        eps = _irls_eps(st)
        dc = st.depth[:, ::stride, ::stride]
        X = world_points(st.c2w, st.focal, st.pp, dc, stride)
        loss = fit_edges(data, st, irls_eps=eps, stride=stride, X=X)
        losses.append(loss)
        normalize_edge_scales(st, cons)
        X = world_points(st.c2w, st.focal, st.pp, st.depth[:, ::stride, ::stride], stride)
        Y, A = accumulate_targets(data, st, X, eps, stride)
        c2w, f, pp = fit_cameras(Y, A, st.c2w, st.focal, st.pp, cons, stride=stride, iters=cam_iters,
                                 pose_free=pose_free)
        st.c2w, st.focal, st.pp = c2w, f, pp
        dnew = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, st.depth[:, ::stride, ::stride], stride)
        if stride == 1:
            st.depth = dnew
        else:
            # keep full-res depth in step with the coarse solution: per-image scale of the coarse change
            ratio = (dnew / st.depth[:, ::stride, ::stride].clamp_min(1e-30))
            st.depth[:, ::stride, ::stride] = dnew
            med = ratio.flatten(1).median(dim=1).values
            mask = torch.ones_like(st.depth, dtype=torch.bool)
            mask[:, ::stride, ::stride] = False
            st.depth = torch.where(mask, st.depth * med[:, None, None], st.depth)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5g}")
        if (math.isfinite(prev) and abs(prev - loss) <= tol * abs(prev)) or loss <= 1e-3 * eps:
            break
        prev = loss
    t_coarse = time.perf_counter() - t0
    # full resolution: cameras fixed, alternate edges and depth
    n_fine = 0
    if stride > 1 or fine_iter > 0:
        prevf = math.inf
        for it in range(max(fine_iter, 1) if stride > 1 else fine_iter):
            n_fine += 1
            eps = _irls_eps(st)
            X = world_points(st.c2w, st.focal, st.pp, st.depth)
            Y, A = accumulate_targets(data, st, X, eps, 1)
            st.depth = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, st.depth)
            loss = fit_edges(data, st, irls_eps=eps, stride=1)
            normalize_edge_scales(st, cons)
            if (math.isfinite(prevf) and abs(prevf - loss) <= tol * abs(prevf)) or loss <= 1e-3 * eps:
                break
            prevf = loss
    if bar is not None:
        bar.close()
    return dict(iterations=n_it, fine_iterations=n_fine, stride=stride, coarse_losses=losses,
                t_coarse=t_coarse, t_total=time.perf_counter() - t0)
