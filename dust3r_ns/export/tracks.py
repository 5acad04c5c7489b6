"""Multi-view tracks for the exported points: which other images see each point, by depth-consistent reprojection.

A point of the cloud comes from one pixel p of one image a (its source). For every other image b the point x is
projected with b's camera, (u', v', z) = K_b R_b^T (x - C_b) / z, and rounded to the nearest network pixel q. Image b
observes the point when q lies inside b, q is one of b's reconstructed pixels (confidence above the threshold, not
masked) and b's depth agrees with the point's depth along b's axis: |d - z| <= depth_tol * z, with d the depth at q
or the depth at (u', v') interpolated in inverse depth (exact on planes) from its 4 pixels (a point hidden behind a
nearer surface fails this test). Each observation is its own keypoint: two points may
observe the same pixel (down-sampled clouds hold nearby points from several images).

Each track's 3D point is the confidence-weighted mean of its observations' back-projected pixels
X_b(q) = C_b + R_b depth_b(q) K_b^-1 (q, 1); its keypoints are the pixel centres q (mapped to original-image
pixels), and its reprojection error per observation is |project_b(X) - q| in original-image pixels (COLMAP's
definition; the point's error is their mean). Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import conventions as cv
from ..scene import Reconstruction

__all__ = ["Tracks", "TracksConfig", "build_tracks", "project"]


@dataclass(frozen=True)
class TracksConfig:
    """Multi-view tracks of the COLMAP points and the optional bundle adjustment on them."""

    depth_tol: float = 0.02
    """Relative depth agreement for a point to count as seen by another image; 0: single-image tracks."""
    bundle_adjust: bool = False
    """Refine the poses by bundle adjustment (pycolmap) on the tracks before exporting (all formats)."""
    refine_focal: bool = False
    """Bundle adjustment also refines the focal lengths."""

    def __post_init__(self) -> None:
        if self.depth_tol < 0:
            raise ValueError(f"--tracks.depth-tol must be >= 0 (0: single-image tracks), got {self.depth_tol}")


@dataclass
class Tracks:
    """Points with their observations, sorted by point (each point's source observation first).

    xyz (M,3) float64 fused points, rgb (M,3) uint8; per observation: point (O,) int64 index into xyz, image (O,)
    int64, vu (O,2) int64 network pixel (v, u), error (O,) float64 reprojection error in original-image pixels.
    """

    xyz: np.ndarray
    rgb: np.ndarray
    point: np.ndarray
    image: np.ndarray
    vu: np.ndarray
    error: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """(M,) number of images observing each point."""
        return np.bincount(self.point, minlength=len(self.xyz))

    @property
    def point_errors(self) -> np.ndarray:
        """(M,) mean reprojection error of each point over its track (original-image pixels)."""
        return np.bincount(self.point, weights=self.error, minlength=len(self.xyz)) / np.maximum(self.lengths, 1)

    def select(self, keep: np.ndarray) -> "Tracks":
        """The tracks of the points where the boolean (M,) `keep` holds (points renumbered in order)."""
        keep = np.asarray(keep, bool)
        new = np.cumsum(keep) - 1
        o = keep[self.point]
        return Tracks(xyz=self.xyz[keep], rgb=self.rgb[keep], point=new[self.point[o]], image=self.image[o],
                      vu=self.vu[o], error=self.error[o])

    def summary(self) -> dict[str, float]:
        """Points, observations, mean/max track length, share of multi-view points, mean/median reprojection error
        per observation and mean per point (COLMAP's mean reprojection error), in original-image pixels."""
        n = self.lengths
        return dict(points=int(len(self.xyz)), observations=int(len(self.point)),
                    mean_track_length=float(n.mean()) if len(n) else 0.0, max_track_length=int(n.max(initial=0)),
                    multi_view_share=float((n > 1).mean()) if len(n) else 0.0,
                    mean_error_px=float(self.error.mean()) if len(self.error) else 0.0,
                    mean_point_error_px=float(self.point_errors.mean()) if len(n) else 0.0,
                    median_error_px=float(np.median(self.error)) if len(self.error) else 0.0)


def project(rec: Reconstruction, image: np.ndarray, xyz: np.ndarray, K: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Project world points xyz (M,3) into images `image` (M,) with intrinsics K (N,3,3) (default: network
    pixels). Returns (uv (M,2) package pixel coordinates, z (M,) depth along the camera axis)."""
    K = rec.K if K is None else K
    c2w = rec.c2w[image]
    Xc = np.einsum("mji,mj->mi", c2w[:, :3, :3], xyz - c2w[:, :3, 3])       # R^T (x - C)
    z = Xc[:, 2]
    Kp = K[image]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = Kp[:, 0, 0] * Xc[:, 0] / z + Kp[:, 0, 1] * Xc[:, 1] / z + Kp[:, 0, 2]
        v = Kp[:, 1, 1] * Xc[:, 1] / z + Kp[:, 1, 2]
    return np.stack([u, v], -1), z


def _interp_rel(depth: np.ndarray, valid: np.ndarray, uv: np.ndarray, z: np.ndarray) -> np.ndarray:
    """|d - z| / z with d the depth map at the sub-pixel positions uv, interpolated bilinearly in inverse depth
    (exact on planes) from the 4 surrounding pixels; inf where one of them is outside or not reconstructed."""
    h, w = depth.shape
    u0, v0 = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    ok = (u0 >= 0) & (u0 + 1 < w) & (v0 >= 0) & (v0 + 1 < h)
    out = np.full(len(uv), np.inf)
    i = np.nonzero(ok)[0]
    u0, v0 = u0[i], v0[i]
    fu, fv = uv[i, 0] - u0, uv[i, 1] - v0
    inv = 0.0
    good = np.ones(len(i), bool)
    for du, dv, wt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        d = depth[v0 + dv, u0 + du].astype(np.float64)
        good &= valid[v0 + dv, u0 + du] & (d > 0)
        inv = inv + wt / np.where(d > 0, d, 1.0)
    out[i[good]] = np.abs(1.0 / inv[good] - z[i[good]]) / z[i[good]]
    return out


def _lookup(maps: list[np.ndarray], image: np.ndarray, vu: np.ndarray) -> np.ndarray:
    """float64 values maps[image][v, u] per observation (one gather per image)."""
    out = np.zeros(len(image), np.float64)
    for b in np.unique(image):
        m = image == b
        out[m] = maps[b][vu[m, 0], vu[m, 1]]
    return out


def _back_project(rec: Reconstruction, image: np.ndarray, vu: np.ndarray) -> np.ndarray:
    """World points (O,3) of network pixels vu (O,2) of images `image` (O,) from their depth maps."""
    d = _lookup(rec.depths, image, vu)
    Kinv = np.linalg.inv(rec.K)[image]
    ray = np.einsum("mij,mj->mi", Kinv, np.stack([vu[:, 1], vu[:, 0], np.ones(len(vu))], -1).astype(np.float64))
    c2w = rec.c2w[image]
    return np.einsum("mij,mj->mi", c2w[:, :3, :3], ray * d[:, None]) + c2w[:, :3, 3]


def build_tracks(rec: Reconstruction, points: tuple[np.ndarray, np.ndarray, np.ndarray],
                 conf_thr: float | None = None, depth_tol: float = 0.02) -> Tracks:
    """Tracks of the points (xyz, rgb, src) of `rec.pointcloud(conf_thr=...)` (see the module docstring).

    conf_thr: which pixels of the other images count as reconstructed (None: `rec.default_conf_thr`; use the
    point cloud's threshold). depth_tol: relative depth agreement for an observation; 0: every point keeps only its
    source observation (single-image tracks, the point's own coordinates).
    """
    xyz, rgb, src = (np.asarray(a) for a in points)
    src = src.astype(np.int64).reshape(-1, 3)
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    M, N = len(xyz), len(rec)
    if depth_tol < 0:
        raise ValueError(f"depth_tol must be >= 0 (0: single-image tracks), got {depth_tol}")
    # candidate observations: (point, image, v, u, rank); the source has rank -1 (always kept)
    P, B, V, U, R = [np.arange(M)], [src[:, 0]], [src[:, 1]], [src[:, 2]], [np.full(M, -1.0)]
    if depth_tol > 0 and M:
        valid = rec.masks(conf_thr)
        for b in range(N):
            h, w = rec.depths[b].shape
            uv, z = project(rec, np.full(M, b), xyz)
            with np.errstate(invalid="ignore"):
                ok = (src[:, 0] != b) & (z > 0) & np.isfinite(uv).all(1)
            q = np.full((M, 2), -1, np.int64)
            q[ok] = np.floor(uv[ok] + 0.5).astype(np.int64)                # nearest pixel centre (u, v)
            ok &= (q[:, 0] >= 0) & (q[:, 0] < w) & (q[:, 1] >= 0) & (q[:, 1] < h)
            idx = np.nonzero(ok)[0]
            qu, qv = q[idx, 0], q[idx, 1]
            keep = valid[b][qv, qu]
            rel = np.minimum(np.abs(rec.depths[b][qv, qu].astype(np.float64) - z[idx]) / z[idx],
                             _interp_rel(rec.depths[b], valid[b], uv[idx], z[idx]))
            keep &= rel <= depth_tol
            idx = idx[keep]
            P.append(idx), B.append(np.full(len(idx), b)), V.append(qv[keep]), U.append(qu[keep]), R.append(rel[keep])
    p, b, v, u, r = (np.concatenate(x) for x in (P, B, V, U, R))
    sel = np.arange(len(p))
    # by point, source first
    sel = sel[np.lexsort((r[sel], p[sel]))]
    p, b, vu, r = p[sel], b[sel], np.stack([v[sel], u[sel]], -1), r[sel]
    if depth_tol > 0:
        Xo = _back_project(rec, b, vu)
        wt = np.maximum(_lookup(rec.confs, b, vu), 1e-6)
        den = np.bincount(p, weights=wt, minlength=M)
        fused = np.stack([np.bincount(p, weights=wt * Xo[:, k], minlength=M) for k in range(3)], -1).astype(np.float64)
        fused /= np.maximum(den, 1e-30)[:, None]   # (bincount of no points is an empty int array)
    else:
        fused = xyz.copy()
    K_orig = rec.K_orig
    uv_proj, _ = project(rec, b, fused[p], K=K_orig)
    kp = cv.pixel_net_to_orig(np.stack([vu[:, 1], vu[:, 0]], -1).astype(np.float64), rec.transforms[b])
    err = np.linalg.norm(uv_proj - kp, axis=-1)
    return Tracks(xyz=fused, rgb=np.asarray(rgb, np.uint8).reshape(-1, 3), point=p, image=b, vu=vu, error=err)
