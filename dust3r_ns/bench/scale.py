"""`dust3r-ns bench scale`: pair inference and global alignment of long rendered sequences (N = 50 ... 1000).

Per case (N frames, a camera path, a prediction source):
  path 'orbit': a 120 deg arc around the scene ('wide' of `synth.camera_path`); 'loop': a 350 deg circle (the
  longer path: its two ends meet, the graph has to close the loop).
  source 'network': the bundled model (or `--model`) run by the pair engine on the default scene graph
  (`pairs.default_scene_graph`, a retrieval graph above 12 frames; with `--ordered` the frames are a video: the
  video default graph, and the aligner's sequence prior, `RobustConfig.sequence_weight`); 'oracle':
  `synth.oracle_pairs` on the same edges (ground truth plus the oracle's mild noise), so the solver's share of the
  pose error is told apart from the network's.
The predictions go into a pair store on disk (`--store disk`, float16; `PairStoreWriter`) or stay in memory
(`float16`); they and the ground truth are cached under `cache_dir`, so reruns skip rendering and the network.
Inference and alignment each run in a fresh process (`bench.common.run_isolated`): their peak RSS are their own.

Reported per case: pairs, inference seconds (when computed, else the cached figure), alignment seconds (wall and
the process's CPU time: with one torch thread the CPU time is the work, whatever else shares the machine), peak RSS
of both processes, ATE (% of the camera spread), RRA mean/max (deg), the median per-edge rotation error of the
graph's own edges (`bench.robust.edge_rotation_errors`; the target is RRA mean <= 1.5x it and RRA max < 20 deg),
the solution's RRA on those edges (median), the predictions' predicted/true relative angle per bin of true angle
(`bench.robust.angle_ratios`: a systematic over-rotation that chaining integrates), edges rejected by the robust stage; then t_align(N_max) / t_align(N) per path and source with the pairs per image
of both (the alignment should grow about linearly in pairs).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dust3r_ns.bench.common import run_isolated
from dust3r_ns.bench.robust import angle_ratios, edge_rotations, gt_of, model_tag, own_edge_rra, render_orbit, write_npz
from dust3r_ns.fileio import atomic_write
from dust3r_ns.pairs import default_scene_graph
from dust3r_ns.retrieval import graph_key

PATHS = {"orbit": "wide", "loop": "loop"}   # bench path -> synth.camera_path baseline


@dataclass
class ScaleBenchConfig:
    n: list[int] = field(default_factory=lambda: [50, 200, 1000])
    """Frame counts."""
    paths: list[str] = field(default_factory=lambda: ["orbit", "loop"])
    """Camera paths: 'orbit' (120 deg arc) and/or 'loop' (350 deg circle)."""
    sources: list[str] = field(default_factory=lambda: ["network", "oracle"])
    """Prediction sources: 'network' (the model) and/or 'oracle' (rendered ground truth + noise, same edges)."""
    skip: list[str] = field(default_factory=list)
    """Cases to leave out, as N:path:source (e.g. 1000:loop:oracle)."""
    size: int = 224
    """Frames are rendered at size x size (the bundled model's input size)."""
    graph: str = "default"
    """Scene graph of the network cases ('default': `default_scene_graph(N, ordered)`); the oracle uses the same
    edges when the network case is cached, else this graph (a retrieval graph falls back to swin-6)."""
    ordered: bool = False
    """The frames are a video (ordered input): the default graph's sequential window and the aligner's sequence
    prior; else an unordered photo set (the order the engine may read from the renders' content is withheld)."""
    store: str = "disk"
    """Where the predictions live while aligned: 'disk' (a float16 pair store) or 'float16' (in memory)."""
    seed: int = 0
    """Scene and camera-path seed."""
    model: str = ""
    """Checkpoint of the network cases; empty: the bundled model."""
    batch_size: int = 16
    """Pairs per decoder batch."""
    threads: int = 1
    """torch threads of each case's processes (0: torch's default)."""
    cache_dir: str = ".cache/bench_scale"
    """Where ground truth and pair stores are cached."""
    gpu_model: str = ""
    """Instead of the cases: the GPU memory model of pair inference for this official architecture with random
    weights (e.g. 512_dpt), measured on the CPU (`memory_model`), and what it predicts for `gpu_n` images."""
    gpu_size: str = "384x512"
    """Image size HxW of the memory model."""
    gpu_n: int = 200
    """Images whose GPU memory the model predicts (pairs: `pairs_per_image` x N)."""
    pairs_per_image: float = 11.0
    """Ordered pairs per image of the predicted run (retrieval-8 gives about 11 on the rendered sequences)."""
    json_out: str = ""
    """Optional path for the results as JSON."""


def _key(cfg: ScaleBenchConfig, n: int, path: str) -> str:
    return f"n{n}_{cfg.size}_{path}_s{cfg.seed}"


def _model_tag(cfg: ScaleBenchConfig) -> str:
    from dust3r_ns.pipeline import default_model_source

    return model_tag(cfg.model or default_model_source())


def _graph(cfg: ScaleBenchConfig, n: int) -> str:
    """The network cases' graph itself (not 'default')."""
    return default_scene_graph(n, cfg.ordered) if cfg.graph == "default" else cfg.graph


def _case_dir(cfg: ScaleBenchConfig, n: int, path: str, source: str) -> Path:
    tag = _model_tag(cfg) if source == "network" else "oracle"
    return Path(cfg.cache_dir) / f"{_key(cfg, n, path)}_{graph_key(_graph(cfg, n))}_{tag}"


def _views(cfg: ScaleBenchConfig, n: int, path: str) -> list[dict]:
    views, _, _ = render_orbit(n, cfg.size, cfg.size, PATHS[path], cfg.seed)
    return views


def _gt(cfg: ScaleBenchConfig, n: int, path: str, views: list[dict] | None = None) -> dict:
    """Ground truth (c2w, K, depth, valid) of a sequence, cached."""
    gt_path = Path(cfg.cache_dir) / f"gt_{_key(cfg, n, path)}.npz"
    if gt_path.exists():
        with np.load(gt_path) as z:
            return {k: z[k] for k in z.files}
    gt = gt_of(views if views is not None else _views(cfg, n, path))
    gt_path.parent.mkdir(parents=True, exist_ok=True)
    write_npz(gt_path, **gt)
    return gt


def _oracle_edges(cfg: ScaleBenchConfig, n: int, path: str) -> np.ndarray:
    """The network case's edges when cached (self-edges dropped), else the configured graph's."""
    from dust3r_ns.pairs import graph_edges, is_retrieval
    from dust3r_ns.predictions import open_store

    net = _case_dir(cfg, n, path, "network") / "pairs"
    if (net / "meta.npz").is_file():
        e = open_store(net).edges
        return e[e[:, 0] != e[:, 1]]
    graph = _graph(cfg, n)
    return np.asarray(graph_edges(n, "swin-6" if is_retrieval(graph) else graph), np.int64).reshape(-1, 2)


def predict_case(cfg_dict: dict, n: int, path: str, source: str) -> dict:
    """(child process) Render, run the network or the oracle into the case's pair store (or `.npz` for store
    'float16'), measure the per-edge rotation errors; returns the figures (also written next to the store)."""
    from dust3r_ns.images import make_view
    from dust3r_ns.inference import inference_graph
    from dust3r_ns.model.checkpoint import load_model
    from dust3r_ns.pipeline import default_model_source
    from dust3r_ns.predictions import PairStoreWriter, open_store
    from dust3r_ns.synth import oracle_pairs

    cfg = ScaleBenchConfig(**cfg_dict)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = _case_dir(cfg, n, path, source)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    views = _views(cfg, n, path)
    gt = _gt(cfg, n, path, views)
    disk = cfg.store == "disk"
    out = root / ("pairs" if disk else "pairs.npz")
    if source == "network":
        graph = _graph(cfg, n)
        net = load_model(cfg.model or default_model_source())
        net(*(dict(img=torch.zeros(1, 3, cfg.size, cfg.size), true_shape=torch.tensor([[cfg.size] * 2]))
              for _ in range(2)))                          # (kernels built/loaded before the clock starts)
        t1, c1 = time.perf_counter(), time.process_time()
        vs = [make_view(k, rgb=v["rgb"]) for k, v in enumerate(views)]
        preds = inference_graph(vs, net, graph, device="cpu", batch_size=cfg.batch_size, verbose=False,
                                store_dtype=torch.float16, store_path=out if disk else None, ordered=cfg.ordered)
    else:
        t1, c1 = time.perf_counter(), time.process_time()
        edges = _oracle_edges(cfg, n, path)
        graph = f"{len(edges)} edges of the network graph" if (_case_dir(cfg, n, path, "network") / "pairs").is_dir() \
            else (cfg.graph if cfg.graph != "default" else "swin-6")
        H = W = cfg.size
        images = [make_view(k, rgb=v["rgb"], name=f"frame_{k:05d}").info for k, v in enumerate(views)]
        chunk = 64
        tmp = root / ".oracle_tmp"
        with PairStoreWriter(out if disk else tmp, images, edges, H, W, torch.float16, cfg.ordered) as w:
            for a in range(0, len(edges), chunk):
                o = oracle_pairs(views, [tuple(e) for e in edges[a:a + chunk].tolist()], seed=cfg.seed * 7919 + a)
                w.write(a, dict(pts1=o["pred1"]["pts3d"], pts2=o["pred2"]["pts3d_in_other_view"],
                                conf1=o["pred1"]["conf"], conf2=o["pred2"]["conf"]))
        preds = open_store(out if disk else tmp)
    t2, c2 = time.perf_counter(), time.process_time()
    err, ang_pred, ang_true = edge_rotations(preds, gt)
    if not disk:
        preds.astype(torch.float16).save(out)
        if source == "oracle":
            shutil.rmtree(tmp)
    info = dict(n=n, path=path, source=source, graph=graph, pairs=int(preds.n_edges),
                pairs_per_image=preds.n_edges / n, render_s=t1 - t0, infer_s=t2 - t1, infer_cpu_s=c2 - c1,
                edge_err_median_deg=float(np.median(err)), edge_err_p90_deg=float(np.percentile(err, 90)),
                angle_ratio=angle_ratios(ang_pred, ang_true, err, 45.0))
    atomic_write(root / "info.json", lambda p: p.write_text(json.dumps(info)), "benchmark cache", ValueError)
    return info


def align_case(cfg_dict: dict, n: int, path: str, source: str) -> dict:
    """(child process) Align the case's cached predictions (fast mode, defaults); pose errors against the truth."""
    from dust3r_ns.align import global_align
    from dust3r_ns.metrics import pose_metrics
    from dust3r_ns.predictions import PairPredictions

    cfg = ScaleBenchConfig(**cfg_dict)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    root = _case_dir(cfg, n, path, source)
    preds = PairPredictions.load(root / ("pairs" if cfg.store == "disk" else "pairs.npz"))
    preds.ordered = cfg.ordered         # (the cached pairs of an explicit graph serve both; no order detected)
    t0, c0 = time.perf_counter(), time.process_time()
    rec = global_align(preds, verbose=False, dtype="float16" if cfg.store == "float16" else "float32")
    sec, cpu = time.perf_counter() - t0, time.process_time() - c0
    with np.load(Path(cfg.cache_dir) / f"gt_{_key(cfg, n, path)}.npz") as z:
        c2w = z["c2w"]
    pm = pose_metrics(rec.c2w, c2w)
    edge_rra = own_edge_rra(rec.c2w, c2w, preds.edges)
    return dict(align_s=sec, align_cpu_s=cpu, ate_pct=pm["ate_pct"], rra_mean_deg=pm["rra_mean_deg"], rra_max_deg=pm["rra_max_deg"],
                edge_rra_median_deg=float(np.median(edge_rra)),
                edges_rejected=int(rec.meta.get("edges_rejected", 0)), iterations=int(rec.meta["iterations"]),
                polish_iterations=int(rec.meta.get("polish_iterations", 0)))


def run_case(cfg: ScaleBenchConfig, n: int, path: str, source: str) -> dict:
    """One case: predictions (cached, else computed in a child process), then the alignment in another."""
    root = _case_dir(cfg, n, path, source)
    store = root / ("pairs" if cfg.store == "disk" else "pairs.npz")
    info_path = root / "info.json"
    if info_path.exists() and store.exists():
        info = json.loads(info_path.read_text())
        info["cached"] = True
    else:
        info = run_isolated(predict_case, asdict(cfg), n, path, source)
        info["infer_rss_gb"] = info.pop("peak_rss_mb") / 1024
        atomic_write(info_path, lambda p: p.write_text(json.dumps(info)), "benchmark cache", ValueError)
        info["cached"] = False
    res = run_isolated(align_case, asdict(cfg), n, path, source)
    res["align_rss_gb"] = res.pop("peak_rss_mb") / 1024
    return dict(info, **res, store=cfg.store, ordered=cfg.ordered,
                target_rra_mean_deg=1.5 * info["edge_err_median_deg"])


def _fmt(r: dict) -> str:
    ok = "ok" if r["rra_mean_deg"] <= r["target_rra_mean_deg"] and r["rra_max_deg"] < 20 else "MISS"
    return (f"{r['n']:>5} {r['path']:<5} {r['source']:<7} {r['pairs']:>6} ({r['pairs_per_image']:.1f}/img) "
            f"infer {r['infer_s']:7.1f}s{'*' if r['cached'] else ' '} align {r['align_s']:7.1f}s "
            f"(CPU {r['align_cpu_s']:7.1f}s)  "
            f"RSS infer {r.get('infer_rss_gb', float('nan')):.2f} / align {r['align_rss_gb']:.2f} GB  ATE {r['ate_pct']:6.2f}%  "
            f"RRA {r['rra_mean_deg']:6.2f}/{r['rra_max_deg']:6.2f} deg (graph's edges med "
            f"{r.get('edge_rra_median_deg', float('nan')):.2f})  edge err med {r['edge_err_median_deg']:5.2f} "
            f"deg (target RRA mean <= {r['target_rra_mean_deg']:.2f}, max < 20: {ok})  rejected {r['edges_rejected']}")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_decode(name: str, size: str, batch: int, threads: int) -> dict:
    """(child process) Bytes of the weights, of one image's encoder output, and the peak memory a decoder batch of
    `batch` pairs adds (peak RSS of the decode over the RSS before it) for an official architecture, random
    weights, float32, inference mode, on the CPU."""
    from dust3r_ns.bench.common import parse_hw
    from dust3r_ns.bench.inference import bench_model
    from dust3r_ns.images import make_view
    from dust3r_ns.inference import decode_batch, encode_images

    if threads > 0:
        torch.set_num_threads(threads)
    H, W = parse_hw(size)
    model = bench_model(False, name)
    views = [make_view(k, img=torch.rand(1, 3, H, W) * 2 - 1) for k in range(2)]
    feats = encode_images(model, views, "cpu", batch_size=1)
    feat_bytes = sum(t.numel() * t.element_size() for t in feats[0])
    pairs = [(views[0], views[1])] * batch
    before = _rss()
    with torch.inference_mode():
        decode_batch(model, pairs, feats, torch.device("cpu"), None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(weights=sum(p.numel() * p.element_size() for p in model.parameters()), feat_bytes=feat_bytes,
                batch=batch, decode_peak=max(0, peak - before))


def memory_model(cfg: ScaleBenchConfig) -> dict:
    """GPU memory of pair inference ~ weights + N x one image's encoder output (every image's tokens stay on the
    device) + a decoder batch's peak, linear in the batch (measured at 1 and 3 pairs); printed with the prediction
    for `gpu_n` images at `NetworkConfig.batch_size` 8 and the aligner's estimate on the device (`estimate_memory`,
    float16 stacks), all labelled estimates (CPU allocations stand for the CUDA allocator's)."""
    from dust3r_ns.align import estimate_memory
    from dust3r_ns.bench.common import parse_hw

    a, b = (run_isolated(measure_decode, cfg.gpu_model, cfg.gpu_size, k, cfg.threads) for k in (1, 3))
    per_pair = max(1, (b["decode_peak"] - a["decode_peak"]) // 2)
    fixed = max(0, a["decode_peak"] - per_pair)
    N, B = cfg.gpu_n, 8
    H, W = parse_hw(cfg.gpu_size)
    E = int(round(cfg.pairs_per_image * N))
    infer = a["weights"] + N * a["feat_bytes"] + fixed + B * per_pair
    align = estimate_memory(N, E, H, W, "fast", 2)
    gib = 2.0 ** 30
    print(f"memory model of {cfg.gpu_model} at {cfg.gpu_size} (random weights, float32; measured on the CPU): weights "
          f"{a['weights'] / gib:.2f} GiB, encoder output {a['feat_bytes'] / 2**20:.2f} MiB per image, decoder batch "
          f"{fixed / 2**20:.0f} MiB + {per_pair / 2**20:.0f} MiB per pair (peaks of 1 and 3 pairs: "
          f"{a['decode_peak'] / 2**20:.0f} / {b['decode_peak'] / 2**20:.0f} MiB)")
    print(f"ESTIMATE for N={N} ({E} pairs, batch {B}): pair inference on one GPU ~{infer / gib:.1f} GiB "
          f"({'within' if infer <= 24 * gib else 'over'} a 24 GiB budget; the maps go to host memory or a pair store as "
          f"they are decoded); fast alignment on the GPU (float16 stacks) ~{align / gib:.1f} GiB "
          f"({'within' if align <= 24 * gib else 'over'} 24 GiB)", flush=True)
    return dict(a=a, b=b, per_pair=per_pair, fixed=fixed, infer_estimate=infer, align_estimate=align, n=N, pairs=E)


def run(cfg: ScaleBenchConfig) -> list[dict]:
    """Run every case (sources in order, so the oracle reuses the network's edges); print and return the rows."""
    for p in cfg.paths:
        if p not in PATHS:
            raise ValueError(f"unknown path {p!r}: use {sorted(PATHS)}")
    for s in cfg.sources:
        if s not in ("network", "oracle"):
            raise ValueError(f"unknown source {s!r}: use network or oracle")
    if cfg.store not in ("disk", "float16"):
        raise ValueError(f"store must be 'disk' or 'float16', got {cfg.store!r}")
    if cfg.gpu_model:
        res = memory_model(cfg)
        if cfg.json_out:
            Path(cfg.json_out).write_text(json.dumps(dict(config=asdict(cfg), memory_model=res), indent=1))
        return [res]
    if cfg.ordered:
        print("frames as a video (ordered input): the video default graph and the aligner's sequence prior", flush=True)
    print("    N path  source   pairs (pairs/img)  inference (* cached: figure of the run that computed it)  "
          "alignment  peak RSS  ATE  RRA mean/max  per-edge rotation error median  rejected", flush=True)
    rows: list[dict] = []
    for path in cfg.paths:
        for source in cfg.sources:
            for n in sorted(cfg.n):
                if f"{n}:{path}:{source}" in cfg.skip:
                    continue
                r = run_case(cfg, n, path, source)
                rows.append(r)
                print(_fmt(r), flush=True)
                if r.get("angle_ratio"):
                    print("          predicted/true relative angle by true angle: "
                          + ", ".join(f"{k} deg {v:.2f}" for k, v in r["angle_ratio"].items()), flush=True)
    for path in cfg.paths:
        for source in cfg.sources:
            rs = sorted((r for r in rows if r["path"] == path and r["source"] == source), key=lambda r: r["n"])
            for lo in rs[:-1]:
                hi = rs[-1]
                print(f"t_align(N={hi['n']}) / t_align(N={lo['n']}) [{path}, {source}]: wall "
                      f"{hi['align_s'] / max(lo['align_s'], 1e-9):.2f}, CPU "
                      f"{hi['align_cpu_s'] / max(lo['align_cpu_s'], 1e-9):.2f} for {hi['pairs'] / max(lo['pairs'], 1):.2f}x the "
                      f"pairs ({lo['pairs_per_image']:.1f} -> {hi['pairs_per_image']:.1f} per image)", flush=True)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(dict(config=asdict(cfg), rows=rows), indent=1))
    return rows
