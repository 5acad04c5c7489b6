"""Low-level 3D geometry shared by the package: SO(3) exp/log, quaternions, weighted Procrustes (Umeyama), look-at.

Pure functions, batched over leading dimensions (torch unless noted). Rotations are matrices acting on column
vectors; axis-angle vectors w have angle |w| and axis w / |w|.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

# ------------------------------------------------------------------------------------------------------- SO(3)


def skew(w: torch.Tensor) -> torch.Tensor:
    """Cross-product matrices [w]_x, [..., 3] -> [..., 3, 3], with [w]_x v = w x v."""
    z = torch.zeros_like(w[..., 0])
    return torch.stack([z, -w[..., 2], w[..., 1], w[..., 2], z, -w[..., 0], -w[..., 1], w[..., 0], z], -1).reshape(
        *w.shape[:-1], 3, 3)


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula, [..., 3] -> [..., 3, 3]: exp([w]_x) = I + sin(t)/t [w]_x + (1 - cos(t))/t^2 [w]_x^2,
    t = |w| (second-order Taylor coefficients below t = 1e-8)."""
    th = w.norm(dim=-1, keepdim=True)[..., None]
    K = skew(w)
    small = th < 1e-8
    ths = torch.where(small, torch.ones_like(th), th)
    a = torch.where(small, 1 - th ** 2 / 6, torch.sin(ths) / ths)
    b = torch.where(small, 0.5 - th ** 2 / 24, (1 - torch.cos(ths)) / ths ** 2)
    eye = torch.eye(3, device=w.device, dtype=w.dtype).expand_as(K)
    return eye + a * K + b * (K @ K)


NEAR_PI_COS = -0.7   # below this cos(angle), so3_log reads the axis from the symmetric part of R


def so3_log(R: torch.Tensor) -> torch.Tensor:
    """Axis-angle [..., 3] of rotation matrices [..., 3, 3], angle in [0, pi].

    The skew part of R is sin(t) [a]_x and its trace 1 + 2 cos(t): the angle is atan2(sin, cos) and the axis the
    skew vector over sin (the vector itself below sin = 1e-12, where it equals the angle to first order). Near pi
    (cos(t) < NEAR_PI_COS) the skew part vanishes and the axis comes from the symmetric part instead:
    (R + R^T) / 2 - cos(t) I = (1 - cos(t)) a a^T, whose largest-diagonal column is parallel to a; its sign is the
    skew vector's.
    """
    w = 0.5 * torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    sin = w.norm(dim=-1, keepdim=True)                                          # [..., 1]
    cos = 0.5 * (R.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) - 1)         # [..., 1]
    ang = torch.atan2(sin, cos)
    out = w * (ang / sin.clamp_min(1e-30)).where(sin > 1e-12, torch.ones_like(sin))
    # near pi (computed for all entries: no host sync; selected below)
    eye = torch.eye(3, device=R.device, dtype=R.dtype)
    S = 0.5 * (R + R.transpose(-1, -2)) - cos[..., None] * eye                   # [..., 3, 3] (1 - cos) a a^T
    k = S.diagonal(dim1=-2, dim2=-1).argmax(-1)                                  # [...]
    col = torch.gather(S, -1, k[..., None, None].expand(*S.shape[:-1], 1))[..., 0]   # [..., 3]
    axis = col / col.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    axis = torch.where((axis * w).sum(-1, keepdim=True) < 0, -axis, axis)
    return torch.where(cos < NEAR_PI_COS, axis * ang, out)


