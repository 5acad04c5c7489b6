"""`Dust3rSplatfactoModel`: nerfstudio's splatfacto with offline and CPU fallbacks for DUSt3R-seeded scenes.

On a CUDA machine rendering is splatfacto's own (gsplat), untouched. The differences everywhere:
- the camera optimizer (SO3xR3 joint pose refinement) is on by default;
- seed colours are set here (splatfacto's own colour initialisation calls `.cuda()` unconditionally);
- the LPIPS metric needs AlexNet weights from the internet: when they cannot be loaded (offline) LPIPS is
  reported as NaN, with one warning, instead of failing model construction.
- optional seed scales: with `footprint_scale` k > 0 each seed Gaussian starts with scale k x its pixel footprint
  (depth / focal in the training images, from the dataparser) instead of splatfacto's 3-nearest-neighbour distance.
Without CUDA, or with the model on the CPU (slow path for tests and demos):
- `get_outputs` renders with the pure-PyTorch `rasterizer.rasterize_dense` (no `.cuda()`, no torch.compile);
- without CUDA, gsplat's CUDA back-end module is replaced by a stub that raises, so nothing can start gsplat's
  CUDA JIT build (which cannot run without a GPU).
"""

from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Type, Union

import torch
from torch import Tensor, nn

from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import RGB2SH, SplatfactoModel, SplatfactoModelConfig

from dust3r_ns.conventions import opengl_c2w_to_opencv_w2c_torch
from dust3r_ns.nerfstudio.rasterizer import rasterize_dense


def cpu_fallback_active() -> bool:
    """True when the pure-PyTorch rasterizer replaces gsplat (no CUDA device)."""
    return not torch.cuda.is_available()


class _NoCudaBackend:
    def __getattr__(self, name: str):
        raise RuntimeError(f"gsplat CUDA kernel '{name}' requested on a machine without CUDA; dust3r-splatfacto "
                           "renders with its CPU rasterizer there (this call came from another code path)")


def block_gsplat_cuda_jit() -> None:
    """Without CUDA, make gsplat's lazy CUDA back-end a stub that raises instead of starting its CUDA JIT build."""
    name = "gsplat.cuda._backend"
    if cpu_fallback_active() and name not in sys.modules:
        stub = types.ModuleType(name)
        stub._C = _NoCudaBackend()  # type: ignore[attr-defined]
        stub.__doc__ = "dust3r_ns stub: gsplat CUDA back-end disabled (no CUDA device)"
        sys.modules[name] = stub


class _NoLPIPS(nn.Module):
    """Stand-in for LPIPS when its AlexNet weights are unavailable: returns NaN."""

    def forward(self, *args, **kwargs) -> Tensor:
        return torch.tensor(float("nan"))


