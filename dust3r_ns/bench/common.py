"""Benchmark helpers: size parsing, median timing, this machine's float32 matmul rate, child-process peak RSS."""

from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import time

import torch


def parse_hw(size: str) -> tuple[int, int]:
    """'HxW' (e.g. '96x128') -> (H, W)."""
    try:
        h, w = (int(x) for x in size.lower().split("x"))
    except ValueError as e:
        raise ValueError(f"size must look like 96x128 (HxW), got {size!r}") from e
    return h, w


def median_time(fn, repeats: int, warmup: int = 0) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def matmul_gflops(n: int = 2048, repeats: int = 5, dtype=torch.float32, device="cpu") -> float:
    """Measured dense matmul rate (GFLOP/s) of this machine with the current torch thread count."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    t, _ = median_time(lambda: (a @ b, sync()), repeats, warmup=1)
    return 2 * n**3 / t / 1e9


def _child(fn, args, queue):
    res = fn(*args)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put(res)


def run_isolated(fn, *args) -> dict:
    """Run `fn(*args) -> dict` in a fresh process so its peak RSS is its own; adds `peak_rss_mb`."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, args, queue))
    proc.start()
    while True:
        try:
            res = queue.get(timeout=1.0)
            break
        except Exception:  # queue.Empty: keep waiting while the child lives
            if not proc.is_alive():
                raise RuntimeError(f"benchmark child failed with exit code {proc.exitcode}") from None
    proc.join()
    return res
