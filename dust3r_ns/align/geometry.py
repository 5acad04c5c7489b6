"""Batched geometry for alignment: weighted Sim(3)/SE(3) Procrustes from moments, pixel rays, focal estimation."""

from __future__ import annotations

import math

import numpy as np
import torch


def pixel_grid(H: int, W: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) pixel coordinates of shape (H',W') of every `stride`-th pixel (u = column, v = row).

    Cached per (shape, stride, device, dtype): the solvers ask for the same grids every iteration. Read-only views.
    """
    key = (H, W, stride, str(torch.device(device)), dtype)
    uv = _GRIDS.get(key)
    if uv is None:
        v = torch.arange(0, H, stride, device=device, dtype=dtype)
        u = torch.arange(0, W, stride, device=device, dtype=dtype)
        uv = u[None, :].expand(len(v), len(u)), v[:, None].expand(len(v), len(u))
        if len(_GRIDS) >= 32:
            _GRIDS.clear()
        _GRIDS[key] = uv
    return uv


_GRIDS: dict = {}


class Moments:
    """Accumulated weighted moments between source points x and target points y (batched over B).

    The sums accumulate where the points live (one (B,5,4) float64 buffer, no host sync per `add`); `solve` moves
    them to the CPU once and does the 3x3 solves there in float64 (tiny; batched small SVDs are slow on GPUs).
    """

    def __init__(self, B: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> None:
        self.B, self.dtype = B, dtype
        self.G: torch.Tensor | None = None if device is None else torch.zeros(B, 5, 4, dtype=dtype, device=device)
        self._cpu: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, idx: slice | torch.Tensor | None = None) -> None:
        """x, y (b,M,3), w (b,M); rows go to batch entries `idx` (default all). One batched GEMM per call."""
        self.add_cf(x.transpose(1, 2), y.transpose(1, 2), w, idx)

    def add_cf(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, idx: slice | torch.Tensor | None = None
               ) -> None:
        """As `add` with channels-first points x, y (b,3,M)."""
        w = w.float()
        b, M = w.shape
        # channels-first operands: the (5,M) @ (M,4) products run ~2.5x faster on CPUs than channels-last ones
        xa = torch.empty(b, 4, M, device=x.device)
        xa[:, :3] = x
        xa[:, 3] = 1.0                                                 # [x, 1]
        ya = torch.empty(b, 5, M, device=x.device)
        ya[:, :3] = y
        ya[:, 3] = (xa[:, :3] * xa[:, :3]).sum(1)
        ya[:, 4] = 1.0                                                 # [y, |x|^2, 1]
        self.add_sums(torch.bmm(ya, (xa * w[:, None]).transpose(1, 2)), idx)   # (b,5,4)

    def add_sums(self, G: torch.Tensor, idx: slice | torch.Tensor | None = None) -> None:
        """Add precomputed moments G (b,5,4) (layout: `sums`) to batch entries `idx` (default all)."""
        if self.G is None:
            self.G = torch.zeros(self.B, 5, 4, dtype=self.dtype, device=G.device)
        self._cpu = None
        G = G.to(self.dtype)
        if idx is None:
            self.G += G
        else:
            self.G[idx.to(self.G.device) if isinstance(idx, torch.Tensor) else idx] += G

    def sums(self) -> dict[str, torch.Tensor]:
        """The moments on the CPU: w (B,), sx (B,3), sy (B,3), sxx (B,), syx (B,3,3) (sum of w y x^T)."""
        if self._cpu is None:
            self._cpu = torch.zeros(self.B, 5, 4, dtype=self.dtype) if self.G is None else self.G.cpu()
        G = self._cpu
        return dict(w=G[:, 4, 3], sx=G[:, 4, :3], sy=G[:, :3, 3], sxx=G[:, 3, 3], syx=G[:, :3, :3])

    @property
    def w(self) -> torch.Tensor:
        return self.sums()["w"]

    def solve(self, with_scale: bool = True, log_scale_mean: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted Umeyama: (s, R, t) minimising sum w ||y - (s R x + t)||^2. s = 1 when with_scale is False.

        log_scale_mean: minimise the sum over the batch subject to mean(log s) = this value instead (the scale gauge
        of global alignment), see `gauged_scales`. Results are float64 CPU tensors.
        """
        m = self.sums()
        W = m["w"].clamp_min(1e-12)
        mx, my = m["sx"] / W[:, None], m["sy"] / W[:, None]
        cov = m["syx"] / W[:, None, None] - my[:, :, None] * mx[:, None, :]
        varx = (m["sxx"] / W - (mx * mx).sum(-1)).clamp_min(1e-30)
        # numpy's LAPACK loop: torch's batched CPU linalg on 3x3 matrices pays a thread-pool round trip per call
        # (milliseconds on many-core hosts, where every iteration of the fast solver calls this)
        U, S, Vh = (torch.from_numpy(x) for x in np.linalg.svd(cov.numpy()))
        d = torch.sign(det3(U) * det3(Vh))
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


