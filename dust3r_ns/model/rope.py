"""2-D rotary position embedding (RoPE2D) used by every attention layer of DUSt3R.

The head dimension D is split in two halves: the first half is rotated by the token's row position,
the second by its column position, each with the rotate-half rotary formula and inverse frequencies
``base ** (-arange(0, D/2, 2) / (D/2))``. Tables are cached per (dim, length, device, dtype).
"""

from __future__ import annotations

import torch
from torch import nn


def rope_tables(dim: int, length: int, base: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (length, dim) for a 1-D rotary embedding over `dim` channels."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))
    t = torch.arange(length, device=device, dtype=inv_freq.dtype)
    freqs = torch.outer(t, inv_freq)
    freqs = torch.cat((freqs, freqs), dim=-1)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def _rope1d(x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, N, d); pos: (B, N) integer; tables: (L, d)
    c = cos[pos][:, None]
    s = sin[pos][:, None]
    return x * c + _rotate_half(x) * s


class RoPE2D(nn.Module):
    """Pure-PyTorch 2-D RoPE: `forward(tokens[B, heads, N, D], pos[B, N, 2] (row, col)) -> tokens`."""

    def __init__(self, freq: float = 100.0):
        super().__init__()
        self.base = float(freq)
        self._cache: dict = {}

    def tables(self, dim: int, length: int, device, dtype):
        key = (dim, length, device, dtype)
        if key not in self._cache:
            self._cache[key] = rope_tables(dim, length, self.base, device, dtype)
        return self._cache[key]

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if tokens.size(-1) % 4 != 0:
            raise ValueError(f"RoPE2D needs a head dimension divisible by 4, got {tokens.size(-1)}")
        half = tokens.size(-1) // 2
        length = int(pos.max()) + 1
        cos, sin = self.tables(half, length, tokens.device, tokens.dtype)
        y, x = tokens.chunk(2, dim=-1)
        y = _rope1d(y, pos[..., 0], cos, sin)
        x = _rope1d(x, pos[..., 1], cos, sin)
        return torch.cat((y, x), dim=-1)

