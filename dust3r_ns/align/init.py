"""Initialisation: a maximum-spanning-tree chaining of the pair predictions into one world, then per-image
cameras, focals and depth maps, optionally refined by pose-graph averaging over all edges (`averaging`).

Edges are scored by mean(conf1) x mean(conf2) (`edge_scores`); starting from the best edge, the best edge joining
a placed image to an unplaced one carries the new image's points into the world by the weighted Umeyama similarity
of the shared image's two point maps. Each image's camera is then the similarity from its own point map (pts1 of
its best edge as first view) to its world points, its focal a Weiszfeld fit (`pinhole.estimate_focal`) and its
depth the scaled own map's z; the edges finally get their similarities to these world points (`edges.fit_edges`).
"""

from __future__ import annotations

import heapq

import numpy as np
import torch

from dust3r_ns.geometry import umeyama

from .averaging import pose_graph_average
from .cameras import fit_cameras
from .data import AlignError, PairData
from .depths import depth_from_targets
from .edges import fit_edges
from .pinhole import estimate_focal
from .problem import Constraints, State, apply_known_poses, edge_chunks, normalize_edge_scales, sub_depth


def edge_scores(data: PairData) -> torch.Tensor:
    """Per ordered edge: mean(conf1) * mean(conf2) over valid pixels (reference pair score)."""
    valid = data.valid().float()
    e = data.edges
    out = []
    for sl in edge_chunks(data):
        v1, v2 = valid[e[sl, 0]], valid[e[sl, 1]]
        m1 = (data.conf(1, sl) * v1).sum((1, 2)) / v1.sum((1, 2))
        m2 = (data.conf(2, sl) * v2).sum((1, 2)) / v2.sum((1, 2))
        out.append(m1 * m2)
    return torch.cat(out)


