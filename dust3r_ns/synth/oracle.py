"""Oracle pair predictions from rendered ground truth, in the reference pair-inference output structure.

For edge (i, j): pred1 = view i's points in camera i's frame, pred2 = view j's points in camera i's frame, both
corrupted per pair by one random similarity (unknown scale, small rotation and translation), multiplicative noise
along each view's rays (white per pixel + a smooth low-frequency field), optionally a per-map focal error, and
outliers pushed along their rays with low confidence. Invalid pixels get confidence 1 and a finite point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch



@dataclass(frozen=True)
class NoiseConfig:
    """Corruption of oracle predictions. scale_range: per-pair scale (log-uniform); rot_deg: std of the per-pair
    rotation angle; trans_frac: per-pair translation as a fraction of the median depth of view i; depth_noise: std of
    the per-pixel multiplicative noise along the ray; smooth_noise: std of a low-frequency multiplicative depth error
    (a coarse smooth_grid x smooth_grid N(0,1) field, bilinearly upsampled: correlated like real network errors,
    so it does not average out over pixels); focal_noise: std of a per-map relative error e of the focal implied by
    the points (their x, y in the view's own camera frame divided by 1 + e; noise along rays alone leaves the
    focal exact); outlier_frac: share of pixels pushed along the ray (x0.6-0.85
    or x1.2-1.8) with confidence 1.0-1.2; conf_range: confidence of the other valid pixels."""

    scale_range: tuple[float, float] = (0.5, 2.0)
    rot_deg: float = 0.5
    trans_frac: float = 0.005
    depth_noise: float = 0.01
    outlier_frac: float = 0.02
    conf_range: tuple[float, float] = (1.5, 10.0)
    smooth_noise: float = 0.01
    smooth_grid: int = 4
    focal_noise: float = 0.0

    @classmethod
    def none(cls) -> "NoiseConfig":
        """Exact geometry: no noise, no outliers, scale 1."""
        return cls(scale_range=(1.0, 1.0), rot_deg=0.0, trans_frac=0.0, depth_noise=0.0, outlier_frac=0.0,
                   smooth_noise=0.0)

    def scaled(self, factor: float) -> "NoiseConfig":
        """Same config with rotation, translation, depth noises and outlier share multiplied by factor (>= 0)."""
        if factor < 0:
            raise ValueError(f"NoiseConfig.scaled: factor must be >= 0, got {factor}")
        return replace(self, rot_deg=self.rot_deg * factor, trans_frac=self.trans_frac * factor,
                       depth_noise=self.depth_noise * factor, outlier_frac=min(0.5, self.outlier_frac * factor),
                       smooth_noise=self.smooth_noise * factor, focal_noise=self.focal_noise * factor)

    def validate(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"NoiseConfig: scale_range must satisfy 0 < lo <= hi, got {self.scale_range}")
        clo, chi = self.conf_range
        if not 1.0 < clo <= chi:
            raise ValueError(f"NoiseConfig: conf_range must satisfy 1 < lo <= hi, got {self.conf_range}")
        amounts = (self.rot_deg, self.trans_frac, self.depth_noise, self.smooth_noise, self.focal_noise)
        if min(amounts) < 0 or not 0 <= self.outlier_frac <= 1 or self.smooth_grid < 2:
            raise ValueError("NoiseConfig: rot_deg, trans_frac, depth_noise, smooth_noise, focal_noise must be >= 0, "
                             "outlier_frac in [0, 1] and smooth_grid >= 2")


def pixel_rays(K: np.ndarray, H: int, W: int) -> np.ndarray:
    """(H,W,3) camera-frame rays K^-1 [u, v, 1] scaled to z = 1 (pixel (u, v) at continuous coordinate (u, v))."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    return rays / rays[..., 2:3]


def camera_points(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H,W,3) camera-frame points of a z-depth map."""
    return pixel_rays(K, *depth.shape) * depth[..., None]


def _rotation(axis_angle: np.ndarray) -> np.ndarray:
    th = float(np.linalg.norm(axis_angle))
    if th < 1e-12:
        return np.eye(3)
    k = axis_angle / th
    Kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * Kx + (1 - math.cos(th)) * Kx @ Kx


class _View:
    """Per-view data reused by every pair: rays, filled depth (invalid pixels at the median depth), validity."""

    def __init__(self, view: dict) -> None:
        self.valid = np.asarray(view["valid"], bool)
        depth = np.asarray(view["depth"], np.float64)
        self.H, self.W = depth.shape
        self.median = float(np.median(depth[self.valid])) if self.valid.any() else 1.0
        self.depth = np.where(self.valid, depth, self.median)
        self.rays = pixel_rays(np.asarray(view["K"], np.float64), self.H, self.W)
        self.c2w = np.asarray(view["c2w"], np.float64)


def smooth_field(rng: np.random.Generator, H: int, W: int, grid: int = 4) -> np.ndarray:
    """(H,W) smooth random field: a grid x grid N(0,1) lattice bilinearly interpolated over the image."""
    g = rng.standard_normal((grid, grid))
    y = np.linspace(0, grid - 1, H)
    x = np.linspace(0, grid - 1, W)
    y0 = np.minimum(y.astype(int), grid - 2)
    x0 = np.minimum(x.astype(int), grid - 2)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    a, b = g[y0][:, x0], g[y0][:, x0 + 1]
    c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _noisy_points(v: _View, noise: NoiseConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Camera-frame points (H,W,3) of a view with ray noise and outliers, and their confidences (H,W)."""
    H, W = v.H, v.W
    d = v.depth
    if noise.depth_noise > 0 or noise.smooth_noise > 0:
        rel = noise.depth_noise * rng.standard_normal((H, W)) if noise.depth_noise > 0 else 0.0
        if noise.smooth_noise > 0:
            rel = rel + noise.smooth_noise * smooth_field(rng, H, W, noise.smooth_grid)
        d = d * np.clip(1 + rel, 0.2, None)
    lo, hi = noise.conf_range
    yy, xx = np.ogrid[0:H, 0:W]
    fr, ph = rng.uniform(1, 4, 2), rng.uniform(0, 2 * np.pi, 2)
    s = max(H, W)
    field = 0.5 + 0.25 * (np.sin(2 * np.pi * fr[0] * xx / s + ph[0]) + np.sin(2 * np.pi * fr[1] * yy / s + ph[1]))
    conf = np.where(v.valid, lo * (hi / lo) ** field, 1.0)         # smooth, log-interpolated in conf_range
    if noise.outlier_frac > 0:
        out = np.flatnonzero((rng.uniform(size=H * W) < noise.outlier_frac) & v.valid.ravel())
        push = np.where(rng.uniform(size=len(out)) < 0.5, rng.uniform(0.6, 0.85, len(out)),
                        rng.uniform(1.2, 1.8, len(out)))
        d = d.copy() if d is v.depth else d
        d.ravel()[out] *= push
        conf.ravel()[out] = rng.uniform(1.0, 1.2, len(out))
    X = v.rays * d[..., None]
    if noise.focal_noise > 0:
        X[..., :2] /= max(1 + noise.focal_noise * rng.standard_normal(), 0.2)
    return X, conf


