"""Camera block: each camera's pose, focal (and principal point) fitted to per-image target points.

Given targets Y (one world point per pixel, `depths.accumulate_targets`) with weights A, camera n minimises
sum_px A |Y - (C_n + d R_n r_px)|^2 over its rotation, centre, log-focal (and principal point), where the ray
direction r_px = ((u - cx) / f, (v - cy) / f, 1) and the depth d along it are eliminated (d optimal per pixel: the
point-to-ray distance). Levenberg-Marquardt on the 9 unknowns per camera, float64 normal equations on the host.
"""

from __future__ import annotations

import torch

from dust3r_ns.geometry import so3_exp

from .pinhole import focal_bounds, pixel_grid
from .problem import Constraints, channels_first

CAM_FIT_CHUNK = 1 << 22   # Jacobian elements (N x 9 x 3 x pixels) per chunk of the camera fit's normal equations


def lm_step(H: torch.Tensor, g: torch.Tensor, lam: float, shared_focal: bool) -> torch.Tensor:
    """Solution s [N, 9] of the damped normal equations (H + diag(lam h + [h <= 0] + 1e-12)) s = g, h = diag(H),
    of N independent cameras (H [N, 9, 9], g [N, 9], float64), or, with a shared focal (entry 6 one unknown for all
    images: its row and column the sums over the images), of that arrow-shaped 9N system by eliminating the per-image
    unknowns: with A_n the damped 8x8 own blocks, b_n their focal columns and c the damped focal entry,
    s_f = (g_f - sum_n b_n^T A_n^-1 g_n) / (c - sum_n b_n^T A_n^-1 b_n), s_n = A_n^-1 (g_n - b_n s_f); O(N), the
    same as the dense (9N)^2 solve."""
    def damped(M: torch.Tensor) -> torch.Tensor:
        h = M.diagonal(dim1=-2, dim2=-1)
        return M + torch.diag_embed(lam * h + (h <= 0).double() + 1e-12)

    if not shared_focal:
        return torch.linalg.solve(damped(H), g)
    own = [0, 1, 2, 3, 4, 5, 7, 8]
    A = damped(H[:, own][:, :, own])                                         # [N, 8, 8]
    b = H[:, own, 6]                                                         # [N, 8]
    c = damped(H[:, 6, 6].sum().reshape(1, 1))[0, 0]
    uv = torch.linalg.solve(A, torch.stack([g[:, own], b], -1))               # A^-1 [g, b]
    sf = (g[:, 6].sum() - (b * uv[..., 0]).sum()) / (c - (b * uv[..., 1]).sum())
    s = torch.empty_like(g)
    s[:, own] = uv[..., 0] - uv[..., 1] * sf
    s[:, 6] = sf
    return s


