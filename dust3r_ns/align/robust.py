"""Outlier edges: pair predictions that are confidently wrong (a network's wrong pairs are structured: both
directions of a pair, and neighbouring wrong pairs, agree with each other, so local checks such as two-way or
triangle consistency pass them), found by global consensus over the pose graph and dropped before the solve.

Each ordered edge e = (i, j) gives a relative rotation Rrel_e (R_j ~ R_i Rrel_e, `averaging.relative_similarities`
of the images' own point maps) and a prior weight w_e (the pair's confidence score; for frames of one sequence, times
`sequence_weight` on the edges between neighbouring frames, `sequence_weights`). Consensus search
(`consensus_rotations`): spanning trees of the graph, the first of maximum weight and the others of weights perturbed
by log-normal noise (w_e exp(sigma g_e), g_e ~ N(0, 1)), each chained into rotations and refined by robust averaging
(IRLS on the Lie algebra with Geman-McClure weights w_e s^2 / (s^2 + r_e^2)^2, r_e = |log(R_i Rrel_e R_j^T)|); the
hypothesis with the largest weighted inlier mass sum_e w_e [r_e < inlier_deg] wins. Rejection (`reject_edges`):
edges whose residual against the winning rotations exceeds max(reject_deg_min, reject_factor x the weighted
median residual) are dropped, strongest offenders first, unless dropping one would disconnect the graph or leave an
image without an edge in which it is the first view (the solver reads each image's own points from such an edge).
Relative log-scales get the same treatment (their consensus from the rotation inliers, robust least squares over
the graph): an edge whose scale disagrees by more than a factor exp(scale_tol) is dropped as well.
Re-admission (`readmit_edges`, after the solve): the consensus is chained through the graph and follows the
strongest (short, confident) pairs, so systematic errors of those pairs bend it, and good long pairs, the ones
that hold a long sequence rigid, can disagree with it beyond the threshold. The solve weighs all kept pairs by
their points, so each edge rejected for its rotation is checked again against the solved camera rotations and
comes back (the solve resumed) when its residual is within max(readmit_deg, reject_factor x the weighted median
residual of the kept edges). That is on trial: a wrong edge re-admitted pulls the poses towards itself, yet the
poses re-solved with it still disagree with it, so each re-admitted edge whose residual against them exceeds
max(trial_deg, reject_factor x the weighted median) goes out again (the solve resumed once more).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from dust3r_ns.geometry import so3_exp, so3_log

from .averaging import _laplacian_solve, _robust_ls, relative_similarities
from .config import RobustConfig
from .data import PairData
from .problem import State, apply_sim_cf, channels_first, dist_cf, edge_sides, world_points


class DisjointSets:
    """Union-find over 0..N-1 (path halving)."""

    def __init__(self, N: int) -> None:
        self.parent = list(range(N))
        self.groups = N

    def find(self, a: int) -> int:
        parent = self.parent
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(self, a: int, b: int) -> bool:
        """Join the sets of a and b; False when they were one already."""
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra == rb:
            return False
        self.parent[ra] = rb
        self.groups -= 1
        return True


def spanning_tree(N: int, i: np.ndarray, j: np.ndarray, weight: np.ndarray) -> list[int]:
    """Edge indices of a maximum-weight spanning forest (Kruskal; self-edges skipped)."""
    sets = DisjointSets(N)
    tree = []
    for k in np.argsort(-weight, kind="stable"):
        if sets.union(int(i[k]), int(j[k])):
            tree.append(int(k))
            if len(tree) == N - 1:
                break
    return tree


def chain_rotations(N: int, i: np.ndarray, j: np.ndarray, Rrel: torch.Tensor, tree: list[int]) -> torch.Tensor:
    """Rotations [N, 3, 3] (float64) chained along the tree edges from image i[tree[0]] (R = I there):
    R_j = R_i Rrel_e, R_i = R_j Rrel_e^T. Images the tree does not reach keep the identity."""
    R = torch.eye(3, dtype=torch.float64).repeat(N, 1, 1)
    if not tree:
        return R
    adj: dict[int, list[tuple[int, int, bool]]] = {}
    for k in tree:
        a, b = int(i[k]), int(j[k])
        adj.setdefault(a, []).append((b, k, True))
        adj.setdefault(b, []).append((a, k, False))
    root = int(i[tree[0]])
    seen = {root}
    stack = [root]
    while stack:
        a = stack.pop()
        for b, k, fwd in adj.get(a, []):
            if b not in seen:
                R[b] = R[a] @ (Rrel[k] if fwd else Rrel[k].T)
                seen.add(b)
                stack.append(b)
    return R


def rotation_residuals(R: torch.Tensor, i: np.ndarray, j: np.ndarray, Rrel: torch.Tensor) -> torch.Tensor:
    """|log(R_i Rrel_e R_j^T)| per edge (radians)."""
    return so3_log(R[i] @ Rrel @ R[j].transpose(1, 2)).norm(dim=-1)


def robust_rotations(i: np.ndarray, j: np.ndarray, Rrel: torch.Tensor, w: torch.Tensor, R0: torch.Tensor,
                     scale: float, iters: int = 20) -> torch.Tensor:
    """Rotations [N, 3, 3] with R_j ~ R_i Rrel_e from R0: IRLS Lie-algebraic averaging with Geman-McClure weights
    w_e s^2 / (s^2 + r_e^2)^2 (s = `scale`, radians): edges far beyond s lose their pull, so a start near the
    consensus stays there. Stops when the largest increment is below 1e-9 rad."""
    R = R0.clone()
    N = R.shape[0]
    ti, tj = torch.as_tensor(i), torch.as_tensor(j)
    for _ in range(iters):
        r = so3_log(R[ti] @ Rrel @ R[tj].transpose(1, 2))
        s2 = scale * scale
        wt = w * (s2 / (s2 + r.square().sum(-1))) ** 2
        om = _laplacian_solve(ti, tj, wt.clamp_min(1e-12 * float(w.max())), r, N, 0)
        R = so3_exp(om) @ R
        if float(om.norm(dim=-1).max()) < 1e-9:
            break
    return R


def consensus_rotations(N: int, i: np.ndarray, j: np.ndarray, Rrel: torch.Tensor, w: torch.Tensor,
                        inlier_deg: float, hypotheses: int, seed: int = 0, sigma: float = 1.0,
                        short_deg: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotations [N, 3, 3], residuals [E] radians) of the best-supported hypothesis (module doc).

    Hypothesis 0 is the maximum-weight spanning tree; the others perturb the weights log-normally (`sigma`), seeded
    by `seed` (deterministic). Support: sum of w over edges with residual below `inlier_deg` after refinement."""
    thr = math.radians(inlier_deg)
    rng = np.random.default_rng(seed)
    logw = np.log(w.numpy().clip(1e-12))
    if short_deg > 0:   # prefer short predicted baselines: pairs with much overlap are the reliable ones
        logw = logw - torch.rad2deg(so3_log(Rrel).norm(dim=-1)).numpy() / short_deg
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    seen: set[tuple[int, ...]] = set()
    for h in range(max(1, hypotheses)):
        pert = logw if h == 0 else logw + sigma * rng.standard_normal(len(logw))
        tree = spanning_tree(N, i, j, pert)
        key = tuple(sorted(tree))
        if key in seen:
            continue
        seen.add(key)
        R = chain_rotations(N, i, j, Rrel, tree)
        for sc in (8 * thr, 4 * thr, 2 * thr, thr):     # graduated non-convexity: wide basin first
            R = robust_rotations(i, j, Rrel, w, R, scale=sc, iters=5)
        r = rotation_residuals(R, i, j, Rrel)
        support = float((w * (r < thr)).sum())
        if best is None or support > best[0] + 1e-9:
            best = (support, R, r)
    assert best is not None
    R = robust_rotations(i, j, Rrel, w, best[1], scale=thr / 2, iters=30)
    return R, rotation_residuals(R, i, j, Rrel)


