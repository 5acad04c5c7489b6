"""Synthetic scenes: determinism, camera paths, exact multi-view depth consistency, oracle pair predictions."""

import math

import numpy as np
import pytest
import torch

from dust3r_ns import synth

H, W = 24, 32


@pytest.fixture(scope="module")
def scene():
    return synth.make_scene(11)


def test_make_scene_deterministic_and_seed_dependent():
    a, b, c = synth.make_scene(4), synth.make_scene(4), synth.make_scene(5)
    c2w, K = synth.camera_path(a, 2, seed=0, H=H, W=W)
    ra, rb = synth.render(a, c2w[0], K[0], H, W), synth.render(b, c2w[0], K[0], H, W)
    rc = synth.render(c, c2w[0], K[0], H, W)
    assert np.array_equal(ra["rgb"], rb["rgb"]) and np.array_equal(ra["depth"], rb["depth"])
    assert not np.array_equal(ra["rgb"], rc["rgb"])
    assert 3 <= len(a.objects) <= 7
    assert len(synth.make_scene(0, n_objects=(5, 5)).objects) == 5
    with pytest.raises(ValueError, match="n_objects"):
        synth.make_scene(0, n_objects=(4, 2))


def test_render_outputs(scene):
    c2w, K = synth.camera_path(scene, 1, seed=3, H=H, W=W)
    r = synth.render(scene, c2w[0], K[0], H, W)
    assert r["rgb"].shape == (H, W, 3) and r["rgb"].dtype == np.uint8
    assert r["depth"].shape == (H, W) and r["depth"].dtype == np.float32
    assert r["valid"].dtype == bool and r["valid"].all()          # closed room: every ray hits something
    assert (r["depth"] > 0.1).all() and r["rgb"].std() > 10        # textured, not a flat image
    with pytest.raises(ValueError):
        synth.render(scene, np.eye(3), K[0], H, W)


@pytest.mark.parametrize("baseline,arc", [("small", 10), ("moderate", 45), ("wide", 120)])
def test_camera_path_geometry(scene, baseline, arc):
    n = 5
    c2w, K = synth.camera_path(scene, n, baseline=baseline, seed=2, H=H, W=W)
    assert c2w.shape == (n, 4, 4) and K.shape == (n, 3, 3) and c2w.dtype == np.float64
    R = c2w[:, :3, :3]
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(R), 1)
    assert np.allclose(K[:, 0, 2], W / 2) and np.allclose(K[:, 1, 2], H / 2)
    f = K[:, 0, 0] / max(H, W)
    assert ((f >= 0.8) & (f <= 1.2)).all()
    C = c2w[:, :3, 3]
    assert (C > scene.room_min).all() and (C < scene.room_max).all()
    # image rows point down in the world (+z up): camera y axis has a negative world z component
    assert (R[:, 2, 1] < 0).all()
    # every camera looks at the objects' centre: it projects near the image centre
    ctr = scene.center
    pc = np.einsum("nji,nj->ni", R, ctr - C)
    uv = np.einsum("nij,nj->ni", K, pc)
    uv = uv[:, :2] / uv[:, 2:]
    assert (pc[:, 2] > 0).all() and np.abs(uv - [W / 2, H / 2]).max() < 0.35 * max(H, W)
    # total arc around the centre (horizontal angle between first and last camera)
    a0, a1 = (C[0] - ctr)[:2], (C[-1] - ctr)[:2]
    ang = math.degrees(math.acos(np.dot(a0, a1) / np.linalg.norm(a0) / np.linalg.norm(a1)))
    assert abs(ang - arc) < 0.2 * arc + 2


def test_camera_path_errors(scene):
    with pytest.raises(ValueError, match="baseline"):
        synth.camera_path(scene, 3, baseline="huge")
    with pytest.raises(ValueError, match="n must"):
        synth.camera_path(scene, 0)


