"""Tests of the Reconstruction result (dust3r_ns.scene): geometry helpers, point cloud, save/load validation."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dust3r_ns.scene import Reconstruction, ReconstructionError


def _rec(n: int = 3, H: int = 12, W: int = 16, seed: int = 0) -> Reconstruction:
    g = np.random.default_rng(seed)
    c2w = np.tile(np.eye(4), (n, 1, 1))
    c2w[:, :3, 3] = g.normal(size=(n, 3))
    K = np.tile(np.array([[20.0, 0, W / 2], [0, 20.0, H / 2], [0, 0, 1]]), (n, 1, 1))
    return Reconstruction(
        names=[f"im{k}.png" for k in range(n)], orig_sizes=np.tile([W * 2, H * 2], (n, 1)),
        transforms=np.tile([0.5, 0.5, 0.0, 0.0], (n, 1)), c2w=c2w, K=K,
        depths=[g.uniform(1, 3, (H, W)).astype(np.float32) for _ in range(n)],
        confs=[g.uniform(1, 6, (H, W)).astype(np.float32) for _ in range(n)],
        rgbs=[g.integers(0, 256, (H, W, 3), dtype=np.uint8) for _ in range(n)], meta=dict(mode="fast", loss=0.25))


def test_points_and_masks():
    rec = _rec()
    p = rec.points_cam(0)
    np.testing.assert_allclose(p[..., 2], rec.depths[0], rtol=1e-6)
    # projecting camera points with K gives back the pixel grid
    uv = p @ rec.K[0].T
    v, u = np.mgrid[0:12, 0:16]
    np.testing.assert_allclose(uv[..., 0] / uv[..., 2], u, atol=1e-9)
    np.testing.assert_allclose(uv[..., 1] / uv[..., 2], v, atol=1e-9)
    np.testing.assert_allclose(rec.points_world(1), p_w := rec.points_cam(1) + rec.c2w[1, :3, 3])
    assert p_w.shape == (12, 16, 3)
    m = rec.masks(3.0)[0]
    np.testing.assert_array_equal(m, rec.confs[0] > 3.0)


def test_K_orig_inverts_network_transform():
    from dust3r_ns.conventions import K_orig_to_net

    rec = _rec()
    np.testing.assert_allclose(K_orig_to_net(rec.K_orig, rec.transforms), rec.K, atol=1e-12)
    assert rec.K_orig[0, 0, 0] == pytest.approx(40.0)


def test_pointcloud_threshold_cap_and_voxel():
    rec = _rec(n=3, H=30, W=40)
    xyz, rgb, src = rec.pointcloud(conf_thr=3.0, max_points=None)
    n_masked = sum(int(m.sum()) for m in rec.masks(3.0))
    assert len(xyz) == n_masked and xyz.dtype == np.float32 and rgb.dtype == np.uint8
    k, v, u = src[5]
    np.testing.assert_allclose(xyz[5], rec.points_world(k)[v, u], rtol=1e-5)
    np.testing.assert_array_equal(rgb[5], rec.rgbs[k][v, u])
    capped, _, _ = rec.pointcloud(conf_thr=1.0, max_points=500)
    assert 0 < len(capped) <= 500
    vox, _, vsrc = rec.pointcloud(conf_thr=1.0, max_points=None, voxel=0.5)
    full, _, fsrc = rec.pointcloud(conf_thr=1.0, max_points=None)
    P = np.concatenate([rec.points_world(k)[fsrc[fsrc[:, 0] == k, 1], fsrc[fsrc[:, 0] == k, 2]] for k in range(3)])
    q_full = np.floor((P - P.min(0)) / 0.5)
    occupied = len(np.unique(q_full, axis=0))
    assert len(vox) == occupied < len(full)          # exactly one point per occupied voxel
    sky = [np.ones((30, 40), bool)] * 3
    assert len(rec.pointcloud(sky_masks=sky)[0]) == 0
    near, _, _ = rec.pointcloud(conf_thr=1.0, max_points=None, far_clip=1.0)
    assert len(near) < 3 * 30 * 40


def test_save_load_roundtrip_atomic(tmp_path):
    rec = _rec()
    path = rec.save(tmp_path / "scene.npz")
    assert sorted(os.listdir(tmp_path)) == ["scene.npz"]          # no temp files left behind
    back = Reconstruction.load(path)
    assert back.names == rec.names and back.meta == rec.meta
    for key in ("orig_sizes", "transforms", "c2w", "K"):
        np.testing.assert_array_equal(getattr(back, key), getattr(rec, key))
    for a, b in zip(back.depths + back.confs + back.rgbs, rec.depths + rec.confs + rec.rgbs):
        np.testing.assert_array_equal(a, b)


def test_load_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ReconstructionError, match="not a readable"):
        Reconstruction.load(bad)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ReconstructionError, match="not a dust3r_ns reconstruction"):
        Reconstruction.load(other)
    rec = _rec()
    path = rec.save(tmp_path / "r.npz")
    with np.load(path) as z:
        data = {k: z[k] for k in z.files}
    data["format_version"] = np.array(99)
    np.savez(tmp_path / "v.npz", **data)
    with pytest.raises(ReconstructionError, match="version 99"):
        Reconstruction.load(tmp_path / "v.npz")
    data["format_version"] = np.array(1)
    del data["depth_1"]
    np.savez(tmp_path / "t.npz", **data)
    with pytest.raises(ReconstructionError, match="depth_1"):
        Reconstruction.load(tmp_path / "t.npz")
    with pytest.raises(ReconstructionError, match="no such"):
        Reconstruction.load(tmp_path / "missing.npz")
    with pytest.raises(ReconstructionError, match=".npz"):
        rec.save(tmp_path / "r.txt")


def test_constructor_validates_shapes():
    rec = _rec()
    with pytest.raises(ReconstructionError, match="c2w"):
        Reconstruction(names=rec.names, orig_sizes=rec.orig_sizes, transforms=rec.transforms, c2w=rec.c2w[:2],
                       K=rec.K, depths=rec.depths, confs=rec.confs, rgbs=rec.rgbs)
    with pytest.raises(ReconstructionError, match="disagree"):
        Reconstruction(names=rec.names, orig_sizes=rec.orig_sizes, transforms=rec.transforms, c2w=rec.c2w,
                       K=rec.K, depths=rec.depths, confs=[c[:, :5] for c in rec.confs], rgbs=rec.rgbs)
