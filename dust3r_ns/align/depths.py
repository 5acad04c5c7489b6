"""Depth block: per-image targets from the edges (`accumulate_targets`), the closed-form depths they give
(`depth_from_targets`), and the one-shot robust depths of the full-resolution phase (`median_depth`).

With cameras and edges fixed the objective separates over the pixels: pixel p of image n pays
sum_k w_k |X(d) - Y_k| over the edges' transformed predictions Y_k of that pixel, X(d) = C_n + d R_n r_p on the
pixel's ray. Its IRLS quadratic (weights w_k / max(|X - Y_k|, eps)) is that of the weighted mean target Y with total
weight A, minimised by the closest point to Y on the ray; the exact minimiser along the ray lies between the
candidates d_k (Y_k projected on the ray), near their weighted median.
"""

from __future__ import annotations

import math

import torch

from .data import PairData
from .pinhole import pixel_grid
from .problem import State, apply_sim, apply_sim_cf, areas, channels_first, dist_cf, edge_sides


@torch.no_grad()
def accumulate_targets(data: PairData, st: State, X: torch.Tensor, eps: float, loss_out: list | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """IRLS-weighted mean of the edges' transformed point maps per image: Y [N, h, w, 3] (channels-first storage),
    A [N, h, w] total weight
    (weights log-conf / max(|X - P_e(p)|, eps)).

    X: current world points [N, h, w, 3] on the data's grid (for the IRLS weights). loss_out: if given, the
    objective at X is appended (computed in the same pass).
    """
    N, h, w, _ = X.shape
    Xc = channels_first(X)                                                          # [N, 3, M]
    Ysum = torch.zeros(N, 3, h * w, device=X.device, dtype=X.dtype)
    A = torch.zeros(N, h * w, device=X.device, dtype=X.dtype)
    area = areas(data) if loss_out is not None else (1.0, 1.0)
    loss = 0.0
    for sl, side, img, p, wt in edge_sides(data):
        Yp = apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], p)
        dist = dist_cf(Xc[img], Yp)
        if loss_out is not None:
            loss += float((wt * dist).sum()) / area[side - 1]
        wt = wt / dist.clamp_min_(eps)
        Ysum.index_add_(0, img, Yp.mul_(wt[:, None]))
        A.index_add_(0, img, wt)
    if loss_out is not None:
        loss_out.append(loss)
    Y = Ysum.div_(A.clamp_min(1e-30)[:, None]).reshape(N, 3, h, w).permute(0, 2, 3, 1)   # (in place: no copy)
    return Y, A.reshape(N, h, w)



def depth_from_targets(Y: torch.Tensor, A: torch.Tensor, c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor,
                       prev: torch.Tensor, stride: int = 1, floor: float | None = None) -> torch.Tensor:
    """Closed-form depth per pixel: the point on the pixel's ray closest to the target Y (keeps prev where A = 0),
    d = r . Z / |r|^2 with Z = R^T (Y - C) and r = ((u - cx) / f, (v - cy) / f, 1).

    Y [N, h, w, 3], A [N, h, w] on a grid sub-sampled by `stride`. Depths are clamped to `floor` (default 1e-4 x
    the median previous depth) as the reference's log-depth keeps them positive.
    """
    N, h, w, _ = Y.shape
    u, v = pixel_grid(h * stride, w * stride, Y.device, Y.dtype, stride)
    u, v = u[:h, :w], v[:h, :w]
    Z = torch.einsum("nhwi,nij->nhwj", Y - c2w[:, None, None, :3, 3], c2w[:, :3, :3])
    rx = (u[None] - pp[:, 0, None, None]) / focal[:, None, None]
    ry = (v[None] - pp[:, 1, None, None]) / focal[:, None, None]
    d = (rx * Z[..., 0] + ry * Z[..., 1] + Z[..., 2]) / (rx * rx + ry * ry + 1)
    if floor is None:
        pos = prev[prev > 0]
        floor = 1e-4 * float(pos.median()) if pos.numel() else 1e-8
    return torch.where(A > 0, d.clamp_min(floor), prev)



@torch.no_grad()
def median_depth(data: PairData, st: State, floor: float, max_elems: int | None = None) -> torch.Tensor:
    """Per pixel, the log-conf weighted median of the depths (along the pixel's ray) of the edges' transformed
    predictions of that image: a robust one-shot estimate of the depth minimising the L2-norm loss.

    Vectorised over images: each image's candidates (one per edge side that shows it) are padded to the largest
    count K of its chunk (depth +inf, weight 0) and sorted together; images are taken in chunks of at most `max_elems` K*H*W
    (default: 1M on CUDA, where each chunk costs kernel launches, and one image per chunk on CPUs, where only the
    memory counts). Depths are clamped to `floor`; pixels without candidates keep st.depth when it is on the data's
    grid.
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
        K = max(1, max(len(slots[n]) for n in imgs))      # the chunk's own count: no padding to the graph's hubs
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
            Yp = apply_sim(st.s[k_t], st.R[k_t], st.t[k_t], pts[k_t])                          # [m, H, W, 3] world
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
        med = d.gather(1, idx)[:, 0]                                                            # [b, H*W]
        if same_grid:      # pixels no candidate weighs (padding): keep the current depth
            med = torch.where(cw[:, -1] > 0, med, st.depth[a:a + len(imgs)].flatten(1))
        out[a:a + len(imgs)] = med.reshape(-1, H, W).clamp_min(floor)
    return out