def oracle_pairs(views: list[dict], edges: list[tuple[int, int]], noise: NoiseConfig | None = None,
                 seed: int = 0) -> dict:
    """Pair predictions for `edges` from rendered views (render_views); see the module doc.

    Returns dict(view1, view2, pred1, pred2) as the reference inference: view* = dict(idx list[int], true_shape
    int32 (P,2), img float32 (P,3,H,W) in [-1, 1], instance list[str]); pred1 = dict(pts3d (P,H,W,3), conf (P,H,W));
    pred2 = dict(pts3d_in_other_view (P,H,W,3), conf (P,H,W)). All views must share one size.
    """
    noise = NoiseConfig() if noise is None else noise
    noise.validate()
    if not edges:
        raise ValueError("oracle_pairs: edges is empty")
    for k, v in enumerate(views):
        missing = {"rgb", "depth", "valid", "c2w", "K"} - set(v)
        if missing:
            raise ValueError(f"oracle_pairs: view {k} lacks {sorted(missing)}; build views with synth.render_views")
    shapes = {v["depth"].shape for v in views}
    if len(shapes) != 1:
        raise ValueError(f"oracle_pairs: all views must have the same size, got {sorted(shapes)}")
    n = len(views)
    for i, j in edges:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"oracle_pairs: bad edge ({i}, {j}) for {n} views")
    cache = {k: _View(views[k]) for k in sorted({int(x) for e in edges for x in e})}
    H, W = next(iter(shapes))
    P1, P2 = np.empty((len(edges), H, W, 3), np.float32), np.empty((len(edges), H, W, 3), np.float32)
    C1, C2 = np.empty((len(edges), H, W), np.float32), np.empty((len(edges), H, W), np.float32)
    for e, (i, j) in enumerate(edges):
        rng = np.random.default_rng([int(seed), e, int(i), int(j)])
        vi, vj = cache[int(i)], cache[int(j)]
        Xi, C1[e] = _noisy_points(vi, noise, rng)
        Xj, C2[e] = _noisy_points(vj, noise, rng)
        lo, hi = noise.scale_range
        s = math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo
        axis = rng.standard_normal(3)
        axis /= np.linalg.norm(axis)
        Rn = _rotation(axis * math.radians(noise.rot_deg) * rng.standard_normal())
        tn = rng.standard_normal(3)
        tn *= noise.trans_frac * vi.median / max(np.linalg.norm(tn), 1e-12)
        # one affine map per point map: pred1 = s (Rn X_i + tn); pred2 = s (Rn (T_ij X_j) + tn), T_ij = w2c_i c2w_j
        T = np.linalg.inv(vi.c2w) @ vj.c2w
        P1[e] = Xi @ (s * Rn).T + s * tn
        P2[e] = Xj @ (s * Rn @ T[:3, :3]).T + s * (Rn @ T[:3, 3] + tn)

    used = sorted(cache)
    slot = {k: m for m, k in enumerate(used)}
    imgs = np.stack([np.ascontiguousarray(views[k]["rgb"].transpose(2, 0, 1)) for k in used]).astype(np.float32)
    imgs = (imgs / 255 - 0.5) / 0.5                              # (V,3,H,W) in [-1, 1]

    out = {}
    for name, col in (("view1", 0), ("view2", 1)):
        idx = [int(e[col]) for e in edges]
        out[name] = dict(idx=idx, true_shape=torch.tensor([[H, W]] * len(edges), dtype=torch.int32),
                         img=torch.from_numpy(imgs[[slot[k] for k in idx]]), instance=[str(k) for k in idx])
    out["pred1"] = dict(pts3d=torch.from_numpy(P1), conf=torch.from_numpy(C1))
    out["pred2"] = dict(pts3d_in_other_view=torch.from_numpy(P2), conf=torch.from_numpy(C2))
    return out
