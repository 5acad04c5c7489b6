"""Fast mode: block-coordinate IRLS on the reference objective, coarse-to-fine.

Each outer iteration (all closed-form or tiny dense solves, vectorised over edges and images):
  1. per-edge similarity by weighted Umeyama to the current world points (IRLS weights log-conf / distance), all
     edges solved jointly under the scale gauge (geometric mean of the edge scales fixed, `geometry.gauged_scales`),
  2. edge-scale normalisation (a no-op unless a gauged solve fell back),
  3. per-image target = IRLS-weighted mean of the transformed pair point maps,
  4. per-image camera (rotation, centre, log-focal[, pp]) by Levenberg-Marquardt on point-to-ray distances with the
     depth eliminated, then 5. closed-form depth (closest point on each pixel ray), 6. over-relaxation: cameras and
     depths move once more by their last update (undone when that raises the loss).
The iterations run on point maps sub-sampled by `stride` (auto: >= 3072 pixels per image); then at full resolution
every pixel's depth is the log-conf weighted median of its edges' depth candidates, refined by IRLS passes kept only
while they lower the loss. Stops early when the relative loss change falls below `tol`.
Block-coordinate descent propagates corrections one graph hop per iteration, so on long chain-like graphs (swin on
64 images) it relies on its start: `mst_init(global_step=True)` (align.averaging) gives it cameras averaged over
all edges at once instead of chained along the spanning tree. A warning is issued at the iteration cap.
"""

from __future__ import annotations

import math
import time

import torch

from .core import (BASE_SCALE, Constraints, State, _chunks, apply_sim, areas, depth_from_targets, fit_cameras,
                   fit_edges, sub_depth, world_points)
from .data import PairData
from .geometry import pixel_grid, so3_exp


EPS_REL = 1e-4   # IRLS distance floor relative to the median depth. At the optimum each pixel's depth sits on one
                 # edge's candidate (a weighted median along the ray): a larger floor caps that edge's weight and
                 # moves the fixed point off the optimum (1e-3 cost ~30% in rotation accuracy on complete graphs)


