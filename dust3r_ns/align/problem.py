"""The alignment problem: its unknowns (`State`), what is held fixed (`Constraints`) and the objective.

Unknowns: per image n a camera-to-world pose c2w_n (rotation R_n, centre C_n), a focal f_n, a principal point p_n
and a depth map D_n; per ordered edge e = (i, j) (one pair prediction) a similarity P_e(x) = s_e R_e x + t_e that
maps the pair's point maps, both in camera i's frame, into the world. Image n's world points are
    X_n(u, v) = R_n D_n(u, v) ((u - p_n,x) / f_n, (v - p_n,y) / f_n, 1) + C_n            (`world_points`).
Objective (the reference's):
    L = sum_e sum_px w1_e |X_i - P_e(pts1_e)| / area_1 + sum_e sum_px w2_e |X_j - P_e(pts2_e)| / area_2,
w = log(conf) (zero on padding), area_k = summed valid pixel counts of the edges' first / second images
(`areas`). The scale is a free gauge unless two or more poses are known: the edge scales are then held at a
geometric mean of `BASE_SCALE` (`normalize_edge_scales`).

`objective` evaluates L; the solvers' passes over the edges (`edge_sides`) also read L on the way: the edge fits
(`edges.edge_moments`) and the per-image targets (`depths.accumulate_targets`), both with IRLS weights w / |r| that
majorise the L2-norm terms by quadratics; the baseline (`baseline.solve_baseline`) differentiates it with autograd.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from .data import PairData
from .pinhole import pixel_grid

BASE_SCALE = 0.5


@dataclass
class Constraints:
    """What is fixed: known focals/pp (net pixels), known c2w, shared focal, principal-point optimisation."""

    known_focal: torch.Tensor | None = None    # [N, 2] fx, fy or None
    known_pp: torch.Tensor | None = None       # [N, 2] or None
    focal_mask: torch.Tensor | None = None     # [N] bool: focal known
    known_c2w: torch.Tensor | None = None      # [N, 4, 4]
    pose_mask: torch.Tensor | None = None      # [N] bool: pose known
    shared_focal: bool = False
    optimize_pp: bool = False
    pp_mask: torch.Tensor | None = None        # [N] bool: principal point known
    known_K_net: np.ndarray | None = None      # [N, 3, 3] NaN rows for unknown (reported as given)
    known_c2w_np: np.ndarray | None = None     # [N, 4, 4] NaN rows for unknown (reported as given)

    def n_known_poses(self) -> int:
        return 0 if self.pose_mask is None else int(self.pose_mask.sum())

    @property
    def normalize_scale(self) -> bool:
        """Edge-scale normalisation is only needed while the scale gauge is free (fewer than 2 known poses)."""
        return self.n_known_poses() < 2


@dataclass
class State:
    """The unknowns. The solvers' steps replace these tensors rather than write into them (except the uniform
    rescale of `normalize_edge_scales`), so a `snapshot` (shared tensors) stays valid while the state moves on."""

    c2w: torch.Tensor      # [N, 4, 4]
    focal: torch.Tensor    # [N]
    pp: torch.Tensor       # [N, 2]
    depth: torch.Tensor    # [N, H, W] (on the grid of the data the state is used with)
    s: torch.Tensor        # [E]
    R: torch.Tensor        # [E, 3, 3]
    t: torch.Tensor        # [E, 3]

    def clone(self) -> "State":
        """Deep copy (every tensor cloned)."""
        return State(*(x.clone() for x in (self.c2w, self.focal, self.pp, self.depth, self.s, self.R, self.t)))

    def snapshot(self, **changes: torch.Tensor) -> "State":
        """Shallow copy sharing this state's tensors, with the fields in `changes` replaced."""
        return dataclasses.replace(self, **changes)

    def assign(self, other: "State", depth: bool = True) -> None:
        """Take over `other`'s tensors (shared, not copied); depth False keeps this state's depth maps."""
        self.c2w, self.focal, self.pp, self.s, self.R, self.t = other.c2w, other.focal, other.pp, other.s, other.R, other.t
        if depth:
            self.depth = other.depth