def mst_init(data: PairData, cons: Constraints, verbose: bool = False, coarse: PairData | None = None,
             global_step: bool = False) -> State:
    """The initial `State` on the grid of `data` (module doc); known intrinsics/poses of `cons` are applied and the
    edge scales normalised.

    coarse: optional sub-sampled copy of `data` used for the pass over all edges (scores, initial similarities).
    global_step: replace the tree's cameras by rotation/scale/translation averaging over all edges
        (`averaging.pose_graph_average`; needs N > 2 and every image the first view of some edge).
    Images that are never a first view get their camera by the point-to-ray fit to their world points.
    """
    coarse = data if coarse is None else coarse
    N, E = data.n_images, data.n_edges
    H, W = data.HW
    dev = data.pts1.device
    edges = data.edges.cpu().numpy()
    score = edge_scores(coarse).cpu().numpy()
    # best direction per unordered pair
    best: dict[tuple[int, int], int] = {}
    for k, (i, j) in enumerate(edges):
        if i == j:
            continue
        key = (min(i, j), max(i, j))
        if key not in best or score[k] > score[best[key]]:
            best[key] = k
    Xw = torch.empty(N, H, W, 3, device=dev)                      # [N, H, W, 3] world points, filled in tree order
    conf = lambda k, side: data.conf(side, k)  # noqa: E731
    P = lambda k, side: (data.pts1 if side == 1 else data.pts2)[k].float()       # noqa: E731
    done = np.zeros(N, bool)
    if N == 1 or not best:
        if N > 1:
            raise AlignError(f"the pair graph has no pair between distinct images ({N} images); use make_pairs(...)")
        k = int(np.argmax(score))
        Xw[0] = P(k, 1)
        done[0] = True
    else:
        # Prim: a heap of the best edges leaving the placed images (-score, edge), stale entries skipped
        touching: list[list[int]] = [[] for _ in range(N)]
        for (a, b), k in best.items():
            touching[a].append(k)
            touching[b].append(k)
        k0 = max(best.values(), key=lambda k: score[k])
        heap: list[tuple[float, int]] = []

        def place(n: int) -> None:
            done[n] = True
            for k in touching[n]:
                heapq.heappush(heap, (-float(score[k]), k))

        i, j = edges[k0]
        Xw[i], Xw[j] = P(k0, 1), P(k0, 2)
        place(i), place(j)
        while not done.all():
            while heap and done[edges[heap[0][1], 0]] == done[edges[heap[0][1], 1]]:
                heapq.heappop(heap)
            if not heap:
                left = np.nonzero(~done)[0].tolist()
                got = np.nonzero(done)[0].tolist()
                raise AlignError(f"the pair graph is disconnected: images {left} share no pair with images {got}; "
                                 "add pairs between them (e.g. scene_graph='complete' or a larger 'swin-k' window)")
            k = heapq.heappop(heap)[1]
            i, j = edges[k]
            if done[i]:   # align pts1 (i's points) to the world, carry j's points
                s, R, t = umeyama(P(k, 1).reshape(1, -1, 3), Xw[i].reshape(1, -1, 3), conf(k, 1).reshape(1, -1))
                Xw[j] = s[0] * P(k, 2) @ R[0].T + t[0]
                place(j)
            else:
                s, R, t = umeyama(P(k, 2).reshape(1, -1, 3), Xw[j].reshape(1, -1, 3), conf(k, 2).reshape(1, -1))
                Xw[i] = s[0] * P(k, 1) @ R[0].T + t[0]
                place(i)
    shapes_t = torch.as_tensor(data.shapes, device=dev, dtype=torch.float32)
    pp = torch.stack([shapes_t[:, 1] / 2, shapes_t[:, 0] / 2], -1)
    if cons.known_pp is not None:
        pp = cons.known_pp.clone().float()
    # per image: best edge with the image as first view -> its own camera-frame points
    first = np.full(N, -1)
    for k, (i, j) in enumerate(edges):
        if first[i] < 0 or score[k] > score[first[i]]:
            first[i] = k
    c2w = torch.eye(4, device=dev).repeat(N, 1, 1)
    depth = torch.ones(N, H, W, device=dev)
    focal = torch.full((N,), 1.0, device=dev)
    has_first = torch.as_tensor(first >= 0, device=dev)
    idx_first = torch.as_tensor(np.where(first >= 0, first, 0), device=dev)
    pc = data.pts1[idx_first].float()                             # [N, H, W, 3] camera-frame points
    valid = data.valid()
    # per image: focal (Weiszfeld) and the similarity own points -> world points, in chunks of images (the fits
    # are per image: chunking bounds their temporaries, not their values)
    f_est, s, R, t = torch.empty(N, device=dev), torch.empty(N, device=dev), torch.empty(N, 3, 3, device=dev), \
        torch.empty(N, 3, device=dev)
    step = max(1, (1 << 22) // (H * W))
    for a in range(0, N, step):
        b = min(N, a + step)
        ks = idx_first[a:b]
        wc = data.weights(1, ks)
        f_est[a:b] = estimate_focal(pc[a:b], pp[a:b], (wc + 1e-6) * valid[a:b], shapes=shapes_t[a:b])
        s[a:b], R[a:b], t[a:b] = umeyama(pc[a:b].reshape(b - a, -1, 3), Xw[a:b].reshape(b - a, -1, 3),
                                         (data.conf(1, ks) * valid[a:b]).reshape(b - a, -1))
    if global_step and N > 2 and bool(has_first.all()):
        # replace the tree-chained cameras by the pose-graph averages over every edge
        lam, Rg, Cg = pose_graph_average(coarse, coarse.pts1[idx_first].float(), torch.as_tensor(score), R)
        s, R, t = (x.to(dev, torch.float32) for x in (lam, Rg, Cg))
    c2w[:, :3, :3], c2w[:, :3, 3] = R, t
    depth = torch.where(valid, s[:, None, None] * pc[..., 2], torch.ones_like(pc[..., 2]))
    focal = f_est
    if cons.shared_focal:
        focal = torch.exp(torch.log(focal).mean()).expand(N).clone()
    if cons.focal_mask is not None:
        focal = torch.where(cons.focal_mask, cons.known_focal.float().mean(-1), focal)
    if not bool(has_first.all()):
        # images never used as first view: fit their camera to their world points (point-to-ray LM)
        miss = ~has_first
        A = (data.valid().float() * miss[:, None, None].float())
        for kk in torch.nonzero(miss)[:, 0].tolist():
            # start at the camera of a neighbour
            nb = [int(i) for i, j in edges if j == kk and i != kk][0]
            c2w[kk] = c2w[nb]
            focal[kk] = focal[nb] if cons.focal_mask is None or not bool(cons.focal_mask[kk]) else focal[kk]
        c2w_fit, f_fit, _ = fit_cameras(Xw, A, c2w, focal, pp, Constraints(
            focal_mask=has_first | (cons.focal_mask if cons.focal_mask is not None else False)), iters=30)
        c2w = torch.where(miss[:, None, None], c2w_fit, c2w)
        focal = torch.where(miss, f_fit, focal)
        depth = depth_from_targets(Xw, A, c2w, focal, pp, depth)
    st = State(c2w=c2w, focal=focal, pp=pp, depth=depth, s=torch.ones(E, device=dev),
               R=torch.eye(3, device=dev).repeat(E, 1, 1), t=torch.zeros(E, 3, device=dev))
    apply_known_poses(st, cons)
    fit_edges(coarse, st, irls_eps=None, depth=sub_depth(st.depth, coarse.stride // data.stride))
    normalize_edge_scales(st, cons)
    return st

