"""Joint camera/edge step: cameras, depth-map scales and edge similarities moved together by one Gauss-Newton solve.

Block-coordinate descent fits the edges to the cameras and the cameras to the edges, one block at a time. A camera
error is then partly absorbed by its edges at each turn (the edges follow the camera, the camera follows the edges),
so the slow modes of the objective (a camera drifting together with the scales, rotations and translations of its
edges, an image's depth scale together with its edges' scales) close only a fraction per iteration. This step
minimises the IRLS-weighted quadratic of the current iteration over all of them at once, the per-pixel depths held
up to one scale per image:

    sum_{e,side} sum_p w_p |X_p + w_n x a_p + dC_n + kappa_n a_p + phi_n Q_n a_p - (Y_p + w_e x b_p + sigma_e b_p + dt_e)|^2

per image n: rotation increment w_n about its centre, centre increment dC_n, depth-map scale kappa_n, log-focal
increment phi_n (Q_n = -R_n diag(1,1,0) R_n^T: the change of the back-projected offsets a_p = X_p - C_n); per edge e:
rotation w_e, scale sigma_e and translation dt_e of Y_p = s_e R_e P_p + t_e (b_p = Y_p - t_e). Everything it needs is
one 7x7 moment matrix per edge side, sum w [X; P; 1][X; P; 1]^T (`joint_moments`), from which the Umeyama moments of
the edge fit are also read (`umeyama_sums`). The edges are eliminated per edge (7x7 blocks), leaving an 8N x 8N system
on the images, plus one Lagrange multiplier for the scale gauge (sum of the edge log-scales held) and a penalty that
fixes the free global rotation and translation (mean pose increment zero) unless cameras are known. That system is
solved densely (LU, O(N^3)) up to DENSE_MAX_IMAGES images and above by preconditioned conjugate gradients on its
per-edge blocks (O(E) per iteration), the multiplier eliminated exactly (`solve_images_dense`, `solve_images_pcg`).
"""

from __future__ import annotations

import torch

from dust3r_ns.geometry import so3_exp

from .problem import State

MAX_ANGLE = 0.05          # rad: a larger rotation increment scales the whole step down (the rotations are linearised)
SCALE_RANGE = (0.5, 2.0)  # bounds of one step's depth-map, focal and edge scale factors
NU = 8                    # unknowns per image: rotation (3), centre (3), depth scale, log-focal
NE = 7                    # unknowns per edge: rotation (3), scale, translation (3)
DENSE_MAX_IMAGES = 256    # up to this many images the image system is solved densely, above by PCG (O(E) per step)
PCG_RTOL = 1e-9           # relative residual at which the PCG solve stops
PCG_MAX_ITER = 1000


def _bases() -> tuple[torch.Tensor, torch.Tensor]:
    """The residual's derivative as sum_k z[k] A_k x: A (4,3,NU) for an image (z = [a; 1], x = [w, dC, kappa, phi];
    the focal column depends on the camera and is filled in by `joint_step`) and B (4,3,NE) for an edge
    (z = [b; 1], x = [w, sigma, dt]; enters the residual with a minus sign)."""
    eye = torch.eye(3, dtype=torch.float64)
    S = torch.linalg.cross(eye[:, None, :].expand(3, 3, 3), eye[None].expand(3, 3, 3), dim=-1).transpose(1, 2)
    A = torch.zeros(4, 3, NU, dtype=torch.float64)                 # S[k] v = e_k x v
    B = torch.zeros(4, 3, NE, dtype=torch.float64)
    for k in range(3):
        A[k, :, :3] = -S[k]                # w x a = -[a]_x w = -sum_k a_k [e_k]_x w
        A[k, :, 6] = eye[k]                # kappa a
        B[k, :, :3] = S[k]                 # -(w x b) = sum_k b_k [e_k]_x w
        B[k, :, 3] = -eye[k]               # -sigma b
    A[3, :, 3:6] = eye                     # + dC
    B[3, :, 4:] = -eye                     # - dt
    return A, B


_A, _B = _bases()


