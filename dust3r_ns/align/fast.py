"""Fast mode: block-coordinate IRLS on the objective (`problem`), coarse-to-fine, with acceleration.

Each outer iteration (closed-form or tiny dense solves, vectorised over edges and images):
  1. edges: weighted Umeyama per edge to the current world points (IRLS weights log-conf / distance), all edges
     solved jointly under the scale gauge, then cameras (pose, focal), depth-map scales and edges moved together by
     one Gauss-Newton step on the same weighted quadratic (`edges.fit_edges_joint`, `joint.joint_step`),
  2. edge-scale normalisation (a no-op unless a gauged solve fell back),
  3. per-image target = IRLS-weighted mean of the transformed pair point maps (`depths.accumulate_targets`),
  4. per-image camera (rotation, centre, log-focal[, pp]) by Levenberg-Marquardt on point-to-ray distances with the
     depth eliminated (`cameras.fit_cameras`), then 5. closed-form depth (`depths.depth_from_targets`),
  6. acceleration of the camera/depth iterates: Anderson mixing of the last maps (`Anderson`; dense graphs) or
     over-relaxation (the last update once more, `_extrapolate`; sparse graphs), undone when it raises the loss.
The iterations run on point maps sub-sampled by `stride` (auto: >= 3072 pixels per image, stride <= 4) until the loss
falls by less than `tol` (relative) per iteration over the last `window` iterations; then at full resolution every
pixel's depth is the log-conf weighted median of its edges' depth candidates (`depths.median_depth`), refined by IRLS
passes kept only while they lower the loss, and `polish_iter` iterations of the whole loop at full resolution move
the cameras from the sub-sample's optimum to the full objective's. A warning is issued at the iteration cap.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from dust3r_ns.geometry import so3_exp, so3_log

from .cameras import fit_cameras
from .data import PairData
from .depths import accumulate_targets, depth_from_targets, median_depth
from .edges import fit_edges, fit_edges_joint
from .problem import Constraints, State, normalize_edge_scales, sub_depth, world_points

EPS_REL = 1e-4   # IRLS distance floor relative to the median depth. At the optimum each pixel's depth sits on one
                 # edge's candidate (a weighted median along the ray): a larger floor caps that edge's weight and
                 # moves the fixed point off the optimum


POLISH_ITER = 5  # full-resolution iterations after the coarse phase (see solve_fast)


def auto_stride(H: int, W: int, target: int = 3072, max_stride: int = 4) -> int:
    """Largest power-of-two stride (at most `max_stride`: sparser grids move the coarse optimum away from the
    full-resolution one) leaving at least `target` pixels per image."""
    s = 1
    while 2 * s <= max_stride and (H // (2 * s)) * (W // (2 * s)) >= target:
        s *= 2
    return s


def _irls_eps(depth: torch.Tensor) -> float:
    pos = depth[depth > 0]
    return EPS_REL * float(pos.median()) if pos.numel() else EPS_REL


@torch.no_grad()
def solve_fast(data: PairData, st: State, cons: Constraints, max_iter: int = 100, tol: float = 1e-5,
               stride: int | None = None, coarse: PairData | None = None, cam_iters: int = 1, fine_iter: int = 8,
               polish_iter: int = POLISH_ITER, warn_cap: bool = True, extrapolate: float = 1.0, accel: str = "auto",
               aa_m: int = 5, window: int = 5, joint: bool = True, full_res: bool = True, verbose: bool = False
               ) -> dict:
    """Run the fast solver in place on `st` (full-resolution state). Returns stats (iterations, losses, times).

    coarse: the sub-sampled data (built from `stride` when not given; stride None = auto).
    fine_iter: IRLS depth passes at full resolution after the coarse phase (cameras fixed).
    polish_iter: then that many iterations of the whole block loop at full resolution (0: none): the coarse grid's
        optimum is a pixel sub-sample's; the polish moves the cameras towards the full objective's.
    accel: 'anderson' (Anderson mixing, memory `aa_m`), 'extrapolate' (over-relaxation by `extrapolate`), 'none'
        (plain block-coordinate descent) or 'auto' (Anderson when the graph holds at least half of all ordered pairs,
        else over-relaxation). An accelerated iterate that raises the loss is replaced by the plain one (Anderson
        restarts its history; over-relaxation stops after three such misses).
    window: the early stop compares the loss with the one `window` iterations back.
    joint: the joint camera/edge Gauss-Newton step after each edge fit (False: the plain block loop).
    warn_cap: warn when the coarse phase stops at `max_iter` without converging (RuntimeWarning).
    full_res: False stops after the coarse phase, with `st.depth` the coarse depths replicated onto the full grid
        (so `sub_depth(st.depth, stride)` gives them back exactly and a later solve resumes from them);
        `finish_full_res` then runs the full-resolution phase once (`global_align` does so while its robust rounds
        may still change the edges: each full-resolution phase costs several passes over every full-size map).
    """
    H, W = data.HW
    if coarse is None:
        stride = auto_stride(H, W) if stride is None else max(1, int(stride))
        coarse = data.coarse(stride)
    s = coarse.stride // data.stride
    if accel not in ("auto", "anderson", "extrapolate", "none"):
        raise ValueError(f"accel must be 'auto', 'anderson', 'extrapolate' or 'none', got {accel!r}")
    if accel == "auto":
        N = data.n_images
        accel = "anderson" if data.n_edges >= 0.5 * N * (N - 1) else "extrapolate"
    t0 = time.perf_counter()
    dc = sub_depth(st.depth, s)
    eps = _irls_eps(dc)   # IRLS distance floor: EPS_REL x median depth, following the scale normalisation below
    opts = dict(cons=cons, tol=tol, cam_iters=cam_iters, accel=accel, extrapolate=extrapolate, aa_m=aa_m,
                window=window, verbose=verbose, joint=joint)
    cur, eps, run = _descend(coarse, st.snapshot(depth=dc), eps, max_iter=max_iter, label=f"align fast (1/{s} res)",
                             **opts)
    st.assign(cur, depth=False)
    losses = run["losses"]
    t_coarse = time.perf_counter() - t0
    final: list[float] = []
    polish: list[float] = []
    if s > 1 and not full_res:
        st.depth = replicate_depth(cur.depth, s, H, W)
    elif s > 1:
        final, polish, diverged = finish_full_res(data, st, cons, eps, fine_iter, polish_iter, run["diverged"],
                                                  **{k: v for k, v in opts.items() if k != "cons"})
        run["diverged"] = diverged
    else:
        st.depth = cur.depth
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
                t_coarse=t_coarse, t_total=time.perf_counter() - t0, eps=eps, accel=accel,
                full_res_pending=s > 1 and not full_res)


def replicate_depth(depth: torch.Tensor, s: int, H: int, W: int) -> torch.Tensor:
    """Coarse depth maps [N, h, w] (pixel (r, c) = full pixel (s r, s c)) replicated onto the full grid [N, H, W]
    (each s x s block takes its corner's value): `sub_depth` of the result is `depth` again."""
    return depth.repeat_interleave(s, 1).repeat_interleave(s, 2)[:, :H, :W].contiguous()


@torch.no_grad()
def finish_full_res(data: PairData, st: State, cons: Constraints, eps: float, fine_iter: int = 8,
                    polish_iter: int = POLISH_ITER, diverged: bool = False, tol: float = 1e-5, cam_iters: int = 1,
                    accel: str = "extrapolate", extrapolate: float = 1.0, aa_m: int = 5, window: int = 5,
                    verbose: bool = False, joint: bool = True) -> tuple[list[float], list[float], bool]:
    """The full-resolution phase after a coarse solve, in place on `st` (cameras and edges from the coarse grid):
    every pixel's depth is the log-conf weighted median of its edges' depth candidates (robust to outliers), refined
    by IRLS passes of the closed-form depth kept only while they lower the loss; then (unless `diverged`)
    `polish_iter` iterations of the whole loop at full resolution. Returns (depth-pass losses, polish losses,
    diverged)."""
    final: list[float] = []
    polish: list[float] = []
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
    if polish_iter > 0 and not diverged:
        cur, eps, prun = _descend(data, st.snapshot(depth=depth), eps, cons, max_iter=polish_iter, tol=tol,
                                  cam_iters=cam_iters, accel=accel, extrapolate=extrapolate, aa_m=aa_m,
                                  window=window, verbose=verbose, label="align fast (polish)", joint=joint)
        st.assign(cur, depth=False)
        depth = cur.depth
        polish = prun["losses"]
        diverged = prun["diverged"]   # (the polish went back to its best iterate: warn as for the coarse)
    st.depth = depth
    return final, polish, diverged


def _descend(pd: PairData, cur: State, eps: float, cons: Constraints, max_iter: int, tol: float, cam_iters: int,
             accel: str, extrapolate: float, aa_m: int, window: int, verbose: bool, label: str, joint: bool = True
             ) -> tuple[State, float, dict]:
    """The block loop on the grid of `pd`, from `cur` (its depth maps on that grid). Returns the final state (it may
    share tensors with `cur`, whose own fields are left at an intermediate iterate), the IRLS floor (both follow the
    scale normalisation) and the run's record (losses, converged, diverged)."""
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=max_iter, desc=label, leave=False)
    losses: list[float] = []
    converged = diverged = False
    best_loss, best, best_eps = math.inf, cur.snapshot(), eps   # (the start: untouched until the first clone)
    plain: State | None = None      # the unaccelerated iterate, while an accelerated one is on trial
    fails = 0
    beta = extrapolate if accel == "extrapolate" else 0.0

    def edges(st: State, eps: float) -> float:
        """Edge fit (and joint step) on `st` in place; returns the loss before it."""
        if joint:
            loss, st.depth = fit_edges_joint(pd, st, eps, st.depth, cons)
            return loss
        return fit_edges(pd, st, irls_eps=eps, gauge=cons.normalize_scale)

    aa = Anderson(aa_m) if accel == "anderson" and aa_m > 0 else None
    for it in range(max_iter):
        loss = edges(cur, eps)
        if plain is not None and loss > losses[-1]:
            # the accelerated cameras/depths did worse than the previous iterate: take the plain step instead
            # (Anderson restarts its history; over-relaxation stops after three such misses)
            cur = plain
            fails += 1
            beta = beta if fails < 3 else 0.0
            if aa is not None:
                aa.reset()
            loss = edges(cur, eps)
        plain = None
        losses.append(loss)
        if not math.isfinite(loss) or loss > 10 * best_loss:
            # diverging (degenerate predictions): go back to the best state seen and stop
            cur, eps = best, best_eps
            diverged = True
            break
        if loss < best_loss:
            best_loss, best, best_eps = loss, cur.clone(), eps
        c = normalize_edge_scales(cur, cons, scale_depth=False)   # out of place below: `best` may share the maps
        cur.depth = cur.depth * c
        eps = eps * c
        X = world_points(cur.c2w, cur.focal, cur.pp, cur.depth, pd.stride)
        Y, A = accumulate_targets(pd, cur, X, eps)
        del X
        before = cur.snapshot()
        c2w, focal, pp = fit_cameras(Y, A, cur.c2w, cur.focal, cur.pp, cons, stride=pd.stride, iters=cam_iters)
        depth = depth_from_targets(Y, A, c2w, focal, pp, cur.depth, pd.stride, floor=0.1 * eps)
        cur = cur.snapshot(c2w=c2w, focal=focal, pp=pp, depth=depth)
        del Y, A
        if aa is not None:
            nxt = aa.step(before, cur)
            if nxt is not None:
                plain = cur
                cur = _keep_known(nxt, plain, cons, 0.1 * eps)
        elif beta > 0 and it > 0:
            plain = cur
            cur = _extrapolate(cur, before, beta, cons)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.5g}")
        if _stalled(losses, tol, window) or loss <= 0.1 * eps:  # noise-free: 1e-5 x median depth
            converged = True
            break
    if not diverged and losses:
        # leave the edges fitted to the final cameras/depths, and the final accelerated iterate checked as above
        loss = edges(cur, eps)
        if plain is not None and loss > losses[-1]:
            cur = plain
            edges(cur, eps)
    if bar is not None:
        bar.close()
    return cur, eps, dict(losses=losses, converged=converged, diverged=diverged)


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



