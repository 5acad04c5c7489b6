"""Compiled RoPE2D: builds `csrc/rope2d.cpp` (+ `rope2d_cuda.cu` when CUDA is present) on first use with torch's
extension tooling, and falls back to the pure-PyTorch RoPE with a one-line notice when it cannot.

Set ``DUST3R_NS_NO_EXT=1`` to skip the build. The compiled kernels read the same cos/sin tables as the PyTorch
path, and backward is the inverse rotation, so both paths agree to float rounding.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch
from torch import nn

from .rope import RoPE2D

CSRC = Path(__file__).parents[1] / "csrc"   # dust3r_ns/csrc: a link to the repository's csrc/, copied into wheels
_lock = threading.Lock()
_state: dict = {}


def _notice(msg: str) -> None:
    if not _state.get("noticed"):
        _state["noticed"] = True
        print(f"dust3r_ns: {msg}; using the PyTorch RoPE", file=sys.stderr)


def cuda_home() -> str | None:
    """The CUDA toolkit root. `nvcc` on PATH may be a symlink or a wrapper script outside the toolkit."""
    import re
    import shutil

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(str(real.parent.parent))
        if real.stat().st_size < 4096:  # a wrapper script: find the nvcc it execs
            m = re.search(r"(/\S+)/bin/nvcc", real.read_text(errors="ignore"))
            if m:
                candidates.append(m.group(1))
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").exists() and (Path(c) / "include" / "cuda_runtime.h").exists():
            return c
    return None


def cuda_include_paths() -> list[str]:
    """Extra CUDA library headers shipped by the nvidia-* wheels (the toolkit may lack e.g. cusparse.h)."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    return [str(p) for base in nvidia.__path__ for p in Path(base).glob("cu*/include")]


NVCC_FLAGS = ["-O3", "-DWITH_CUDA", "--expt-relaxed-constexpr"]


def build(with_cuda: bool | None = None, verbose: bool = False):
    """Compile (or load the cached build of) the extension; returns the module. Raises on failure."""
    import logging

    # importing the tooling logs a warning about CUDA_HOME on machines without a GPU; it is expected here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = torch.cuda.is_available()
    sources = [str(CSRC / "rope2d.cpp")]
    flags = ["-O3"]
    if with_cuda:
        home = cuda_home()
        if home:
            os.environ.setdefault("CUDA_HOME", home)
            cpp_extension.CUDA_HOME = home
        sources.append(str(CSRC / "rope2d_cuda.cu"))
        flags.append("-DWITH_CUDA")
    for s in sources:
        if not Path(s).exists():
            raise FileNotFoundError(f"{s}: RoPE kernel source not found (install the package with pip install -e .)")
    name = "dust3r_ns_rope2d" + ("_cuda" if with_cuda else "_cpu")
    return cpp_extension.load(name=name, sources=sources, extra_cflags=flags,
                              extra_cuda_cflags=NVCC_FLAGS if with_cuda else None,
                              extra_include_paths=cuda_include_paths() if with_cuda else None,
                              with_cuda=with_cuda, verbose=verbose)


def get_extension():
    """The compiled module, or None (after one notice) when disabled or the build fails."""
    with _lock:
        if "ext" not in _state:
            if os.environ.get("DUST3R_NS_NO_EXT", "") not in ("", "0"):
                _state["ext"], _state["error"] = None, "DUST3R_NS_NO_EXT is set"
            else:
                try:
                    _state["ext"], _state["error"] = build(), None
                except Exception as e:  # compiler missing, headers, ...: fall back
                    _state["ext"] = None
                    _state["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200] if str(e).strip() else ''}"
            if _state["ext"] is None:
                _notice(f"compiled RoPE unavailable ({_state['error']})")
        return _state["ext"]


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, pos, cos, sin, ext):
        ctx.save_for_backward(pos, cos, sin)
        ctx.ext = ext
        return ext.rope2d(tokens, pos, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad):
        pos, cos, sin = ctx.saved_tensors
        return ctx.ext.rope2d(grad.contiguous(), pos, cos, sin, -1.0), None, None, None, None


class RoPE2DExt(RoPE2D):
    """RoPE2D through the compiled kernels; same tables and semantics as `RoPE2D`, PyTorch fallback per call."""

    def __init__(self, freq: float = 100.0, ext=None):
        super().__init__(freq)
        self.ext = ext

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        ext = self.ext
        if ext is None or (tokens.is_cuda and not ext.with_cuda) or tokens.dtype == torch.float64 \
                or tokens.size(-1) % 4:
            return super().forward(tokens, pos)
        length = int(pos.max()) + 1
        cos, sin = self.tables(tokens.size(-1) // 2, length, tokens.device, torch.float32)
        q = tokens.size(-1) // 4
        key = ("quarter", q, length, tokens.device)
        if key not in self._cache:
            self._cache[key] = (cos[:, :q].contiguous(), sin[:, :q].contiguous())
        cq, sq = self._cache[key]
        return _RoPEFunction.apply(tokens, pos.long(), cq, sq, ext)


def make_rope2d(freq: float = 100.0, backend: str = "auto") -> nn.Module:
    """RoPE2D module: 'torch' (pure PyTorch), 'ext' (compiled kernels, error if unavailable) or 'auto'
    (compiled when it builds, else PyTorch with a one-line notice)."""
    if backend == "torch":
        return RoPE2D(freq)
    if backend not in ("auto", "ext"):
        raise ValueError(f"unknown RoPE backend {backend!r}: use 'auto', 'ext' or 'torch'")
    ext = get_extension()
    if ext is None:
        if backend == "ext":
            raise RuntimeError(f"compiled RoPE requested but unavailable: {_state.get('error')}")
        return RoPE2D(freq)
    return RoPE2DExt(freq, ext)