def auto_stride(H: int, W: int, target: int = 3072) -> int:
    """Largest power-of-two stride leaving at least `target` pixels per image."""
    s = 1
    while (H // (2 * s)) * (W // (2 * s)) >= target:
        s *= 2
    return s


def _irls_eps(depth: torch.Tensor) -> float:
    pos = depth[depth > 0]
    return EPS_REL * float(pos.median()) if pos.numel() else EPS_REL


@torch.no_grad()
def accumulate_targets(data: PairData, st: State, X: torch.Tensor, eps: float, loss_out: list | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """IRLS-weighted mean of the edges' transformed point maps per image: Y (N,h,w,3), A (N,h,w) total weight.

    X: current world points on the data's grid (for the IRLS weights). loss_out: if given, the objective at X is
    appended (computed in the same pass).
    """
    N, h, w, _ = X.shape
    Ysum = torch.zeros(N, h * w * 3, device=X.device, dtype=X.dtype)
    A = torch.zeros(N, h * w, device=X.device, dtype=X.dtype)
    area = areas(data) if loss_out is not None else (1.0, 1.0)
    loss = 0.0
    for sl in _chunks(data):
        e = data.edges[sl]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            Yp = apply_sim(st.s[sl], st.R[sl], st.t[sl], pts[sl])
            wt = data.weights(side, sl)
            dist = (X[e[:, col]] - Yp).norm(dim=-1)
            if loss_out is not None:
                loss += float((wt * dist).sum()) / area[side - 1]
            wt = wt / dist.clamp_min_(eps)
            b = wt.shape[0]
            Ysum.index_add_(0, e[:, col], (Yp * wt[..., None]).reshape(b, -1))
            A.index_add_(0, e[:, col], wt.reshape(b, -1))
    if loss_out is not None:
        loss_out.append(loss)
    Y = Ysum.reshape(N, h, w, 3) / A.clamp_min(1e-30).reshape(N, h, w, 1)
    return Y, A.reshape(N, h, w)


@torch.no_grad()
def solve_fast(data: PairData, st: State, cons: Constraints, max_iter: int = 100, tol: float = 1e-5,
               stride: int | None = None, coarse: PairData | None = None, cam_iters: int = 1, fine_iter: int = 8,
               warn_cap: bool = True, extrapolate: float = 1.0, verbose: bool = False) -> dict:
    """Run the fast solver in place on `st` (full-resolution state). Returns stats (iterations, losses, times).

    coarse: the sub-sampled data (built from `stride` when not given; stride None = auto).
    extrapolate: over-relaxation factor of the camera/depth updates (0: plain block-coordinate descent); an
        extrapolated iterate that raises the loss is replaced by the plain one, and after three such misses the run
        continues without extrapolation.
    """
    H, W = data.HW
    if coarse is None:
        stride = auto_stride(H, W) if stride is None else max(1, int(stride))
        coarse = data.coarse(stride)
    s = coarse.stride // data.stride
    t0 = time.perf_counter()
    prev = math.inf
    n_it = 0
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc=f"align fast (1/{s} res)", leave=False)
    losses: list[float] = []
    converged = False
    dc = sub_depth(st.depth, s)
    eps = _irls_eps(dc)   # IRLS distance floor: EPS_REL x median depth, following the scale normalisation below
    best_loss, best = math.inf, None
    diverged = False
    plain, fails = None, 0
    beta = extrapolate
    for it in range(max_iter):
        n_it = it + 1
        loss = fit_edges(coarse, st, irls_eps=eps, depth=dc, gauge=cons.normalize_scale)
        if plain is not None and loss > losses[-1]:
            # the extrapolated cameras/depths did worse than the previous iterate: take the plain step instead
            # (extrapolation stops after three such misses)
            st.c2w, st.focal, dc = plain
            st.s, st.R, st.t = edges
            fails += 1
            beta = beta if fails < 3 else 0.0
            loss = fit_edges(coarse, st, irls_eps=eps, depth=dc, gauge=cons.normalize_scale)
        plain = None
        losses.append(loss)
        if not math.isfinite(loss) or loss > 10 * best_loss:
            # diverging (degenerate predictions): go back to the best state seen and stop
            st.c2w, st.focal, st.pp, st.s, st.R, st.t, dc, eps = best
            diverged = True
            break
        if loss < best_loss:
            best_loss = loss
            best = (st.c2w.clone(), st.focal.clone(), st.pp.clone(), st.s.clone(), st.R.clone(), st.t.clone(),
                    dc.clone(), eps)
        c = _normalize(st, cons)
        dc = dc * c
        eps = eps * c
        X = world_points(st.c2w, st.focal, st.pp, dc, coarse.stride)
        Y, A = accumulate_targets(coarse, st, X, eps)
        before = (st.c2w.clone(), st.focal.clone(), dc)
        st.c2w, st.focal, st.pp = fit_cameras(Y, A, st.c2w, st.focal, st.pp, cons, stride=coarse.stride,
                                              iters=cam_iters)
        dc = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, dc, coarse.stride, floor=0.1 * eps)
        if beta > 0 and it > 0:
            plain, edges = (st.c2w, st.focal, dc), (st.s, st.R, st.t)
            dc = _extrapolate(st, before, dc, beta, cons)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5g}")
        if (math.isfinite(prev) and abs(prev - loss) <= tol * abs(prev)) or loss <= 0.1 * eps:  # noise-free: 1e-5 x median depth
            converged = True
            break
        prev = loss
    t_coarse = time.perf_counter() - t0
    final: list[float] = []
    if s > 1:
        # full resolution, cameras and edges fixed: start from the per-pixel weighted median of the edges' depth
        # candidates (robust to outliers), then IRLS passes of the closed-form depth until the loss settles
        depth = median_depth(data, st, floor=0.1 * eps)
        prevf, prev_depth = math.inf, depth
        for k in range(fine_iter):   # IRLS passes, kept only while they lower the loss
            fl: list[float] = []
            X = world_points(st.c2w, st.focal, st.pp, depth, data.stride)
            Y, A = accumulate_targets(data, st, X, eps, loss_out=fl)
            del X
            final.append(fl[0])
            if fl[0] >= prevf:
                depth = prev_depth
                break
            prev_depth, prevf = depth, fl[0]
            depth = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, depth, data.stride, floor=0.1 * eps)
            del Y, A
            if math.isfinite(prevf) and k > 0 and abs(final[-2] - fl[0]) <= 10 * tol * abs(final[-2]):
                break
        st.depth = depth
    else:
        st.depth = dc
    if bar is not None:
        bar.close()
    if diverged:
        import warnings

        warnings.warn("fast alignment diverged (the pair predictions disagree strongly); kept the best iterate",
                      RuntimeWarning, stacklevel=3)
    elif not converged and max_iter > 1 and warn_cap and not (rel_last(losses) <= 10 * tol):
        # (within 10x of tol the iterate is as good as converged: no warning)
        import warnings

        warnings.warn(f"fast alignment stopped at its {max_iter}-iteration cap (relative loss change "
                      f"{rel_last(losses):.1e} > 10 x tol {tol:.0e}); sparse, chain-like scene graphs (swin on long "
                      "sequences) converge slowly in this mode: raise niter or use mode='baseline'", RuntimeWarning,
                      stacklevel=3)
    return dict(iterations=n_it, converged=converged, diverged=diverged, stride=s, coarse_losses=losses, fine_losses=final, t_coarse=t_coarse, t_total=time.perf_counter() - t0)


