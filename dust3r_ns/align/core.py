"""Alignment state, the reference objective (chunked over edges), and the shared minimum-spanning-tree initialisation.

State: per image c2w (N,4,4), focal (N,), principal point (N,2), depth (N,H,W); per edge a similarity
P_e(x) = s_e R_e x + t_e mapping the pair's point maps (camera-i frame) into the world.
Objective (reference): sum_e [sum w1 ||X_i - P_e(pts1_e)|| + sum w2 ||X_j - P_e(pts2_e)||] / areas, w = log(conf),
with the edge scales normalised to a geometric mean of `BASE_SCALE` unless the metric scale is fixed by known poses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .data import AlignError, PairData
from .geometry import Moments, default_focal, estimate_focal, pixel_grid, so3_exp, umeyama
from .joint import joint_moments, joint_step, umeyama_sums

BASE_SCALE = 0.5


@dataclass
class Constraints:
    """What is fixed: known focals/pp (net pixels), known c2w, shared focal, principal-point optimisation."""

    known_focal: torch.Tensor | None = None    # (N,2) fx, fy or None
    known_pp: torch.Tensor | None = None       # (N,2) or None
    focal_mask: torch.Tensor | None = None     # (N,) bool: focal known
    known_c2w: torch.Tensor | None = None      # (N,4,4)
    pose_mask: torch.Tensor | None = None      # (N,) bool: pose known
    shared_focal: bool = False
    optimize_pp: bool = False
    pp_mask: torch.Tensor | None = None        # (N,) bool: principal point known
    known_K_net: np.ndarray | None = None      # (N,3,3) NaN rows for unknown (reported as given)
    known_c2w_np: np.ndarray | None = None     # (N,4,4) NaN rows for unknown (reported as given)

    def n_known_poses(self) -> int:
        return 0 if self.pose_mask is None else int(self.pose_mask.sum())

    @property
    def normalize_scale(self) -> bool:
        """Edge-scale normalisation is only needed while the scale gauge is free (fewer than 2 known poses)."""
        return self.n_known_poses() < 2


@dataclass
class State:
    c2w: torch.Tensor      # (N,4,4)
    focal: torch.Tensor    # (N,)
    pp: torch.Tensor       # (N,2)
    depth: torch.Tensor    # (N,H,W)
    s: torch.Tensor        # (E,)
    R: torch.Tensor        # (E,3,3)
    t: torch.Tensor        # (E,3)
    history: list = field(default_factory=list)

    def clone(self) -> "State":
        return State(*(x.clone() for x in (self.c2w, self.focal, self.pp, self.depth, self.s, self.R, self.t)))


def edge_chunk(data: PairData, max_elems: int = 1 << 21) -> int:
    H, W = data.HW
    return max(1, min(data.n_edges, max_elems // max(H * W, 1)))


def world_points(c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor, depth: torch.Tensor,
                 stride: int = 1) -> torch.Tensor:
    """(N,h,w,3) world points from depth maps on a grid sub-sampled by `stride` (pixel (r,c) -> (stride*c, stride*r))."""
    N, h, w = depth.shape
    u, v = pixel_grid(h * stride, w * stride, depth.device, depth.dtype, stride)
    u, v = u[:h, :w], v[:h, :w]
    x = (u[None] - pp[:, 0, None, None]) / focal[:, None, None] * depth
    y = (v[None] - pp[:, 1, None, None]) / focal[:, None, None] * depth
    pc = torch.stack([x, y, depth], -1)
    return torch.einsum("nij,nhwj->nhwi", c2w[:, :3, :3], pc) + c2w[:, None, None, :3, 3]


def apply_sim(s: torch.Tensor, R: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P(p) = s R p + t for p (b,h,w,3), s (b,), R (b,3,3), t (b,3) (one batched GEMM)."""
    b, h, w, _ = p.shape
    A = (s[:, None, None] * R).transpose(1, 2)
    return torch.baddbmm(t[:, None, :], p.reshape(b, h * w, 3).float(), A).reshape(b, h, w, 3)


def channels_first(p: torch.Tensor) -> torch.Tensor:
    """(b,h,w,3) points -> (b,3,h*w) float32: free when `p` views channels-first storage (as the coarse stacks do),
    else one copy, which still pays off: the batched 3x3 products and norms run several times faster on
    channels-first operands on CPUs (`apply_sim_cf`)."""
    return p.permute(0, 3, 1, 2).reshape(p.shape[0], 3, -1).float()