def weighted_median(x: torch.Tensor, w: torch.Tensor) -> float:
    """Weighted median of x (1-D) with non-negative weights w."""
    o = torch.argsort(x)
    c = torch.cumsum(w[o].double(), 0)
    k = int(torch.searchsorted(c, 0.5 * c[-1]))
    return float(x[o][min(k, len(x) - 1)])


def keep_structure(N: int, edges: np.ndarray, drop_order: list[int]) -> np.ndarray:
    """(E,) bool kept-edge mask after dropping the edges of `drop_order` in turn, each only if the rest stays
    connected and every image keeps an edge in which it is the first view.

    Incremental, O(E + drops x the search for another path): an edge goes when its first view keeps another
    first-view edge and, unless another kept edge joins the same two images, a breadth-first search from one end
    reaches the other without it (`_ok` on every remainder gives the same mask, in O(drops x E))."""
    edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
    keep = np.ones(len(edges), bool)
    if N <= 1:
        keep[list(drop_order)] = False
        return keep
    if not _ok(N, edges):       # dropping edges cannot mend a graph that already fails: nothing goes
        return keep
    first = np.bincount(edges[:, 0], minlength=N)
    adj: list[dict[int, int]] = [{} for _ in range(N)]      # kept edges per unordered neighbour (multiplicity)
    for a, b in edges.tolist():
        if a != b:
            adj[a][b] = adj[a].get(b, 0) + 1
            adj[b][a] = adj[b].get(a, 0) + 1
    for k in drop_order:
        if not keep[k]:
            continue
        a, b = int(edges[k, 0]), int(edges[k, 1])
        if first[a] <= 1:
            continue
        if a != b:
            if adj[a][b] == 1 and not _reaches(adj, a, b):
                continue
            for x, y in ((a, b), (b, a)):
                adj[x][y] -= 1
                if adj[x][y] == 0:
                    del adj[x][y]
        first[a] -= 1
        keep[k] = False
    return keep