def test_random_pair(scene):
    rng = np.random.default_rng(0)
    for _ in range(5):
        c2w, K = synth.random_pair(scene, rng, H, W, baseline_deg=(20, 30))
        assert c2w.shape == (2, 4, 4) and K.shape == (2, 3, 3)
        d = [(c2w[k, :3, 3] - scene.center)[:2] for k in range(2)]
        ang = math.degrees(math.acos(np.dot(d[0], d[1]) / np.linalg.norm(d[0]) / np.linalg.norm(d[1])))
        assert 19 < ang < 31


def _world_points(view):
    X = synth.camera_points(view["depth"].astype(np.float64), view["K"])
    return X @ view["c2w"][:3, :3].T + view["c2w"][:3, 3]


def test_multiview_depth_consistency(scene):
    """Back-project view i, project into view j, re-cast there at the sub-pixel position: same z-depth where seen."""
    c2w, K = synth.camera_path(scene, 3, baseline="moderate", seed=5, H=48, W=64)
    views = synth.render_views(scene, c2w, K, 48, 64)
    for i, j in [(0, 1), (2, 0)]:
        Xw = _world_points(views[i]).reshape(-1, 3)
        w2c = np.linalg.inv(c2w[j])
        Xc = Xw @ w2c[:3, :3].T + w2c[:3, 3]
        uvw = Xc @ K[j].T
        uv = uvw[:, :2] / uvw[:, 2:]
        inside = (Xc[:, 2] > 0) & (uv[:, 0] >= 0) & (uv[:, 0] <= 63) & (uv[:, 1] >= 0) & (uv[:, 1] <= 47)
        d = np.concatenate([uv[inside], np.ones((inside.sum(), 1))], 1) @ np.linalg.inv(K[j]).T
        t, _ = synth.cast(scene, c2w[j][:3, 3], d @ c2w[j][:3, :3].T)
        rel = np.abs(t - Xc[inside, 2]) / Xc[inside, 2]
        assert inside.mean() > 0.3
        assert (rel < 1e-4).mean() > 0.7                    # the rest is occluded in view j
        # the unoccluded pixels agree to float32 depth precision
        assert np.median(rel) < 1e-6


def test_oracle_exact_geometry(scene):
    c2w, K = synth.camera_path(scene, 3, baseline="wide", seed=1, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W)
    edges = [(0, 1), (1, 0), (2, 1)]
    out = synth.oracle_pairs(views, edges, noise=synth.NoiseConfig.none(), seed=0)
    assert out["view1"]["idx"] == [0, 1, 2] and out["view2"]["idx"] == [1, 0, 1]
    assert out["view1"]["instance"] == ["0", "1", "2"]
    assert out["view1"]["true_shape"].tolist() == [[H, W]] * 3
    img = out["view2"]["img"]
    assert img.shape == (3, 3, H, W) and img.dtype == torch.float32
    assert torch.allclose(img[0], torch.from_numpy(views[1]["rgb"]).permute(2, 0, 1).float() / 127.5 - 1, atol=1e-6)
    p1, p2 = out["pred1"]["pts3d"].double().numpy(), out["pred2"]["pts3d_in_other_view"].double().numpy()
    assert p1.shape == (3, H, W, 3) and out["pred1"]["conf"].shape == (3, H, W)
    for e, (i, j) in enumerate(edges):
        Ri, ti = c2w[i][:3, :3], c2w[i][:3, 3]
        assert np.allclose(p1[e] @ Ri.T + ti, _world_points(views[i]), atol=1e-4)
        assert np.allclose(p2[e] @ Ri.T + ti, _world_points(views[j]), atol=1e-4)
        assert np.allclose(p1[e][..., 2], views[i]["depth"], rtol=1e-6)
    for key in ("pred1", "pred2"):
        conf = out[key]["conf"]
        assert (conf >= 1.5).all() and (conf <= 10.0).all()