def _extrapolate(cur: State, before: State, beta: float, cons: Constraints) -> State:
    """Over-relaxed step: cameras (rotation on SO(3), centre, log-focal) and log-depths moved `beta` times further
    along their last update `before` -> `cur` (block-coordinate descent creeps along the coupled camera/edge/depth
    valleys); known poses stay put (fixed focals do not move: their ratio is 1). Returns a new state (edges and
    principal points shared with `cur`)."""
    c2w = cur.c2w.clone()
    R = cur.c2w[:, :3, :3]
    c2w[:, :3, :3] = R @ so3_exp(beta * so3_log(before.c2w[:, :3, :3].transpose(1, 2) @ R))
    c2w[:, :3, 3] += beta * (cur.c2w[:, :3, 3] - before.c2w[:, :3, 3])
    if cons.pose_mask is not None:
        c2w = torch.where(cons.pose_mask[:, None, None], cur.c2w, c2w)
    focal = cur.focal * (cur.focal / before.focal).clamp(0.5, 2.0) ** beta
    depth = cur.depth * (cur.depth / before.depth.clamp_min(1e-30)) ** beta
    return cur.snapshot(c2w=c2w, focal=focal, depth=depth)


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

    def _pack(self, st: State) -> torch.Tensor:
        om = so3_log(self.R0.transpose(1, 2) @ st.c2w[:, :3, :3])
        hw = st.depth[0].numel()
        return torch.cat([st.depth.clamp_min(1e-30).log().flatten() / math.sqrt(hw),
                          st.c2w[:, :3, 3].flatten() / self.scale, om.flatten(), st.focal.log(),
                          (st.pp / st.focal[:, None]).flatten()]).double()

    def _unpack(self, x: torch.Tensor, like: State) -> State:
        N = like.c2w.shape[0]
        nd = like.depth.numel()
        hw = like.depth[0].numel()
        x = x.to(like.depth.dtype)
        depth = (x[:nd] * math.sqrt(hw)).exp().reshape(like.depth.shape)
        C = x[nd:nd + 3 * N].reshape(N, 3) * self.scale
        om = x[nd + 3 * N:nd + 6 * N].reshape(N, 3)
        focal = x[nd + 6 * N:nd + 7 * N].exp()
        pp = x[nd + 7 * N:].reshape(N, 2) * focal[:, None]
        c2w = like.c2w.clone()
        c2w[:, :3, :3] = self.R0 @ so3_exp(om)
        c2w[:, :3, 3] = C
        return like.snapshot(c2w=c2w, focal=focal, pp=pp, depth=depth)

    def step(self, before: State, after: State) -> State | None:
        """Record x (`before`) and G(x) (`after`); return the accelerated iterate (edges shared with `after`) or
        None while the history is too short."""
        if self.R0 is None:
            self.R0 = before.c2w[:, :3, :3].clone()
            self.scale = max(float(before.depth.median()), 1e-12)
        x, g = self._pack(before), self._pack(after)
        f = g - x
        if self.last is not None:
            self.dX.append(g - self.last[0])
            self.dF.append(f - self.last[1])
            if len(self.dX) > self.m:
                self.dX.pop(0), self.dF.pop(0)
        self.last = (g, f)
        if not self.dF:
            return None
        dF = torch.stack(self.dF, 1)                                          # [n, k]
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


def _keep_known(new: State, plain: State, cons: Constraints, floor: float) -> State:
    """`new` with the known poses/focals/principal points of `plain` restored (and a shared focal made equal);
    depths kept above `floor`."""
    c2w, focal, pp = new.c2w, new.focal, new.pp
    if cons.pose_mask is not None:
        c2w = torch.where(cons.pose_mask[:, None, None], plain.c2w, c2w)
    if cons.focal_mask is not None:
        focal = torch.where(cons.focal_mask, plain.focal, focal)
    if cons.shared_focal:
        focal = focal.mean().expand_as(focal).clone()
    if not cons.optimize_pp:
        pp = plain.pp
    elif cons.pp_mask is not None:
        pp = torch.where(cons.pp_mask[:, None], plain.pp, pp)
    return new.snapshot(c2w=c2w, focal=focal, pp=pp, depth=new.depth.clamp_min(floor))
