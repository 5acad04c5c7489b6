"""The pinhole camera on the pixel grid: pixel coordinates, the default focal and its bounds, focal estimation.

Pixel (r, c) of a map sub-sampled by `stride` is pixel (stride r, stride c) of the image, with coordinates
u = stride c (column), v = stride r (row); a camera with focal f and principal point (cx, cy) sees the camera-frame
point d ((u - cx) / f, (v - cy) / f, 1) at depth d.
"""

from __future__ import annotations

import math

import torch

FOCAL_RANGE = (0.02, 50.0)   # focal bounds of the solvers, in units of the 60-degree focal of the map size


def pixel_grid(H: int, W: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               stride: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, v) pixel coordinates, each [H', W'], of every `stride`-th pixel (u = column, v = row).

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


def default_focal(H: int, W: int) -> float:
    """Focal of a 60 deg field of view on the long side: max(H, W) / (2 tan 30 deg)."""
    return max(H, W) / (2 * math.tan(math.radians(60) / 2))


def focal_bounds(H: int, W: int) -> tuple[float, float]:
    """(lowest, highest) focal the solvers allow on an H x W image: `FOCAL_RANGE` x the default focal."""
    return tuple(k * default_focal(H, W) for k in FOCAL_RANGE)  # type: ignore[return-value]


def estimate_focal(pts_cam: torch.Tensor, pp: torch.Tensor, weight: torch.Tensor | None = None, iters: int = 10,
                   min_factor: float = 0.5, max_factor: float = 3.5, shapes: torch.Tensor | None = None) -> torch.Tensor:
    """Focal [B] per map from camera-frame points [B, H, W, 3] by a Weiszfeld fit of (u,v) - pp = f * (X/Z, Y/Z).

    pp: [B, 2]. Only points with Z > 0 (and weight > 0) count. The least-squares focal starts `iters` reweighted
    passes (weights 1 / residual: the L1 fit). Clipped to [min, max] x the 60-degree focal.
    shapes: [B, 2] true (H, W) used for the clip bounds (default the map size).
    """
    B, H, W, _ = pts_cam.shape
    u, v = pixel_grid(H, W, pts_cam.device, pts_cam.dtype)
    px = torch.stack([u, v], -1)[None] - pp[:, None, None, :]               # [B, H, W, 2]
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
