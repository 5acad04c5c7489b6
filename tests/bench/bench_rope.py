"""RoPE2D: PyTorch path vs compiled kernel, median of repeated calls (CPU, and CUDA when present).

Run: python tests/bench/bench_rope.py
"""

import statistics
import time

import torch

from dust3r_ns.model.rope import RoPE2D
from dust3r_ns.model.rope_ext import RoPE2DExt, build


def median_ms(fn, repeats=15, sync=lambda: None):
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        ext = build(with_cuda=dev == "cuda")
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        for B, H, h, w, D in [(2, 16, 24, 32, 64), (2, 12, 32, 32, 64), (16, 16, 24, 32, 64)]:
            x = torch.randn(B, H, h * w, D, device=dev)
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            pos = torch.stack((rows, cols), -1).reshape(1, -1, 2).expand(B, -1, -1).contiguous().to(dev)
            slow = RoPE2D(100.0)
            t_torch = median_ms(lambda: slow(x, pos), sync=sync)
            fast = RoPE2DExt(100.0, ext)
            t_ext = median_ms(lambda: fast(x, pos), sync=sync)
            print(f"{dev:4s} {B}x{H}x{h * w}x{D}: torch {t_torch:7.3f} ms  ext {t_ext:7.3f} ms  "
                  f"speed-up {t_torch / t_ext:5.2f}x")


if __name__ == "__main__":
    main()
