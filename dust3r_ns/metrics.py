"""Evaluation metrics against ground truth: Sim(3)-aligned trajectory error, relative rotation/translation angles,
focal error and median-scaled depth AbsRel. All inputs numpy (or array-like), cameras OpenCV camera-to-world 4x4."""

from __future__ import annotations

import math

import numpy as np
import torch

from dust3r_ns.geometry import umeyama


def umeyama_sim3(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(s, R (3,3), t (3,)) minimising sum ||dst - (s R src + t)||^2 for point sets src, dst (N,3), N >= 1
    (`dust3r_ns.geometry.umeyama` in float64; one point or a degenerate fit: s = 1, R = I, t the mean shift)."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or len(src) < 1:
        raise ValueError(f"umeyama_sim3: need two (N,3) arrays of equal shape, got {src.shape} and {dst.shape}")
    # centred first: the moments' covariance E[y x^T] - my mx^T then involves no cancellation
    ms, md = src.mean(0), dst.mean(0)
    s, R, _ = umeyama(torch.from_numpy(src - ms)[None], torch.from_numpy(dst - md)[None])
    s, R = float(s[0]), R[0].numpy()
    if len(src) < 2 or not np.isfinite(s):
        s, R = 1.0, np.eye(3)
    return s, R, md - s * R @ ms


def _check_poses(c2w: np.ndarray, name: str) -> np.ndarray:
    c2w = np.asarray(c2w, np.float64)
    if c2w.ndim != 3 or c2w.shape[1:] not in ((4, 4), (3, 4)):
        raise ValueError(f"pose_metrics: {name} must be (N,4,4) or (N,3,4) camera-to-world, got {c2w.shape}")
    return c2w


def rotation_angle_deg(R: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) of rotation matrices (...,3,3)."""
    R = np.asarray(R, np.float64)
    # ||R - I||_F = 2 sqrt(2) sin(theta / 2): accurate for small angles (arccos of the trace is not)
    d = np.linalg.norm(R - np.eye(3), axis=(-2, -1)) / (2 * math.sqrt(2))
    return np.degrees(2 * np.arcsin(np.clip(d, 0.0, 1.0)))


def relative_rotation_errors(c2w_est: np.ndarray, c2w_gt: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(P,) degrees: for each pair (i, j) of `pairs` [P, 2], the angle of (R_i^T R_j)_est^T (R_i^T R_j)_gt (frame-free).
    Over all ordered pairs this is the RRA of `pose_metrics`; over a pair graph's own edges it compares a solution
    with the relative rotations its edges predicted."""
    est, gt = _check_poses(c2w_est, "c2w_est"), _check_poses(c2w_gt, "c2w_gt")
    i, j = np.asarray(pairs, np.int64).reshape(-1, 2).T
    Re, Rg = est[:, :3, :3], gt[:, :3, :3]
    rel_e = np.swapaxes(Re[i], -1, -2) @ Re[j]
    rel_g = np.swapaxes(Rg[i], -1, -2) @ Rg[j]
    return rotation_angle_deg(np.swapaxes(rel_e, -1, -2) @ rel_g)


def pose_metrics(c2w_est: np.ndarray, c2w_gt: np.ndarray) -> dict:
    """Camera pose errors of an estimate against ground truth (same order, N >= 2).

    ate_pct: RMSE of the camera centres after Sim(3) alignment of the estimate onto the ground truth, divided by
    the RMS distance of the GT centres to their mean, x 100. rra_*: over all ordered pairs (i, j), i != j, the angle
    of (R_i^T R_j)_est^T (R_i^T R_j)_gt. rta_*: angle between the relative translation directions R_i^T (C_j - C_i)
    (camera i's frame), est vs gt. Scale- and frame-invariant.
    """
    est, gt = _check_poses(c2w_est, "c2w_est"), _check_poses(c2w_gt, "c2w_gt")
    if len(est) != len(gt) or len(gt) < 2:
        raise ValueError(f"pose_metrics: need the same number (>= 2) of estimated and GT cameras, "
                         f"got {len(est)} and {len(gt)}")
    Ce, Cg = est[:, :3, 3], gt[:, :3, 3]
    s, R, t = umeyama_sim3(Ce, Cg)
    aligned = s * Ce @ R.T + t
    spread = math.sqrt(((Cg - Cg.mean(0)) ** 2).sum(-1).mean())
    rmse = math.sqrt(((aligned - Cg) ** 2).sum(-1).mean())
    ate = 100.0 * rmse / max(spread, 1e-12)
    n = len(gt)
    i, j = np.array([(a, b) for a in range(n) for b in range(n) if a != b]).T
    Re, Rg = est[:, :3, :3], gt[:, :3, :3]
    rra = relative_rotation_errors(est, gt, np.stack([i, j], -1))
    te = (np.swapaxes(Re[i], -1, -2) @ (Ce[j] - Ce[i])[..., None])[..., 0]
    tg = (np.swapaxes(Rg[i], -1, -2) @ (Cg[j] - Cg[i])[..., None])[..., 0]
    rta = np.degrees(np.arctan2(np.linalg.norm(np.cross(te, tg), axis=-1), (te * tg).sum(-1)))
    return dict(ate_pct=float(ate), rra_mean_deg=float(rra.mean()), rra_max_deg=float(rra.max()),
                rta_mean_deg=float(rta.mean()), rta_max_deg=float(rta.max()))


def focal_error_pct(f_est, f_gt) -> float:
    """Mean relative focal error |f_est / f_gt - 1| x 100 over cameras (scalars or (N,) arrays)."""
    fe = np.atleast_1d(np.asarray(f_est, np.float64))
    fg = np.atleast_1d(np.asarray(f_gt, np.float64))
    if fe.shape != fg.shape or (fg <= 0).any():
        raise ValueError(f"focal_error_pct: need equal shapes and positive GT focals, got {fe.shape} and {fg.shape}")
    return float(np.abs(fe / fg - 1).mean() * 100)


def depth_abs_rel(d_est, d_gt, valid=None) -> float:
    """AbsRel mean |s d_est - d_gt| / d_gt over valid pixels (valid & d_gt > 0 & finite) after median scaling
    s = median(d_gt) / median(d_est). Lists of maps are scaled per map; the result is the mean over maps."""
    if isinstance(d_est, (list, tuple)):
        if not isinstance(d_gt, (list, tuple)) or len(d_gt) != len(d_est) or len(d_est) == 0:
            raise ValueError("depth_abs_rel: d_est and d_gt lists must have the same, non-zero length")
        vs = valid if isinstance(valid, (list, tuple)) else [valid] * len(d_est)
        return float(np.mean([depth_abs_rel(a, b, v) for a, b, v in zip(d_est, d_gt, vs)]))
    de = np.asarray(d_est, np.float64)
    dg = np.asarray(d_gt, np.float64)
    if de.shape != dg.shape:
        raise ValueError(f"depth_abs_rel: shapes differ: {de.shape} vs {dg.shape}")
    m = np.isfinite(de) & np.isfinite(dg) & (dg > 0) & (de > 0)
    if valid is not None:
        m &= np.asarray(valid, bool)
    if not m.any():
        raise ValueError("depth_abs_rel: no valid pixels")
    s = np.median(dg[m]) / np.median(de[m])
    return float((np.abs(s * de[m] - dg[m]) / dg[m]).mean())