def apply_sim_cf(s: torch.Tensor, R: torch.Tensor, t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """P(p) = s R p + t for channels-first p (b,3,M) (one batched GEMM)."""
    return torch.baddbmm(t[:, :, None], s[:, None, None] * R, p)


def dist_cf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (n,M) between channels-first point sets (n,3,M)."""
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
# kernel launches; on CPUs only its temporaries count (~100 bytes per element in `fit_edges`)


def _chunks(data: PairData, max_elems: int | None = None):
    if max_elems is None:
        max_elems = CHUNK_ELEMS.get(data.pts1.device.type, CHUNK_ELEMS["cpu"])
    ch = edge_chunk(data, max_elems)
    for a in range(0, data.n_edges, ch):
        yield slice(a, min(a + ch, data.n_edges))


@torch.no_grad()
def objective(data: PairData, st: State, depth: torch.Tensor | None = None) -> float:
    """The reference loss (log-conf weighted L2 distances, normalised by areas), evaluated chunk by chunk.

    depth: depth maps on the data's grid (default: st.depth, which must then match the data's grid).
    """
    depth = st.depth if depth is None else depth
    X = channels_first(world_points(st.c2w, st.focal, st.pp, depth, data.stride))
    area_i, area_j = areas(data)
    li = torch.zeros((), device=X.device, dtype=torch.float64)
    lj = torch.zeros_like(li)
    for sl in _chunks(data):
        e = data.edges[sl]
        b = e.shape[0]
        d1 = dist_cf(X[e[:, 0]], apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], channels_first(data.pts1[sl])))
        d2 = dist_cf(X[e[:, 1]], apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], channels_first(data.pts2[sl])))
        li += (data.weights(1, sl).reshape(b, -1) * d1).sum().double()
        lj += (data.weights(2, sl).reshape(b, -1) * d2).sum().double()
    return float(li / area_i + lj / area_j)


def normalize_edge_scales(st: State, cons: Constraints, scale_depth: bool = True) -> float:
    """Rescale the whole solution so that the geometric mean of edge scales is BASE_SCALE (no-op if metric).

    Returns the factor; scale_depth False leaves st.depth alone (for callers holding their depths elsewhere)."""
    if not cons.normalize_scale:
        return 1.0
    c = BASE_SCALE / float(torch.exp(torch.log(st.s.clamp_min(1e-30)).mean()))
    st.s *= c
    st.t *= c
    st.c2w[:, :3, 3] *= c
    if scale_depth:
        st.depth *= c
    return c


# ---------------------------------------------------------------------------------------------------- camera fit
FOCAL_RANGE = (0.02, 50.0)   # focal bounds of the camera fit, in units of the 60-degree focal of the map size


CAM_FIT_CHUNK = 1 << 22   # Jacobian elements (N x 9 x 3 x pixels) per chunk of the camera fit's normal equations


def fit_cameras(Y: torch.Tensor, A: torch.Tensor, c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor,
                cons: Constraints, stride: int = 1, iters: int = 3, lam: float = 1e-4, pose_free: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt on (rotation, centre, log-focal, pp) per image minimising sum A * dist(Y, ray)^2.

    Y (N,h,w,3) target world points, A (N,h,w) weights. The depth along each ray is eliminated (optimal per pixel).
    Shared focal couples the images through one global unknown; known poses/focals stay fixed. Every pixel counts:
    the normal equations and costs are accumulated over pixel chunks (`CAM_FIT_CHUNK` Jacobian elements each), so
    memory stays bounded at full resolution (a fixed subset of 8192 pixels per image moved the fixed point: N=8 at
    384x512 with the full-resolution polish, RRA mean 0.0127 deg against 0.0124 on all pixels).
    """
    N, h, w, _ = Y.shape
    dev, dt = Y.device, Y.dtype
    u, v = pixel_grid(h * stride, w * stride, dev, dt, stride)
    u, v = u[:h, :w].reshape(-1), v[:h, :w].reshape(-1)
    Yf, Af = channels_first(Y), A.reshape(N, -1).clamp_min(0)        # (N,3,M) channels-first: elementwise rows
    M = Yf.shape[2]
    step_px = max(1, CAM_FIT_CHUNK // (27 * N))
    chunks = [slice(a, min(M, a + step_px)) for a in range(0, M, step_px)]

    def residual(R_, C_, f_, p_, sl):
        """Point-to-ray residual e (N,3,m) in the camera frame on the pixels `sl`, plus pieces for the Jacobian."""
        D = Yf[:, :, sl] - C_[:, :, None]                         # world offsets (N,3,m)
        Z = torch.bmm(R_.transpose(1, 2), D)                      # camera-frame targets R^T (Y - C)
        rx = (u[None, sl] - p_[:, 0, None]) / f_[:, None]
        ry = (v[None, sl] - p_[:, 1, None]) / f_[:, None]
        r = torch.stack([rx, ry, torch.ones_like(rx)], 1)
        rr = (rx * rx + ry * ry + 1)[:, None]
        lam_ = (rx * Z[:, 0] + ry * Z[:, 1] + Z[:, 2])[:, None] / rr
        return Z - lam_ * r, Z, r, rr, lam_

    def jacobian(R_, C_, f_, p_, sl):
        """Residuals and the Jacobian (N,9,3,m) on the pixels `sl`, with the rotation/centre columns in the camera
        frame (elementwise, no 3x3 matmuls per pixel): with P = I - r r^T/|r|^2, de/dtheta = P [Z]x R^T and
        de/dC = -P R^T, and the R^T factors are applied to the 9x9 normal equations on the host (`to_world`)."""
        e, Z, r, rr, lam_ = residual(R_, C_, f_, p_, sl)
        qr = r / rr                                                          # r / |r|^2
        J = Z.new_zeros(N, 9, 3, Z.shape[2])
        c = torch.cross(r, Z, dim=1)
        Z0, Z1, Z2 = Z[:, 0], Z[:, 1], Z[:, 2]
        for k, col in enumerate(((None, Z2, -Z1), (-Z2, None, Z0), (Z1, -Z0, None))):   # P [Z]x, column k
            J[:, k] = -qr * c[:, k, None]
            for i, zc in enumerate(col):
                if zc is not None:
                    J[:, k, i] += zc
            J[:, 3 + k] = qr * r[:, k, None]                                 # -P, column k
            J[:, 3 + k, k] -= 1.0
        # de/dr . dr = -lam dr - r (dr . (Z - 2 lam r)) / rr
        q = (Z - 2 * lam_ * r) / rr
        # focal: dr/dlogf = -(rx, ry, 0)
        J[:, 6] = r * (r[:, 0] * q[:, 0] + r[:, 1] * q[:, 1])[:, None]
        J[:, 6, :2] += lam_ * r[:, :2]
        if cons.optimize_pp:   # dr/dpp_k = -e_k / f
            inv_f = (1.0 / f_)[:, None, None]
            for k in (0, 1):
                J[:, 7 + k] = r * q[:, k, None] * inv_f
                J[:, 7 + k, k] += lam_[:, 0] * inv_f[:, 0]
        return e, J

    def to_world(Hc, gc, Rh):
        """Normal equations of the camera-frame columns -> those of the world-frame parameters (float64 host)."""
        T = torch.eye(9, dtype=torch.float64).repeat(N, 1, 1)
        T[:, :3, :3] = Rh.transpose(1, 2)
        T[:, 3:6, 3:6] = Rh.transpose(1, 2)
        return T.transpose(1, 2) @ Hc @ T, (T.transpose(1, 2) @ gc[..., None])[..., 0]

    def cost(R_, C_, f_, p_):
        total = 0.0
        for sl in chunks:
            e = residual(R_, C_, f_, p_, sl)[0]
            total += float((Af[:, sl] * (e * e).sum(1)).sum())
        return total

    def normal_equations(R_, C_, f_, p_):
        """Camera-frame normal equations (N,9,9), (N,9) and the cost, accumulated over the pixel chunks."""
        Hc = torch.zeros(N, 9, 9, device=dev, dtype=torch.float64)
        gc = torch.zeros(N, 9, device=dev, dtype=torch.float64)
        total = 0.0
        for sl in chunks:
            e, J = jacobian(R_, C_, f_, p_, sl)                 # (N,3,m), (N,9,3,m)
            a = Af[:, sl]
            total += float((a * (e * e).sum(1)).sum())
            J = J.reshape(N, 9, -1)
            JA = (J.reshape(N, 9, 3, -1) * a[:, None, None]).reshape(N, 9, -1)
            Hc += torch.bmm(JA, J.transpose(1, 2)).double()
            gc += torch.bmm(JA, e.reshape(N, -1, 1))[..., 0].double()
        return Hc, gc, total

    # global parameter indices
    idx = torch.arange(N * 9, device=dev).reshape(N, 9)
    free = torch.ones(N, 9, dtype=torch.bool, device=dev)
    if cons.pose_mask is not None:
        free[cons.pose_mask, :6] = False
    if pose_free is not None:
        free[~pose_free, :6] = False
    if cons.focal_mask is not None:
        free[cons.focal_mask, 6] = False
    if not cons.optimize_pp:
        free[:, 7:9] = False
    elif cons.pp_mask is not None:
        free[cons.pp_mask, 7:9] = False
    if cons.shared_focal:
        idx[:, 6] = idx[0, 6]
    R, C = c2w[:, :3, :3], c2w[:, :3, 3]
    f, p = focal.clone(), pp.clone()
    idxc, freec = idx.cpu(), free.cpu()

    f_lo, f_hi = (k * default_focal(h * stride, w * stride) for k in FOCAL_RANGE)
    cur = None
    for _ in range(iters):
        Hc, gc, c0 = normal_equations(R, C, f, p)
        if cur is None:
            cur = c0
        # normal equations solved on the CPU in float64 (at most 9N unknowns)
        Hl, gl = to_world(Hc.to("cpu", torch.float64), gc.to("cpu", torch.float64), R.to("cpu", torch.float64))
        Hl = Hl * (freec[:, :, None] & freec[:, None, :])
        gl = gl * freec
        if cons.shared_focal:      # the shared focal couples the images: one dense (9N)^2 system
            G = N * 9
            Hg = torch.zeros(G, G, dtype=torch.float64)
            gg = torch.zeros(G, dtype=torch.float64)
            ii = idxc[:, :, None].expand(N, 9, 9).reshape(-1)
            jj = idxc[:, None, :].expand(N, 9, 9).reshape(-1)
            Hg.index_put_((ii, jj), Hl.reshape(-1), accumulate=True)
            gg.index_add_(0, idxc.reshape(-1), gl.reshape(-1))
        else:                      # independent cameras: N 9x9 systems in one batched solve
            Hg, gg = Hl, gl
        diag = Hg.diagonal(dim1=-2, dim2=-1)
        unused = diag <= 0
        accepted = False
        for _t in range(6):
            Hd = Hg + torch.diag_embed(lam * diag + unused.double() + 1e-12)
            step = -torch.from_numpy(np.linalg.solve(Hd.numpy(), gg.numpy()[..., None])[..., 0])   # (see Moments.solve)
            d = ((step[idxc] if cons.shared_focal else step) * freec).to(dev, dt)             # (N,9)
            Rn = so3_exp(d[:, :3]) @ R
            Cn, fn, pn = C + d[:, 3:6], f * torch.exp(d[:, 6]), p + d[:, 7:9]
            fn = torch.where(free[:, 6], fn.clamp(f_lo, f_hi), fn)   # degenerate maps (flat, constant) push f to inf
            new = cost(Rn, Cn, fn, pn)
            if new <= cur:
                R, C, f, p, cur = Rn, Cn, fn, pn, new
                lam = max(lam / 10, 1e-7)
                accepted = True
                break
            lam *= 10
        if not accepted:
            break
    out = c2w.clone()
    out[:, :3, :3], out[:, :3, 3] = R, C
    return out, f, p


def depth_from_targets(Y: torch.Tensor, A: torch.Tensor, c2w: torch.Tensor, focal: torch.Tensor, pp: torch.Tensor,
                       prev: torch.Tensor, stride: int = 1, floor: float | None = None) -> torch.Tensor:
    """Closed-form depth per pixel: the point on the pixel's ray closest to the target Y (keeps prev where A = 0).

    Depths are clamped to `floor` (default 1e-4 x the median previous depth) as the reference's log-depth keeps
    them positive.
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


# ---------------------------------------------------------------------------------------------------- MST init
def edge_scores(data: PairData) -> torch.Tensor:
    """Per ordered edge: mean(conf1) * mean(conf2) over valid pixels (reference pair score)."""
    valid = data.valid().float()
    e = data.edges
    out = []
    for sl in _chunks(data):
        v1, v2 = valid[e[sl, 0]], valid[e[sl, 1]]
        m1 = (data.conf(1, sl) * v1).sum((1, 2)) / v1.sum((1, 2))
        m2 = (data.conf(2, sl) * v2).sum((1, 2)) / v2.sum((1, 2))
        out.append(m1 * m2)
    return torch.cat(out)


def mst_init(data: PairData, cons: Constraints, verbose: bool = False, coarse: PairData | None = None,
             global_step: bool = False) -> State:
    """Maximum-spanning-tree chaining of pairwise point maps + per-image Procrustes pose, Weiszfeld focal, depth.

    coarse: optional sub-sampled copy of `data` used for the pass over all edges (scores, initial similarities).
    global_step: refine the tree's cameras by rotation/scale/translation averaging over all edges (fast mode).
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
    pts_world: list[torch.Tensor | None] = [None] * N
    conf = lambda k, side: data.conf(side, k)  # noqa: E731
    P = lambda k, side: (data.pts1 if side == 1 else data.pts2)[k].float()       # noqa: E731
    done = np.zeros(N, bool)
    if N == 1 or not best:
        if N > 1:
            raise AlignError(f"the pair graph has no pair between distinct images ({N} images); use make_pairs(...)")
        k = int(np.argmax(score))
        pts_world[0] = P(k, 1)
        done[0] = True
    else:
        k0 = max(best.values(), key=lambda k: score[k])
        i, j = edges[k0]
        pts_world[i], pts_world[j] = P(k0, 1), P(k0, 2)
        done[[i, j]] = True
        while not done.all():
            cand = [k for (a, b), k in best.items() if done[a] != done[b]]
            if not cand:
                left = np.nonzero(~done)[0].tolist()
                got = np.nonzero(done)[0].tolist()
                raise AlignError(f"the pair graph is disconnected: images {left} share no pair with images {got}; "
                                 "add pairs between them (e.g. scene_graph='complete' or a larger 'swin-k' window)")
            k = max(cand, key=lambda k: score[k])
            i, j = edges[k]
            if done[i]:   # align pts1 (i's points) to the world, carry j's points
                s, R, t = umeyama(P(k, 1).reshape(1, -1, 3), pts_world[i].reshape(1, -1, 3), conf(k, 1).reshape(1, -1))
                pts_world[j] = s[0] * P(k, 2) @ R[0].T + t[0]
                done[j] = True
            else:
                s, R, t = umeyama(P(k, 2).reshape(1, -1, 3), pts_world[j].reshape(1, -1, 3), conf(k, 2).reshape(1, -1))
                pts_world[i] = s[0] * P(k, 1) @ R[0].T + t[0]
                done[i] = True
    Xw = torch.stack(pts_world)                                   # (N,H,W,3)
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
    pc = data.pts1[idx_first].float()                             # (N,H,W,3) camera-frame points
    wc = data.weights(1)[idx_first] if N > 0 else None
    valid = data.valid()
    f_est = estimate_focal(pc, pp, (wc + 1e-6) * valid, shapes=shapes_t)
    s, R, t = umeyama(pc.reshape(N, -1, 3), Xw.reshape(N, -1, 3), (data.conf(1, idx_first) * valid).reshape(N, -1))
    if global_step and N > 2 and bool(has_first.all()):
        # replace the tree-chained cameras by the pose-graph averages over every edge (align.averaging)
        from .averaging import pose_graph_average

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


def sub_depth(depth: torch.Tensor, stride: int) -> torch.Tensor:
    return depth if stride == 1 else depth[:, ::stride, ::stride].contiguous()


def apply_known_poses(st: State, cons: Constraints) -> None:
    """Replace estimated poses by known ones, carrying depth scale: with >= 2 known poses the world becomes metric."""
    if cons.pose_mask is None or not bool(cons.pose_mask.any()):
        return
    m = cons.pose_mask
    K = cons.known_c2w.to(st.c2w)
    if int(m.sum()) >= 2:
        # similarity from estimated to known camera centres/orientations, applied to the whole estimate
        # rotation: chordal mean of R_known R_est^T; then scale + translation from the camera centres
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


def fit_edges(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor | None = None,
              gauge: bool = False) -> float:
    """Closed-form per-edge similarity (weighted Umeyama) to the current world points. Returns the loss before it.

    irls_eps None: weights = log-conf; else IRLS weights log-conf / max(dist, eps) (majorises the L2-norm loss).
    depth: depth maps on the data's grid (default st.depth).
    gauge: solve the edges jointly under the scale gauge (geometric mean of the edge scales = BASE_SCALE) instead of
        freely. Free fits followed by a rescale of the whole solution do not minimise the gauged objective (the free
        fit always prefers smaller scales), so a solver alternating them settles off the optimum.
    """
    loss, mom, _ = _edge_moments(data, st, irls_eps, depth, side_moments=False)
    _solve_edges(data, st, mom, gauge)
    return loss


def fit_edges_joint(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor, cons: Constraints
                    ) -> tuple[float, torch.Tensor]:
    """`fit_edges`, then the joint camera/edge/depth-scale step (`joint.joint_step`) from the same pass's moments:
    updates the cameras and edges of `st` in place; returns the loss before both and the rescaled depths. Known
    poses and focals stay put; a shared focal is left to the camera fit."""
    loss, mom, M7 = _edge_moments(data, st, irls_eps, depth, side_moments=True)
    _solve_edges(data, st, mom, cons.normalize_scale)
    N = data.n_images
    focal_free = (torch.zeros(N, dtype=torch.bool) if cons.shared_focal
                  else torch.ones(N, dtype=torch.bool) if cons.focal_mask is None else ~cons.focal_mask.cpu())
    H, W = data.HW
    f_range = tuple(k * default_focal(H * data.stride, W * data.stride) for k in FOCAL_RANGE)
    gain = joint_step(data.edges, st, M7, cons.pose_mask, focal_free, cons.normalize_scale, f_range)
    return loss, depth if gain is None else depth * gain[:, None, None]


def _edge_moments(data: PairData, st: State, irls_eps: float | None, depth: torch.Tensor | None, side_moments: bool
                  ) -> tuple[float, Moments, torch.Tensor | None]:
    """One pass over the edges: the loss (with IRLS weights), the Umeyama moments and, if asked, the (E,2,7,7)
    moments per edge side of `joint.joint_moments` (which hold the Umeyama ones)."""
    depth = st.depth if depth is None else depth
    X = channels_first(world_points(st.c2w, st.focal, st.pp, depth, data.stride))     # (N,3,M)
    mom = Moments(data.n_edges)
    area_i, area_j = areas(data)
    loss = torch.zeros((), device=X.device, dtype=torch.float64)
    M7 = torch.zeros(data.n_edges, 2, 7, 7, device=X.device, dtype=torch.float64) if side_moments else None
    for sl in _chunks(data):
        e = data.edges[sl]
        b = e.shape[0]
        for side, pts, col in ((1, data.pts1, 0), (2, data.pts2, 1)):
            p = channels_first(pts[sl])
            w = data.weights(side, sl).reshape(b, -1)
            Xt = X[e[:, col]]
            if irls_eps is not None:
                dist = dist_cf(Xt, apply_sim_cf(st.s[sl], st.R[sl], st.t[sl], p))
                loss += (w * dist).sum().double() / (area_i if side == 1 else area_j)
                w = w / dist.clamp_min(irls_eps)
            if M7 is None:
                mom.add_cf(p, Xt, w, idx=sl)
            else:
                M7[sl, side - 1] = M = joint_moments(Xt, p, w)
                mom.add_sums(umeyama_sums(M), sl)
    return float(loss), mom, M7


def _solve_edges(data: PairData, st: State, mom: Moments, gauge: bool) -> None:
    """The edges' similarities from their moments (under the scale gauge if asked); non-finite fits keep theirs."""
    log_mean = None
    if gauge:
        good = mom.w > 0
        n_good = int(good.sum())
        if n_good:   # edges without weight keep their scale and still count in the gauge
            rest = float(torch.log(st.s.cpu().double().clamp_min(1e-30))[~good].sum())
            log_mean = (data.n_edges * math.log(BASE_SCALE) - rest) / n_good
    dev = st.s.device
    s, R, t = (x.to(dev) for x in mom.solve(True, log_scale_mean=log_mean))
    ok = torch.isfinite(s) & (s > 0)
    st.s = torch.where(ok, s.float(), st.s)
    st.R = torch.where(ok[:, None, None], R.float(), st.R)
    st.t = torch.where(ok[:, None], t.float(), st.t)
