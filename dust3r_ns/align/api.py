"""`global_align`: `PairPredictions` -> `Reconstruction` (options, memory check, 1/2-image paths, result assembly)."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from dust3r_ns.scene import Reconstruction

from .baseline import solve_baseline
from .config import AlignConfig
from .data import AlignError, PairData, as_predictions, pair_data
from .edges import fit_edges
from .fast import POLISH_ITER, auto_stride, finish_full_res, solve_fast
from .init import mst_init
from .problem import Constraints, State, apply_known_poses, edge_chunks, objective, sub_depth
from .robust import detect_outliers, drop_edges, misfit_outliers, readmit_edges, restore_edges


def available_memory(device: torch.device) -> int | None:
    """Free bytes on the device (CUDA: mem_get_info; CPU: MemAvailable of /proc/meminfo), None if unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimate_memory(n_images: int, n_edges: int, H: int, W: int, mode: str, store_bytes: int = 4,
                    on_disk: bool = False) -> int:
    """Rough peak bytes of an alignment run: the pair stacks (none for a pair store on disk, whose maps are read
    chunk by chunk) + their coarse copies + the solver's working set (per-image maps and one chunk of edges)."""
    px = H * W
    s = auto_stride(H, W)
    # coarse stacks: points (6 values a pixel) in the stacks' dtype (a store's own dtype when on disk), weights (2) in
    # the stacks' dtype, float32 when read from a store
    coarse = n_edges * -(-H // s) * -(-W // s) * (6 * store_bytes + 2 * (4 if on_disk else store_bytes))
    preds = 0 if on_disk else n_edges * px * 8 * store_bytes
    if mode == "baseline":
        # autograd keeps float copies, transformed maps, gathered world points, differences and gradients per edge
        work = n_edges * px * 44 * 4 + n_images * px * 24 * 4
    else:
        chunk = min(n_edges, max(1, (1 << 22) // px)) * px
        # per image: state, world points, targets, median-depth candidates (26 floats a pixel when streaming a
        # store: the full-resolution maps of the initialisation and depth passes are per image, not per edge)
        work = chunk * 30 * 4 + n_images * px * (26 if on_disk else 20) * 4
    return int(preds + coarse + work + 256 * 2 ** 20)


def _suggest_graph(n: int, budget: int, H: int, W: int, mode: str, store_bytes: int, on_disk: bool) -> str:
    for k in (10, 8, 6, 5, 4, 3, 2, 1):
        e = 2 * n * k
        if estimate_memory(n, e, H, W, mode, store_bytes, on_disk) < budget:
            return f"scene_graph='swin-{k}' (~{e} pairs)"
    return "fewer images or a smaller image size (224)"


def _known_K(known_K: Any, N: int, transforms: np.ndarray, K_space: str) -> tuple[np.ndarray, np.ndarray]:
    """-> (K_net (N,3,3) float64 with NaN rows for unknown, mask (N,) bool)."""
    Ks = np.full((N, 3, 3), np.nan)
    if isinstance(known_K, Mapping):
        for k, v in known_K.items():
            if not 0 <= int(k) < N:
                raise AlignError(f"known_K has image index {k}, expected 0..{N - 1}")
            Ks[int(k)] = np.asarray(v, dtype=np.float64).reshape(3, 3)
    else:
        arr = np.asarray(known_K, dtype=np.float64)
        if arr.shape == (3, 3):
            arr = np.broadcast_to(arr, (N, 3, 3))
        if arr.shape != (N, 3, 3):
            raise AlignError(f"known_K must be (N,3,3)=({N},3,3), a 3x3 shared by all, or a dict idx->3x3; got {arr.shape}")
        Ks[:] = arr
    mask = np.isfinite(Ks).all((1, 2))
    if K_space == "orig":
        from dust3r_ns.conventions import K_orig_to_net

        Ks[mask] = np.asarray(K_orig_to_net(Ks[mask], transforms[mask]), dtype=np.float64)
    elif K_space != "net":
        raise AlignError(f"K_space must be 'orig' (original-image pixels) or 'net' (network pixels), got {K_space!r}")
    if mask.any() and (Ks[mask, 0, 0] <= 0).any():
        raise AlignError("known_K has a non-positive focal length")
    return Ks, mask


def _known_c2w(known_c2w: Any, N: int) -> tuple[np.ndarray, np.ndarray]:
    P = np.full((N, 4, 4), np.nan)
    if isinstance(known_c2w, Mapping):
        for k, v in known_c2w.items():
            if not 0 <= int(k) < N:
                raise AlignError(f"known_c2w has image index {k}, expected 0..{N - 1}")
            P[int(k)] = np.asarray(v, dtype=np.float64).reshape(4, 4)
    else:
        arr = np.asarray(known_c2w, dtype=np.float64)
        if arr.shape != (N, 4, 4):
            raise AlignError(f"known_c2w must be (N,4,4)=({N},4,4) (NaN for unknown) or a dict idx->4x4; got {arr.shape}")
        P[:] = arr
    mask = np.isfinite(P).all((1, 2))
    if mask.any():
        R = P[mask, :3, :3]
        if np.abs(R @ R.transpose(0, 2, 1) - np.eye(3)).max() > 1e-4 or (np.linalg.det(R) < 0).any():
            raise AlignError("known_c2w rotations must be orthonormal with det +1 (camera-to-world, OpenCV axes)")
    return P, mask


def global_align(preds: Any, config: AlignConfig | None = None, *, known_K: Any = None, K_space: str = "orig",
                 known_c2w: Any = None, conf_thr: float = 3.0, verbose: bool = True, **options: Any
                 ) -> Reconstruction:
    """Align pairwise DUSt3R predictions into one reconstruction.

    preds: `PairPredictions` (what `inference` returns) or the reference output dict (view1/view2 with idx,
        true_shape [, img, name, orig_size, transform]; pred1 pts3d/conf, pred2 pts3d_in_other_view/conf).
    config: `AlignConfig` (default: its defaults); `options` override its fields by name (mode, niter, shared_focal,
        optimize_pp, device, dtype (a name or a torch dtype), tol, stride, lr, metric_iter, global_step,
        memory_limit_bytes). Without a device the alignment runs on the CPU.
    known_K: (N,3,3), one 3x3, or {idx: 3x3}; `K_space`='orig' means original-image pixels mapped into the network
        crop with each image's transform, 'net' means network pixels. Known intrinsics fix the focal and the
        principal point of those images.
    known_c2w: {idx: 4x4} or (N,4,4) with NaN rows for unknown (OpenCV camera-to-world). Two or more known poses
        fix the metric scale (edge-scale normalisation is switched off).
    conf_thr: confidence threshold stored with the result (`rec.masks()` and `rec.pointcloud()` default to it).
    One image -> monocular result (identity pose); two images -> direct pair solution (no iterations).
    """
    try:
        cfg = (config or AlignConfig()).replace(**options)
    except ValueError as e:
        raise AlignError(str(e)) from None
    mode = cfg.mode
    if mode not in ("fast", "baseline"):
        raise AlignError(f"mode must be 'fast' or 'baseline', got {mode!r}")
    dtype = cfg.torch_dtype
    dev = torch.device(cfg.device or "cpu")
    t0 = time.perf_counter()
    preds = as_predictions(preds)
    # memory check before stacking anything
    N, n_pairs = preds.n_images, preds.n_edges
    H, W = (int(x) for x in preds.shapes.max(0))
    on_disk = preds.on_disk
    store_bytes = torch.empty((), dtype=preds.dtype if on_disk else dtype).element_size()   # (disk: the store's)
    if on_disk and mode != "fast":
        raise AlignError("predictions in a pair store on disk align in mode='fast' only; use --align.mode fast or "
                         "keep them in memory (--store float16)")
    need = estimate_memory(N, n_pairs, H, W, mode, store_bytes, on_disk)
    budget = cfg.memory_limit_bytes if cfg.memory_limit_bytes is not None else available_memory(dev)
    if budget is not None and need > budget:
        fixes = [_suggest_graph(N, budget, H, W, mode, store_bytes, on_disk)]
        if not on_disk:
            fixes.append("dtype=torch.float16")
            if mode == "fast" and estimate_memory(N, n_pairs, H, W, mode, store_bytes, True) <= budget:
                fixes.append("a pair store on disk (--store disk)")
        if mode != "fast":
            fixes.append("mode='fast'")
        raise AlignError(
            f"global alignment ({mode}) of {N} images / {n_pairs} pairs at {H}x{W} needs ~{need / 2**30:.1f} GiB but only "
            f"{budget / 2**30:.1f} GiB is available; use " + (", ".join(fixes[:-1]) + ", or " if len(fixes) > 1 else "")
            + fixes[-1])
    # a pair store on disk: the full-resolution maps are read chunk by chunk in every pass over the edges, so the
    # solve stops after the coarse phase and the full-resolution depth passes (no full-resolution polish)
    data = pair_data(preds, dev, dtype)
    ordered = preds.ordered
    del preds
    cons = _constraints(data, cfg.shared_focal, known_K, K_space, known_c2w, cfg.optimize_pp, dev)
    H, W = data.HW
    coarse = data.coarse(auto_stride(H, W) if cfg.stride is None else max(1, int(cfg.stride)))
    niter = cfg.niter
    # fast mode with known poses: pose-free solve first (the scale gauge is well conditioned there), then snap to
    # the known poses; with >= 2 known poses a short metric phase follows (the metric objective drifts towards
    # shrinking the scene, so it is capped by `metric_iter`, and runs without the joint step, whose per-image depth
    # scales would follow that drift)
    free = dataclasses.replace(cons, pose_mask=None, known_c2w=None)
    # wrong pairs: rejected by consensus over the pose graph before the solve (their weights zeroed)
    rob = cfg.robust
    robust = rob.enabled and N > 2
    rejected = np.zeros(data.n_edges, bool)
    readmitted = np.zeros(data.n_edges, bool)
    if robust:
        rejected, report = detect_outliers(coarse, rob, ordered)
        saved = drop_edges([data, coarse], rejected)
        candidates = rejected & ~(report["scale_residual"] > rob.scale_tol)    # rotation-flagged only
    st = mst_init(data, free if (mode == "fast" and N > 2) else cons, verbose, coarse=coarse,
                  global_step=mode == "fast" and cfg.global_step)
    stats: dict[str, Any] = dict(iterations=0)
    if N > 2:
        if mode == "fast":
            # while robust rounds may still change the edges, the solves stop after their coarse phase; the
            # full-resolution phase (several passes over every full-size map) runs once, at the end
            fast_opts = dict(max_iter=100 if niter is None else niter, tol=cfg.tol, coarse=coarse, verbose=verbose,
                             polish_iter=0 if cons.pose_mask is not None or data.on_disk else POLISH_ITER,
                             full_res=not robust)
            stats = solve_fast(data, st, free, **fast_opts)
            last = stats

            def resume() -> None:      # the solve continued after the edge set changed
                nonlocal last
                last = solve_fast(data, st, free, **fast_opts)
                stats["iterations"] += last["iterations"]
                stats["polish_iterations"] = stats.get("polish_iterations", 0) + last["polish_iterations"]

            for _ in range(rob.rounds if robust else 0):
                # and by misfit after it: edges that the solution cannot explain are dropped, the solve resumed
                new = misfit_outliers(coarse, st, rejected, rob.misfit_factor, sub_depth(st.depth, coarse.stride))
                if not new.any():
                    break
                rejected |= new
                drop_edges([data, coarse], new)
                resume()
            if robust and rob.readmit and candidates.any():
                # consensus rejections that the solved poses explain come back (`robust.readmit_edges`), on trial:
                # those the poses re-solved with them still cannot explain (trial_deg, reject_factor) go out again:
                # a wrong edge pulls the poses when re-admitted, yet stays off them
                back, _res = readmit_edges(st.c2w, data.edges_np, report["Rrel"], report["weight"], rejected,
                                           candidates, rob.readmit_deg, rob.reject_factor)
                if back.any():
                    rejected &= ~back
                    restore_edges(saved, back)
                    resume()
                    kept, _res = readmit_edges(st.c2w, data.edges_np, report["Rrel"], report["weight"], rejected,
                                               back, rob.trial_deg, rob.reject_factor)
                    out = back & ~kept
                    if out.any():
                        rejected |= out
                        drop_edges([data, coarse], out)
                        resume()
                    readmitted = kept
            if last["full_res_pending"]:
                _fine, polish, _div = finish_full_res(data, st, free, last["eps"], polish_iter=fast_opts["polish_iter"],
                                                      diverged=last["diverged"], tol=cfg.tol, accel=last["accel"],
                                                      verbose=verbose)
                stats["polish_iterations"] = stats.get("polish_iterations", 0) + len(polish)
            if cons.pose_mask is not None:
                apply_known_poses(st, cons)
                fit_edges(coarse, st, irls_eps=None, depth=sub_depth(st.depth, coarse.stride))
                if not cons.normalize_scale:
                    s2 = solve_fast(data, st, cons, max_iter=cfg.metric_iter, tol=1e-3, coarse=coarse,
                                    verbose=verbose, warn_cap=False, joint=False)
                    stats["iterations"] += s2["iterations"]
        else:
            stats = solve_baseline(data, st, cons, niter=300 if niter is None else niter, lr=cfg.lr, verbose=verbose)
    if N == 1 and cons.pose_mask is None:
        # monocular: the world is the camera frame
        st.c2w = torch.eye(4, device=st.c2w.device)[None].clone()
        fit_edges(data, st, irls_eps=None)
    loss = objective(data, st)
    rec = _to_reconstruction(data, st, cons)
    rec.meta.update(mode=mode if N > 2 else ("pair" if N == 2 else "monocular"), loss=float(loss),
                    iterations=int(stats.get("iterations", 0)),
                    polish_iterations=int(stats.get("polish_iterations", 0)),
                    converged=int(bool(stats.get("converged", True))),
                    seconds=float(time.perf_counter() - t0),
                    conf_thr=float(conf_thr), edges_rejected=int(rejected.sum()),
                    edges_readmitted=int(readmitted.sum()), ordered=int(bool(ordered)),
                    rejected_edges=",".join(str(k) for k in np.nonzero(rejected)[0]))
    return rec


def _constraints(data: PairData, shared_focal: bool, known_K: Any, K_space: str, known_c2w: Any, optimize_pp: bool,
                 dev: torch.device) -> Constraints:
    N = data.n_images
    cons = Constraints(shared_focal=bool(shared_focal), optimize_pp=bool(optimize_pp))
    if known_K is not None:
        Ks, mask = _known_K(known_K, N, data.transforms, K_space)
        if mask.any():
            if shared_focal and not mask.all():
                raise AlignError("shared_focal with known_K for only some images is ambiguous; give K for all or none")
            f = np.where(mask[:, None], np.stack([Ks[:, 0, 0], Ks[:, 1, 1]], -1), 1.0)
            pp = np.stack([data.shapes[:, 1] / 2, data.shapes[:, 0] / 2], -1).astype(np.float64)
            pp[mask] = Ks[mask][:, :2, 2]
            cons.known_focal = torch.as_tensor(f, device=dev)
            cons.focal_mask = torch.as_tensor(mask, device=dev)
            cons.known_pp = torch.as_tensor(pp, device=dev, dtype=torch.float32)
            cons.pp_mask = torch.as_tensor(mask, device=dev)
            cons.known_K_net = Ks
    if known_c2w is not None:
        P, mask = _known_c2w(known_c2w, N)
        if mask.any():
            cons.known_c2w = torch.as_tensor(np.where(mask[:, None, None], P, np.eye(4)), device=dev,
                                             dtype=torch.float32)
            cons.pose_mask = torch.as_tensor(mask, device=dev)
            cons.known_c2w_np = P
    return cons


@torch.no_grad()
def _to_reconstruction(data: PairData, st: State, cons: Constraints) -> Reconstruction:
    N = data.n_images
    H, W = data.HW
    # per-image confidence: max over the edges that predict the image
    conf = torch.ones(N, H, W, device=st.depth.device)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*index_reduce.*")
        for sl in edge_chunks(data):
            conf.index_reduce_(0, data.edges[sl, 0], data.conf(1, sl), "amax")
            conf.index_reduce_(0, data.edges[sl, 1], data.conf(2, sl), "amax")
    K = np.zeros((N, 3, 3))
    f = st.focal.double().cpu().numpy()
    pp = st.pp.double().cpu().numpy()
    K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = f, f, pp[:, 0], pp[:, 1], 1.0
    kn = getattr(cons, "known_K_net", None)
    if kn is not None:
        m = np.isfinite(kn).all((1, 2))
        K[m] = kn[m]
    c2w = st.c2w.double().cpu().numpy()
    c2w[:, 3] = [0, 0, 0, 1]
    U, _, Vt = np.linalg.svd(c2w[:, :3, :3])       # re-orthonormalise in float64 (the solver runs in float32)
    c2w[:, :3, :3] = U @ Vt
    kp = getattr(cons, "known_c2w_np", None)
    if kp is not None:
        m = np.isfinite(kp).all((1, 2))
        c2w[m] = kp[m]
    depths, confs = [], []
    for k in range(N):
        h, w = data.shapes[k]
        depths.append(st.depth[k, :h, :w].float().cpu().numpy())
        confs.append(conf[k, :h, :w].float().cpu().numpy())
    return Reconstruction(names=data.names, orig_sizes=data.orig_sizes, transforms=data.transforms, c2w=c2w, K=K,
                          depths=depths, confs=confs, rgbs=data.rgbs)