def fit_cameras(Y: torch.Tensor, A: torch.Tensor, c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor,
                cons: Constraints, stride: int = 1, iters: int = 3, lam: float = 1e-4, pose_free: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt on (rotation, centre, log-focal, pp) per image minimising sum A * dist(Y, ray)^2.

    Y [N, h, w, 3] target world points on a grid sub-sampled by `stride`, A [N, h, w] weights; `iters` LM
    iterations from (c2w, focal, pp), damping `lam` (x10 on a rejected step, /10 on an accepted one). A shared focal
    couples the images through one global unknown; known poses/focals/principal points stay fixed, as do the poses
    outside `pose_free` when given. Every pixel counts: the normal equations and costs are accumulated over pixel
    chunks (`CAM_FIT_CHUNK` Jacobian elements each), so memory stays bounded at full resolution.
    Returns (c2w [N, 4, 4], focal [N], pp [N, 2]).
    """
    N, h, w, _ = Y.shape
    dev, dt = Y.device, Y.dtype
    u, v = pixel_grid(h * stride, w * stride, dev, dt, stride)
    u, v = u[:h, :w].reshape(-1), v[:h, :w].reshape(-1)
    Yf, Af = channels_first(Y), A.reshape(N, -1).clamp_min(0)      # [N, 3, M] channels-first: elementwise rows
    M = Yf.shape[2]
    step_px = max(1, CAM_FIT_CHUNK // (27 * N))
    chunks = [slice(a, min(M, a + step_px)) for a in range(0, M, step_px)]

    def residual(R_, C_, f_, p_, sl):
        """Point-to-ray residual e (N,3,m) in the camera frame on the pixels `sl`, plus pieces for the Jacobian."""
        D = Yf[:, :, sl] - C_[:, :, None]                       # world offsets [N, 3, m]
        Z = torch.bmm(R_.transpose(1, 2), D)                      # camera-frame targets R^T (Y - C)
        rx = (u[None, sl] - p_[:, 0, None]) / f_[:, None]
        ry = (v[None, sl] - p_[:, 1, None]) / f_[:, None]
        r = torch.stack([rx, ry, torch.ones_like(rx)], 1)
        rr = (rx * rx + ry * ry + 1)[:, None]
        lam_ = (rx * Z[:, 0] + ry * Z[:, 1] + Z[:, 2])[:, None] / rr
        return Z - lam_ * r, Z, r, rr, lam_

    def jacobian(R_, C_, f_, p_, sl):
        """Residuals and the Jacobian (N,9,3,m) on the pixels `sl`, with the rotation/centre columns in the camera
        frame (elementwise, no 3x3 matmuls per pixel): with P = I - r r^T/|r|^2, de/dtheta = P [Z]x R^T and
        de/dC = -P R^T, and the R^T factors are applied to the 9x9 normal equations on the host (`to_world`)."""
        e, Z, r, rr, lam_ = residual(R_, C_, f_, p_, sl)
        qr = r / rr                                                          # r / |r|^2
        J = Z.new_zeros(N, 9, 3, Z.shape[2])
        c = torch.cross(r, Z, dim=1)
        Z0, Z1, Z2 = Z[:, 0], Z[:, 1], Z[:, 2]
        for k, col in enumerate(((None, Z2, -Z1), (-Z2, None, Z0), (Z1, -Z0, None))):   # P [Z]x, column k
            J[:, k] = -qr * c[:, k, None]
            for i, zc in enumerate(col):
                if zc is not None:
                    J[:, k, i] += zc
            J[:, 3 + k] = qr * r[:, k, None]                                 # -P, column k
            J[:, 3 + k, k] -= 1.0
        # de/dr . dr = -lam dr - r (dr . (Z - 2 lam r)) / rr
        q = (Z - 2 * lam_ * r) / rr
        # focal: dr/dlogf = -(rx, ry, 0)
        J[:, 6] = r * (r[:, 0] * q[:, 0] + r[:, 1] * q[:, 1])[:, None]
        J[:, 6, :2] += lam_ * r[:, :2]
        if cons.optimize_pp:   # dr/dpp_k = -e_k / f
            inv_f = (1.0 / f_)[:, None, None]
            for k in (0, 1):
                J[:, 7 + k] = r * q[:, k, None] * inv_f
                J[:, 7 + k, k] += lam_[:, 0] * inv_f[:, 0]
        return e, J

    def to_world(Hc, gc, Rh):
        """Normal equations of the camera-frame columns -> those of the world-frame parameters (float64 host)."""
        T = torch.eye(9, dtype=torch.float64).repeat(N, 1, 1)
        T[:, :3, :3] = Rh.transpose(1, 2)
        T[:, 3:6, 3:6] = Rh.transpose(1, 2)
        return T.transpose(1, 2) @ Hc @ T, (T.transpose(1, 2) @ gc[..., None])[..., 0]

    def cost(R_, C_, f_, p_):
        total = 0.0
        for sl in chunks:
            e = residual(R_, C_, f_, p_, sl)[0]
            total += float((Af[:, sl] * (e * e).sum(1)).sum())
        return total

    def normal_equations(R_, C_, f_, p_):
        """Camera-frame normal equations (N,9,9), (N,9) and the cost, accumulated over the pixel chunks."""
        Hc = torch.zeros(N, 9, 9, device=dev, dtype=torch.float64)
        gc = torch.zeros(N, 9, device=dev, dtype=torch.float64)
        total = 0.0
        for sl in chunks:
            e, J = jacobian(R_, C_, f_, p_, sl)            # [N, 3, m], [N, 9, 3, m]
            a = Af[:, sl]
            total += float((a * (e * e).sum(1)).sum())
            J = J.reshape(N, 9, -1)
            JA = (J.reshape(N, 9, 3, -1) * a[:, None, None]).reshape(N, 9, -1)
            Hc += torch.bmm(JA, J.transpose(1, 2)).double()
            gc += torch.bmm(JA, e.reshape(N, -1, 1))[..., 0].double()
        return Hc, gc, total

    free = torch.ones(N, 9, dtype=torch.bool, device=dev)
    if cons.pose_mask is not None:
        free[cons.pose_mask, :6] = False
    if pose_free is not None:
        free[~pose_free, :6] = False
    if cons.focal_mask is not None:
        free[cons.focal_mask, 6] = False
    if not cons.optimize_pp:
        free[:, 7:9] = False
    elif cons.pp_mask is not None:
        free[cons.pp_mask, 7:9] = False
    R, C = c2w[:, :3, :3], c2w[:, :3, 3]
    f, p = focal.clone(), pp.clone()
    freec = free.cpu()

    f_lo, f_hi = focal_bounds(h * stride, w * stride)
    cur = None
    for _ in range(iters):
        Hc, gc, c0 = normal_equations(R, C, f, p)
        if cur is None:
            cur = c0
        # normal equations solved on the CPU in float64 (at most 9N unknowns)
        Hl, gl = to_world(Hc.to("cpu", torch.float64), gc.to("cpu", torch.float64), R.to("cpu", torch.float64))
        Hl = Hl * (freec[:, :, None] & freec[:, None, :])
        gl = gl * freec
        accepted = False
        for _t in range(6):
            step = -lm_step(Hl, gl, lam, cons.shared_focal)
            d = (step * freec).to(dev, dt)                                                    # [N, 9]
            Rn = so3_exp(d[:, :3]) @ R
            Cn, fn, pn = C + d[:, 3:6], f * torch.exp(d[:, 6]), p + d[:, 7:9]
            fn = torch.where(free[:, 6], fn.clamp(f_lo, f_hi), fn)   # degenerate maps (flat, constant) push f to inf
            new = cost(Rn, Cn, fn, pn)
            if new <= cur:
                R, C, f, p, cur = Rn, Cn, fn, pn, new
                lam = max(lam / 10, 1e-7)
                accepted = True
                break
            lam *= 10
        if not accepted:
            break
    out = c2w.clone()
    out[:, :3, :3], out[:, :3, 3] = R, C
    return out, f, p