def joint_moments(X: torch.Tensor, P: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum w z z^T with z = [X; P; 1] per batch entry: X, P channels-first [b, 3, M], w [b, M] -> [b, 7, 7] float64."""
    b, _, M = X.shape
    Z = torch.empty(b, 7, M, device=X.device, dtype=X.dtype)
    Z[:, :3] = X
    Z[:, 3:6] = P
    Z[:, 6] = 1.0
    return torch.bmm(Z * w[:, None].to(Z.dtype), Z.transpose(1, 2)).double()


def umeyama_sums(M7: torch.Tensor) -> torch.Tensor:
    """The [b, 5, 4] Procrustes moments (source P, target X; layout of `dust3r_ns.geometry.procrustes_moments`) read
    from `joint_moments` [b, 7, 7]."""
    G = torch.zeros(M7.shape[0], 5, 4, dtype=M7.dtype, device=M7.device)
    G[:, :3, :3] = M7[:, :3, 3:6]                                   # sum w X P^T
    G[:, :3, 3] = M7[:, :3, 6]                                      # sum w X
    G[:, 3, 3] = M7[:, 3:6, 3:6].diagonal(dim1=1, dim2=2).sum(-1)   # sum w |P|^2
    G[:, 4, :3] = M7[:, 6, 3:6]                                     # sum w P
    G[:, 4, 3] = M7[:, 6, 6]                                        # sum w
    return G


def _pose_penalty(diag: torch.Tensor, N: int) -> tuple[float, torch.Tensor]:
    """rho and the [NU] pose mask of the penalty rho |sum_n (w_n, dC_n)|^2 that pins the global rotation and
    translation; diag [N * NU] the system's diagonal (rho = its mean pose entry / N)."""
    pose = torch.zeros(NU, dtype=diag.dtype)
    pose[:6] = 1.0
    return float(diag.reshape(N, NU)[:, :6].mean()) / N, pose


def solve_images_dense(blocks: torch.Tensor, idx: torch.Tensor, rhs: torch.Tensor, free: torch.Tensor,
                       border: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, pin_mean_pose: bool
                       ) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Solve the image system of `joint_step` densely (LU): S x + col lam = rhs, col^T x + d lam = r_n.

    blocks [E, 2NU, 2NU] per-edge Schur complements scattered at idx [E, 2NU] into S [n, n]; rhs [n]; free [n] bool
    unknowns that move (the others are 0); border (col [n], d, r_n) of the scale-gauge multiplier or None;
    pin_mean_pose: add the penalty of `_pose_penalty`. Returns x [n] and lam (0.0 without border)."""
    n = rhs.shape[0]
    N = n // NU
    K = n + int(border is not None)
    S = torch.zeros(K, K, dtype=blocks.dtype)
    S.index_put_((idx[:, :, None].expand(-1, -1, 2 * NU), idx[:, None, :].expand(-1, 2 * NU, -1)), blocks,
                 accumulate=True)
    b = torch.zeros(K, dtype=blocks.dtype)
    b[:n] = rhs
    if border is not None:
        col, d, rn = border
        S[:n, n] = col
        S[n, :n] = col
        S[n, n] = d
        b[n] = rn
    if pin_mean_pose:
        rho, pose = _pose_penalty(S[:n, :n].diagonal(), N)
        S[:n, :n] += rho * torch.kron(torch.ones(N, N, dtype=S.dtype), torch.diag(pose))
    keep = torch.cat([free, torch.ones(K - n, dtype=torch.bool)])
    x = torch.zeros(K, dtype=blocks.dtype)
    x[keep] = torch.linalg.solve(S[keep][:, keep], b[keep])
    return x[:n], (x[n] if border is not None else 0.0)


def solve_images_pcg(blocks: torch.Tensor, idx: torch.Tensor, rhs: torch.Tensor, free: torch.Tensor,
                     border: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, pin_mean_pose: bool,
                     rtol: float = PCG_RTOL, max_iter: int = PCG_MAX_ITER, stats: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | float]:
    """`solve_images_dense` without forming S: conjugate gradients with a block-Jacobi (one NU x NU block per image)
    preconditioner, O(E) per iteration instead of O(N^3) once.

    The multiplier is eliminated exactly: d < 0 (minus a sum of the edges' positive scale variances), so
    lam = (r_n - col^T x) / d and (S + col col^T / |d|) x = rhs + col r_n / |d|, symmetric positive definite with
    the pose penalty (a rank-6 term, applied as such). Stops when |residual| <= rtol |rhs| or after max_iter;
    stats, if given, receives the iterations and the final relative residual."""
    n = rhs.shape[0]
    N = n // NU
    f64 = blocks.dtype
    m = free.to(f64)
    flat = idx.reshape(-1)
    img = idx[:, ::NU] // NU                                                         # [E, 2]
    D = torch.zeros(N, NU, NU, dtype=f64)                                            # diagonal blocks of S
    D.index_add_(0, img[:, 0], blocks[:, :NU, :NU])
    D.index_add_(0, img[:, 1], blocks[:, NU:, NU:])
    rho, pose = _pose_penalty(D.diagonal(dim1=1, dim2=2).reshape(-1), N) if pin_mean_pose else (0.0, None)
    b = rhs.clone()
    if border is not None:
        col, d, rn = border
        inv_d = 1.0 / float(-d)
        b += col * (float(rn) * inv_d)
        cn = col.reshape(N, NU)
        D += inv_d * cn[:, :, None] * cn[:, None, :]
    if pose is not None:
        D += rho * torch.diag(pose)
    mm = m.reshape(N, NU)
    D = D * mm[:, :, None] * mm[:, None, :] + torch.diag_embed(1.0 - mm)
    Dinv = torch.linalg.inv(D)

    def apply(v: torch.Tensor) -> torch.Tensor:
        y = torch.zeros(n, dtype=f64).index_add_(0, flat, torch.bmm(blocks, v[idx][..., None]).reshape(-1))
        if pose is not None:
            y.view(N, NU).add_(rho * pose * (v.view(N, NU) * pose).sum(0))
        if border is not None:
            y += col * (float(col @ v) * inv_d)
        return y * m

    def precondition(v: torch.Tensor) -> torch.Tensor:
        return torch.bmm(Dinv, v.view(N, NU, 1)).reshape(-1)

    b = b * m
    x = torch.zeros(n, dtype=f64)
    r = b.clone()
    z = precondition(r)
    p = z.clone()
    rz = float(r @ z)
    stop = rtol * float(b.norm())
    it = 0
    while it < max_iter and float(r.norm()) > stop:
        it += 1
        Ap = apply(p)
        alpha = rz / float(p @ Ap)
        x += alpha * p
        r -= alpha * Ap
        z = precondition(r)
        rz, rz_old = float(r @ z), rz
        p = z + (rz / rz_old) * p
    if stats is not None:
        stats.update(iterations=it, residual=float(r.norm()) / max(float(b.norm()), 1e-300))
    lam = (float(rn) - float(col @ x)) / float(d) if border is not None else 0.0
    return x, lam


@torch.no_grad()
def joint_step(edges: torch.Tensor, st: State, M7: torch.Tensor, pose_fixed: torch.Tensor | None = None,
               focal_free: torch.Tensor | None = None, gauge: bool = True,
               focal_range: tuple[float, float] = (0.0, float("inf"))) -> torch.Tensor | None:
    """Move the cameras (rotation about the centre, centre, focal) and edges (similarity) of `st` in place by the
    joint Gauss-Newton step; returns the factors [N] by which to scale each image's depth map (None: step skipped,
    the system being singular or non-finite).

    edges [E, 2] image indices; M7 [E, 2, 7, 7] `joint_moments` (any device); pose_fixed: [N] bool cameras whose pose
    stays put (known poses); focal_free: [N] bool focals the step may change (None: none); gauge: hold the sum of
    the edge log-scales; focal_range: bounds of the focals after the step. A step whose largest rotation increment
    exceeds MAX_ANGLE is scaled down to it; scale factors are clamped to SCALE_RANGE.
    """
    E = edges.shape[0]
    N = st.c2w.shape[0]
    f64 = torch.float64
    M7 = M7.to("cpu", f64)
    img = edges.cpu()
    Rc = st.c2w[:, :3, :3].to("cpu", f64)
    C = st.c2w[:, :3, 3].to("cpu", f64)                                           # [N, 3]
    sR = (st.s[:, None, None] * st.R).to("cpu", f64)                              # [E, 3, 3]
    t = st.t.to("cpu", f64)                                                        # [E, 3]
    eye = torch.eye(3, dtype=f64)
    # z_a = [X - C_n; 1] = Ta z, z_b = [s R P; 1] = Tb z with z = [X; P; 1]
    Ta = torch.zeros(E, 2, 4, 7, dtype=f64)
    Ta[..., :3, :3] = eye
    Ta[..., :3, 6] = -C[img]
    Ta[..., 3, 6] = 1.0
    Tb = torch.zeros(E, 2, 4, 7, dtype=f64)
    Tb[..., :3, 3:6] = sR[:, None]
    Tb[..., 3, 6] = 1.0
    Maa = Ta @ M7 @ Ta.transpose(-1, -2)
    Mab = Ta @ M7 @ Tb.transpose(-1, -2)
    Mbb = Tb @ M7 @ Tb.transpose(-1, -2)
    # residual r = X - Y = Ra z_a - Rb z_b with Ra = [I | C_n - t_e], Rb = [I | 0]
    Ra = torch.zeros(E, 2, 3, 4, dtype=f64)
    Ra[..., :3] = eye
    Ra[..., 3] = C[img] - t[:, None]
    Rb = torch.zeros(3, 4, dtype=f64)
    Rb[:, :3] = eye
    ra = Ra @ Maa - Rb @ Mab.transpose(-1, -2)                                   # [E, 2, 3, 4] sum w r z_a^T
    rb = Ra @ Mab - Rb @ Mbb                                                        # sum w r z_b^T
    Q = -Rc @ torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=f64)) @ Rc.transpose(1, 2)   # [N, 3, 3]
    A = _A.expand(E, 2, 4, 3, NU).clone()
    A[..., :3, :, 7] = Q[img].transpose(-1, -2)                                     # phi Q a = sum_k a_k Q[:, k] phi
    B = _B
    Hcc = torch.einsum("eskxa,eskl,eslxb->esab", A, Maa, A)                      # [E, 2, NU, NU]
    Hce = torch.einsum("eskxa,eskl,lxb->esab", A, Mab, B)                        # [E, 2, NU, NE]
    Hee = torch.einsum("kxa,eskl,lxb->eab", B, Mbb, B)                            # [E, NE, NE] both sides
    gc = torch.einsum("eskxa,esxk->esa", A, ra)                                   # [E, 2, NU]
    ge = torch.einsum("kxa,esxk->ea", B, rb)                                       # [E, NE]
    good = M7[..., 6, 6].sum(1) > 0                                                 # edges with weight
    # edges: Hee x_e = -(ge + sum_side Hce^T x_side + lam u), u = the scale entry
    damp = 1e-12 * Hee.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-30)
    try:
        Hinv = torch.linalg.inv(Hee + damp[:, None, None] * torch.eye(NE, dtype=f64))
    except RuntimeError:
        return None
    Hinv = torch.where(good[:, None, None], Hinv, torch.zeros_like(Hinv))
    n = NU * N
    use_gauge = gauge and bool(good.any())
    idx = (NU * img[..., None] + torch.arange(NU)).reshape(E, 2 * NU)              # the edge's image unknowns
    Hc = torch.zeros(E, 2 * NU, 2 * NU, dtype=f64)
    Hc[:, :NU, :NU] = Hcc[:, 0]
    Hc[:, NU:, NU:] = Hcc[:, 1]
    He = torch.cat([Hce[:, 0], Hce[:, 1]], 1)                                      # [E, 2NU, NE]
    gcat = torch.cat([gc[:, 0], gc[:, 1]], 1)                                       # [E, 2NU]
    HeHinv = He @ Hinv
    blocks = Hc - HeHinv @ He.transpose(1, 2)                                        # Schur complement, per edge
    rhs = torch.zeros(n, dtype=f64).index_put_((idx,), -gcat + (HeHinv @ ge[..., None])[..., 0], accumulate=True)
    border = None
    if use_gauge:   # Lagrange multiplier of sum sigma_e = 0: column, corner and right-hand side of its row
        col = torch.zeros(n, dtype=f64).index_put_((idx,), -HeHinv[:, :, 3], accumulate=True)
        border = (col, -Hinv[:, 3, 3].sum(), (Hinv[:, 3] * ge).sum())
    free = torch.ones(N, NU, dtype=torch.bool)
    free[:, 7] = False if focal_free is None else focal_free.cpu()
    pin = pose_fixed is not None and bool(pose_fixed.any())
    if pin:
        free[pose_fixed.cpu(), :6] = False
    focal_moves = free[:, 7].clone()
    solve = solve_images_dense if N <= DENSE_MAX_IMAGES else solve_images_pcg
    try:
        x, lam = solve(blocks, idx, rhs, free.reshape(-1), border, pin_mean_pose=not pin)
    except RuntimeError:
        return None
    xc = x[:n].reshape(N, NU)
    xcat = torch.cat([xc[img[:, 0]], xc[img[:, 1]]], 1)
    rhs_e = ge + (He.transpose(1, 2) @ xcat[..., None])[..., 0]
    if use_gauge:
        rhs_e[:, 3] += lam
    xe = -(Hinv @ rhs_e[..., None])[..., 0]                                         # [E, NE]
    if not (torch.isfinite(xc).all() and torch.isfinite(xe).all()):
        return None
    ang = max(float(xc[:, :3].norm(dim=1).max()), float(xe[:, :3].norm(dim=1).max()))
    if ang > MAX_ANGLE:
        xc, xe = xc * (MAX_ANGLE / ang), xe * (MAX_ANGLE / ang)
    dev, dt = st.c2w.device, st.c2w.dtype
    c2w = st.c2w.clone()
    c2w[:, :3, :3] = so3_exp(xc[:, :3]).to(dev, dt) @ st.c2w[:, :3, :3]
    c2w[:, :3, 3] += xc[:, 3:6].to(dev, dt)
    st.c2w = c2w
    lo, hi = SCALE_RANGE
    st.focal = torch.where(focal_moves.to(dev),
                           (st.focal * torch.exp(xc[:, 7].clamp(-0.5, 0.5)).to(dev, dt)).clamp(*focal_range),
                           st.focal)
    st.R = so3_exp(xe[:, :3]).to(dev, dt) @ st.R
    st.s = st.s * (1 + xe[:, 3]).clamp(lo, hi).to(dev, dt)     # the model is linear in the scales
    st.t = st.t + xe[:, 4:].to(dev, dt)
    return (1 + xc[:, 6]).clamp(lo, hi).to(dev, dt)
