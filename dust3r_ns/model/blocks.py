"""Transformer building blocks of DUSt3R: patch embedding, attention with 2-D RoPE, encoder and decoder blocks.

Parameter names follow the published checkpoints (``qkv``, ``projq``/``projk``/``projv``, ``norm_y``, ...), so
state dicts load with ``strict=True``. Attention runs through ``scaled_dot_product_attention`` by default; the
explicit softmax path (``impl='math'``) is the float32 reference used by tests and benchmarks.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def grid_positions(h: int, w: int, device) -> torch.Tensor:
    """(h*w, 2) integer (row, col) positions of a row-major token grid."""
    rows = torch.arange(h, device=device).repeat_interleave(w)
    cols = torch.arange(w, device=device).repeat(h)
    return torch.stack((rows, cols), dim=-1)


def attention(q, k, v, impl: str = "sdpa") -> torch.Tensor:
    """Softmax attention over (B, heads, N, D) tensors."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    scale = q.shape[-1] ** -0.5
    w = (q @ k.transpose(-2, -1)) * scale
    return w.softmax(dim=-1) @ v


class PatchEmbed(nn.Module):
    """16x16 convolutional patch embedding returning tokens and their (row, col) positions.

    With ``many_ar=True`` (the checkpoint's ``ManyAR_PatchEmbed``) the batch tensor is landscape and images whose
    ``true_shape`` is portrait are stored transposed: they are transposed back before embedding.
    """

    def __init__(self, img_size, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768, many_ar: bool = False):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.many_ar = many_ar
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def _embed(self, img):
        x = self.proj(img)
        h, w = x.shape[-2:]
        pos = grid_positions(h, w, img.device).unsqueeze(0).expand(img.shape[0], -1, -1)
        return x.flatten(2).transpose(1, 2), pos

    def forward(self, img: torch.Tensor, true_shape: torch.Tensor | None = None):
        B, _, H, W = img.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        if not self.many_ar or true_shape is None:
            return self._embed(img)
        if W < H:
            raise ValueError(f"ManyAR patch embedding expects a landscape batch tensor, got {H}x{W}")
        portrait = true_shape[:, 0] > true_shape[:, 1]
        if not portrait.any():
            return self._embed(img)
        if portrait.all():
            return self._embed(img.transpose(-1, -2))
        x = img.new_zeros((B, (H // p) * (W // p), self.proj.out_channels))
        pos = torch.zeros((B, x.shape[1], 2), dtype=torch.int64, device=img.device)
        x[~portrait], pos[~portrait] = self._embed(img[~portrait])
        x[portrait], pos[portrait] = self._embed(img[portrait].transpose(-1, -2))
        return x, pos


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rope: nn.Module):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.impl = "sdpa"

    def forward(self, x, pos):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.rope(q, pos), self.rope(k, pos)
        out = attention(q, k, v, self.impl)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rope: nn.Module):
        super().__init__()
        self.num_heads = num_heads
        self.projq = nn.Linear(dim, dim, bias=True)
        self.projk = nn.Linear(dim, dim, bias=True)
        self.projv = nn.Linear(dim, dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rope = rope
        self.impl = "sdpa"

    def _heads(self, t):
        B, N, C = t.shape
        return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, x, mem, qpos, kpos):
        B, N, C = x.shape
        q = self.rope(self._heads(self.projq(x)), qpos)
        k = self.rope(self._heads(self.projk(mem)), kpos)
        v = self._heads(self.projv(mem))
        out = attention(q, k, v, self.impl)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class EncoderBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: nn.Module):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, rope)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, pos):
        x = x + self.attn(self.norm1(x), pos)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    """Self-attention, cross-attention to the other view (memory normalised by ``norm_y``), MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, rope: nn.Module, norm_mem: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, rope)
        self.cross_attn = CrossAttention(dim, num_heads, rope)
        self.norm2 = LayerNorm(dim)
        self.norm3 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_y = LayerNorm(dim) if norm_mem else nn.Identity()

    def forward(self, x, mem, pos, mem_pos):
        x = x + self.attn(self.norm1(x), pos)
        m = self.norm_y(mem)
        x = x + self.cross_attn(self.norm2(x), m, pos, mem_pos)
        return x + self.mlp(self.norm3(x))
