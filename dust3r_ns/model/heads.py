"""Prediction heads of DUSt3R: the linear (pixel-shuffle) head, the DPT head, and their output activations.

Both heads map decoder tokens to a (B, 4, H, W) map; ``postprocess`` turns channels 0..2 into 3-D points
(``xyz/|xyz| * expm1(|xyz|)`` for the ``exp`` depth mode) and channel 3 into a confidence (``vmin + exp(c)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def activate_points(xyz: torch.Tensor, mode) -> torch.Tensor:
    kind, vmin, vmax = mode
    if not (vmin == -math.inf and vmax == math.inf):
        raise ValueError(f"bounded depth modes are not supported: {mode}")
    if kind == "linear":
        return xyz
    d = xyz.norm(dim=-1, keepdim=True)
    direction = xyz / d.clip(min=1e-8)
    if kind == "exp":
        return direction * torch.expm1(d)
    if kind == "square":
        return direction * d.square()
    raise ValueError(f"unknown depth mode {kind!r}")


def activate_conf(c: torch.Tensor, mode) -> torch.Tensor:
    kind, vmin, vmax = mode
    if kind == "exp":
        return vmin + c.exp().clip(max=vmax - vmin)
    if kind == "sigmoid":
        return (vmax - vmin) * torch.sigmoid(c) + vmin
    raise ValueError(f"unknown confidence mode {kind!r}")


def postprocess(out: torch.Tensor, depth_mode, conf_mode) -> dict:
    """(B, 4, H, W) raw head output -> {'pts3d': (B, H, W, 3), 'conf': (B, H, W)}."""
    fmap = out.permute(0, 2, 3, 1)
    res = {"pts3d": activate_points(fmap[..., 0:3], depth_mode)}
    if conf_mode is not None:
        res["conf"] = activate_conf(fmap[..., 3], conf_mode)
    return res


class LinearHead(nn.Module):
    """Linear projection of the last decoder tokens to 16x16x4 values per patch, then pixel shuffle."""

    def __init__(self, dec_dim: int, patch_size: int, depth_mode, conf_mode, has_conf: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.depth_mode, self.conf_mode = depth_mode, conf_mode
        self.proj = nn.Linear(dec_dim, (3 + has_conf) * patch_size**2)

    def forward(self, tokens: list, image_size) -> dict:
        H, W = image_size
        p = self.patch_size
        x = tokens[-1]
        B, S, _ = x.shape
        feat = self.proj(x).transpose(-1, -2).reshape(B, -1, H // p, W // p)
        return postprocess(F.pixel_shuffle(feat, p), self.depth_mode, self.conf_mode)


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1, bias=True)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1, bias=True)

    def forward(self, x):
        out = self.conv1(F.relu(x))
        out = self.conv2(F.relu(out))
        return out + x


class FusionBlock(nn.Module):
    """Adds the residual-refined skip input, refines, upsamples x2 (bilinear, align_corners) and projects."""

    def __init__(self, features: int):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, bias=True)  # registered first, as in the checkpoints
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x, skip=None):
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Interpolate(nn.Module):
    def __init__(self, scale_factor: float):
        super().__init__()
        self.scale_factor = scale_factor

    def forward(self, x):
        return F.interpolate(x, scale_factor=self.scale_factor, mode="bilinear", align_corners=True)


class _Scratch(nn.Module):
    def __init__(self, layer_dims, features: int):
        super().__init__()
        for i, d in enumerate(layer_dims):
            setattr(self, f"layer{i + 1}_rn", nn.Conv2d(d, features, 3, padding=1, bias=False))
        # The published checkpoints hold these convolutions a second time under ``layer_rn.{0..3}``.
        self.layer_rn = nn.ModuleList([getattr(self, f"layer{i + 1}_rn") for i in range(len(layer_dims))])
        for i in range(4):
            setattr(self, f"refinenet{i + 1}", FusionBlock(features))


class DPT(nn.Module):
    """Dense prediction transformer decoder reading four token layers (encoder output, decoder layers)."""

    def __init__(self, dim_tokens, num_channels: int = 4, patch_size: int = 16, hooks=(0, 6, 9, 12),
                 layer_dims=(96, 192, 384, 768), feature_dim: int = 256, last_dim: int = 128):
        super().__init__()
        self.hooks = list(hooks)
        self.patch_size = patch_size
        self.scratch = _Scratch(layer_dims, feature_dim)
        self.head = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim // 2, 3, padding=1),
            Interpolate(2),
            nn.Conv2d(feature_dim // 2, last_dim, 3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(last_dim, num_channels, 1),
        )
        ld = layer_dims
        self.act_postprocess = nn.ModuleList([
            nn.Sequential(nn.Conv2d(dim_tokens[0], ld[0], 1), nn.ConvTranspose2d(ld[0], ld[0], 4, stride=4)),
            nn.Sequential(nn.Conv2d(dim_tokens[1], ld[1], 1), nn.ConvTranspose2d(ld[1], ld[1], 2, stride=2)),
            nn.Sequential(nn.Conv2d(dim_tokens[2], ld[2], 1)),
            nn.Sequential(nn.Conv2d(dim_tokens[3], ld[3], 1), nn.Conv2d(ld[3], ld[3], 3, stride=2, padding=1)),
        ])

    def forward(self, tokens: list, image_size) -> torch.Tensor:
        H, W = image_size
        nh, nw = H // self.patch_size, W // self.patch_size
        feats = []
        for i, hook in enumerate(self.hooks):
            t = tokens[hook]
            t = t.transpose(1, 2).reshape(t.shape[0], t.shape[2], nh, nw)
            feats.append(self.scratch.layer_rn[i](self.act_postprocess[i](t)))
        s = self.scratch
        p4 = s.refinenet4(feats[3])[:, :, : feats[2].shape[2], : feats[2].shape[3]]
        p3 = s.refinenet3(p4, feats[2])
        p2 = s.refinenet2(p3, feats[1])
        p1 = s.refinenet1(p2, feats[0])
        return self.head(p1)


class DPTHead(nn.Module):
    """DUSt3R's DPT head: ``dpt`` produces 4 channels at full resolution, then the output activations."""

    def __init__(self, enc_dim: int, dec_dim: int, dec_depth: int, patch_size: int, depth_mode, conf_mode,
                 has_conf: bool = True):
        super().__init__()
        self.depth_mode, self.conf_mode = depth_mode, conf_mode
        hooks = (0, dec_depth * 2 // 4, dec_depth * 3 // 4, dec_depth)
        self.dpt = DPT((enc_dim, dec_dim, dec_dim, dec_dim), num_channels=3 + has_conf, patch_size=patch_size,
                       hooks=hooks)

    def forward(self, tokens: list, image_size) -> dict:
        return postprocess(self.dpt(tokens, image_size), self.depth_mode, self.conf_mode)