def _reaches(adj: list[dict[int, int]], a: int, b: int) -> bool:
    """True when b is reachable from a in the graph `adj` without the (single) edge between a and b."""
    seen = {a}
    frontier = [n for n in adj[a] if n != b]
    seen.update(frontier)
    while frontier:
        nxt = []
        for n in frontier:
            for m in adj[n]:
                if m == b:
                    return True
                if m not in seen:
                    seen.add(m)
                    nxt.append(m)
        frontier = nxt
    return False


def _ok(N: int, e: np.ndarray) -> bool:
    if N <= 1:
        return True
    first = np.zeros(N, bool)
    first[e[:, 0]] = True
    if not first.all():
        return False
    sets = DisjointSets(N)
    for a, b in e:
        sets.union(a, b)
    return sets.groups == 1


def reject_edges(N: int, edges: np.ndarray, Rrel: torch.Tensor, rho: torch.Tensor, w: torch.Tensor,
                 inlier_deg: float = 15.0, reject_deg_min: float = 10.0, reject_factor: float = 4.0,
                 scale_tol: float = 0.5, hypotheses: int = 32, seed: int = 0) -> tuple[np.ndarray, dict]:
    """(E,) bool mask of the edges to keep and a report (residual thresholds, rotation residuals in degrees).

    edges [E, 2]; Rrel [E, 3, 3], rho [E] the edges' relative rotations and scales (j's own frame into i's);
    w [E] prior weights (> 0). Self-edges and edges with non-finite estimates are never rejected here (they carry no
    relative pose). See the module doc for the rule."""
    E = len(edges)
    ok = (edges[:, 0] != edges[:, 1]) & torch.isfinite(rho).numpy() & (rho > 0).numpy() \
        & torch.isfinite(Rrel).all(-1).all(-1).numpy()
    idx = np.nonzero(ok)[0]
    report: dict = dict(rot_residual_deg=np.full(E, np.nan), rot_threshold_deg=float("nan"),
                        scale_residual=np.full(E, np.nan))
    if len(idx) < N:       # a tree or less: nothing is redundant
        return np.ones(E, bool), report
    i, j = edges[idx, 0], edges[idx, 1]
    Rr = Rrel[idx].double()
    wk = w[idx].double().clamp_min(1e-12)
    wk = wk / wk.mean()
    R, r = consensus_rotations(N, i, j, Rr, wk, inlier_deg, hypotheses, seed)
    r_deg = torch.rad2deg(r)
    thr = max(reject_deg_min, reject_factor * weighted_median(r_deg, wk))
    # relative log-scales: robust consensus over the rotation inliers
    inl = r_deg <= thr
    ti, tj = torch.as_tensor(i), torch.as_tensor(j)
    lrho = torch.log(rho[idx].double())
    sres = torch.full((len(idx),), float("nan"), dtype=torch.float64)
    if _ok(N, np.stack([i, j], 1)[inl.numpy()]):
        x = _robust_ls(ti[inl], tj[inl], wk[inl], lrho[inl, None], N, 0)[:, 0]
        sres = (x[tj] - x[ti] - lrho).abs()
    bad = (r_deg > thr) | (sres > scale_tol)
    sev = torch.maximum(r_deg / thr, torch.nan_to_num(sres / scale_tol, nan=0.0))
    order = [int(idx[k]) for k in torch.argsort(-sev).tolist() if bool(bad[k])]
    keep = keep_structure(N, edges, order)
    report["rot_residual_deg"][idx] = r_deg.numpy()
    report["scale_residual"][idx] = sres.numpy()
    report["rot_threshold_deg"] = thr
    return keep, report