def det3(M: torch.Tensor) -> torch.Tensor:
    """Determinants of (...,3,3) matrices by the rule of Sarrus (elementwise: no LAPACK call)."""
    a, b, c = M[..., 0, 0], M[..., 0, 1], M[..., 0, 2]
    d, e, f = M[..., 1, 0], M[..., 1, 1], M[..., 1, 2]
    g, h, i = M[..., 2, 0], M[..., 2, 1], M[..., 2, 2]
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


def gauged_scales(a: torch.Tensor, b: torch.Tensor, log_mean: float, iters: int = 100) -> torch.Tensor:
    """argmin_s sum_e (a_e s_e^2 - 2 b_e s_e) subject to mean_e log s_e = log_mean (a > 0).

    The Lagrange condition a s^2 - b s = mu gives s_e(mu) = (b + sqrt(b^2 + 4 a mu)) / (2 a), increasing in mu;
    mu is the root of g(mu) = mean log s(mu) - log_mean, found by Newton steps kept inside a shrinking bracket
    (bisection where a step leaves it), in float64 numpy (a few dozen scalar-sized steps; no torch dispatch).
    Entries with a non-finite or non-positive a/b get NaN.
    """
    a_t = torch.as_tensor(a)
    an = a_t.detach().double().cpu().numpy()
    bn = torch.as_tensor(b).detach().double().cpu().numpy()
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(an) & np.isfinite(bn) & (an > 0) & (bn > 0)
    out = np.full(an.shape, np.nan)
    if ok.any():
        out[ok] = _gauged_root(an[ok], bn[ok], float(log_mean), iters)
    return torch.from_numpy(out).to(a_t.device)


def _gauged_root(a: np.ndarray, b: np.ndarray, log_mean: float, iters: int) -> np.ndarray:
    def s_of(mu: float) -> tuple[np.ndarray, np.ndarray]:
        sq = np.sqrt(np.maximum(b * b + 4 * a * mu, 0.0))
        return (b + sq) / (2 * a), sq

    lo = -float((b * b / (4 * a)).min())        # smallest mu with real roots for every edge (s = b / 2a there)
    s, _ = s_of(lo)
    if np.log(s).mean() >= log_mean:            # the gauge asks for less than half the free scales: clamp there
        return s
    hi = max(float(np.median(b * b / a)), 1e-300)   # mu of the order of the free a s^2
    while np.log(s_of(hi)[0]).mean() < log_mean and hi < 1e300:
        lo, hi = hi, hi * 4
    mu = 0.5 * (lo + hi)
    for _ in range(iters):
        s, sq = s_of(mu)
        g = np.log(s).mean() - log_mean
        if g < 0:
            lo = mu
        else:
            hi = mu
        if abs(g) <= 1e-14 or hi - lo <= 1e-15 * max(abs(lo), abs(hi)):
            break
        dg = (1.0 / (s * np.maximum(sq, 1e-300))).mean()       # d mean(log s) / d mu
        nxt = mu - g / dg if dg > 0 and np.isfinite(dg) else np.nan
        mu = nxt if lo < nxt < hi else 0.5 * (lo + hi)
    return s_of(mu)[0]


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
