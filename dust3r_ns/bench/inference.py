"""`dust3r-ns bench inference`: the reference-style per-pair path vs the engine, same model and images, one run.

(a) per-pair: the whole network for every ordered pair (encoder re-run per pair, explicit-softmax attention),
(b) engine: each image encoded once, decoders batched over pairs, fused attention; optionally (c) engine in bf16.
Prints median seconds, the speed-up, peak RSS (each mode in its own process) and the encoder's achieved GFLOP/s
against this machine's float32 matmul rate measured in the same run.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import torch

from dust3r_ns.bench.common import parse_hw


@dataclass
class InferenceBenchConfig:
    n_images: list[int] = field(default_factory=lambda: [4, 8])
    """Numbers of images (complete symmetric graph: N(N-1) ordered pairs)."""
    size: str = "224x224"
    """Image size HxW (multiples of 16)."""
    model: str = "224_linear"
    """Official configuration with random weights: 224_linear, 512_linear or 512_dpt."""
    device: str = "cpu"
    """Torch device ('cuda' on a GPU machine)."""
    repeats: int = 3
    """Timed runs per mode (the median is reported)."""
    batch_size: int = 8
    """Engine decoder batch (pairs)."""
    bf16: bool = True
    """Also time the engine under bfloat16 autocast and report its error against float32."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    tiny: bool = False
    """Use a tiny model (smoke test of the benchmark itself)."""
    json_out: str = ""
    """Optional path for the results as JSON."""


def bench_model(tiny: bool, name: str):
    """An official architecture (`name` = '224_linear', '512_linear', '512_dpt') with seeded random weights, in eval
    mode; `tiny`: the same heads on a small encoder/decoder."""
    from dust3r_ns.model.network import AsymmetricCroCo3DStereo

    torch.manual_seed(0)
    res, head = name.split("_")
    kw = dict(img_size=(int(res), int(res)), head_type=head, landscape_only=False)
    if tiny:
        kw.update(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4)
    return AsymmetricCroCo3DStereo(**kw).eval()


def _pairs(n: int, size: str):
    from dust3r_ns.images import make_view

    h, w = parse_hw(size)
    g = torch.Generator().manual_seed(1)
    views = [make_view(i, img=torch.rand(1, 3, h, w, generator=g) * 2 - 1) for i in range(n)]
    pairs = [(views[i], views[j]) for i, j in itertools.combinations(range(n), 2)]
    return pairs + [(b, a) for a, b in pairs]


def encoder_flops(model, tokens: int) -> float:
    c = model.config
    d, depth = c["enc_embed_dim"], c["enc_depth"]
    hidden = int(d * c["mlp_ratio"])
    per_block = 2 * tokens * (4 * d * d + 2 * d * hidden) + 4 * tokens * tokens * d
    patch = 2 * tokens * d * 3 * c["patch_size"] ** 2
    return depth * per_block + patch


def _measure(mode: str, n: int, cfg: InferenceBenchConfig) -> dict:
    from dust3r_ns.bench.common import matmul_gflops, median_time
    from dust3r_ns.inference import encode_images, inference, inference_per_pair

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dev = torch.device(cfg.device)
    model = bench_model(cfg.tiny, cfg.model).to(dev)
    pairs = _pairs(n, cfg.size)
    res = {"mode": mode, "n": n, "pairs": len(pairs)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if mode == "per_pair":
        model.set_attention_impl("math")
        fn = lambda: (inference_per_pair(pairs, model, device=dev), sync())[0]  # noqa: E731
    else:
        amp = "bf16" if mode == "engine_bf16" else None
        fn = lambda: (inference(pairs, model, device=dev, batch_size=cfg.batch_size, amp=amp,  # noqa: E731
                                verbose=False), sync())[0]
        views = list({v["idx"]: v for p in pairs for v in p}.values())  # each image once
        t_enc, _ = median_time(lambda: (encode_images(model, views, dev, batch_size=cfg.batch_size, amp=amp),
                                        sync()), cfg.repeats, warmup=1)
        h, w = parse_hw(cfg.size)
        tokens = (h // 16) * (w // 16)
        res["encoder_s"] = t_enc
        res["encoder_gflops"] = encoder_flops(model, tokens) * n / t_enc / 1e9
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    res["matmul_gflops"] = matmul_gflops()  # measured in this process, next to the timed runs
    t, times = median_time(fn, cfg.repeats, warmup=0 if mode == "per_pair" and dev.type == "cpu" else 1)
    res.update(median_s=t, times=times)
    if dev.type == "cuda":
        res["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if mode != "per_pair":
        out = fn()
        res["pts3d_sample"] = out["pred2"]["pts3d_in_other_view"][:2].tolist()
    return res


def run(cfg: InferenceBenchConfig) -> dict:
    from dust3r_ns.bench.common import matmul_gflops, run_isolated

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rate = matmul_gflops(device=cfg.device)
    print(f"float32 matmul rate (2048^3, {cfg.device}, {torch.get_num_threads()} threads): {rate:.0f} GFLOP/s")
    modes = ["per_pair", "engine"] + (["engine_bf16"] if cfg.bf16 else [])
    results = {"matmul_gflops": rate, "runs": []}
    header = f"{'N':>3} {'pairs':>5} {'mode':>12} {'median s':>9} {'speed-up':>8} {'peak RSS MB':>11} {'enc GFLOP/s':>11} {'% matmul':>8}"
    print(header)
    for n in cfg.n_images:
        base = None
        fp32_sample = None
        for mode in modes:
            r = run_isolated(_measure, mode, n, cfg)
            base = r["median_s"] if mode == "per_pair" else base
            r["speedup"] = base / r["median_s"]
            sample = torch.tensor(r.pop("pts3d_sample", []))
            if mode == "engine":
                fp32_sample = sample
            elif mode == "engine_bf16" and fp32_sample is not None:
                r["rel_err_vs_fp32"] = float((sample - fp32_sample).abs().max() / fp32_sample.abs().max())
            enc = r.get("encoder_gflops")
            pct = "" if enc is None else f"{100 * enc / r['matmul_gflops']:.0f}%"
            print(f"{n:>3} {r['pairs']:>5} {mode:>12} {r['median_s']:>9.2f} {r['speedup']:>7.2f}x "
                  f"{r['peak_rss_mb']:>11.0f} {'' if enc is None else f'{enc:.0f}':>11} "
                  f"{pct:>8}"
                  + (f"  rel.err vs fp32 {r['rel_err_vs_fp32']:.1e}" if "rel_err_vs_fp32" in r else "")
                  + (f"  GPU peak {r['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in r else ""))
            results["runs"].append(r)
    if cfg.json_out:
        from pathlib import Path

        Path(cfg.json_out).write_text(json.dumps(results, indent=1))
    return results