# ------------------------------------------------------------------------------------------------ in the solver
def own_maps(data: PairData, score: torch.Tensor) -> torch.Tensor:
    """[N, h, w, 3] each image's points in its own camera frame: pts1 of its best-scored edge as first view
    (images that are never a first view get their first edge's pts1 slot, which the caller must not use)."""
    e = data.edges_np
    sc = score.cpu().numpy()
    first = np.full(data.n_images, -1)
    for k, (i, _j) in enumerate(e):
        if first[i] < 0 or sc[k] > sc[first[i]]:
            first[i] = k
    return data.pts1[torch.as_tensor(np.where(first >= 0, first, 0), device=data.pts1.device)].float()


def prior_weights(score: torch.Tensor, gamma: float) -> torch.Tensor:
    """Edge weights of the consensus: (score / median score)^gamma (a sharpened confidence: wrong pairs are about as
    confident as right ones, only slightly less, so their weight is only a tie-breaker)."""
    s = score.double().cpu().clamp_min(1e-12)
    return (s / s.median()) ** gamma


@torch.no_grad()
def edge_residuals(data: PairData, st: State, depth: torch.Tensor | None = None) -> torch.Tensor:
    """[E] per edge: the weighted mean distance of its transformed point maps to the world points, over the weighted
    mean depth of its images (a scale-free misfit; zero-weight edges get NaN)."""
    depth = st.depth if depth is None else depth
    X = channels_first(world_points(st.c2w, st.focal, st.pp, depth, data.stride))
    dist = torch.zeros(data.n_edges, dtype=torch.float64)
    wsum = torch.zeros_like(dist)
    dsum = torch.zeros_like(dist)
    z = depth.reshape(depth.shape[0], -1)
    for sl, _side, img, p, w in edge_sides(data):
        d = dist_cf(X[img], apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], p))
        dist[sl] += (w * d).sum(1).double().cpu()
        dsum[sl] += (w * z[img]).sum(1).double().cpu()
        wsum[sl] += w.sum(1).double().cpu()
    return torch.where(wsum > 0, dist / dsum.clamp_min(1e-30), torch.full_like(dist, float("nan")))


Saved = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def drop_edges(datas: list[PairData], rejected: np.ndarray) -> Saved:
    """Zero the weights of the rejected edges in place in each `PairData` (shared stacks are zeroed once). Returns
    what `restore_edges` needs to give them back: (stack, edge indices, their weights before) per stack."""
    idx = torch.as_tensor(np.nonzero(rejected)[0])
    saved: Saved = []
    if not len(idx):
        return saved
    seen: set[int] = set()
    for d in datas:
        for t in (d.w1, d.w2):
            if id(t) not in seen:
                seen.add(id(t))
                k = idx.to(t.device)
                saved.append((t, k, t[k].clone()))
                t[k] = 0
    return saved


def restore_edges(saved: Saved, back: np.ndarray) -> None:
    """Give the edges of the (E,) bool mask `back` their saved weights again (in place; see `drop_edges`)."""
    for t, k, w in saved:
        sel = torch.as_tensor(back, device=k.device)[k]
        if bool(sel.any()):
            t[k[sel]] = w[sel]


SEQUENCE_RULE = "index gap, loop seam"
"""How the sequence prior finds neighbouring frames (`sequence_weights`); cache keys of input that may be ordered
name it, so a changed rule does not serve reconstructions made under the old one."""


def closes_loop(edges: np.ndarray, n_images: int, window: int) -> bool:
    """Whether the pair graph links the two ends of a sequence of `n_images` frames as neighbours: every pair of a
    first and a last frame that would be at most `window` apart around a loop, (a, N - 1 - b) with a + b < window,
    is an edge (in either order), in a graph that pairs at most half of all the frame pairs (a dense graph, e.g.
    complete, pairs everything and says nothing about the ends). A cyclic swin/logwin graph closes the sequence; a
    retrieval graph does when the video's ends look alike (it came back to its start); an open path's ends are not
    content neighbours."""
    if n_images <= 2 * window + 1:
        return False
    have = {(min(int(i), int(j)), max(int(i), int(j))) for i, j in np.asarray(edges).reshape(-1, 2) if i != j}
    if len(have) > n_images * (n_images - 1) // 4:
        return False
    return all((a, n_images - 1 - b) in have for a in range(window) for b in range(window - a))


