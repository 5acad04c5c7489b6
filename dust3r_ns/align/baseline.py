"""Baseline mode: the reference schedule re-implemented (autograd + Adam(lr 0.01, betas (0.9, 0.9)), cosine, 300 it).

Parametrisation as the reference: log-depth per pixel; per image a unit quaternion + signed-log1p translation and
focal stored as 20 * log(f) (principal point as pp0 + 10 * offset); per edge a quaternion, signed-log1p translation
and log-scale, the scales normalised to a geometric mean of 0.5 unless the metric scale is fixed by known poses.
"""

from __future__ import annotations

import math
import time

import torch

from dust3r_ns.geometry import quat_to_rotmat, rotmat_to_quat

from .data import PairData
from .pinhole import pixel_grid
from .problem import BASE_SCALE, Constraints, State, areas

FOCAL_BREAK = 20.0
PP_BREAK = 10.0


def _signed_log1p(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def _signed_expm1(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def _poses(q: torch.Tensor, tr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    R = quat_to_rotmat(q)
    return R, _signed_expm1(tr)


def solve_baseline(data: PairData, st: State, cons: Constraints, niter: int = 300, lr: float = 0.01,
                   lr_min: float = 1e-6, schedule: str = "cosine", verbose: bool = False) -> dict:
    """Adam on all parameters with the reference objective (all edges in one autograd graph). Updates `st`."""
    dev = st.depth.device
    N, H, W = st.depth.shape
    log_depth = torch.nn.Parameter(st.depth.clamp_min(1e-8).log())
    q_im = torch.nn.Parameter(rotmat_to_quat(st.c2w[:, :3, :3]))
    t_im = torch.nn.Parameter(_signed_log1p(st.c2w[:, :3, 3]))
    f0 = st.focal[:1] if cons.shared_focal else st.focal
    lf = torch.nn.Parameter(FOCAL_BREAK * f0.log())
    pp0 = st.pp.clone()
    ppo = torch.nn.Parameter(torch.zeros(N, 2, device=dev))
    # edges: P(x) = s (R x + T)
    logs = st.s.log()
    q_e = torch.nn.Parameter(rotmat_to_quat(st.R))
    t_e = torch.nn.Parameter(_signed_log1p(st.t / st.s[:, None]))
    ls_e = torch.nn.Parameter(logs.clone())
    params = [log_depth, q_im, t_im, lf, q_e, t_e, ls_e]
    if cons.optimize_pp and cons.known_pp is None:
        params.append(ppo)
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.9))
    pose_mask = cons.pose_mask
    known = cons.known_c2w.to(dev).float() if cons.known_c2w is not None else None
    fmask = cons.focal_mask
    fknown = cons.known_focal.float().mean(-1).to(dev) if cons.known_focal is not None else None
    area_i, area_j = areas(data)
    # tensors made under torch.inference_mode (the pair inference) cannot enter autograd: copy those once
    plain = lambda t: t.clone() if t.is_inference() else t  # noqa: E731
    w1, w2 = plain(data.weights(1)), plain(data.weights(2))
    pts1, pts2 = plain(data.pts1.float()), plain(data.pts2.float())
    ei, ej = data.edges[:, 0], data.edges[:, 1]
    u, v = pixel_grid(H, W, dev)

    def current():
        R, C = _poses(q_im, t_im)
        if pose_mask is not None:
            R = torch.where(pose_mask[:, None, None], known[:, :3, :3], R)
            C = torch.where(pose_mask[:, None], known[:, :3, 3], C)
        f = (lf / FOCAL_BREAK).exp().expand(N)
        if fmask is not None:
            f = torch.where(fmask, fknown, f)
        pp = pp0 + PP_BREAK * ppo
        return R, C, f, pp

    def loss_fn():
        R, C, f, pp = current()
        d = log_depth.exp()
        pc = torch.stack([(u - pp[:, 0, None, None]) / f[:, None, None] * d,
                          (v - pp[:, 1, None, None]) / f[:, None, None] * d, d], -1)
        X = torch.einsum("nij,nhwj->nhwi", R, pc) + C[:, None, None, :]
        Re, Te = _poses(q_e, t_e)
        s = ls_e.exp()
        if cons.normalize_scale:
            s = s * math.exp(math.log(BASE_SCALE)) / ls_e.mean().exp()
        a1 = s[:, None, None, None] * (torch.einsum("eij,ehwj->ehwi", Re, pts1) + Te[:, None, None, :])
        a2 = s[:, None, None, None] * (torch.einsum("eij,ehwj->ehwi", Re, pts2) + Te[:, None, None, :])
        li = ((X[ei] - a1).norm(dim=-1) * w1).sum() / area_i
        lj = ((X[ej] - a2).norm(dim=-1) * w2).sum() / area_j
        return li + lj

    t0 = time.perf_counter()
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=niter, desc="align baseline", leave=False)
    loss = torch.zeros(())
    for it in range(niter):
        frac = it / max(niter, 1)
        cur_lr = lr_min + (lr - lr_min) * (1 + math.cos(math.pi * frac)) / 2 if schedule == "cosine" else \
            lr_min + (lr - lr_min) * (1 - frac)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.5g}")
    if bar is not None:
        bar.close()
    with torch.no_grad():
        R, C, f, pp = current()
        st.c2w = torch.eye(4, device=dev).repeat(N, 1, 1)
        st.c2w[:, :3, :3], st.c2w[:, :3, 3] = R, C
        st.focal, st.pp = f.clone(), pp.clone()
        st.depth = log_depth.exp().detach().clone()
        Re, Te = _poses(q_e, t_e)
        s = ls_e.exp()
        if cons.normalize_scale:
            s = s * BASE_SCALE / ls_e.mean().exp()
        st.s, st.R, st.t = s.detach(), Re.detach(), (s[:, None] * Te).detach()
    return dict(iterations=niter, t_total=time.perf_counter() - t0, last_loss=float(loss.detach()))