def test_oracle_noise(scene):
    c2w, K = synth.camera_path(scene, 3, baseline="moderate", seed=1, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W)
    edges = [(0, 1), (1, 2), (2, 0)]
    cfg = synth.NoiseConfig(outlier_frac=0.1)
    out = synth.oracle_pairs(views, edges, noise=cfg, seed=3)
    again = synth.oracle_pairs(views, edges, noise=cfg, seed=3)
    assert torch.equal(out["pred1"]["pts3d"], again["pred1"]["pts3d"])
    scales = []
    for e, (i, _) in enumerate(edges):
        exact = synth.camera_points(views[i]["depth"].astype(np.float64), K[i]).reshape(-1, 3)
        pred = out["pred1"]["pts3d"][e].double().numpy().reshape(-1, 3)
        conf = out["pred1"]["conf"][e].numpy().ravel()
        good = conf >= cfg.conf_range[0]
        assert 0.03 < (~good).mean() < 0.2                     # outliers flagged with low confidence
        s = np.linalg.norm(pred[good] - pred[good].mean(0), axis=1).mean() / \
            np.linalg.norm(exact[good] - exact[good].mean(0), axis=1).mean()
        assert 0.45 < s < 2.1
        scales.append(s)
        # away from outliers the corruption is a similarity plus ~1% noise
        from dust3r_ns.metrics import umeyama_sim3
        s2, R2, t2 = umeyama_sim3(exact[good], pred[good])
        res = np.linalg.norm(s2 * exact[good] @ R2.T + t2 - pred[good], axis=1) / np.linalg.norm(pred[good], axis=1)
        assert np.median(res) < 0.02 and abs(s2 / s - 1) < 0.05
    assert np.ptp(scales) > 0.01                                 # an unknown scale per pair
    assert synth.NoiseConfig().scaled(2.0).depth_noise == pytest.approx(0.02)


def test_oracle_errors(scene):
    c2w, K = synth.camera_path(scene, 2, seed=1, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W)
    with pytest.raises(ValueError, match="edge"):
        synth.oracle_pairs(views, [(0, 2)])
    with pytest.raises(ValueError, match="scale_range"):
        synth.oracle_pairs(views, [(0, 1)], noise=synth.NoiseConfig(scale_range=(2.0, 1.0)))


def test_cameras_clear_of_objects_and_deterministic():
    from dust3r_ns.synth.cameras import object_distance

    for s in range(6):
        sc = synth.make_scene(s)
        c2w, K = synth.camera_path(sc, 6, baseline="wide", seed=s, H=H, W=W)
        c2w_b, K_b = synth.camera_path(sc, 6, baseline="wide", seed=s, H=H, W=W)
        assert np.array_equal(c2w, c2w_b) and np.array_equal(K, K_b)
        pair, _ = synth.random_pair(sc, np.random.default_rng(s), H, W)
        for C in (c2w[:, :3, 3], pair[:, :3, 3]):
            assert min(object_distance(ob, C).min() for ob in sc.objects) > 0.5
            assert ((C > sc.room_min) & (C < sc.room_max)).all()


def test_oracle_invalid_pixels(scene):
    c2w, K = synth.camera_path(scene, 2, seed=4, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W)
    views[1] = dict(views[1], valid=views[1]["valid"].copy(), depth=views[1]["depth"].copy())
    views[1]["valid"][:5] = False
    views[1]["depth"][:5] = 0.0
    out = synth.oracle_pairs(views, [(0, 1), (1, 0)], seed=0)
    assert torch.isfinite(out["pred1"]["pts3d"]).all() and torch.isfinite(out["pred2"]["pts3d_in_other_view"]).all()
    assert (out["pred2"]["conf"][0, :5] == 1.0).all() and (out["pred1"]["conf"][1, :5] == 1.0).all()
    assert (out["pred1"]["pts3d"][1, :5, :, 2] > 0).all()        # in front of the camera, at a plausible depth
    assert (out["pred1"]["conf"][0] > 1.0).all()


def test_make_examples(tmp_path):
    import json

    from PIL import Image

    from dust3r_ns.synth.make_examples import make_examples

    paths = make_examples(tmp_path / "ex", seed=2, n=3, H=H, W=W)
    assert [p.name for p in paths] == ["view_00.png", "view_01.png", "view_02.png", "cameras.json"]
    meta = json.loads(paths[-1].read_text())
    c2w, K = synth.camera_path(synth.make_scene(2), 3, baseline="moderate", seed=2, H=H, W=W)
    assert np.allclose(meta["c2w"], c2w) and np.allclose(meta["K"], K)
    img = np.asarray(Image.open(paths[1]))
    assert img.shape == (H, W, 3)
    assert np.array_equal(img, synth.render(synth.make_scene(2), c2w[1], K[1], H, W)["rgb"])
    assert not list((tmp_path / "ex").glob("*.tmp"))


