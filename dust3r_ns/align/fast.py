"""Fast mode: block-coordinate IRLS on the reference objective, coarse-to-fine.

Each outer iteration (all closed-form or tiny dense solves, vectorised over edges and images):
  1. per-edge similarity by weighted Umeyama to the current world points (IRLS weights log-conf / distance),
  2. edge-scale normalisation (scale gauge),
  3. per-image target = IRLS-weighted mean of the transformed pair point maps,
  4. per-image camera (rotation, centre, log-focal[, pp]) by Levenberg-Marquardt on point-to-ray distances with the
     depth eliminated, then 5. closed-form depth (closest point on each pixel ray).
The iterations run on point maps sub-sampled by `stride`; then one full-resolution pass gives every pixel's depth.
Stops early when the relative loss change falls below `tol`.
"""

from __future__ import annotations

import math
import time

import torch

from .core import (BASE_SCALE, Constraints, State, _chunks, apply_sim, areas, depth_from_targets, fit_cameras,
                   fit_edges, sub_depth, world_points)
from .data import PairData


def auto_stride(H: int, W: int, target: int = 3072) -> int:
    """Largest power-of-two stride leaving at least `target` pixels per image."""
    s = 1
    while (H // (2 * s)) * (W // (2 * s)) >= target:
        s *= 2
    return s


def _irls_eps(depth: torch.Tensor) -> float:
    pos = depth[depth > 0]
    return 1e-3 * float(pos.median()) if pos.numel() else 1e-3


@torch.no_grad()
def accumulate_targets(data: PairData, st: State, X: torch.Tensor, eps: float, loss_out: list | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """IRLS-weighted mean of the edges' transformed point maps per image: Y (N,h,w,3), A (N,h,w) total weight.

    X: current world points on the data's grid (for the IRLS weights). loss_out: if given, the objective at X is
    appended (computed in the same pass).
    """
    N, h, w, _ = X.shape
    Ysum = torch.zeros(N, h * w * 3, device=X.device, dtype=X.dtype)
    A = torch.zeros(N, h * w, device=X.device, dtype=X.dtype)
    area = areas(data) if loss_out is not None else (1.0, 1.0)
    loss = 0.0
    for sl in _chunks(data):
        e = data.edges[sl]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            Yp = apply_sim(st.s[sl], st.R[sl], st.t[sl], pts[sl])
            wt = data.weights(side, sl)
            dist = (X[e[:, col]] - Yp).norm(dim=-1)
            if loss_out is not None:
                loss += float((wt * dist).sum()) / area[side - 1]
            wt = wt / dist.clamp_min_(eps)
            b = wt.shape[0]
            Ysum.index_add_(0, e[:, col], (Yp * wt[..., None]).reshape(b, -1))
            A.index_add_(0, e[:, col], wt.reshape(b, -1))
    if loss_out is not None:
        loss_out.append(loss)
    Y = Ysum.reshape(N, h, w, 3) / A.clamp_min(1e-30).reshape(N, h, w, 1)
    return Y, A.reshape(N, h, w)


@torch.no_grad()
def solve_fast(data: PairData, st: State, cons: Constraints, max_iter: int = 60, tol: float = 1e-4,
               stride: int | None = None, coarse: PairData | None = None, cam_iters: int = 2, fine_iter: int = 3,
               verbose: bool = False) -> dict:
    """Run the fast solver in place on `st` (full-resolution state). Returns stats (iterations, losses, times).

    coarse: the sub-sampled data (built from `stride` when not given; stride None = auto).
    """
    H, W = data.HW
    if coarse is None:
        stride = auto_stride(H, W) if stride is None else max(1, int(stride))
        coarse = data.coarse(stride)
    s = coarse.stride // data.stride
    t0 = time.perf_counter()
    prev = math.inf
    n_it = 0
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc=f"align fast (1/{s} res)", leave=False)
    losses: list[float] = []
    dc = sub_depth(st.depth, s)
    d_start = dc.clone()
    for it in range(max_iter):
        n_it = it + 1
        eps = _irls_eps(dc)
        loss = fit_edges(coarse, st, irls_eps=eps, depth=dc)
        losses.append(loss)
        c = _normalize(st, cons)
        dc = dc * c
        X = world_points(st.c2w, st.focal, st.pp, dc, coarse.stride)
        Y, A = accumulate_targets(coarse, st, X, eps)
        st.c2w, st.focal, st.pp = fit_cameras(Y, A, st.c2w, st.focal, st.pp, cons, stride=coarse.stride,
                                              iters=cam_iters)
        dc = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, dc, coarse.stride)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5g}")
        if (math.isfinite(prev) and abs(prev - loss) <= tol * abs(prev)) or loss <= 1e-3 * eps:
            break
        prev = loss
    t_coarse = time.perf_counter() - t0
    final: list[float] = []
    if s > 1:
        # full resolution: IRLS weights from the old full-res depth rescaled like its coarse samples, then the
        # closed-form depth of every pixel for the final cameras and edges (one pass), then the loss (one pass)
        ratio = (dc / d_start.clamp_min(1e-30)).flatten(1).median(dim=1).values
        depth = st.depth * ratio[:, None, None]
        eps = _irls_eps(dc)
        prevf = math.inf
        for _ in range(fine_iter):   # IRLS on the per-pixel depths (cameras and edges fixed)
            fl: list[float] = []
            X = world_points(st.c2w, st.focal, st.pp, depth, data.stride)
            Y, A = accumulate_targets(data, st, X, eps, loss_out=fl)
            del X
            depth = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, depth, data.stride)
            del Y, A
            final.append(fl[0])
            if abs(prevf - fl[0]) <= 10 * tol * abs(prevf):
                break
            prevf = fl[0]
        st.depth = depth
    else:
        st.depth = dc
    if bar is not None:
        bar.close()
    return dict(iterations=n_it, stride=s, coarse_losses=losses, fine_losses=final, t_coarse=t_coarse, t_total=time.perf_counter() - t0)


def _normalize(st: State, cons: Constraints) -> float:
    """Edge-scale normalisation on the cameras/edges; returns the factor for depth maps held outside `st`."""
    if not cons.normalize_scale:
        return 1.0
    c = BASE_SCALE / float(torch.exp(torch.log(st.s.clamp_min(1e-30)).mean()))
    st.s *= c
    st.t *= c
    st.c2w[:, :3, 3] *= c
    return c
