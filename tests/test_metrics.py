"""Metrics on hand-made cases with known answers."""

import math

import numpy as np
import pytest

from dust3r_ns.metrics import (depth_abs_rel, focal_error_pct, pose_metrics, relative_rotation_errors, rotation_angle_deg,
                               umeyama_sim3)


def _rot(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(deg)
    return np.eye(3) + math.sin(t) * K + (1 - math.cos(t)) * K @ K


def _cams(n=6, seed=0):
    g = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for k in range(n):
        c2w[k, :3, :3] = _rot(g.normal(size=3), g.uniform(5, 170))
        c2w[k, :3, 3] = g.normal(size=3) * 2
    return c2w


def test_identity_is_zero():
    c = _cams()
    m = pose_metrics(c, c)
    assert m["ate_pct"] < 1e-4 and m["rra_max_deg"] < 1e-6 and m["rta_mean_deg"] < 1e-6


def test_known_rotation_error():
    gt = _cams()
    est = gt.copy()
    est[2, :3, :3] = gt[2, :3, :3] @ _rot([0.3, 1, 0.2], 7.0)      # camera 2 turned by 7 deg about its own axis
    m = pose_metrics(est, gt)
    assert m["rra_max_deg"] == pytest.approx(7.0, abs=1e-6)
    n = len(gt)
    assert m["rra_mean_deg"] == pytest.approx(7.0 * 2 * (n - 1) / (n * (n - 1)), abs=1e-6)
    assert m["ate_pct"] < 1e-4                                       # centres unchanged
    assert rotation_angle_deg(_rot([1, 2, 3], 0.01)) == pytest.approx(0.01, rel=1e-6)


def test_sim3_copy_has_zero_error_and_umeyama_recovers_it():
    gt = _cams(8, seed=1)
    S, Rs, ts = 3.7, _rot([1, -1, 2], 63), np.array([5.0, -2.0, 1.0])
    est = gt.copy()
    est[:, :3, :3] = Rs @ gt[:, :3, :3]
    est[:, :3, 3] = S * gt[:, :3, 3] @ Rs.T + ts
    m = pose_metrics(est, gt)
    assert m["ate_pct"] < 1e-3 and m["rra_max_deg"] < 1e-6 and m["rta_mean_deg"] < 1e-6
    s, R, t = umeyama_sim3(gt[:, :3, 3], est[:, :3, 3])
    assert s == pytest.approx(S, rel=1e-5) and np.allclose(R, Rs, atol=1e-5) and np.allclose(t, ts, atol=1e-4)


def test_translation_errors():
    gt = _cams(5, seed=2)
    est = gt.copy()
    est[0, :3, 3] += np.array([0.5, 0.0, 0.0])
    m = pose_metrics(est, gt)
    assert m["ate_pct"] > 1.0 and m["rta_mean_deg"] > 0.1 and m["rra_max_deg"] < 1e-6
    # ATE is relative to the camera spread: scaling the whole problem does not change it
    gt2, est2 = gt.copy(), est.copy()
    gt2[:, :3, 3] *= 10
    est2[:, :3, 3] *= 10
    assert pose_metrics(est2, gt2)["ate_pct"] == pytest.approx(m["ate_pct"], rel=1e-4)


def test_pose_metric_errors():
    with pytest.raises(ValueError, match="same number"):
        pose_metrics(_cams(3), _cams(4))
    with pytest.raises(ValueError, match="camera-to-world"):
        pose_metrics(np.eye(4), np.eye(4))


def test_focal_and_depth():
    assert focal_error_pct([110.0, 90.0], [100.0, 100.0]) == pytest.approx(10.0)
    assert focal_error_pct(100.0, 100.0) == 0.0
    g = np.random.default_rng(0)
    d = g.uniform(1, 5, (8, 9))
    assert depth_abs_rel(3.0 * d, d) == pytest.approx(0.0, abs=1e-12)
    gt = np.ones(10)
    est = np.ones(10)
    est[:2] = 3.0                                                   # median stays 1: abs rel = 2 * 2 / 10
    assert depth_abs_rel(est, gt) == pytest.approx(0.4)
    valid = np.ones(10, bool)
    valid[:2] = False
    assert depth_abs_rel(est, gt, valid) == pytest.approx(0.0)
    assert depth_abs_rel([est, 2 * gt], [gt, gt], [valid, valid]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="no valid"):
        depth_abs_rel(est, gt, np.zeros(10, bool))


def test_relative_rotation_errors_over_all_pairs_is_the_rra_and_frame_free():
    gt = _cams(6, seed=3)
    g = np.random.default_rng(3)
    est = gt.copy()
    for k in range(len(gt)):
        est[k, :3, :3] = gt[k, :3, :3] @ _rot(g.normal(size=3), g.uniform(1, 5))
    n = len(gt)
    pairs = np.array([(a, b) for a in range(n) for b in range(n) if a != b])
    err = relative_rotation_errors(est, gt, pairs)
    assert err.shape == (n * (n - 1),) and (err > 0).all()
    assert err.mean() == pytest.approx(pose_metrics(est, gt)["rra_mean_deg"], rel=1e-12)
    # a rotation of the whole estimated world changes nothing; a pair (i, i) has no error
    G = np.eye(4)
    G[:3, :3] = _rot([0.3, -1.0, 0.4], 40)
    np.testing.assert_allclose(relative_rotation_errors(G @ est, gt, pairs), err, atol=1e-9)
    assert relative_rotation_errors(est, gt, np.array([[2, 2]]))[0] == pytest.approx(0.0, abs=1e-9)