def sequence_weights(edges: np.ndarray, window: int, weight: float, n_images: int | None = None) -> torch.Tensor:
    """[E] float64 factors of the consensus weights for frames of one sequence: `weight` on the edges (i, j) with
    0 < gap(i, j) <= `window`, 1 elsewhere; gap = |i - j|, or min(|i - j|, N - |i - j|) when the graph closes the
    sequence into a loop (`closes_loop`, given `n_images` = N). Neighbouring frames of a video overlap whatever they
    show, while a pair network's wrong pairs link distant frames (the far side of a loop seen mirrored): on a
    rendered 350-degree loop of 50 frames those outweigh the sequence, and the consensus picks a folded loop, unless
    the sequence counts more; when the loop closes, the pairs across its seam are neighbours too."""
    edges = np.asarray(edges).reshape(-1, 2)
    gap = np.abs(edges[:, 0] - edges[:, 1])
    if n_images is not None and closes_loop(edges, n_images, window):
        gap = np.minimum(gap, n_images - gap)
    return torch.as_tensor(np.where((gap > 0) & (gap <= window), float(weight), 1.0))


def detect_outliers(data: PairData, cfg: RobustConfig, ordered: bool = False) -> tuple[np.ndarray, dict]:
    """(E,) bool mask of the edges to reject before the solve, and the report of `reject_edges`, from the relative
    similarities of the images' own point maps (on `data`'s grid, typically the coarse one). `ordered`: the images
    are frames of one sequence, whose neighbouring edges get `sequence_weights`."""
    from .init import edge_scores

    score = edge_scores(data)
    rho, Rrel, _t = relative_similarities(data, own_maps(data, score))
    w = prior_weights(score, cfg.gamma)
    if ordered:
        w = w * sequence_weights(data.edges_np, cfg.sequence_window, cfg.sequence_weight, data.n_images)
    keep, rep = reject_edges(data.n_images, data.edges_np, Rrel, rho, w,
                             inlier_deg=cfg.inlier_deg, reject_deg_min=cfg.reject_deg, reject_factor=cfg.reject_factor,
                             scale_tol=cfg.scale_tol, hypotheses=cfg.hypotheses, seed=cfg.seed)
    rep.update(Rrel=Rrel.double().cpu(), weight=w)
    return ~keep, rep


def readmit_edges(c2w: torch.Tensor, edges: np.ndarray, Rrel: torch.Tensor, w: torch.Tensor, rejected: np.ndarray,
                  candidates: np.ndarray, readmit_deg: float, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """((E,) bool edges to re-admit, (E,) rotation residuals in degrees) against solved poses.

    c2w [N, 4, 4] the solved cameras; Rrel [E, 3, 3] the edges' relative rotations (j's own frame into i's, the
    camera frames up to scale); w [E] prior weights. Each edge's residual is |log(R_i Rrel_e R_j^T)| with R the
    solved camera rotations. A candidate (rejected before the solve) comes back when its residual is below
    max(readmit_deg, factor x the weighted median residual of the kept edges): the consensus that flagged it was
    chained through the graph and may be bent by systematic errors of many short pairs, which the solve, holding
    all kept edges at once, spreads out; edges that are truly wrong stay far off the solved poses."""
    E = len(edges)
    res = np.full(E, np.nan)
    back = np.zeros(E, bool)
    ok = (edges[:, 0] != edges[:, 1]) & torch.isfinite(Rrel).all(-1).all(-1).numpy()
    if not ok.any():
        return back, res
    idx = np.nonzero(ok)[0]
    R = c2w[:, :3, :3].detach().double().cpu()
    r = torch.rad2deg(rotation_residuals(R, edges[idx, 0], edges[idx, 1], Rrel[idx].double()))
    res[idx] = r.numpy()
    kept = ~rejected[idx]
    if not kept.any():
        return back, res
    kt = torch.as_tensor(kept)
    thr = max(readmit_deg, factor * weighted_median(r[kt], w[torch.as_tensor(idx)][kt].double()))
    back[idx] = candidates[idx] & (res[idx] < thr)
    return back, res


def misfit_outliers(data: PairData, st: State, rejected: np.ndarray, factor: float,
                    depth: torch.Tensor | None = None) -> np.ndarray:
    """(E,) bool: edges not yet rejected whose misfit (`edge_residuals`) exceeds `factor` x the median misfit of
    the kept edges, strongest first, as far as the graph structure allows (`keep_structure`)."""
    res = edge_residuals(data, st, depth).numpy()
    live = ~rejected & np.isfinite(res)
    if live.sum() < 2:
        return np.zeros_like(rejected)
    thr = factor * float(np.median(res[live]))
    cand = [int(k) for k in np.argsort(-np.nan_to_num(res, nan=0.0)) if live[k] and res[k] > thr]
    keep = keep_structure(data.n_images, data.edges_np, [int(k) for k in np.nonzero(rejected)[0]] + cand)
    return ~keep & ~rejected
