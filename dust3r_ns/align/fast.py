"""Fast mode: block-coordinate IRLS on the reference objective, coarse-to-fine.

Each outer iteration (all closed-form or tiny dense solves, vectorised over edges and images):
  1. per-edge similarity by weighted Umeyama to the current world points (IRLS weights log-conf / distance), all
     edges solved jointly under the scale gauge (geometric mean of the edge scales fixed, `geometry.gauged_scales`),
     then cameras (pose, focal), depth-map scales and edges moved together by one Gauss-Newton step on the same
     weighted quadratic (`joint.joint_step`, from the moments of the same pass): the modes that alternating block
     fits close only slowly (a camera drifting with its edges' scales and rotations),
  2. edge-scale normalisation (a no-op unless a gauged solve fell back),
  3. per-image target = IRLS-weighted mean of the transformed pair point maps,
  4. per-image camera (rotation, centre, log-focal[, pp]) by Levenberg-Marquardt on point-to-ray distances with the
     depth eliminated, then 5. closed-form depth (closest point on each pixel ray), 6. acceleration of the
     camera/depth iterates: Anderson mixing of the last maps (`Anderson`; dense graphs) or over-relaxation (the last
     update once more; sparse graphs, where Anderson steps were mostly rejected), undone when it raises the loss.
The iterations run on point maps sub-sampled by `stride` (auto: >= 3072 pixels per image, stride <= 4) until the loss
falls by less than `tol` (relative) per iteration over the last 5 iterations; then at full resolution every pixel's
depth is the log-conf weighted median of its edges' depth candidates, refined by IRLS passes kept only while they
lower the loss, and `polish_iter` iterations of the whole loop at full resolution move the cameras from the
sub-sample's optimum to the full objective's. The hot loops read the point maps channels-first ((E,3,h*w):
`core.channels_first`), where the batched 3x3 products and norms run several times faster on CPUs.
Without the joint step, block-coordinate descent propagates corrections about one graph hop per iteration and long
chain-like graphs (swin on 64 images) depended on the start; `mst_init(global_step=True)` (align.averaging), cameras
averaged over all edges at once instead of chained along the spanning tree, still saves iterations there. A warning
is issued at the iteration cap.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .core import (Constraints, State, _chunks, apply_sim, apply_sim_cf, areas, channels_first,
                   depth_from_targets, dist_cf, fit_cameras, fit_edges, fit_edges_joint, normalize_edge_scales,
                   sub_depth, world_points)
from .data import PairData
from .geometry import pixel_grid, so3_exp


EPS_REL = 1e-4   # IRLS distance floor relative to the median depth. At the optimum each pixel's depth sits on one
                 # edge's candidate (a weighted median along the ray): a larger floor caps that edge's weight and
                 # moves the fixed point off the optimum (1e-3 cost ~30% in rotation accuracy on complete graphs)


POLISH_ITER = 5  # full-resolution iterations after the coarse phase (see solve_fast)


def auto_stride(H: int, W: int, target: int = 3072, max_stride: int = 4) -> int:
    """Largest power-of-two stride (at most `max_stride`) leaving at least `target` pixels per image.

    The cap: sparser grids move the coarse optimum away from the full-resolution one (N=8 at 384x512: ATE 0.195% of
    the camera spread at stride 8, 0.177% at stride 4, the reference schedule 0.184%)."""
    s = 1
    while 2 * s <= max_stride and (H // (2 * s)) * (W // (2 * s)) >= target:
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
    Xc = channels_first(X)                                                          # (N,3,M)
    Ysum = torch.zeros(N, 3, h * w, device=X.device, dtype=X.dtype)
    A = torch.zeros(N, h * w, device=X.device, dtype=X.dtype)
    area = areas(data) if loss_out is not None else (1.0, 1.0)
    loss = 0.0
    for sl in _chunks(data):
        e = data.edges[sl]
        b = e.shape[0]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            Yp = apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], channels_first(pts[sl]))
            wt = data.weights(side, sl).reshape(b, -1)
            dist = dist_cf(Xc[e[:, col]], Yp)
            if loss_out is not None:
                loss += float((wt * dist).sum()) / area[side - 1]
            wt = wt / dist.clamp_min_(eps)
            Ysum.index_add_(0, e[:, col], Yp.mul_(wt[:, None]))
            A.index_add_(0, e[:, col], wt)
    if loss_out is not None:
        loss_out.append(loss)
    Y = (Ysum / A.clamp_min(1e-30)[:, None]).reshape(N, 3, h, w).permute(0, 2, 3, 1).contiguous()
    return Y, A.reshape(N, h, w)


@torch.no_grad()
def solve_fast(data: PairData, st: State, cons: Constraints, max_iter: int = 100, tol: float = 1e-5,
               stride: int | None = None, coarse: PairData | None = None, cam_iters: int = 1, fine_iter: int = 8,
               polish_iter: int = POLISH_ITER, warn_cap: bool = True, extrapolate: float = 1.0, accel: str = "auto",
               aa_m: int = 5, window: int = 5, joint: bool = True, verbose: bool = False) -> dict:
    """Run the fast solver in place on `st` (full-resolution state). Returns stats (iterations, losses, times).

    coarse: the sub-sampled data (built from `stride` when not given; stride None = auto).
    fine_iter: IRLS depth passes at full resolution after the coarse phase (cameras fixed).
    polish_iter: then that many iterations of the whole block loop at full resolution (0: none): the coarse grid's
        optimum is a pixel sub-sample's; the polish moves the cameras towards the full objective's (N=8 at 384x512
        from stride 4: RRA mean 0.0129 -> 0.0127 deg, loss 1.4e-4 -> 4e-5 above the reference schedule's, for 5
        iterations; ~1 s of 5 at N=8, 96x128).
    accel: 'anderson' (Anderson mixing, memory `aa_m`), 'extrapolate' (over-relaxation by `extrapolate`), 'none'
        (plain block-coordinate descent) or 'auto' (Anderson when the graph holds at least half of all ordered pairs,
        else over-relaxation). An accelerated iterate that raises the loss is replaced by the plain one (Anderson
        restarts its history; over-relaxation stops after three such misses).
    window: the early stop compares the loss with the one `window` iterations back.
    joint: the joint camera/edge Gauss-Newton step after each edge fit (False: the plain block loop). Measured on the
        bench scenes (CPU, 96x128 unless said): N=8 43 -> 33 coarse iterations, N=32 30 -> 19 with ATE 0.1457% ->
        0.1431% (the reference schedule: 0.1432%), N=64 swin-3 53 -> 29 with ATE 0.81% -> 0.47% (reference 3.46%).
    """
    H, W = data.HW
    if coarse is None:
        stride = auto_stride(H, W) if stride is None else max(1, int(stride))
        coarse = data.coarse(stride)
    s = coarse.stride // data.stride
    if accel not in ("auto", "anderson", "extrapolate", "none"):
        raise ValueError(f"accel must be 'auto', 'anderson', 'extrapolate' or 'none', got {accel!r}")
    if accel == "auto":   # Anderson on dense graphs; on sparse ones its steps are mostly rejected (measured)
        N = data.n_images
        accel = "anderson" if data.n_edges >= 0.5 * N * (N - 1) else "extrapolate"
    t0 = time.perf_counter()
    dc = sub_depth(st.depth, s)
    eps = _irls_eps(dc)   # IRLS distance floor: EPS_REL x median depth, following the scale normalisation below
    opts = dict(cons=cons, tol=tol, cam_iters=cam_iters, accel=accel, extrapolate=extrapolate, aa_m=aa_m,
                window=window, verbose=verbose, joint=joint)
    dc, eps, run = _descend(coarse, st, dc, eps, max_iter=max_iter, label=f"align fast (1/{s} res)", **opts)
    losses = run["losses"]
    t_coarse = time.perf_counter() - t0
    final: list[float] = []
    polish: list[float] = []
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
        if polish_iter > 0 and not run["diverged"]:
            depth, eps, prun = _descend(data, st, depth, eps, max_iter=polish_iter, label="align fast (polish)",
                                        **opts)
            polish = prun["losses"]
            run["diverged"] = prun["diverged"]   # (the polish went back to its best iterate: warn as for the coarse)
        st.depth = depth
    else:
        st.depth = dc
    if run["diverged"]:
        import warnings

        warnings.warn("fast alignment diverged (the pair predictions disagree strongly); kept the best iterate",
                      RuntimeWarning, stacklevel=3)
    elif not run["converged"] and max_iter > 1 and warn_cap and not (_rate(losses, window) <= 10 * tol):
        # (within 10x of tol the iterate is as good as converged: no warning)
        import warnings

        warnings.warn(f"fast alignment stopped at its {max_iter}-iteration cap (relative loss change "
                      f"{_rate(losses, window):.1e} per iteration > 10 x tol {tol:.0e}); sparse, chain-like scene graphs (swin on long "
                      "sequences) converge slowly in this mode: raise niter or use mode='baseline'", RuntimeWarning,
                      stacklevel=3)
    return dict(iterations=len(losses), converged=run["converged"], diverged=run["diverged"], stride=s,
                coarse_losses=losses, fine_losses=final, polish_losses=polish, polish_iterations=len(polish),
                t_coarse=t_coarse, t_total=time.perf_counter() - t0)


def _descend(pd: PairData, st: State, dc: torch.Tensor, eps: float, cons: Constraints, max_iter: int, tol: float,
             cam_iters: int, accel: str, extrapolate: float, aa_m: int, window: int, verbose: bool, label: str,
             joint: bool = True) -> tuple[torch.Tensor, float, dict]:
    """The block loop on the grid of `pd` from the depths `dc` (same grid): updates the cameras and edges of `st`
    in place; returns the depths, the IRLS floor (both follow the scale normalisation) and the run's record
    (losses, converged, diverged)."""
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc=label, leave=False)
    losses: list[float] = []
    converged = diverged = False
    best_loss, best = math.inf, None
    plain, fails = None, 0
    beta = extrapolate if accel == "extrapolate" else 0.0

    def edges(dc: torch.Tensor, eps: float) -> tuple[float, torch.Tensor]:   # loss before, depths after
        if joint:
            return fit_edges_joint(pd, st, eps, dc, cons)
        return fit_edges(pd, st, irls_eps=eps, depth=dc, gauge=cons.normalize_scale), dc

    aa = Anderson(aa_m) if accel == "anderson" and aa_m > 0 else None
    for it in range(max_iter):
        loss, dc = edges(dc, eps)
        if plain is not None and loss > losses[-1]:
            # the accelerated cameras/depths did worse than the previous iterate: take the plain step instead
            # (Anderson restarts its history; over-relaxation stops after three such misses)
            (st.c2w, st.focal, st.pp, dc), (st.s, st.R, st.t) = plain
            fails += 1
            beta = beta if fails < 3 else 0.0
            if aa is not None:
                aa.reset()
            loss, dc = edges(dc, eps)
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
        c = normalize_edge_scales(st, cons, scale_depth=False)   # depths held here, on the loop's grid
        dc = dc * c
        eps = eps * c
        X = world_points(st.c2w, st.focal, st.pp, dc, pd.stride)
        Y, A = accumulate_targets(pd, st, X, eps)
        del X
        before = (st.c2w.clone(), st.focal.clone(), st.pp.clone(), dc)
        st.c2w, st.focal, st.pp = fit_cameras(Y, A, st.c2w, st.focal, st.pp, cons, stride=pd.stride, iters=cam_iters)
        dc = depth_from_targets(Y, A, st.c2w, st.focal, st.pp, dc, pd.stride, floor=0.1 * eps)
        del Y, A
        if aa is not None:
            nxt = aa.step(before, (st.c2w, st.focal, st.pp, dc))
            if nxt is not None:
                plain = (st.c2w, st.focal, st.pp, dc), (st.s, st.R, st.t)
                st.c2w, st.focal, st.pp, dc = _keep_known(nxt, plain[0], cons, 0.1 * eps)
        elif beta > 0 and it > 0:
            plain = (st.c2w, st.focal, st.pp, dc), (st.s, st.R, st.t)
            dc = _extrapolate(st, (before[0], before[1], before[3]), dc, beta, cons)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5g}")
        if _stalled(losses, tol, window) or loss <= 0.1 * eps:  # noise-free: 1e-5 x median depth
            converged = True
            break
    if not diverged and losses:
        # leave the edges fitted to the final cameras/depths, and the final accelerated iterate checked as above
        loss, dc = edges(dc, eps)
        if plain is not None and loss > losses[-1]:
            (st.c2w, st.focal, st.pp, dc), (st.s, st.R, st.t) = plain
            _, dc = edges(dc, eps)
    if bar is not None:
        bar.close()
    return dc, eps, dict(losses=losses, converged=converged, diverged=diverged)


def _stalled(losses: list[float], tol: float, window: int) -> bool:
    """Mean relative loss decrease over the last `window` iterations below `tol` (a window, as accelerated
    iterations alternate good and poor steps)."""
    return len(losses) > window and _rate(losses, window) <= tol


def _rate(losses: list[float], window: int) -> float:
    """Mean relative loss decrease per iteration over the last `window` iterations (NaN when too few)."""
    if len(losses) < 2:
        return float("nan")
    k = min(window, len(losses) - 1)
    a, b = losses[-k - 1], losses[-1]
    return (a - b) / max(abs(a), 1e-30) / k if math.isfinite(a) else float("nan")


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


class Anderson:
    """Anderson acceleration (type II, memory `m`) of the block-coordinate map x -> G(x) on the cameras and depths.

    x stacks log-depths (weighted 1/sqrt(pixels per image), so a depth map counts like one camera unknown), camera
    centres over the scene scale, rotations as axis-angle relative to fixed references, log-focals and principal
    points over the focal. The next iterate is the combination of the last maps G(x_i) whose residuals G(x_i) - x_i
    combine to the least norm (a tiny regularised least squares in float64 on the host).
    """

    def __init__(self, m: int = 5, reg: float = 1e-8):
        self.m, self.reg = m, reg
        self.R0: torch.Tensor | None = None
        self.scale = 1.0
        self.dX: list[torch.Tensor] = []
        self.dF: list[torch.Tensor] = []
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset(self) -> None:
        self.dX, self.dF, self.last = [], [], None

    def _pack(self, c2w, focal, pp, depth) -> torch.Tensor:
        R = c2w[:, :3, :3]
        om = _log_rotation_step(self.R0.transpose(1, 2) @ R)
        hw = depth[0].numel()
        return torch.cat([depth.clamp_min(1e-30).log().flatten() / math.sqrt(hw), c2w[:, :3, 3].flatten() / self.scale,
                          om.flatten(), focal.log(), (pp / focal[:, None]).flatten()]).double()

    def _unpack(self, x: torch.Tensor, like: tuple) -> tuple:
        c2w0, focal0, pp0, depth0 = like
        N = c2w0.shape[0]
        nd = depth0.numel()
        hw = depth0[0].numel()
        x = x.to(depth0.dtype)
        depth = (x[:nd] * math.sqrt(hw)).exp().reshape(depth0.shape)
        C = x[nd:nd + 3 * N].reshape(N, 3) * self.scale
        om = x[nd + 3 * N:nd + 6 * N].reshape(N, 3)
        focal = x[nd + 6 * N:nd + 7 * N].exp()
        pp = x[nd + 7 * N:].reshape(N, 2) * focal[:, None]
        c2w = c2w0.clone()
        c2w[:, :3, :3] = self.R0 @ so3_exp(om)
        c2w[:, :3, 3] = C
        return c2w, focal, pp, depth

    def step(self, before: tuple, after: tuple) -> tuple | None:
        """Record x (`before`) and G(x) (`after`), each (c2w, focal, pp, depth); return the accelerated iterate
        (same layout) or None while the history is too short."""
        if self.R0 is None:
            self.R0 = before[0][:, :3, :3].clone()
            self.scale = max(float(before[3].median()), 1e-12)
        x, g = self._pack(*before), self._pack(*after)
        f = g - x
        if self.last is not None:
            self.dX.append(g - self.last[0])
            self.dF.append(f - self.last[1])
            if len(self.dX) > self.m:
                self.dX.pop(0), self.dF.pop(0)
        self.last = (g, f)
        if not self.dF:
            return None
        dF = torch.stack(self.dF, 1)                                          # (n, k)
        Mt = (dF.T @ dF).cpu().numpy()
        b = (dF.T @ f).cpu().numpy()
        Mt += self.reg * max(float(np.trace(Mt)), 1e-300) * np.eye(len(b))
        try:
            gam = np.linalg.solve(Mt, b)
        except np.linalg.LinAlgError:
            gam = None
        if gam is None or not np.all(np.isfinite(gam)):   # degenerate history: start it again
            self.reset()
            return None
        xn = g - torch.stack(self.dX, 1) @ torch.as_tensor(gam, device=g.device)
        return self._unpack(xn, after)


def _keep_known(new: tuple, plain: tuple, cons: Constraints, floor: float) -> tuple:
    """Known poses/focals/principal points of `plain` restored in `new` (both (c2w, focal, pp, depth));
    depths kept above `floor`."""
    c2w, focal, pp, depth = new
    if cons.pose_mask is not None:
        c2w = torch.where(cons.pose_mask[:, None, None], plain[0], c2w)
    if cons.focal_mask is not None:
        focal = torch.where(cons.focal_mask, plain[1], focal)
    if cons.shared_focal:
        focal = focal.mean().expand_as(focal).clone()
    if not cons.optimize_pp:
        pp = plain[2]
    elif cons.pp_mask is not None:
        pp = torch.where(cons.pp_mask[:, None], plain[2], pp)
    return c2w, focal, pp, depth.clamp_min(floor)