def world_points(c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor, depth: torch.Tensor,
                 stride: int = 1) -> torch.Tensor:
    """World points [N, h, w, 3] (a view of channels-first storage [N, 3, h, w]) of depth maps [N, h, w] on a grid
    sub-sampled by `stride` (pixel (r, c) -> (u, v) = (stride c, stride r)): R_n d ((u - cx) / f, (v - cy) / f, 1) + C_n."""
    N, h, w = depth.shape
    u, v = pixel_grid(h * stride, w * stride, depth.device, depth.dtype, stride)
    u, v = u[:h, :w], v[:h, :w]
    x = (u[None] - pp[:, 0, None, None]) / focal[:, None, None] * depth
    y = (v[None] - pp[:, 1, None, None]) / focal[:, None, None] * depth
    pc = torch.stack([x, y, depth], 1).reshape(N, 3, h * w)                               # [N, 3, M]
    X = torch.baddbmm(c2w[:, :3, 3, None].to(pc.dtype), c2w[:, :3, :3].to(pc.dtype), pc)  # [N, 3, M]
    return X.reshape(N, 3, h, w).permute(0, 2, 3, 1)    # channels-first storage: `channels_first` of it is free


def apply_sim(s: torch.Tensor, R: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P(p) = s R p + t for p [b, h, w, 3], s [b], R [b, 3, 3], t [b, 3] (one batched GEMM)."""
    b, h, w, _ = p.shape
    A = (s[:, None, None] * R).transpose(1, 2)
    return torch.baddbmm(t[:, None, :], p.reshape(b, h * w, 3).float(), A).reshape(b, h, w, 3)


def channels_first(p: torch.Tensor) -> torch.Tensor:
    """[b, h, w, 3] points -> [b, 3, h*w] float32: free when `p` views channels-first storage (as the coarse stacks
    do), else one copy; the batched 3x3 products and norms run faster on channels-first operands on CPUs."""
    return p.permute(0, 3, 1, 2).reshape(p.shape[0], 3, -1).float()


def apply_sim_cf(s: torch.Tensor, R: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P(p) = s R p + t for channels-first p [b, 3, M] (one batched GEMM)."""
    return torch.baddbmm(t[:, :, None], s[:, None, None] * R, p)


def dist_cf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [n, M] between channels-first point sets [n, 3, M]."""
    d = a - b
    return d.square_().sum(1).sqrt_()


def areas(data: PairData) -> tuple[float, float]:
    """Normalisers of the two loss terms: summed pixel counts (on the data's grid) of first / second images.

    From the true shapes alone (no device work), so the per-iteration loss costs no extra host sync."""
    h = -(-data.shapes[:, 0] // data.stride)          # pixels r with stride * r < H_true
    w = -(-data.shapes[:, 1] // data.stride)
    H, W = data.HW
    a = np.minimum(h, H) * np.minimum(w, W)
    e = data.edges_np
    return float(a[e[:, 0]].sum()), float(a[e[:, 1]].sum())


CHUNK_ELEMS = {"cuda": 1 << 20, "cpu": 1 << 18}   # edge x pixel elements per pass chunk: on GPUs each chunk costs
# kernel launches; on CPUs only its temporaries count (~100 bytes per element in an edge fit)


def edge_chunk(data: PairData, max_elems: int = 1 << 21) -> int:
    """Edges per chunk holding at most `max_elems` edge x pixel elements (at least one edge)."""
    H, W = data.HW
    return max(1, min(data.n_edges, max_elems // max(H * W, 1)))


def edge_chunks(data: PairData, max_elems: int | None = None) -> Iterator[slice]:
    """Slices of consecutive edges covering all edges, `edge_chunk` edges each (default size per device type)."""
    if max_elems is None:
        max_elems = CHUNK_ELEMS.get(data.pts1.device.type, CHUNK_ELEMS["cpu"])
    ch = edge_chunk(data, max_elems)
    for a in range(0, data.n_edges, ch):
        yield slice(a, min(a + ch, data.n_edges))


def edge_sides(data: PairData) -> Iterator[tuple[slice, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The objective's terms, chunk by chunk: (edges sl, side 1 or 2, image index [b] of that side, the side's
    point maps channels-first [b, 3, M] (camera-i frame), weights [b, M])."""
    for sl in edge_chunks(data):
        e = data.edges[sl]
        b = e.shape[0]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            yield sl, side, e[:, col], channels_first(pts[sl]), data.weights(side, sl).reshape(b, -1)


@torch.no_grad()
def objective(data: PairData, st: State, depth: torch.Tensor | None = None) -> float:
    """The objective L (module doc), evaluated chunk by chunk.

    depth: depth maps on the data's grid (default: st.depth, which must then match the data's grid).
    """
    depth = st.depth if depth is None else depth
    X = channels_first(world_points(st.c2w, st.focal, st.pp, depth, data.stride))
    area_i, area_j = areas(data)
    li = torch.zeros((), device=X.device, dtype=torch.float64)
    lj = torch.zeros_like(li)
    for sl, side, img, p, w in edge_sides(data):
        d = dist_cf(X[img], apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], p))
        if side == 1:
            li += (w * d).sum().double()
        else:
            lj += (w * d).sum().double()
    return float(li / area_i + lj / area_j)


