"""Pure-PyTorch, differentiable 3D Gaussian rasterizer: the CPU fallback for splatfacto (slow; tests and demos).

gsplat has no CPU rasterizer, so `dust3r-splatfacto` uses `rasterize_dense` only when CUDA is absent. It follows
gsplat's `rasterization(...)` contract for what splatfacto uses (pinhole cameras, `packed=False`):
EWA projection (covariance J W S W^T J^T + eps2d, 'antialiased' opacity compensation), radii = ceil(3 sigma_max),
spherical harmonics up to degree 3 (colour = max(SH + 0.5, 0)), front-to-back alpha compositing at pixel centres
(u + 0.5, v + 0.5) with alpha = min(0.999, o * exp(-d^T conic d / 2)), alphas < 1/255 skipped, compositing stopped
once transmittance falls under 1e-4. It returns (render [C,H,W,D], alpha [C,H,W,1], info) where info has
`means2d` [C,N,2] (non-leaf; after backward `means2d.absgrad` holds the per-pixel absolute gradient sums that
gsplat's densification uses), `radii` [C,N] int32, `depths`, `conics`, `width`, `height`, `n_cameras`,
`gaussian_ids=None`, `tile_size`.

The compositing is dense per tile: each `tile_size` square of pixels considers, front to back, every Gaussian
whose footprint of non-negligible alpha (o exp(-q/2) >= 1/255, within its 3-sigma radius) reaches the tile
(memory ~ pixels x Gaussians per chunk, bounded by `chunk_elems`). With gradients on, the chunks of one render
keep their intermediate tensors for the backward pass until their pixel x Gaussian elements add up to
`keep_elems`; the chunks after that are checkpointed (recomputed in the backward pass: less memory, more
compositing time). Both give the same values and gradients.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dust3r_ns import geometry

# real spherical-harmonic basis constants (degrees 0..3), the 3DGS sign convention
_SH_C0 = 0.28209479177387814
_SH_C1 = 0.4886025119029199
_SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
_SH_C3 = (-0.5900435899266435, 2.890611442640554, -0.4570457994644658, 0.3731763325901154, -0.4570457994644658,
          1.445305721320277, -0.5900435899266435)
ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.999
T_MIN = 1e-4


def sh_basis(degree: int, dirs: Tensor) -> Tensor:
    """Real SH basis values (..., (degree+1)^2) for unit directions (..., 3)."""
    if not 0 <= degree <= 3:
        raise ValueError(f"spherical-harmonic degree {degree} is not supported by the CPU rasterizer (0..3)")
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, _SH_C0)]
    if degree >= 1:
        out += [-_SH_C1 * y, _SH_C1 * z, -_SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [_SH_C2[0] * x * y, _SH_C2[1] * y * z, _SH_C2[2] * (2 * zz - xx - yy), _SH_C2[3] * x * z,
                _SH_C2[4] * (xx - yy)]
    if degree >= 3:
        out += [_SH_C3[0] * y * (3 * xx - yy), _SH_C3[1] * x * y * z, _SH_C3[2] * y * (4 * zz - xx - yy),
                _SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy), _SH_C3[4] * x * (4 * zz - xx - yy),
                _SH_C3[5] * z * (xx - yy), _SH_C3[6] * x * (xx - 3 * yy)]
    return torch.stack(out, dim=-1)


def eval_sh(degree: int, dirs: Tensor, coeffs: Tensor) -> Tensor:
    """SH colour (..., 3) from directions (..., 3) (normalised here) and coefficients (..., K, 3), K >= (d+1)^2."""
    nb = (degree + 1) ** 2
    if coeffs.shape[-2] < nb:
        raise ValueError(f"SH degree {degree} needs {nb} coefficients per colour, got {coeffs.shape[-2]}")
    basis = sh_basis(degree, F.normalize(dirs, dim=-1))
    return (basis[..., None] * coeffs[..., :nb, :]).sum(-2)


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """(N,4) quaternions (w, x, y, z), normalised here -> (N,3,3) rotations."""
    return geometry.quat_to_rotmat(quats, scalar_first=True)


def project_gaussians(means: Tensor, quats: Tensor, scales: Tensor, viewmats: Tensor, Ks: Tensor, width: int,
                      height: int, eps2d: float = 0.3, near_plane: float = 0.01, far_plane: float = 1e10
                      ) -> dict[str, Tensor]:
    """EWA projection of N Gaussians into C pinhole cameras (world-to-camera `viewmats`, OpenCV axes).

    Returns means2d [C,N,2], conics [C,N,3] (a, b, c of the inverse 2D covariance), depths [C,N], radii [C,N]
    int32 (0 = culled), compensation [C,N] (antialiasing opacity factor), cov2d [C,N,2,2].
    """
    Rq = quat_to_rotmat(quats)
    M = Rq * scales[:, None, :]
    cov3 = M @ M.transpose(1, 2)  # [N,3,3]
    R = viewmats[:, None, :3, :3]  # [C,1,3,3]
    pc = (R @ means[None, :, :, None]).squeeze(-1) + viewmats[:, None, :3, 3]  # [C,N,3]
    x, y, z = pc.unbind(-1)
    valid = (z > near_plane) & (z < far_plane)
    zs = torch.where(valid, z, torch.ones_like(z))
    fx, fy = Ks[:, 0, 0, None], Ks[:, 1, 1, None]
    cx, cy = Ks[:, 0, 2, None], Ks[:, 1, 2, None]
    # clamp the Jacobian's lateral position to the image edges + 30% of the half field of view (stabilises
    # off-screen Gaussians; the same limits as gsplat, asymmetric for an off-centre principal point)
    mx_, my_ = 0.3 * 0.5 * width / fx, 0.3 * 0.5 * height / fy
    tx = zs * torch.minimum(torch.maximum(x / zs, -(cx / fx + mx_)), (width - cx) / fx + mx_)
    ty = zs * torch.minimum(torch.maximum(y / zs, -(cy / fy + my_)), (height - cy) / fy + my_)
    zero = torch.zeros_like(zs)
    J = torch.stack([fx / zs, zero, -fx * tx / zs ** 2, zero, fy / zs, -fy * ty / zs ** 2], -1).reshape(
        *zs.shape, 2, 3)
    cov_c = R @ cov3[None] @ R.transpose(-1, -2)
    cov2 = J @ cov_c @ J.transpose(-1, -2)  # [C,N,2,2]
    det0 = cov2[..., 0, 0] * cov2[..., 1, 1] - cov2[..., 0, 1] * cov2[..., 1, 0]
    cov2 = cov2 + eps2d * torch.eye(2, dtype=cov2.dtype, device=cov2.device)
    det = (cov2[..., 0, 0] * cov2[..., 1, 1] - cov2[..., 0, 1] * cov2[..., 1, 0]).clamp(min=1e-10)
    comp = torch.sqrt(torch.clamp(det0 / det, min=0.0))
    conics = torch.stack([cov2[..., 1, 1] / det, -0.5 * (cov2[..., 0, 1] + cov2[..., 1, 0]) / det,
                          cov2[..., 0, 0] / det], -1)
    means2d = torch.stack([fx * x / zs + cx, fy * y / zs + cy], -1)
    with torch.no_grad():
        b = 0.5 * (cov2[..., 0, 0] + cov2[..., 1, 1])
        lam = b + torch.sqrt(torch.clamp(b * b - det, min=0.01))
        radius = torch.ceil(3.0 * torch.sqrt(lam))
        mx, my = means2d[..., 0], means2d[..., 1]
        inside = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
        radius = torch.where(valid & inside, radius, torch.zeros_like(radius))
    return {"means2d": means2d, "conics": conics, "depths": z, "radii": radius.to(torch.int32),
            "compensation": comp, "cov2d": cov2}


class _AbsGradSink:
    """Holds the info["means2d"] tensor whose `.absgrad` the backward pass fills (kept out of autograd inputs)."""

    def __init__(self, means2d: Tensor):
        self.means2d = means2d


class _PerPixelMeans(torch.autograd.Function):
    """means2d[cam, ids] broadcast to every pixel of a band; backward also accumulates |per-pixel grad| sums
    into `sink.means2d.absgrad[cam]` (what gsplat's `absgrad=True` provides for densification)."""

    @staticmethod
    def forward(ctx, m2d: Tensor, ids: Tensor, npix: int, sink: Optional[_AbsGradSink], cam: int) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.n = m2d.shape[0]
        ctx.sink = sink
        ctx.cam = cam
        return m2d.index_select(0, ids).unsqueeze(0).expand(npix, -1, -1).clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        (ids,) = ctx.saved_tensors
        grad = torch.zeros(ctx.n, 2, dtype=g.dtype, device=g.device).index_add_(0, ids, g.sum(0))
        if ctx.sink is not None:
            ctx.sink.means2d.absgrad[ctx.cam].index_add_(0, ids, g.abs().sum(0))
        return grad, None, None, None, None


def _composite_band(m2d: Tensor, conic: Tensor, opac: Tensor, feats: Tensor, ids: Tensor, pix: Tensor,
                    sink: Optional[_AbsGradSink], cam: int) -> tuple[Tensor, Tensor]:
    """Composite Gaussians `ids` (front to back) at pixel centres `pix` [P,2] -> (features [P,D], alpha [P])."""
    P = pix.shape[0]
    mu = _PerPixelMeans.apply(m2d, ids, P, sink, cam)  # [P,n,2]
    d = pix[:, None, :] - mu
    a, b, c = conic.index_select(0, ids).unbind(-1)
    power = -0.5 * (a * d[..., 0] ** 2 + c * d[..., 1] ** 2) - b * d[..., 0] * d[..., 1]
    alpha = torch.clamp(opac.index_select(0, ids) * torch.exp(power), max=ALPHA_MAX)
    alpha = torch.where((power <= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))
    trans_incl = torch.cumprod(1.0 - alpha, dim=1)
    trans_excl = torch.cat([torch.ones_like(trans_incl[:, :1]), trans_incl[:, :-1]], dim=1)
    w = alpha * trans_excl * (trans_incl >= T_MIN)
    return w @ feats.index_select(0, ids), w.sum(1)


def rasterize_dense(means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
                    viewmats: Tensor, Ks: Tensor, width: int, height: int, near_plane: float = 0.01,
                    far_plane: float = 1e10, eps2d: float = 0.3, sh_degree: Optional[int] = None,
                    backgrounds: Optional[Tensor] = None, render_mode: str = "RGB", absgrad: bool = False,
                    rasterize_mode: str = "classic", packed: bool = False, chunk_elems: int = 1 << 21,
                    tile_size: int = 16, keep_elems: int = 0,
                    **unused: Any) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """gsplat-compatible `rasterization` for CPU (see the module docstring). colors: [N,D] / [C,N,D] when
    sh_degree is None, else SH coefficients [N,K,3]. render_mode: RGB, D, ED, RGB+D or RGB+ED."""
    if packed:
        raise ValueError("the CPU rasterizer supports packed=False only")
    if rasterize_mode not in ("classic", "antialiased"):
        raise ValueError(f"unknown rasterize_mode {rasterize_mode!r}")
    if render_mode not in ("RGB", "D", "ED", "RGB+D", "RGB+ED"):
        raise ValueError(f"unknown render_mode {render_mode!r}")
    C, N = viewmats.shape[0], means.shape[0]
    proj = project_gaussians(means, quats, scales, viewmats, Ks, width, height, eps2d, near_plane, far_plane)
    means2d, conics, depths, radii = proj["means2d"], proj["conics"], proj["depths"], proj["radii"]
    sink = None
    if absgrad and means2d.requires_grad:
        means2d.absgrad = torch.zeros_like(means2d, requires_grad=False)  # filled during backward
        sink = _AbsGradSink(means2d)
    opac = opacities[None].expand(C, N)
    if rasterize_mode == "antialiased":
        opac = opac * proj["compensation"]

    if sh_degree is not None:
        campos = -(viewmats[:, :3, :3].transpose(1, 2) @ viewmats[:, :3, 3:4]).squeeze(-1)  # [C,3]
        dirs = means[None] - campos[:, None]
        coeffs = colors if colors.dim() == 4 else colors[None].expand(C, *colors.shape)
        feats = torch.clamp_min(eval_sh(sh_degree, dirs, coeffs) + 0.5, 0.0)  # [C,N,3]
    else:
        feats = colors if colors.dim() == 3 else colors[None].expand(C, *colors.shape)
    if render_mode in ("D", "ED"):
        feats = depths[..., None]
    elif render_mode in ("RGB+D", "RGB+ED"):
        feats = torch.cat([feats, depths[..., None]], -1)
    D = feats.shape[-1]

    dev, dt = means.device, means.dtype
    vs, us = torch.meshgrid(torch.arange(height, device=dev, dtype=dt), torch.arange(width, device=dev, dtype=dt),
                            indexing="ij")
    pix_all = torch.stack([us, vs], -1).reshape(-1, 2) + 0.5
    # pixel index lists of the tiles (row-major tiles), and the permutation back to image order
    tiles, order_parts = [], []
    for y0 in range(0, height, tile_size):
        for x0 in range(0, width, tile_size):
            y1, x1 = min(height, y0 + tile_size), min(width, x0 + tile_size)
            ids = (torch.arange(y0, y1, device=dev)[:, None] * width + torch.arange(x0, x1, device=dev)).reshape(-1)
            tiles.append((x0, x1, y0, y1, ids))
            order_parts.append(ids)
    inverse = torch.empty(height * width, dtype=torch.long, device=dev)
    inverse[torch.cat(order_parts)] = torch.arange(height * width, device=dev)
    renders, alphas = [], []
    kept = 0  # pixel x Gaussian elements composited without checkpointing so far (all cameras)
    for cam in range(C):
        vis = torch.nonzero(radii[cam] > 0).squeeze(1)
        order = vis[torch.argsort(depths[cam, vis].detach())]
        mx, my = means2d[cam, order, 0].detach(), means2d[cam, order, 1].detach()
        # reach of non-negligible alpha: o exp(-q/2) >= 1/255 needs q <= 2 ln(255 o), q >= |d|^2 / lambda_max,
        # and radius = ceil(3 sqrt(lambda_max)) >= 3 sqrt(lambda_max)
        o = opac[cam, order].detach()
        reach = radii[cam, order].to(dt) / 3.0 * torch.sqrt(torch.clamp(2.0 * torch.log(255.0 * o), min=0.0))
        f_parts, a_parts = [], []
        for x0, x1, y0, y1, ids in tiles:
            sel = order[(reach > 0) & (mx + reach > x0) & (mx - reach < x1) & (my + reach > y0) & (my - reach < y1)]
            if len(sel) == 0:
                f_parts.append(torch.zeros(len(ids), D, dtype=dt, device=dev))
                a_parts.append(torch.zeros(len(ids), dtype=dt, device=dev))
                continue
            step = max(1, chunk_elems // len(sel))  # pixels per chunk (bounds memory)
            for p0 in range(0, len(ids), step):
                pix = pix_all[ids[p0:p0 + step]]
                args = (means2d[cam], conics[cam], opac[cam], feats[cam], sel, pix)
                kept += len(pix) * len(sel)
                if torch.is_grad_enabled() and kept > keep_elems:
                    f, a = checkpoint(_composite_band, *args, sink, cam, use_reentrant=False)
                else:
                    f, a = _composite_band(*args, sink if torch.is_grad_enabled() else None, cam)
                f_parts.append(f)
                a_parts.append(a)
        img = torch.cat(f_parts, 0)[inverse].reshape(height, width, D)
        acc = torch.cat(a_parts, 0)[inverse].reshape(height, width, 1)
        if render_mode in ("ED", "RGB+ED"):
            img = torch.cat([img[..., :-1], img[..., -1:] / acc.clamp(min=1e-10)], -1)
        if backgrounds is not None:
            img = img + (1.0 - acc) * backgrounds[cam]
        renders.append(img)
        alphas.append(acc)
    info = {"means2d": means2d, "radii": radii, "depths": depths, "conics": conics, "width": width,
            "height": height, "n_cameras": C, "gaussian_ids": None, "tile_size": tile_size, "camera_ids": None,
            "opacities": opac}
    return torch.stack(renders), torch.stack(alphas), info

