"""`dust3r-ns bench align`: baseline (reference schedule) vs fast global alignment on ground-truth scenes, one run.

For each case (N images, network size, scene graph) both modes run on the same oracle pair predictions, each in its
own spawned process (so peak RSS is its own). Reports median seconds, iterations, final loss (the shared objective),
peak RSS, ATE (% of the GT camera spread, after Sim(3)), RRA (mean/max deg) and focal error (%), plus the
baseline/fast ratios. Scenes come from `dust3r_ns.synth` (ray-cast, with visibility) or the toy generator
(`source='toy'`, no rendering, for smoke runs).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from dust3r_ns import synth
from dust3r_ns.align import global_align
from dust3r_ns.bench.common import parse_hw, run_isolated
from dust3r_ns.metrics import depth_abs_rel, pose_metrics
from dust3r_ns.pairs import graph_edges as _pair_graph
from dust3r_ns.synth.toy import make_pairs_output


@dataclass
class AlignBenchConfig:
    n: list[int] = field(default_factory=lambda: [8, 16, 32])
    """Image counts run with a complete graph at `size`."""
    size: str = "96x128"
    """Network resolution HxW of the `n` and `swin_n` cases."""
    swin_n: list[int] = field(default_factory=lambda: [64])
    """Image counts run with a swin graph at `size`."""
    swin_window: int = 3
    """Half-window of the swin graph (pairs (i, i+1..k), both directions)."""
    hires_n: list[int] = field(default_factory=lambda: [8])
    """Image counts run with a complete graph at `hires_size`."""
    hires_size: str = "384x512"
    modes: list[str] = field(default_factory=lambda: ["baseline", "fast"])
    noise: float = 0.01
    """Multiplicative point-map noise of the oracle predictions (synth: NoiseConfig default scaled by this)."""
    baseline_niter: int = 300
    repeats: int = 1
    """Timed runs per mode and case (the median is reported)."""
    device: str = "cpu"
    threads: int = 0
    """torch threads in the children (0: torch's default)."""
    source: str = "synth"
    """'synth' (dust3r_ns.synth ray-cast scenes) or 'toy' (no rendering)."""
    seed: int = 0
    warmup: bool = True
    """Run a tiny alignment first in each child (library/CUDA initialisation outside the timing)."""
    isolate: bool = True
    """Run each mode in a spawned process (peak RSS per mode); False runs inline (no RSS)."""
    json_out: str = ""
    """Optional path for the results as JSON."""


def graph_edges(n: int, graph: str) -> list[tuple[int, int]]:
    """Symmetric edge list of a scene graph ('complete', 'swin-k' (cyclic), ...: `dust3r_ns.pairs.graph_edges`)."""
    return [tuple(map(int, e)) for e in _pair_graph(n, graph, symmetrize=True)]


def make_case(source: str, n: int, H: int, W: int, graph: str, noise: float, seed: int):
    """-> (pair output dict, gt dict with c2w (N,4,4), K (N,3,3), depth list of (H,W), valid list of (H,W))."""
    edges = graph_edges(n, graph)
    if source == "toy":
        out, gt = make_pairs_output(n=n, shapes=[(H, W)] * n, noise=noise, seed=seed, edges=edges)
        return out, dict(c2w=gt["c2w"], K=gt["K"], depth=gt["depth"], valid=[np.ones((H, W), bool)] * n)
    if source != "synth":
        raise ValueError(f"source must be 'synth' or 'toy', got {source!r}")
    scene = synth.make_scene(seed)
    c2w, K = synth.camera_path(scene, n, baseline="moderate", seed=seed, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W)
    out = synth.oracle_pairs(views, edges, noise=synth.NoiseConfig().scaled(noise / 0.01), seed=seed)
    return out, dict(c2w=np.asarray(c2w, np.float64), K=np.asarray(K, np.float64),
                     depth=[v["depth"] for v in views], valid=[v["valid"] for v in views])


def save_case(path: str, out: dict, gt: dict) -> None:
    """Store a case (pair output + ground truth) for the mode children: tensors and lists only."""
    g = dict(c2w=torch.as_tensor(gt["c2w"]), K=torch.as_tensor(gt["K"]),
             depth=[torch.as_tensor(np.asarray(d, np.float32)) for d in gt["depth"]],
             valid=[torch.as_tensor(np.asarray(v, bool)) for v in gt["valid"]])
    torch.save(dict(out=out, gt=g), path)


def load_case(path: str) -> tuple[dict, dict]:
    d = torch.load(path, weights_only=True)
    g = d["gt"]
    gt = dict(c2w=g["c2w"].numpy(), K=g["K"].numpy(), depth=[x.numpy() for x in g["depth"]],
              valid=[x.numpy() for x in g["valid"]])
    return d["out"], gt


def _run_mode(case_path: str, n: int, H: int, W: int, graph: str, mode: str, niter: int | None,
              repeats: int, device: str, threads: int, warmup: bool = True) -> dict:
    if threads > 0:
        torch.set_num_threads(threads)
    if warmup:   # initialise the libraries (CUDA context, cuBLAS/cuSOLVER, thread pools) outside the timing
        global_align(make_pairs_output(n=3, shapes=[(24, 32)] * 3, seed=1)[0], mode=mode, device=device, niter=niter and 5,
                     verbose=False)
    out, gt = load_case(case_path)
    if device != "cpu":   # predictions live on the device as after GPU inference
        out = {k: ({kk: (vv.to(device) if isinstance(vv, torch.Tensor) and kk != "true_shape" else vv)
                    for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in out.items()}
    times, rec = [], None
    gc.collect()
    rss0 = _proc_status("VmRSS")
    hwm_reset = _reset_hwm()
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        rec = global_align(out, mode=mode, device=device, niter=niter, verbose=False)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert rec is not None
    align_mb = (_proc_status("VmHWM") - rss0) / 1024 if hwm_reset and rss0 >= 0 else float("nan")
    pm = pose_metrics(rec.c2w, gt["c2w"])
    dabs = float(depth_abs_rel(rec.depths, list(gt["depth"]), list(gt["valid"]))) * 100
    ferr = float(np.abs(rec.focals / gt["K"][:, 0, 0] - 1).mean() * 100)
    res = dict(mode=mode, n=n, size=f"{H}x{W}", graph=graph, edges=len(graph_edges(n, graph)),
               seconds=float(np.median(times)), iterations=int(rec.meta["iterations"]),
               polish_iterations=int(rec.meta.get("polish_iterations", 0)), loss=float(rec.meta["loss"]),
               ate_pct=float(pm["ate_pct"]), rra_mean_deg=float(pm["rra_mean_deg"]),
               rra_max_deg=float(pm["rra_max_deg"]), focal_err_pct=ferr, align_rss_mb=align_mb,
               depth_absrel_pct=dabs)
    if device.startswith("cuda"):
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def _proc_status(key: str) -> int:
    """kB value of `key` (VmRSS, VmHWM) from /proc/self/status, -1 where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_hwm() -> bool:
    """Reset the peak-RSS mark (Linux clear_refs 5) so VmHWM measures the alignment alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cases(cfg: AlignBenchConfig) -> list[tuple[int, int, int, str]]:
    H, W = parse_hw(cfg.size)
    Hh, Wh = parse_hw(cfg.hires_size)
    cs = [(n, H, W, "complete") for n in cfg.n]
    cs += [(n, H, W, f"swin-{cfg.swin_window}") for n in cfg.swin_n]
    cs += [(n, Hh, Wh, "complete") for n in cfg.hires_n]
    return cs


def run(cfg: AlignBenchConfig) -> list[dict]:
    """Run every case in both modes; print a table and the baseline/fast ratios; return the rows."""
    import tempfile

    rows = []
    tmpdir = tempfile.TemporaryDirectory(prefix="bench_align_")
    for n, H, W, graph in cases(cfg):
        by_mode = {}
        t0 = time.perf_counter()
        case_path = f"{tmpdir.name}/case.pt"
        save_case(case_path, *make_case(cfg.source, n, H, W, graph, cfg.noise, cfg.seed))
        print(f"case N={n} {H}x{W} {graph}: generated in {time.perf_counter() - t0:.1f}s ({cfg.source})", flush=True)
        for mode in cfg.modes:
            args = (case_path, n, H, W, graph, mode, cfg.baseline_niter if mode == "baseline" else None,
                    cfg.repeats, cfg.device, cfg.threads, cfg.warmup)
            if cfg.isolate:
                r = run_isolated(_run_mode, *args)
            else:
                r = _run_mode(*args)
                r["peak_rss_mb"] = float("nan")
            by_mode[mode] = r
            rows.append(r)
            print(_fmt(r), flush=True)
        if "baseline" in by_mode and "fast" in by_mode:
            b, f = by_mode["baseline"], by_mode["fast"]
            print(f"  -> N={n} {H}x{W} {graph}: speed-up x{b['seconds'] / f['seconds']:.1f}, "
                  f"peak RSS ratio fast/baseline {f['peak_rss_mb'] / b['peak_rss_mb']:.2f} "
                  f"(alignment's own: {f['align_rss_mb'] / b['align_rss_mb']:.2f}), "
                  f"loss fast/baseline - 1: {f['loss'] / b['loss'] - 1:+.1e}", flush=True)
    tmpdir.cleanup()
    if cfg.json_out:
        with open(cfg.json_out, "w") as fh:
            json.dump(dict(config=cfg.__dict__, rows=rows), fh, indent=1)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['mode']:8s} N={r['n']:3d} {r['size']:>8s} {r['graph']:9s} E={r['edges']:5d} "
            f"{r['seconds']:8.2f}s it={r['iterations']:4d}{'+' + str(r['polish_iterations']) if r.get('polish_iterations') else ''} loss={r['loss']:.7g} RSS={r['peak_rss_mb']:.0f}MB "
            f"(align {r['align_rss_mb']:.0f}MB) "
            f"ATE={r['ate_pct']:.4f}% RRA={r['rra_mean_deg']:.5f}/{r['rra_max_deg']:.4f}deg "
            f"focal={r['focal_err_pct']:.3f}% depth={r.get('depth_absrel_pct', float('nan')):.3f}%" + (f" cuda={r['cuda_peak_mb']:.0f}MB" if "cuda_peak_mb" in r else ""))


def main(argv: list[str] | None = None) -> None:
    import tyro

    run(tyro.cli(AlignBenchConfig, args=argv))


if __name__ == "__main__":
    main()