def normalize_edge_scales(st: State, cons: Constraints, scale_depth: bool = True) -> float:
    """Rescale the whole solution so that the geometric mean of edge scales is BASE_SCALE (no-op if metric).

    Scales the edge scales and translations, camera centres and (unless scale_depth is False, for callers holding
    their depths elsewhere) the depth maps in place; returns the factor."""
    if not cons.normalize_scale:
        return 1.0
    c = BASE_SCALE / float(torch.exp(torch.log(st.s.clamp_min(1e-30)).mean()))
    st.s *= c
    st.t *= c
    st.c2w[:, :3, 3] *= c
    if scale_depth:
        st.depth *= c
    return c


def sub_depth(depth: torch.Tensor, stride: int) -> torch.Tensor:
    """Depth maps [N, H, W] sub-sampled by `stride` (contiguous copy; the maps themselves at stride 1)."""
    return depth if stride == 1 else depth[:, ::stride, ::stride].contiguous()


def apply_known_poses(st: State, cons: Constraints) -> None:
    """Replace estimated poses by known ones, in place.

    One known pose: the rigid motion taking its estimate onto it moves every camera. Two or more: the similarity
    from the estimated to the known cameras (rotation: chordal mean of R_known R_est^T by SVD; scale and translation
    by least squares on the rotated centres) moves every camera and scales the depth maps, making the world metric.
    """
    if cons.pose_mask is None or not bool(cons.pose_mask.any()):
        return
    m = cons.pose_mask
    K = cons.known_c2w.to(st.c2w)
    if int(m.sum()) >= 2:
        M = (K[m, :3, :3] @ st.c2w[m, :3, :3].transpose(1, 2)).sum(0).double()
        U, _, Vh = torch.linalg.svd(M)
        D = torch.ones(3, dtype=M.dtype, device=M.device)
        D[2] = torch.sign(torch.det(U @ Vh))
        R = (U @ torch.diag(D) @ Vh).to(st.c2w)
        Ce, Ck = st.c2w[m, :3, 3] @ R.T, K[m, :3, 3]
        ce, ck = Ce - Ce.mean(0), Ck - Ck.mean(0)
        s = (ce * ck).sum() / (ce * ce).sum().clamp_min(1e-30)
        if not torch.isfinite(s) or float(s) <= 0:
            s = torch.ones((), device=st.c2w.device)
        t = Ck.mean(0) - s * Ce.mean(0)
        st.c2w[:, :3, :3] = R @ st.c2w[:, :3, :3]
        st.c2w[:, :3, 3] = s * (st.c2w[:, :3, 3] @ R.T) + t
        st.depth *= s
    else:
        k = int(torch.nonzero(m)[0, 0])
        T = K[k] @ torch.linalg.inv(st.c2w[k])
        st.c2w = T[None] @ st.c2w
    st.c2w[m] = K[m]