def quat_to_rotmat(q: torch.Tensor, scalar_first: bool = False) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] from quaternions [..., 4], (x, y, z, w) or, with scalar_first, (w, x, y, z);
    normalised first (differentiable; norms below 1e-12 are clamped)."""
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if scalar_first:
        w, x, y, z = q.unbind(-1)
    else:
        x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions [..., 4] (x, y, z, w), w >= 0, from rotation matrices [..., 3, 3] (Shepperd's method: the
    candidate built on the largest of trace, R00, R11, R22 is normalised)."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cands = torch.stack([
        torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1], 1 + tr], -1),
        torch.stack([1 + 2 * m[:, 0, 0] - tr, m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 2, 1] - m[:, 1, 2]], -1),
        torch.stack([m[:, 0, 1] + m[:, 1, 0], 1 + 2 * m[:, 1, 1] - tr, m[:, 1, 2] + m[:, 2, 1], m[:, 0, 2] - m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 + 2 * m[:, 2, 2] - tr, m[:, 1, 0] - m[:, 0, 1]], -1),
    ], 1)                                                                   # [B, 4, 4]: 4 unnormalised candidates
    diag = torch.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    best = diag.argmax(-1)
    q = cands[torch.arange(m.shape[0], device=R.device), best]
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, 3:4] < 0, -q, q)
    return q.reshape(*R.shape[:-2], 4)


def det3(M: torch.Tensor) -> torch.Tensor:
    """Determinants of [..., 3, 3] matrices by the rule of Sarrus (elementwise: no LAPACK call)."""
    a, b, c = M[..., 0, 0], M[..., 0, 1], M[..., 0, 2]
    d, e, f = M[..., 1, 0], M[..., 1, 1], M[..., 1, 2]
    g, h, i = M[..., 2, 0], M[..., 2, 1], M[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


# ------------------------------------------------------------------------------------ weighted Procrustes (Umeyama)
# Moments layout G [B, 5, 4] between source points x and target points y with weights w:
#   G[:, :3, :3] = sum w y x^T   G[:, :3, 3] = sum w y   G[:, 3, 3] = sum w |x|^2   G[:, 4, :3] = sum w x
#   G[:, 4, 3] = sum w           (G[:, 3, :3] = sum w |x|^2 x^T is a by-product, unused)


def procrustes_moments(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Moments G [B, 5, 4] (float64, layout above) of channels-first points x, y [B, 3, M] with weights w [B, M].

    One batched product [y; |x|^2; 1] (w [x; 1])^T in float32 (float64 if an input is float64), then float64."""
    dt = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    w = w.to(dt)
    b, M = w.shape
    xa = torch.empty(b, 4, M, device=x.device, dtype=dt)
    xa[:, :3] = x
    xa[:, 3] = 1.0                                                 # [x, 1]
    ya = torch.empty(b, 5, M, device=x.device, dtype=dt)
    ya[:, :3] = y
    ya[:, 3] = (xa[:, :3] * xa[:, :3]).sum(1)
    ya[:, 4] = 1.0                                                 # [y, |x|^2, 1]
    return torch.bmm(ya, (xa * w[:, None]).transpose(1, 2)).to(torch.float64)


def procrustes_solve(G: torch.Tensor, with_scale: bool = True,
                     scale_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s [B], R [B, 3, 3], t [B, 3]) minimising sum w ||y - (s R x + t)||^2 from the moments G [B, 5, 4].

    With the weighted means mx, my, the cross-covariance C = E[(y - my)(x - mx)^T] = U S V^T and the source
    variance v = E|x - mx|^2: R = U D V^T with D = diag(1, 1, det(U V^T)) (no reflection), s = tr(S D) / v
    (s = 1 without scale), t = my - s R mx. scale_fn(W, v, tr(S D)) -> s replaces the free scale (a constrained
    one; W = sum w). The 3x3 SVDs run in float64 numpy on the host (torch's batched CPU linalg pays a thread-pool
    round trip per call). Results are float64 CPU tensors.
    """
    G = G.cpu()
    W = G[:, 4, 3].clamp_min(1e-12)
    mx, my = G[:, 4, :3] / W[:, None], G[:, :3, 3] / W[:, None]
    cov = G[:, :3, :3] / W[:, None, None] - my[:, :, None] * mx[:, None, :]
    varx = (G[:, 3, 3] / W - (mx * mx).sum(-1)).clamp_min(1e-30)
    U, S, Vh = (torch.from_numpy(a) for a in np.linalg.svd(cov.numpy()))
    d = torch.sign(det3(U) * det3(Vh))
    d = torch.where(d == 0, torch.ones_like(d), d)
    D = torch.ones_like(S)
    D[:, 2] = d
    R = U @ (D[:, :, None] * Vh)
    if not with_scale:
        s = torch.ones_like(varx)
    elif scale_fn is None:
        s = (S * D).sum(-1) / varx
    else:
        s = scale_fn(W, varx, (S * D).sum(-1))
    t = my - s[:, None] * (R @ mx[:, :, None])[..., 0]
    return s, R, t


def umeyama(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None, with_scale: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched weighted Procrustes y ~ s R x + t for x, y [B, M, 3], w [B, M] (default all ones):
    s [B], R [B, 3, 3], t [B, 3] in x's dtype and device (see `procrustes_solve`)."""
    if w is None:
        w = torch.ones(x.shape[:-1], device=x.device)
    s, R, t = procrustes_solve(procrustes_moments(x.transpose(1, 2), y.transpose(1, 2), w), with_scale)
    return s.to(x.device, x.dtype), R.to(x.device, x.dtype), t.to(x.device, x.dtype)


# ------------------------------------------------------------------------------------------------------- cameras


def look_at(C: np.ndarray, target: np.ndarray, up: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world (4, 4) float64 numpy at C looking at target without roll: +z forward,
    +x = z x up (right), +y = z x x (down, against `up`). Raises ValueError when the view is along `up`."""
    C = np.asarray(C, np.float64)
    z = np.asarray(target, np.float64) - C
    z = z / np.linalg.norm(z)
    x = np.cross(z, np.asarray(up, np.float64))
    nx = np.linalg.norm(x)
    if nx < 1e-9:
        raise ValueError("look_at: viewing direction is parallel to the up vector; move the camera or the target")
    x /= nx
    M = np.eye(4)
    M[:3, :3] = np.stack([x, np.cross(z, x), z], 1)
    M[:3, 3] = C
    return M
