"""Where fast-mode alignment spends its time: Python hot spots (cProfile) and, on CUDA, host syncs per iteration.

Run: python tests/bench/profile_align.py --device cuda --n 8 --graph complete --size 96x128
"""

import argparse
import cProfile
import pstats
import time

import torch

from dust3r_ns.align import global_align
from dust3r_ns.bench.align import make_case


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--graph", default="complete")
    ap.add_argument("--size", default="96x128")
    ap.add_argument("--source", default="synth")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    H, W = (int(x) for x in a.size.split("x"))
    out, _ = make_case(a.source, a.n, H, W, a.graph, 0.01, 0)
    global_align(out, mode="fast", device=a.device, verbose=False)   # warm-up (CUDA init, kernels)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    rec = global_align(out, mode="fast", device=a.device, verbose=False)
    sync()
    print(f"fast N={a.n} {a.graph} {a.size} on {a.device}: {time.perf_counter() - t0:.3f} s", getattr(rec, "info", ""))
    pr = cProfile.Profile()
    pr.enable()
    global_align(out, mode="fast", device=a.device, verbose=False)
    sync()
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(a.top)
    pstats.Stats(pr).sort_stats("cumulative").print_stats(a.top + 10)


if __name__ == "__main__":
    main()