def rel_last(losses: list[float]) -> float:
    """Relative change of the last two losses (NaN with fewer than two)."""
    return abs(losses[-2] - losses[-1]) / max(abs(losses[-2]), 1e-30) if len(losses) > 1 else float("nan")


@torch.no_grad()
def median_depth(data: PairData, st: State, floor: float, max_elems: int | None = None) -> torch.Tensor:
    """Per pixel, the log-conf weighted median of the depths (along the pixel's ray) of the edges' transformed
    predictions of that image: a robust one-shot estimate of the depth minimising the L2-norm loss.

    Vectorised over images: each image's candidates (one per edge side that shows it) are padded to the largest
    count K (depth +inf, weight 0) and sorted together; images are taken in chunks of at most `max_elems` K*H*W
    (default: 1M on CUDA, where each chunk costs kernel launches, and one image per chunk on CPUs, where only the
    memory counts).
    """
    N = data.n_images
    H, W = data.HW
    dev = st.depth.device
    slots: list[list[tuple[int, int]]] = [[] for _ in range(N)]     # per image: (edge, side) of its candidates
    for k, (i, j) in enumerate(data.edges_np.tolist()):
        slots[i].append((k, 1))
        slots[j].append((k, 2))
    K = max(len(x) for x in slots)
    u, v = pixel_grid(H * data.stride, W * data.stride, dev, torch.float32, data.stride)
    u, v = u[:H, :W], v[:H, :W]
    same_grid = st.depth.shape[1:] == (H, W)
    out = torch.empty(N, H, W, device=dev)
    if max_elems is None:
        max_elems = (1 << 20) if dev.type == "cuda" else 1
    step = max(1, max_elems // max(K * H * W, 1))
    for a in range(0, N, step):
        imgs = range(a, min(N, a + step))
        d = torch.full((len(imgs), K, H * W), math.inf, device=dev)
        w = torch.zeros(len(imgs), K, H * W, device=dev)
        for side, pts in ((1, data.pts1), (2, data.pts2)):
            rows, cols, ks = [], [], []
            for r, n in enumerate(imgs):
                for c, (k, sd) in enumerate(slots[n]):
                    if sd == side:
                        rows.append(r), cols.append(c), ks.append(k)
            if not ks:
                continue
            n_t = torch.tensor([imgs[r] for r in rows], device=dev)
            k_t = torch.tensor(ks, device=dev)
            Yp = apply_sim(st.s[k_t], st.R[k_t], st.t[k_t], pts[k_t])                          # (m,H,W,3) world
            Z = torch.einsum("mhwi,mij->mhwj", Yp - st.c2w[n_t, None, None, :3, 3], st.c2w[n_t, :3, :3])
            rx = (u - st.pp[n_t, 0, None, None]) / st.focal[n_t, None, None]
            ry = (v - st.pp[n_t, 1, None, None]) / st.focal[n_t, None, None]
            cand = (rx * Z[..., 0] + ry * Z[..., 1] + Z[..., 2]) / (rx * rx + ry * ry + 1)
            ri, ci = torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)
            d[ri, ci] = cand.flatten(1)
            w[ri, ci] = data.weights(side, k_t).flatten(1)
        d, order = d.sort(1)
        cw = w.gather(1, order).cumsum(1)
        idx = (cw < 0.5 * cw[:, -1:]).sum(1, keepdim=True).clamp_max(K - 1)
        med = d.gather(1, idx)[:, 0]                                                            # (b,H*W)
        if same_grid:      # pixels no candidate weighs (padding): keep the current depth
            med = torch.where(cw[:, -1] > 0, med, st.depth[a:a + len(imgs)].flatten(1))
        out[a:a + len(imgs)] = med.reshape(-1, H, W).clamp_min(floor)
    return out


