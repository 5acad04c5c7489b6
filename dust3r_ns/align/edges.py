"""Edge block: each edge's similarity P_e = (s_e, R_e, t_e) fitted to the current world points by weighted Umeyama
(`fit_edges`), optionally followed by the joint camera/edge Gauss-Newton step (`fit_edges_joint`).

With the world points X fixed, the objective separates over the edges; each edge's IRLS quadratic
sum w / max(|r|, eps) |X - s R p - t|^2 (r the current residual) is minimised in closed form from its Procrustes
moments. Under the scale gauge (fewer than two known poses) the edges are solved together with
mean_e log s_e = log BASE_SCALE (`moments.gauged_scales`): a free fit followed by a rescale of the whole solution
does not minimise the gauged objective (the free fit always prefers smaller scales).
"""

from __future__ import annotations

import math

import torch

from .data import PairData
from .joint import joint_moments, joint_step, umeyama_sums
from .moments import Moments
from .pinhole import focal_bounds
from .problem import (BASE_SCALE, Constraints, State, apply_sim_cf, areas, channels_first, dist_cf, edge_sides,
                      world_points)


def fit_edges(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor | None = None,
              gauge: bool = False) -> float:
    """Fit every edge's similarity of `st` (in place) to the world points. Returns the objective before the fit.

    irls_eps None: weights = log-conf; else IRLS weights log-conf / max(dist, irls_eps) (the objective's majoriser).
    depth: depth maps on the data's grid (default st.depth). gauge: solve the edges jointly under the scale gauge.
    """
    loss, mom, _ = edge_moments(data, st, irls_eps, depth, side_moments=False)
    solve_edges(data, st, mom, gauge)
    return loss


def fit_edges_joint(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor, cons: Constraints
                    ) -> tuple[float, torch.Tensor]:
    """`fit_edges`, then the joint camera/edge/depth-scale step (`joint.joint_step`) from the same pass's moments:
    updates the cameras and edges of `st` in place; returns the objective before both and the rescaled depths.
    Known poses and focals stay put; a shared focal is left to the camera fit."""
    loss, mom, M7 = edge_moments(data, st, irls_eps, depth, side_moments=True)
    solve_edges(data, st, mom, cons.normalize_scale)
    N = data.n_images
    focal_free = (torch.zeros(N, dtype=torch.bool) if cons.shared_focal
                  else torch.ones(N, dtype=torch.bool) if cons.focal_mask is None else ~cons.focal_mask.cpu())
    H, W = data.HW
    f_range = focal_bounds(H * data.stride, W * data.stride)
    gain = joint_step(data.edges, st, M7, cons.pose_mask, focal_free, cons.normalize_scale, f_range)
    return loss, depth if gain is None else depth * gain[:, None, None]


def edge_moments(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor | None, side_moments: bool
                 ) -> tuple[float, Moments, torch.Tensor | None]:
    """One pass over the edges: the objective (zero unless irls_eps is given), the Umeyama moments per edge with
    the (IRLS) weights and, if asked, the [E, 2, 7, 7] moments per edge side of `joint.joint_moments` (which hold
    the Umeyama ones)."""
    depth = st.depth if depth is None else depth
    X = channels_first(world_points(st.c2w, st.focal, st.pp, depth, data.stride))     # [N, 3, M]
    mom = Moments(data.n_edges)
    area_i, area_j = areas(data)
    loss = torch.zeros((), device=X.device, dtype=torch.float64)
    M7 = torch.zeros(data.n_edges, 2, 7, 7, device=X.device, dtype=torch.float64) if side_moments else None
    for sl, side, img, p, w in edge_sides(data):
        Xt = X[img]
        if irls_eps is not None:
            dist = dist_cf(Xt, apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], p))
            loss += (w * dist).sum().double() / (area_i if side == 1 else area_j)
            w = w / dist.clamp_min(irls_eps)
        if M7 is None:
            mom.add_cf(p, Xt, w, idx=sl)
        else:
            M7[sl, side - 1] = M = joint_moments(Xt, p, w)
            mom.add_sums(umeyama_sums(M), sl)
    return float(loss), mom, M7


def solve_edges(data: PairData, st: State, mom: Moments, gauge: bool) -> None:
    """The edges' similarities of `st` from their moments (under the scale gauge if asked); non-finite fits keep
    theirs. Edges without weight keep their scale and still count in the gauge."""
    log_mean = None
    if gauge:
        good = mom.w > 0
        n_good = int(good.sum())
        if n_good:
            rest = float(torch.log(st.s.cpu().double().clamp_min(1e-30))[~good].sum())
            log_mean = (data.n_edges * math.log(BASE_SCALE) - rest) / n_good
    dev = st.s.device
    s, R, t = (x.to(dev) for x in mom.solve(True, log_scale_mean=log_mean))
    ok = torch.isfinite(s) & (s > 0)
    st.s = torch.where(ok, s.float(), st.s)
    st.R = torch.where(ok[:, None, None], R.float(), st.R)
    st.t = torch.where(ok[:, None], t.float(), st.t)