def test_open_room_has_invalid_sky():
    sc = synth.make_scene(11, ceiling=False)
    c2w, K = synth.camera_path(sc, 1, seed=0, H=H, W=W)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    c2w[0, :3, :3] = c2w[0, :3, :3] @ np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]])   # tilt up 30 deg
    r = synth.render(sc, c2w[0], K[0], H, W)
    assert 0 < (~r["valid"]).mean() < 1 and (r["depth"][~r["valid"]] == 0).all()
    out = synth.oracle_pairs([dict(r, c2w=c2w[0], K=K[0])] * 2, [(0, 1)])
    assert (out["pred1"]["conf"][0][torch.from_numpy(~r["valid"])] == 1.0).all()
    assert torch.isfinite(out["pred1"]["pts3d"]).all()


def test_smooth_noise_field():
    from dust3r_ns.synth.oracle import smooth_field

    g = np.random.default_rng(5).standard_normal((4, 4))
    f = smooth_field(np.random.default_rng(5), 31, 41, 4)
    assert f.shape == (31, 41) and np.allclose(f[[0, 0, -1, -1], [0, -1, 0, -1]], g[[0, 0, -1, -1], [0, -1, 0, -1]])
    assert np.allclose(f[15, 20], g[1:3, 1:3].mean())                 # centre of the middle cell
    assert np.abs(np.diff(f, axis=1)).max() < 4 * np.abs(g).max() / 13  # smooth: small steps between pixels
    cfg = synth.NoiseConfig(depth_noise=0.0, outlier_frac=0.0, rot_deg=0.0, trans_frac=0.0, scale_range=(1, 1))
    c2w, K = synth.camera_path(synth.make_scene(1), 2, seed=0, H=H, W=W)
    views = synth.render_views(synth.make_scene(1), c2w, K, H, W)
    p = synth.oracle_pairs(views, [(0, 1)], noise=cfg)["pred1"]["pts3d"][0, ..., 2].double().numpy()
    rel = p / views[0]["depth"] - 1
    assert 0.002 < rel.std() < 0.03 and np.abs(np.diff(rel, axis=1)).max() < 0.01


def test_focal_noise_changes_implied_focal():
    def implied_focal(p):                      # least squares (u, v) - pp = f (x/z, y/z)
        v, u = np.mgrid[0:H, 0:W]
        px = np.stack([u - W / 2, v - H / 2], -1).reshape(-1)
        q = (p[..., :2] / p[..., 2:]).reshape(-1)
        return float((px * q).sum() / (q * q).sum())

    sc = synth.make_scene(2)
    c2w, K = synth.camera_path(sc, 2, seed=0, H=H, W=W)
    views = synth.render_views(sc, c2w, K, H, W)
    base = synth.NoiseConfig.none()
    fs = []
    for cfg in (base, synth.NoiseConfig(scale_range=(1, 1), rot_deg=0, trans_frac=0, depth_noise=0, outlier_frac=0,
                                        smooth_noise=0, focal_noise=0.05)):
        p = synth.oracle_pairs(views, [(0, 1)], noise=cfg, seed=1)["pred1"]["pts3d"]
        fs.append(implied_focal(p[0].double().numpy()))
    assert fs[0] == pytest.approx(K[0, 0, 0], rel=1e-4)
    assert 0.002 < abs(fs[1] / K[0, 0, 0] - 1) < 0.25
    with pytest.raises(ValueError, match="focal_noise"):
        synth.oracle_pairs(views, [(0, 1)], noise=synth.NoiseConfig(focal_noise=-1))


def _pair_geometry(scene, c2w):
    """Angle (deg) between the two cameras around the aim centre, their horizontal radii and heights."""
    d = [c2w[k, :2, 3] - scene.center[:2] for k in range(2)]
    ang = math.degrees(math.acos(np.clip(np.dot(d[0], d[1]) / np.linalg.norm(d[0]) / np.linalg.norm(d[1]), -1, 1)))
    return ang, [float(np.linalg.norm(v)) for v in d], c2w[:, 2, 3]


