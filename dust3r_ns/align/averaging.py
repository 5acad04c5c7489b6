"""Global pose-graph step of the fast mode: rotation, scale and translation averaging over every edge at once.

Each image n has an "own" point map (its camera frame: pts1 of its best edge as first view). An ordered edge
e = (i, j) predicts both images in one frame; two weighted Procrustes fits of the own maps into it give the relative
similarity G_e mapping j's own frame into i's: scale rho_e, rotation R_e, translation t_e. With the world
X_n = lam_n R_n own_n + C_n, every edge says
    R_j = R_i R_e,    log lam_j = log lam_i + log rho_e,    C_j - C_i = lam_i R_i t_e.
Rotations: robust Lie-algebraic averaging (IRLS with L1-type weights) started from the spanning-tree rotations;
then log-scales and centres by weighted, IRLS-robust linear least squares over the graph Laplacian (first image
fixed as the gauge). Unlike spanning-tree chaining, errors spread over all loops of the graph instead of piling up
along the tree, which is what long chain-like graphs (swin-k over many images) need. Tiny dense solves (N x N).
"""

from __future__ import annotations

import torch

from dust3r_ns.geometry import so3_exp, so3_log

from .data import PairData
from .moments import Moments
from .problem import edge_chunks


def relative_similarities(data: PairData, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per edge (i, j): (rho [E], R [E, 3, 3], t [E, 3]) of the map from j's own frame into i's own frame.

    own: [N, h, w, 3] each image's points in its own camera frame, on the data's grid. The edge's two point maps
    are fitted by the own maps of i and j (pts1 ~ s_i Q_i own_i + u_i, pts2 ~ s_j Q_j own_j + u_j); eliminating the
    edge's frame gives rho = s_j / s_i, R = Q_i^T Q_j, t = Q_i^T (u_j - u_i) / s_i.
    """
    e = data.edges
    valid = data.valid()
    fits = []
    for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
        m = Moments(data.n_edges)
        for sl in edge_chunks(data):
            n = e[sl, col]
            w = data.weights(side, sl) * valid[n]
            b = w.shape[0]
            m.add(own[n].reshape(b, -1, 3), pts[sl].reshape(b, -1, 3), w.reshape(b, -1), idx=sl)
        fits.append(m.solve(True))
    (si, Qi, ui), (sj, Qj, uj) = fits
    rho = sj / si
    R = Qi.transpose(1, 2) @ Qj
    t = (Qi.transpose(1, 2) @ (uj - ui)[..., None])[..., 0] / si[:, None]
    return rho, R, t


def _laplacian_solve(i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, rhs: torch.Tensor, N: int,
                     gauge: int) -> torch.Tensor:
    """x [N, k] minimising sum_e w_e ||x_j - x_i - rhs_e||^2 with x[gauge] = 0 (float64, dense graph Laplacian,
    Cholesky)."""
    L = torch.zeros(N, N, dtype=torch.float64)
    L.index_put_((i, i), w, accumulate=True)
    L.index_put_((j, j), w, accumulate=True)
    L.index_put_((i, j), -w, accumulate=True)
    L.index_put_((j, i), -w, accumulate=True)
    b = torch.zeros(N, rhs.shape[1], dtype=torch.float64)
    b.index_add_(0, j, w[:, None] * rhs)
    b.index_add_(0, i, -w[:, None] * rhs)
    L[gauge, :] = 0
    L[:, gauge] = 0
    L[gauge, gauge] = 1
    b[gauge] = 0
    L.diagonal().add_(1e-12)
    try:     # symmetric positive definite (gauge row, 1e-12 on the diagonal): Cholesky, half an LU's work
        return torch.cholesky_solve(b, torch.linalg.cholesky(L))
    except RuntimeError:   # numerically not positive definite (weights spanning too many decades): LU
        return torch.linalg.solve(L, b)


def average_rotations(i, j, Rrel, w, R0, gauge: int, iters: int = 30, delta: float = 0.02) -> torch.Tensor:
    """Rotations R [N, 3, 3] with R_j ~ R_i Rrel_e: IRLS Lie-algebraic averaging from R0. Each iteration solves the
    linearised residuals r_e = log(R_i Rrel_e R_j^T) ~ om_j - om_i for increments om (weights w / max(|r|, delta))
    and updates R <- exp(om) R, until the largest increment is below 1e-9 rad."""
    R = R0.clone()
    N = R.shape[0]
    for _ in range(iters):
        r = so3_log(R[i] @ Rrel @ R[j].transpose(1, 2))          # = w_j - w_i at the solution
        wt = w / r.norm(dim=-1).clamp_min(delta)
        om = _laplacian_solve(i, j, wt, r, N, gauge)
        R = so3_exp(om) @ R
        if float(om.norm(dim=-1).max()) < 1e-9:
            break
    return R


def _robust_ls(i, j, w, rhs: torch.Tensor, N: int, gauge: int, iters: int = 10, rel_delta: float = 0.01) -> torch.Tensor:
    """IRLS (L1-type) solution of x_j - x_i = rhs_e (E,k) over the graph, x[gauge] = 0."""
    x = _laplacian_solve(i, j, w, rhs, N, gauge)
    for _ in range(iters):
        res = (x[j] - x[i] - rhs).norm(dim=-1)
        scale = float(rhs.norm(dim=-1).median()) * rel_delta + 1e-12
        x = _laplacian_solve(i, j, w / res.clamp_min(scale), rhs, N, gauge)
    return x


@torch.no_grad()
def pose_graph_average(data: PairData, own: torch.Tensor, score: torch.Tensor, R0: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lam [N], R [N, 3, 3], C [N, 3]) such that lam_n R_n own_n + C_n is image n's world point map.

    own: [N, h, w, 3] own-frame point maps on the data's grid (pts1 of each image's best edge as first view);
    score: [E] edge weights; R0: [N, 3, 3] starting rotations (the spanning-tree chaining). Self-edges and
    non-finite relative similarities are left out; the log-scales are centred (geometric mean of lam = 1).
    """
    N = data.n_images
    e = data.edges.cpu()
    keep = e[:, 0] != e[:, 1]
    rho, Rrel, t = relative_similarities(data, own)
    ok = keep & torch.isfinite(rho) & (rho > 0) & torch.isfinite(t).all(-1)
    i, j = e[ok, 0], e[ok, 1]
    rho, Rrel, t = rho[ok], Rrel[ok], t[ok]
    w = score.detach().double().cpu()[ok].clamp_min(1e-12)
    w = w / w.mean()
    gauge = 0
    R = average_rotations(i, j, Rrel, w, R0.detach().double().cpu(), gauge)
    loglam = _robust_ls(i, j, w, torch.log(rho)[:, None], N, gauge)[:, 0]
    lam = torch.exp(loglam - loglam.mean())
    C = _robust_ls(i, j, w, lam[i, None] * (R[i] @ t[..., None])[..., 0], N, gauge)   # C_j - C_i in world units
    return lam, R, C