@contextlib.contextmanager
def _lpips_or_nan() -> Iterator[None]:
    """While splatfacto builds its metrics, make LPIPS construction failures degrade to `_NoLPIPS`."""
    import torchmetrics.image.lpip as lpip_mod

    real = lpip_mod.LearnedPerceptualImagePatchSimilarity

    def build(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception as e:  # URLError offline, missing weights, ...
            warnings.warn(f"LPIPS disabled (its AlexNet weights could not be loaded: {type(e).__name__}: {e}); "
                          "eval LPIPS will be NaN. Put alexnet-owt-7be5be79.pth in the torch hub cache to enable it.",
                          stacklevel=2)
            return _NoLPIPS()

    lpip_mod.LearnedPerceptualImagePatchSimilarity = build  # type: ignore[assignment]
    try:
        yield
    finally:
        lpip_mod.LearnedPerceptualImagePatchSimilarity = real  # type: ignore[assignment]


@dataclass
class Dust3rSplatfactoModelConfig(SplatfactoModelConfig):
    """splatfacto for DUSt3R-seeded scenes (CPU fallback rasterizer when CUDA is absent; LPIPS optional)."""

    _target: Type = field(default_factory=lambda: Dust3rSplatfactoModel)
    camera_optimizer: CameraOptimizerConfig = field(default_factory=lambda: CameraOptimizerConfig(mode="SO3xR3"))
    """Joint pose refinement of the DUSt3R cameras (learning rate: the method's `camera_opt` optimizer); `off` trains
    on the poses as given."""
    cpu_chunk_elems: int = 1 << 21
    """CPU rasterizer only: pixel x Gaussian elements composited per band (bounds memory)."""
    cpu_tile_size: int = 8
    """CPU rasterizer only: side of the square pixel tiles; each tile composites only the Gaussians that reach it
    (smaller tiles: fewer Gaussians per pixel, more Python loop steps)."""
    cpu_keep_elems: int = 1 << 22
    """CPU rasterizer only: pixel x Gaussian elements per render whose intermediates are kept for the backward pass;
    the bands beyond are checkpointed (recomputed: less memory, slower)."""
    footprint_scale: float = 0.0
    """Seed Gaussians' initial scale (all three axes) = this x their pixel footprint in the training images (depth /
    focal, the dataparser's `points3D_footprint`); 0: splatfacto's mean distance to the 3 nearest seeds."""


class Dust3rSplatfactoModel(SplatfactoModel):
    """splatfacto + seed colours without `.cuda()`, LPIPS fallback, and the CPU rendering path."""

    config: Dust3rSplatfactoModelConfig

    def populate_modules(self) -> None:
        if cpu_fallback_active():
            block_gsplat_cuda_jit()
        seed_rgb = None
        if self.seed_points is not None and not self.config.random_init:
            xyz, seed_rgb = self.seed_points
            self.seed_points = (xyz, seed_rgb[:0])  # empty colours: the parent skips its .cuda() colour init
        with _lpips_or_nan():
            super().populate_modules()
        if seed_rgb is not None and len(seed_rgb):
            rgb = seed_rgb.float() / 255.0
            with torch.no_grad():
                dc = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
                self.gauss_params["features_dc"].data.copy_(dc)
                self.gauss_params["features_rest"].data.zero_()
            self.seed_points = (self.seed_points[0], seed_rgb)
        if self.config.footprint_scale < 0 or not math.isfinite(self.config.footprint_scale):
            raise ValueError(f"--pipeline.model.footprint-scale must be >= 0 (0: nearest-neighbour scales), got "
                             f"{self.config.footprint_scale}")
        footprint = (self.kwargs.get("metadata") or {}).get("points3D_footprint")
        if self.config.footprint_scale > 0 and seed_rgb is not None and footprint is not None:
            self.set_footprint_scales(footprint)

    def set_footprint_scales(self, footprint: Tensor) -> None:
        """Initial log-scales of the seed Gaussians: log(footprint_scale x footprint) on all three axes.
        footprint: [M] world-unit pixel footprints, one per seed point (the order of `points3D_xyz`)."""
        scales = self.gauss_params["scales"]  # [M, 3]
        if footprint.shape != scales.shape[:1]:
            raise ValueError(f"points3D_footprint has {tuple(footprint.shape)} entries for {scales.shape[0]} seed "
                             "points; the dataparser must return one footprint per seed point")
        value = self.config.footprint_scale * footprint.to(scales).clamp_min(1e-12)  # [M]
        with torch.no_grad():
            scales.data.copy_(torch.log(value)[:, None].expand_as(scales))

    def load_state_dict(self, state_dict, **kwargs):  # type: ignore[override]
        """splatfacto's load (resizes every Gaussian parameter to the checkpoint's count), then the loaded values
        are moved into the original `Parameter` objects: the optimizers that a resumed run (`--load-dir`) built before
        loading hold those objects, and would otherwise step orphans while the loaded Gaussians never change."""
        kept = dict(self.gauss_params.items())
        result = super().load_state_dict(state_dict, **kwargs)
        for name, param in kept.items():
            param.data = self.gauss_params[name].data
            self.gauss_params[name] = param
        return result

    def get_outputs(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        if not cpu_fallback_active() and self.device.type == "cuda":
            return super().get_outputs(camera)  # gsplat, untouched
        return self._get_outputs_cpu(camera)

    def _get_outputs_cpu(self, camera: Cameras) -> Dict[str, Union[Tensor, List]]:
        """splatfacto's forward pass (camera optimizer, crop, downscale, background, bilateral grid) on the CPU
        rasterizer."""
        if not isinstance(camera, Cameras):
            return {}
        if self.training:
            if camera.shape[0] != 1:
                raise ValueError("splatfacto trains on one camera at a time")
            c2w = self.camera_optimizer.apply_to_camera(camera)
        else:
            c2w = camera.camera_to_worlds
        c2w = c2w.to(self.device)

        params = {k: self.gauss_params[k] for k in ("means", "scales", "quats", "features_dc", "features_rest",
                                                      "opacities")}
        if self.crop_box is not None and not self.training:
            keep = self.crop_box.within(params["means"]).squeeze()
            if keep.sum() == 0:
                return self.get_empty_outputs(int(camera.width.item()), int(camera.height.item()),
                                              self.background_color)
            params = {k: v[keep] for k, v in params.items()}

        factor = self._get_downscale_factor()
        camera.rescale_output_resolution(1 / factor)
        K = camera.get_intrinsics_matrices().to(self.device)
        W, H = int(camera.width.item()), int(camera.height.item())
        camera.rescale_output_resolution(factor)
        self.last_size = (H, W)

        render_mode = "RGB+ED" if (self.config.output_depth_during_training or not self.training) else "RGB"
        colors = torch.cat([params["features_dc"][:, None, :], params["features_rest"]], dim=1)
        if self.config.sh_degree > 0:
            sh_degree = min(self.step // self.config.sh_degree_interval, self.config.sh_degree)
        else:
            colors, sh_degree = torch.sigmoid(colors[:, 0, :]), None

        render, alpha, self.info = rasterize_dense(
            means=params["means"], quats=params["quats"], scales=torch.exp(params["scales"]),
            opacities=torch.sigmoid(params["opacities"]).squeeze(-1), colors=colors,
            viewmats=opengl_c2w_to_opencv_w2c_torch(c2w), Ks=K, width=W, height=H, near_plane=0.01, far_plane=1e10,
            render_mode=render_mode, sh_degree=sh_degree, absgrad=self.strategy.absgrad,
            rasterize_mode=self.config.rasterize_mode, chunk_elems=self.config.cpu_chunk_elems,
            tile_size=self.config.cpu_tile_size, keep_elems=self.config.cpu_keep_elems)
        if self.training:
            self.strategy.step_pre_backward(self.gauss_params, self.optimizers, self.strategy_state, self.step,
                                            self.info)
        background = self._get_background_color()
        rgb = torch.clamp(render[..., :3] + (1 - alpha) * background, 0.0, 1.0)
        if self.config.use_bilateral_grid and self.training and camera.metadata and "cam_idx" in camera.metadata:
            rgb = self._apply_bilateral_grid(rgb, camera.metadata["cam_idx"], H, W)
        depth = None
        if render_mode == "RGB+ED":
            depth = render[..., 3:4]
            depth = torch.where(alpha > 0, depth, depth.detach().max()).squeeze(0)
        if background.shape[0] == 3 and not self.training:
            background = background.expand(H, W, 3)
        return {"rgb": rgb.squeeze(0), "depth": depth, "accumulation": alpha.squeeze(0),  # type: ignore[dict-item]
                "background": background}
