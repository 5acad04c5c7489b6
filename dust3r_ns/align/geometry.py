"""Batched geometry for alignment: weighted Sim(3)/SE(3) Procrustes from moments, pixel rays, focal estimation."""

from __future__ import annotations

import math

import torch


def pixel_grid(H: int, W: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) pixel coordinates of shape (H',W') of every `stride`-th pixel (u = column, v = row)."""
    v = torch.arange(0, H, stride, device=device, dtype=dtype)
    u = torch.arange(0, W, stride, device=device, dtype=dtype)
    return u[None, :].expand(len(v), len(u)), v[:, None].expand(len(v), len(u))


class Moments:
    """Accumulated weighted moments between source points x and target points y (batched over B)."""

    def __init__(self, B: int, device: torch.device | None = None, dtype: torch.dtype = torch.float64) -> None:
        # the accumulators and the 3x3 solves live on the CPU in float64 (tiny; batched small SVDs are slow on GPUs)
        z = lambda *s: torch.zeros(B, *s, dtype=dtype)  # noqa: E731
        self.w, self.sx, self.sy, self.sxx, self.syx = z(), z(3), z(3), z(), z(3, 3)

    def add(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, idx: slice | torch.Tensor | None = None) -> None:
        """x, y (b,M,3), w (b,M); rows go to batch entries `idx` (default all). One batched GEMM per call."""
        x, y, w = x.float(), y.float(), w.float()
        one = torch.ones_like(w)[..., None]
        xa = torch.cat([x, one], -1) * w[..., None]               # (b,M,4) weighted [x, 1]
        ya = torch.cat([y, (x * x).sum(-1, keepdim=True), one], -1)  # (b,M,5) [y, |x|^2, 1]
        G = (ya.transpose(1, 2) @ xa).to("cpu", self.w.dtype)      # (b,5,4)
        vals = dict(w=G[:, 4, 3], sx=G[:, 4, :3], sy=G[:, :3, 3], sxx=G[:, 3, 3], syx=G[:, :3, :3])
        for name, val in vals.items():
            buf = getattr(self, name)
            if idx is None:
                buf += val
            else:
                buf[idx.cpu() if isinstance(idx, torch.Tensor) else idx] += val

    def solve(self, with_scale: bool = True, log_scale_mean: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted Umeyama: (s, R, t) minimising sum w ||y - (s R x + t)||^2. s = 1 when with_scale is False.

        log_scale_mean: minimise the sum over the batch subject to mean(log s) = this value instead (the scale gauge
        of global alignment), see `gauged_scales`.
        """
        W = self.w.clamp_min(1e-12)
        mx, my = self.sx / W[:, None], self.sy / W[:, None]
        cov = self.syx / W[:, None, None] - my[:, :, None] * mx[:, None, :]
        varx = (self.sxx / W - (mx * mx).sum(-1)).clamp_min(1e-30)
        U, S, Vh = torch.linalg.svd(cov)
        d = torch.sign(torch.det(U) * torch.det(Vh))
        d = torch.where(d == 0, torch.ones_like(d), d)
        D = torch.ones_like(S)
        D[:, 2] = d
        R = U @ (D[:, :, None] * Vh)
        if not with_scale:
            s = torch.ones_like(varx)
        elif log_scale_mean is None:
            s = (S * D).sum(-1) / varx
        else:
            s = gauged_scales(W * varx, W * (S * D).sum(-1), log_scale_mean)
        t = my - s[:, None] * (R @ mx[:, :, None])[..., 0]
        return s, R, t


def gauged_scales(a: torch.Tensor, b: torch.Tensor, log_mean: float, iters: int = 64) -> torch.Tensor:
    """argmin_s sum_e (a_e s_e^2 - 2 b_e s_e) subject to mean_e log s_e = log_mean (a > 0).

    The Lagrange condition a s^2 - b s = mu gives s_e(mu) = (b + sqrt(b^2 + 4 a mu)) / (2 a), increasing in mu;
    mu is found by bisection (float64). Entries with a non-finite or non-positive a/b get NaN.
    """
    a, b = a.double(), b.double()
    ok = torch.isfinite(a) & torch.isfinite(b) & (a > 0) & (b > 0)
    out = torch.full_like(a, float("nan"))
    if not ok.any():
        return out
    a, b = a[ok], b[ok]

    def s_of(mu: float) -> torch.Tensor:
        return (b + (b * b + 4 * a * mu).clamp_min(0).sqrt()) / (2 * a)

    def f(mu: float) -> float:
        return float(s_of(mu).log().mean()) - log_mean

    lo = -float((b * b / (4 * a)).min())        # smallest mu with real roots for every edge (s = b / 2a there)
    if f(lo) >= 0:                              # the gauge asks for less than half the free scales: clamp there
        out[ok] = s_of(lo)
        return out
    hi = max(float((b * b / a).median()), 1e-300)   # mu of the order of the free a s^2
    while f(hi) < 0 and hi < 1e300:
        hi *= 4
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    out[ok] = s_of(0.5 * (lo + hi))
    return out


def umeyama(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor | None = None, with_scale: bool = True):
    """Batched weighted Procrustes y ~ s R x + t for x, y (B,M,3), w (B,M)."""
    if w is None:
        w = torch.ones(x.shape[:-1], device=x.device)
    m = Moments(x.shape[0])
    m.add(x, y, w)
    s, R, t = m.solve(with_scale)
    return s.to(x.device, x.dtype), R.to(x.device, x.dtype), t.to(x.device, x.dtype)