def _extrapolate(st: State, before: tuple, depth: torch.Tensor, beta: float, cons: Constraints) -> torch.Tensor:
    """Over-relaxed step: move cameras (rotation on SO(3), centre, log-focal) and log-depths `beta` times further
    along their last update (block-coordinate descent creeps along the coupled camera/edge/depth valleys). Updates
    `st` in place (new tensors) and returns the extrapolated depth."""
    c0, f0, d0 = before
    c2w = st.c2w.clone()
    R = st.c2w[:, :3, :3]
    c2w[:, :3, :3] = R @ so3_exp(beta * _log_rotation_step(c0[:, :3, :3].transpose(1, 2) @ R))
    c2w[:, :3, 3] += beta * (st.c2w[:, :3, 3] - c0[:, :3, 3])
    if cons.pose_mask is not None:      # known poses stay put
        c2w = torch.where(cons.pose_mask[:, None, None], st.c2w, c2w)
    st.c2w = c2w
    st.focal = st.focal * (st.focal / f0).clamp(0.5, 2.0) ** beta   # fixed focals do not move: their ratio is 1
    return depth * (depth / d0.clamp_min(1e-30)) ** beta


def _log_rotation_step(R: torch.Tensor) -> torch.Tensor:
    """Axis-angle (N,3) of rotations (N,3,3) of angle below pi: atan2 of the skew part's norm and the trace (a few
    kernels, against the quaternion route's ~100; the axis loses precision only near pi, where a step never is)."""
    w = 0.5 * torch.stack([R[:, 2, 1] - R[:, 1, 2], R[:, 0, 2] - R[:, 2, 0], R[:, 1, 0] - R[:, 0, 1]], -1)
    sin = w.norm(dim=-1, keepdim=True)
    cos = 0.5 * (R.diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True) - 1)
    return w * (torch.atan2(sin, cos) / sin.clamp_min(1e-30)).where(sin > 1e-12, torch.ones_like(sin))


def _normalize(st: State, cons: Constraints) -> float:
    """Edge-scale normalisation on the cameras/edges; returns the factor for depth maps held outside `st`."""
    if not cons.normalize_scale:
        return 1.0
    c = BASE_SCALE / float(torch.exp(torch.log(st.s.clamp_min(1e-30)).mean()))
    st.s *= c
    st.t *= c
    st.c2w[:, :3, 3] *= c
    return c
