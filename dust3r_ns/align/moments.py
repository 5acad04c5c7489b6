"""Accumulated Procrustes moments of many point-map pairs (one batch entry per edge) and their solve, optionally
under the scale gauge of global alignment (the geometric mean of the edge scales fixed)."""

from __future__ import annotations

import numpy as np
import torch

from dust3r_ns.geometry import procrustes_moments, procrustes_solve


class Moments:
    """Weighted moments between source points x and target points y, batched over B (layout: `sums`).

    The sums accumulate where the points live (one [B, 5, 4] float64 buffer, no host sync per `add`); `solve` moves
    them to the host once and solves there in float64 (`geometry.procrustes_solve`).
    """

    def __init__(self, B: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> None:
        self.B, self.dtype = B, dtype
        self.G: torch.Tensor | None = None if device is None else torch.zeros(B, 5, 4, dtype=dtype, device=device)
        self._cpu: torch.Tensor | None = None

    def add(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, idx: slice | torch.Tensor | None = None) -> None:
        """x, y [b, M, 3], w [b, M]; rows go to batch entries `idx` (default all). One batched GEMM per call."""
        self.add_cf(x.transpose(1, 2), y.transpose(1, 2), w, idx)

    def add_cf(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, idx: slice | torch.Tensor | None = None
               ) -> None:
        """As `add` with channels-first points x, y [b, 3, M] (the faster operand layout on CPUs)."""
        self.add_sums(procrustes_moments(x, y, w.float()), idx)

    def add_sums(self, G: torch.Tensor, idx: slice | torch.Tensor | None = None) -> None:
        """Add precomputed moments G [b, 5, 4] (layout: `sums`) to batch entries `idx` (default all)."""
        if self.G is None:
            self.G = torch.zeros(self.B, 5, 4, dtype=self.dtype, device=G.device)
        self._cpu = None
        G = G.to(self.dtype)
        if idx is None:
            self.G += G
        else:
            self.G[idx.to(self.G.device) if isinstance(idx, torch.Tensor) else idx] += G

    def _host(self) -> torch.Tensor:
        if self._cpu is None:
            self._cpu = torch.zeros(self.B, 5, 4, dtype=self.dtype) if self.G is None else self.G.cpu()
        return self._cpu

    def sums(self) -> dict[str, torch.Tensor]:
        """The moments on the host: w [B], sx [B, 3], sy [B, 3], sxx [B], syx [B, 3, 3] (sum of w y x^T)."""
        G = self._host()
        return dict(w=G[:, 4, 3], sx=G[:, 4, :3], sy=G[:, :3, 3], sxx=G[:, 3, 3], syx=G[:, :3, :3])

    @property
    def w(self) -> torch.Tensor:
        return self.sums()["w"]

    def solve(self, with_scale: bool = True, log_scale_mean: float | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted Umeyama per entry: (s, R, t) minimising sum w ||y - (s R x + t)||^2 (s = 1 without scale).

        log_scale_mean: minimise the sum over the batch subject to mean(log s) = this value instead (the scale gauge
        of global alignment), see `gauged_scales`. Results are float64 host tensors.
        """
        scale_fn = None
        if with_scale and log_scale_mean is not None:
            scale_fn = lambda W, varx, tr: gauged_scales(W * varx, W * tr, log_scale_mean)  # noqa: E731
        return procrustes_solve(self._host(), with_scale, scale_fn)


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