def test_random_pair_uniform_default_draws_unchanged():
    """The default (uniform, no same-ring pairs) reproduces the original sampler's cameras and random stream."""
    rng = np.random.default_rng(123)
    c2w, K = synth.random_pair(synth.make_scene(7), rng, 24, 32, baseline_deg=(5, 50))
    ref_C = [[-0.986983389, -1.9133222841, 1.630885056], [-0.6925942368, -2.0115854907, 1.7310104982]]
    np.testing.assert_allclose(c2w[:, :3, 3], ref_C, atol=1e-8)
    np.testing.assert_allclose(K[:, 0, 0], [28.3361659312, 35.0907782686], atol=1e-8)
    assert rng.random() == pytest.approx(0.6299402045896808, abs=1e-12)
    rng2 = np.random.default_rng(123)
    c2w2, _ = synth.random_pair(synth.make_scene(7), rng2, 24, 32, baseline_deg=(5, 50), baseline_sampling="uniform",
                                same_ring=0.0)
    np.testing.assert_array_equal(c2w, c2w2)


def test_random_pair_log_sampling_short_baselines(scene):
    """Log-uniform separations over (0.5, 60): about ln(10)/ln(120) = 48% below 5 deg, none outside the range."""
    rng_u, rng_l = np.random.default_rng(1), np.random.default_rng(1)
    ang_u = [_pair_geometry(scene, synth.random_pair(scene, rng_u, H, W, baseline_deg=(0.5, 60))[0])[0]
             for _ in range(120)]
    ang_l = [_pair_geometry(scene, synth.random_pair(scene, rng_l, H, W, baseline_deg=(0.5, 60),
                                                     baseline_sampling="log")[0])[0] for _ in range(120)]
    ang_u, ang_l = np.array(ang_u), np.array(ang_l)
    assert ang_l.min() > 0.45 and ang_l.max() < 60.05
    assert 0.33 < (ang_l < 5).mean() < 0.63  # binomial(120, 0.48): +-3 sigma
    assert (ang_u < 5).mean() < 0.2  # uniform: 7.5% expected
    assert np.median(ang_l) < 0.5 * np.median(ang_u)
    rng_m = np.random.default_rng(1)
    ang_m = np.array([_pair_geometry(scene, synth.random_pair(scene, rng_m, H, W, baseline_deg=(0.5, 60),
                                                              baseline_sampling="mixed")[0])[0] for _ in range(120)])
    assert ang_m.min() > 0.45 and ang_m.max() < 60.05
    assert (ang_u < 5).mean() < (ang_m < 5).mean() < (ang_l < 5).mean()  # expected 7.5% < 28% < 48%
    assert (ang_m > 20).mean() > (ang_l > 20).mean() + 0.08  # expected 45% vs 23%


def test_random_pair_same_ring(scene):
    """same_ring=1: both cameras on one radius and (within noise) one height; 0 keeps them independent."""
    rng = np.random.default_rng(2)
    for _ in range(10):
        c2w, _ = synth.random_pair(scene, rng, H, W, baseline_deg=(1, 10), baseline_sampling="log", same_ring=1.0)
        ang, radii, heights = _pair_geometry(scene, c2w)
        assert 0.95 < ang < 10.05
        assert abs(radii[0] - radii[1]) < 1e-6 and abs(heights[0] - heights[1]) < 0.15
    diffs = [np.ptp(_pair_geometry(scene, synth.random_pair(scene, rng, H, W, baseline_deg=(1, 10))[0])[1])
             for _ in range(10)]
    assert max(diffs) > 0.1


def test_random_pair_bad_sampling_options(scene):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="baseline_sampling"):
        synth.random_pair(scene, rng, H, W, baseline_sampling="cubic")
    with pytest.raises(ValueError, match="lo > 0"):
        synth.random_pair(scene, rng, H, W, baseline_deg=(0, 10), baseline_sampling="log")