def default_focal(H: int, W: int) -> float:
    """Focal of a 60 deg field of view on the long side (used to bound focal estimates)."""
    return max(H, W) / (2 * math.tan(math.radians(60) / 2))


def estimate_focal(pts_cam: torch.Tensor, pp: torch.Tensor, weight: torch.Tensor | None = None, iters: int = 10,
                   min_factor: float = 0.5, max_factor: float = 3.5, shapes: torch.Tensor | None = None) -> torch.Tensor:
    """Focal per map from camera-frame points (B,H,W,3) by a Weiszfeld fit of (u,v) - pp = f * (X/Z, Y/Z).

    pp: (B,2). Only points with Z > 0 (and weight > 0) count. Clipped to [min, max] x the 60-degree focal.
    shapes: (B,2) true (H,W) used for the clip bounds (default the map size).
    """
    B, H, W, _ = pts_cam.shape
    u, v = pixel_grid(H, W, pts_cam.device, pts_cam.dtype)
    px = torch.stack([u, v], -1)[None] - pp[:, None, None, :]               # (B,H,W,2)
    z = pts_cam[..., 2:3]
    ok = z[..., 0] > 1e-8
    if weight is not None:
        ok = ok & (weight > 0)
    q = pts_cam[..., :2] / torch.where(z.abs() > 1e-8, z, torch.ones_like(z))
    okf = ok.float()
    f = (okf[..., None] * px * q).sum((1, 2, 3)) / (okf[..., None] * q * q).sum((1, 2, 3)).clamp_min(1e-12)
    for _ in range(iters):
        r = (px - f[:, None, None, None] * q).norm(dim=-1)
        wt = okf / r.clamp_min(1e-6)
        f = (wt[..., None] * px * q).sum((1, 2, 3)) / (wt[..., None] * q * q).sum((1, 2, 3)).clamp_min(1e-12)
    if shapes is None:
        base = torch.full((B,), default_focal(H, W), device=f.device, dtype=f.dtype)
    else:
        base = shapes.to(f.device, f.dtype).max(-1).values / (2 * math.tan(math.radians(30)))
    return torch.minimum(torch.maximum(f, min_factor * base), max_factor * base)


def skew(w: torch.Tensor) -> torch.Tensor:
    z = torch.zeros_like(w[..., 0])
    return torch.stack([z, -w[..., 2], w[..., 1], w[..., 2], z, -w[..., 0], -w[..., 1], w[..., 0], z], -1).reshape(
        *w.shape[:-1], 3, 3)


def so3_exp(w: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation matrices (...,3,3) from axis-angle (...,3)."""
    th = w.norm(dim=-1, keepdim=True)[..., None]
    K = skew(w)
    small = th < 1e-8
    ths = torch.where(small, torch.ones_like(th), th)
    a = torch.where(small, 1 - th ** 2 / 6, torch.sin(ths) / ths)
    b = torch.where(small, 0.5 - th ** 2 / 24, (1 - torch.cos(ths)) / ths ** 2)
    eye = torch.eye(3, device=w.device, dtype=w.dtype).expand_as(K)
    return eye + a * K + b * (K @ K)


def quat_to_rotmat(q: torch.Tensor) -> torch.Tensor:
    """Rotation matrices (...,3,3) from quaternions (...,4) stored (x, y, z, w); normalised first (differentiable)."""
    q = q / q.norm(dim=-1, keepdim=True)
    x, y, z, w = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1).reshape(*q.shape[:-1], 3, 3)


def rotmat_to_quat(R: torch.Tensor) -> torch.Tensor:
    """Unit quaternions (...,4) (x, y, z, w), w >= 0, from rotation matrices (...,3,3) (Shepperd's method)."""
    m = R.reshape(-1, 3, 3)
    tr = m[:, 0, 0] + m[:, 1, 1] + m[:, 2, 2]
    cands = torch.stack([
        torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0], m[:, 1, 0] - m[:, 0, 1], 1 + tr], -1),
        torch.stack([1 + 2 * m[:, 0, 0] - tr, m[:, 0, 1] + m[:, 1, 0], m[:, 0, 2] + m[:, 2, 0], m[:, 2, 1] - m[:, 1, 2]], -1),
        torch.stack([m[:, 0, 1] + m[:, 1, 0], 1 + 2 * m[:, 1, 1] - tr, m[:, 1, 2] + m[:, 2, 1], m[:, 0, 2] - m[:, 2, 0]], -1),
        torch.stack([m[:, 0, 2] + m[:, 2, 0], m[:, 1, 2] + m[:, 2, 1], 1 + 2 * m[:, 2, 2] - tr, m[:, 1, 0] - m[:, 0, 1]], -1),
    ], 1)                                                                   # (B,4,4): 4 candidate (unnormalised) quats
    diag = torch.stack([tr, m[:, 0, 0], m[:, 1, 1], m[:, 2, 2]], -1)
    best = diag.argmax(-1)
    q = cands[torch.arange(m.shape[0], device=R.device), best]
    q = q / q.norm(dim=-1, keepdim=True)
    q = torch.where(q[:, 3:4] < 0, -q, q)
    return q.reshape(*R.shape[:-2], 4)
