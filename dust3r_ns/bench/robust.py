"""`dust3r-ns bench robust`: global alignment against wrong pairs, on network and on oracle predictions.

Network case: N frames on an orbit arc (`synth.camera_path`, 'wide' = 120 deg) rendered at the network size, the
bundled model (or `--model`) run by the pair engine on scene graphs ('default': `pairs.default_scene_graph(N)`, a
retrieval graph for N > 12; logwin-5 and swin-3), the `PairPredictions` and the ground truth cached on disk so reruns skip rendering and the
network. Per edge e = (i, j) the relative rotation the pair predicts is read from its two point maps by weighted
Procrustes fits of the ground-truth camera-frame points (pts1 ~ A_i X_i^cam, pts2 ~ A_j X_j^cam; relative rotation
R_i^T R_j of the two fits) and compared with the truth; the median of these errors is the reference of the target
(the alignment's RRA mean should not exceed 1.5x it). Edges with an error above `gross_deg` count as gross. The
median ratio of predicted to true relative angle per bin of true angle shows a systematic over- or under-rotation,
which no consistent solution can undo: chained along the graph it grows with the distance between images.
Oracle case: `synth.oracle_pairs` on the same kind of orbit plus structured gross edges (`inject_gross_edges`:
a share of the longest-baseline pairs, both directions, made to agree on a mirrored camera position, at full
confidence) against the clean predictions of the same scene.

Each case is aligned with the robust edge handling on and off (`AlignConfig.robust`); reported per run: RRA
mean/max (deg) over all pairs of images, RRA on the graph's own edges (median/mean: does the solution agree with the
truth at least where the edges predicted it?), ATE (% of the camera spread), edges rejected in the end (and how many of them are gross), edges
re-admitted after the solve, seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dust3r_ns import synth
from dust3r_ns.align import AlignConfig, global_align
from dust3r_ns.bench.common import parse_hw
from dust3r_ns.fileio import atomic_write
from dust3r_ns.geometry import umeyama
from dust3r_ns.metrics import pose_metrics, relative_rotation_errors, rotation_angle_deg
from dust3r_ns.pairs import default_scene_graph, graph_edges
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.retrieval import graph_key


@dataclass
class RobustBenchConfig:
    n: list[int] = field(default_factory=lambda: [48])
    """Frame counts of the network cases (0 or an empty list: none)."""
    graphs: list[str] = field(default_factory=lambda: ["default", "logwin-5", "swin-3"])
    """Scene graphs of the network cases ('default': `default_scene_graph(N)`)."""
    size: int = 224
    """Network input size (frames are rendered at size x size)."""
    baseline: str = "wide"
    """Orbit arc of `synth.camera_path`: small (10 deg), moderate (45 deg) or wide (120 deg)."""
    seed: int = 0
    """Scene and camera-path seed."""
    model: str = ""
    """Checkpoint of the network cases; empty: the bundled model."""
    cache_dir: str = ".cache/bench_robust"
    """Where rendered ground truth and pair predictions are cached (reruns skip the network)."""
    robust: list[str] = field(default_factory=lambda: ["on", "off"])
    """Alignment runs per case: 'on' (AlignConfig.robust True) and/or 'off'."""
    oracle_n: int = 48
    """Frames of the oracle case (0: skip)."""
    oracle_size: str = "96x128"
    """Size HxW of the oracle case."""
    oracle_graph: str = "logwin-5"
    """Scene graph of the oracle case (oracle predictions have no encoder features: not a retrieval graph)."""
    gross_frac: float = 0.2
    """Share of the oracle case's unordered pairs made gross by `inject_gross_edges`."""
    gross_deg: float = 45.0
    """An edge whose relative rotation is off by more than this (degrees) counts as gross."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    json_out: str = ""
    """Optional path for the results as JSON."""


# ------------------------------------------------------------------------------------------------ scenario
def render_orbit(n: int, H: int, W: int, baseline: str, seed: int) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """(views of `synth.render_views`, c2w (n,4,4), K (n,3,3)) of n frames on an arc of scene `seed`."""
    scene = synth.make_scene(seed)
    c2w, K = synth.camera_path(scene, n, baseline=baseline, seed=seed, H=H, W=W)
    return synth.render_views(scene, c2w, K, H, W), c2w, K


def _graph(n: int, graph: str) -> str:
    return default_scene_graph(n) if graph == "default" else graph


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """`arrays` into an `.npz` at `path`, atomically (the benchmarks' caches)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, write, "benchmark cache", ValueError)


def gt_of(views: list[dict]) -> dict:
    """Ground truth of rendered views: c2w (n,4,4), K (n,3,3), depth (n,H,W), valid (n,H,W)."""
    return dict(c2w=np.stack([v["c2w"] for v in views]), K=np.stack([v["K"] for v in views]),
                depth=np.stack([v["depth"] for v in views]), valid=np.stack([v["valid"] for v in views]))


def model_tag(source: str) -> str:
    """Short cache tag of a model source that changes with its weights, not only its path (`cache.model_identity`)."""
    from dust3r_ns.cache import model_identity

    return hashlib.sha1(model_identity(source).encode()).hexdigest()[:8]


def own_edge_rra(c2w: np.ndarray, gt_c2w: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """(E',) degrees: the solution's relative rotation error on the graph's own edges (self-edges left out)."""
    edges = np.asarray(edges)
    return relative_rotation_errors(c2w, gt_c2w, edges[edges[:, 0] != edges[:, 1]])


def network_case(cfg: RobustBenchConfig, n: int, graph: str) -> tuple[PairPredictions, dict]:
    """The network predictions and ground truth of one case, from the cache or computed (and cached)."""
    from dust3r_ns.images import make_view
    from dust3r_ns.inference import inference_graph
    from dust3r_ns.model.checkpoint import load_model
    from dust3r_ns.pipeline import default_model_source

    source = cfg.model or default_model_source()
    tag = model_tag(source)
    root = Path(cfg.cache_dir)
    key = f"n{n}_{cfg.size}_{cfg.baseline}_s{cfg.seed}"
    gt_path = root / f"gt_{key}.npz"
    pred_path = root / f"pairs_{key}_{graph_key(graph)}_{tag}.npz"
    if gt_path.exists() and pred_path.exists():
        with np.load(gt_path) as z:
            gt = {k: z[k] for k in z.files}
        preds = PairPredictions.load(pred_path)
        preds.ordered = False          # an unordered photo set (no order read from the renders' content)
        return preds, gt
    t0 = time.perf_counter()
    views, _, _ = render_orbit(n, cfg.size, cfg.size, cfg.baseline, cfg.seed)
    gt = gt_of(views)
    root.mkdir(parents=True, exist_ok=True)
    write_npz(gt_path, **gt)
    t1 = time.perf_counter()
    net = load_model(source)
    vs = [make_view(k, rgb=v["rgb"]) for k, v in enumerate(views)]
    preds = inference_graph(vs, net, graph, device="cpu", batch_size=16, verbose=False)
    preds.ordered = False
    preds.save(pred_path)
    print(f"  rendered {n} frames in {t1 - t0:.1f}s, {preds.n_edges} pairs through the network in "
          f"{time.perf_counter() - t1:.1f}s (cached in {root})", flush=True)
    return preds, gt


def oracle_case(cfg: RobustBenchConfig) -> tuple[PairPredictions, dict, np.ndarray]:
    """(clean oracle predictions, ground truth, unordered pair list) of the oracle case."""
    H, W = parse_hw(cfg.oracle_size)
    views, _, _ = render_orbit(cfg.oracle_n, H, W, cfg.baseline, cfg.seed)
    edges = graph_edges(cfg.oracle_n, _graph(cfg.oracle_n, cfg.oracle_graph), symmetrize=True)
    out = synth.oracle_pairs(views, edges, seed=cfg.seed)
    return PairPredictions.from_reference(out, n_images=cfg.oracle_n), gt_of(views), np.asarray(edges)


# ------------------------------------------------------------------------------------------------ measures
def _cam_points(gt: dict, k: int) -> np.ndarray:
    return synth.camera_points(np.asarray(gt["depth"][k], np.float64), np.asarray(gt["K"][k], np.float64))


def _fit(preds: PairPredictions, gt: dict, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per edge, the similarity (s, R, t) taking ground-truth camera-frame points of the side's image onto the
    side's predicted point map (weights: confidence on valid pixels)."""
    e = preds.edges[:, side - 1]
    cams = {int(k): torch.from_numpy(_cam_points(gt, int(k))) for k in np.unique(e)}
    out = []
    for a in range(0, preds.n_edges, 32):
        idx = range(a, min(a + 32, preds.n_edges))
        x = torch.stack([cams[int(e[k])].reshape(-1, 3) for k in idx])
        y = torch.stack([preds.edge(k)[side - 1].reshape(-1, 3).double() for k in idx])
        w = torch.stack([(preds.edge(k)[side + 1].double() * torch.from_numpy(gt["valid"][e[k]])).reshape(-1)
                         for k in idx])
        out.append(umeyama(x, y, w))
    return tuple(torch.cat([o[m] for o in out]) for m in range(3))  # type: ignore[return-value]


def edge_rotations(preds: PairPredictions, gt: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(error, predicted angle, true angle), each (E,) degrees: the relative rotation predicted by each edge (module
    doc) against the true R_i^T R_j, and the rotation angles of both."""
    _, Ri, _ = _fit(preds, gt, 1)
    _, Rj, _ = _fit(preds, gt, 2)
    rel = (Ri.transpose(1, 2) @ Rj).numpy()
    c2w = np.asarray(gt["c2w"], np.float64)
    i, j = preds.edges[:, 0], preds.edges[:, 1]
    true = np.swapaxes(c2w[i, :3, :3], 1, 2) @ c2w[j, :3, :3]
    return rotation_angle_deg(np.swapaxes(rel, 1, 2) @ true), rotation_angle_deg(rel), rotation_angle_deg(true)


def edge_rotation_errors(preds: PairPredictions, gt: dict) -> np.ndarray:
    """(E,) degrees: the relative rotation predicted by each edge (module doc) against the true R_i^T R_j."""
    return edge_rotations(preds, gt)[0]


ANGLE_BINS = (0.0, 5.0, 10.0, 20.0, 40.0, 180.0)


def angle_ratios(pred: np.ndarray, true: np.ndarray, err: np.ndarray, gross_deg: float) -> dict[str, float]:
    """Median predicted/true relative rotation angle of the non-gross edges per bin of true angle (`ANGLE_BINS`,
    degrees): a systematic over- (> 1) or under-rotation that chaining along the graph integrates, unlike noise."""
    out = {}
    ok = (err <= gross_deg) & (true > 1e-3)
    for lo, hi in zip(ANGLE_BINS[:-1], ANGLE_BINS[1:]):
        m = ok & (true >= lo) & (true < hi)
        if m.any():
            out[f"{lo:g}-{hi:g}"] = float(np.median(pred[m] / true[m]))
    return out


def edge_baselines(edges: np.ndarray, gt: dict) -> np.ndarray:
    """(E,) degrees: true relative rotation angle of each edge's two cameras."""
    c2w = np.asarray(gt["c2w"], np.float64)
    i, j = np.asarray(edges)[:, 0], np.asarray(edges)[:, 1]
    return rotation_angle_deg(np.swapaxes(c2w[i, :3, :3], 1, 2) @ c2w[j, :3, :3])


def _yaw_about(c2w: np.ndarray, target: np.ndarray) -> float:
    d = c2w[:3, 3] - target
    return math.atan2(d[1], d[0])


def _rot_z(phi: float) -> np.ndarray:
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def inject_gross_edges(preds: PairPredictions, gt: dict, frac: float, seed: int = 0, min_deg: float = 60.0
                       ) -> tuple[PairPredictions, np.ndarray]:
    """Structured gross edges: (new predictions, (E,) bool mask of the corrupted ordered edges).

    round(frac x pairs) unordered pairs are drawn from the 2 x frac longest-baseline ones (as a network's wrong
    pairs sit on long baselines). For a drawn pair (i, j) both directions agree on one wrong world: camera j moved
    about the vertical axis (world z) through the cameras' look-at point by phi = -max(2 |yaw_ij|, min_deg) x
    sign(yaw_ij) (j appears mirrored to the other side of i). The predicted map of the other image is moved by the
    corresponding rigid motion, conjugated by the edge's own similarity (its first map fitted to the true camera
    points); confidences stay as they were (the wrong pairs are as confident as the right ones).
    """
    c2w = np.asarray(gt["c2w"], np.float64)
    E = preds.edges
    pairs = sorted({(int(min(a, b)), int(max(a, b))) for a, b in E if a != b})
    base = edge_baselines(np.asarray(pairs), gt)
    n_bad = int(round(frac * len(pairs)))
    pool = np.argsort(-base)[: max(n_bad, min(len(pairs), int(round(2 * frac * len(pairs)))))]
    rng = np.random.default_rng(seed)
    bad = {pairs[k] for k in rng.choice(pool, size=n_bad, replace=False)}
    # look-at point: least-squares intersection of the optical axes
    A, b = np.zeros((3, 3)), np.zeros(3)
    for T in c2w:
        d = T[:3, 2]
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ T[:3, 3]
    target = np.linalg.solve(A, b)
    s1, R1, t1 = _fit(preds, gt, 1)
    pts2 = preds.pts2.clone() if preds.uniform else [p.clone() for p in preds.pts2]
    mask = np.zeros(len(E), bool)
    for e, (i, j) in enumerate(E):
        key = (int(min(i, j)), int(max(i, j)))
        if i == j or key not in bad:
            continue
        lo, hi = key
        yaw = (_yaw_about(c2w[hi], target) - _yaw_about(c2w[lo], target) + math.pi) % (2 * math.pi) - math.pi
        phi = -math.copysign(max(2 * abs(yaw), math.radians(min_deg)), yaw)
        G = np.eye(4)                       # world motion of camera `hi` about the vertical through the target
        G[:3, :3] = _rot_z(phi)
        G[:3, 3] = target - G[:3, :3] @ target
        if i == hi:                         # this edge moves the other camera (lo) by the inverse motion
            G = np.linalg.inv(G)
        M = np.linalg.inv(c2w[i]) @ G @ c2w[i]          # the motion in camera i's frame
        s, R, t = float(s1[e]), R1[e].numpy(), t1[e].numpy()
        p = pts2[e].double().numpy().reshape(-1, 3)
        x = (p - t) @ R / s                             # edge frame -> camera i frame
        x = x @ M[:3, :3].T + M[:3, 3]
        pts2[e] = torch.from_numpy(((s * x @ R.T) + t).reshape(pts2[e].shape)).to(pts2[e].dtype)
        mask[e] = True
    out = PairPredictions(images=preds.images, edges=preds.edges, pts1=preds.pts1, pts2=pts2, conf1=preds.conf1,
                          conf2=preds.conf2, ordered=preds.ordered)
    return out, mask


def align_run(preds: PairPredictions, gt: dict, robust: bool, gross: np.ndarray) -> dict:
    """One fast alignment: RRA mean/max, RRA on the graph's own edges (median/mean), ATE, edges rejected (and how many
    of them are gross), re-admitted, seconds."""
    t0 = time.perf_counter()
    rec = global_align(preds, AlignConfig().replace(robust=robust), verbose=False)
    sec = time.perf_counter() - t0
    pm = pose_metrics(rec.c2w, gt["c2w"])
    edge_rra = own_edge_rra(rec.c2w, gt["c2w"], preds.edges)
    rej = np.array([int(k) for k in str(rec.meta.get("rejected_edges", "")).split(",") if k], np.int64)
    return dict(robust=robust, rra_mean_deg=pm["rra_mean_deg"], rra_max_deg=pm["rra_max_deg"],
                edge_rra_median_deg=float(np.median(edge_rra)), edge_rra_mean_deg=float(edge_rra.mean()),
                ate_pct=pm["ate_pct"], edges_rejected=int(rec.meta.get("edges_rejected", 0)),
                edges_readmitted=int(rec.meta.get("edges_readmitted", 0)),
                rejected_gross=int(gross[rej].sum()) if len(rej) else 0, gross=int(gross.sum()),
                iterations=int(rec.meta["iterations"]), seconds=sec)


def _fmt(r: dict) -> str:
    return (f"  robust={'on ' if r['robust'] else 'off'} RRA {r['rra_mean_deg']:.2f}/{r['rra_max_deg']:.2f} deg "
            f"(mean/max; on the graph's edges median/mean {r['edge_rra_median_deg']:.2f}/{r['edge_rra_mean_deg']:.2f})  ATE {r['ate_pct']:.2f}%  rejected {r['edges_rejected']} edges "
            f"({r['rejected_gross']} of the {r['gross']} gross; {r['edges_readmitted']} re-admitted)  "
            f"it={r['iterations']}  {r['seconds']:.1f}s")


def run(cfg: RobustBenchConfig) -> list[dict]:
    """Run every case (network, then oracle clean / with gross edges); print and return the rows."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    modes = [{"on": True, "off": False}[m] for m in cfg.robust]
    rows: list[dict] = []
    for n in [k for k in cfg.n if k > 0]:
        for g in cfg.graphs:
            graph = _graph(n, g)
            preds, gt = network_case(cfg, n, graph)
            err, ang_pred, base = edge_rotations(preds, gt)
            gross = err > cfg.gross_deg
            med = float(np.median(err))
            ratios = angle_ratios(ang_pred, base, err, cfg.gross_deg)
            print(f"network N={n} {cfg.size}x{cfg.size} {cfg.baseline} {graph}: {preds.n_edges} pairs, per-edge "
                  f"rotation error median {med:.2f} deg, {100 * (err <= 15).mean():.0f}% <= 15 deg, "
                  f"{gross.sum()} gross (> {cfg.gross_deg:g} deg; {gross[base > 32].mean() * 100 if (base > 32).any() else 0:.0f}% "
                  f"of the edges with baseline > 32 deg); target RRA mean <= {1.5 * med:.2f} deg, max < 20 deg",
                  flush=True)
            print("  predicted/true relative angle (median, non-gross edges) by true angle: "
                  + ", ".join(f"{k} deg {v:.2f}" for k, v in ratios.items()), flush=True)
            for robust in modes:
                r = align_run(preds, gt, robust, gross)
                r.update(case="network", n=n, graph=graph, edges=preds.n_edges, edge_err_median_deg=med,
                         target_rra_mean_deg=1.5 * med, angle_ratio=ratios)
                rows.append(r)
                print(_fmt(r), flush=True)
    if cfg.oracle_n > 0:
        preds, gt, _ = oracle_case(cfg)
        bad, mask = inject_gross_edges(preds, gt, cfg.gross_frac, seed=cfg.seed)
        graph = _graph(cfg.oracle_n, cfg.oracle_graph)
        print(f"oracle N={cfg.oracle_n} {cfg.oracle_size} {cfg.baseline} {graph}: {preds.n_edges} pairs, "
              f"{mask.sum()} made gross ({cfg.gross_frac:.0%} of the pairs, longest baselines)", flush=True)
        none = np.zeros(preds.n_edges, bool)
        clean_ate = None
        for label, p, m in (("clean", preds, none), ("gross", bad, mask)):
            for robust in modes:
                r = align_run(p, gt, robust, m)
                r.update(case=f"oracle-{label}", n=cfg.oracle_n, graph=graph, edges=preds.n_edges)
                if label == "clean" and robust:
                    clean_ate = r["ate_pct"]
                if label == "gross" and clean_ate is not None:
                    r["ate_vs_clean"] = r["ate_pct"] / max(clean_ate, 1e-12)
                rows.append(r)
                print(f"  [{label}]" + _fmt(r)[1:] + (f"  ATE/clean {r['ate_vs_clean']:.2f}x" if "ate_vs_clean" in r
                                                       else ""), flush=True)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(dict(config=cfg.__dict__, rows=rows), indent=1))
    return rows
