"""Tests of the trainer: losses (hand-computed values), view processing, datasets, sampler, schedule, resume."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from dust3r_ns.train.datasets import Co3dPreprocessed, PairBatchSampler, SyntheticScenes, collate_pairs, parse_resolution
from dust3r_ns.train.losses import ConfLoss, Regr3D, Regr3D_ScaleShiftInv
from dust3r_ns.train.loop import TrainConfig, load_preset, lr_at, make_config, run
from dust3r_ns.train.views import color_jitter, depth_to_world, rescale_crop

TEST_MODEL = ("AsymmetricCroCo3DStereo(img_size=(32, 32), head_type='linear', enc_embed_dim=32, enc_depth=1, "
              "enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2, landscape_only=False)")


def _t(x):
    return torch.tensor(x, dtype=torch.float32)


def _pose(t):
    c2w = torch.eye(4)
    c2w[:3, 3] = _t(t)
    return c2w[None]


# ---------------------------------------------------------------------------------------------------- losses

def _pair():
    """B=1, H=1, W=2. View 1 camera at z=-1 (world), view 2's pose is irrelevant (points go to view 1's frame)."""
    gt1 = dict(pts3d=_t([[[[0, 0, 1], [0, 0, 1]]]]), valid_mask=torch.tensor([[[True, True]]]), camera_pose=_pose([0, 0, -1]))
    gt2 = dict(pts3d=_t([[[[0, 0, 1], [5, 5, 5]]]]), valid_mask=torch.tensor([[[True, False]]]), camera_pose=_pose([9, 9, 9]))
    # in view 1's frame the valid GT points are (0,0,2) x3: average distance 2 -> all (0,0,1)
    pred1 = dict(pts3d=_t([[[[0, 0, 4], [0, 0, 4]]]]), conf=_t([[[2.0, 2.0]]]))
    pred2 = dict(pts3d_in_other_view=_t([[[[3, 0, 4], [100, 0, 0]]]]), conf=_t([[[1.5, 7.0]]]))
    return gt1, gt2, pred1, pred2


def test_regr3d_hand_computed():
    gt1, gt2, pred1, pred2 = _pair()
    (l1, v1), (l2, v2), _ = Regr3D()(gt1, gt2, pred1, pred2)
    s = (4 + 4 + 5) / 3  # average distance of the valid predicted points
    e1 = abs(4 / s - 1)
    e2 = math.sqrt((3 / s) ** 2 + (4 / s - 1) ** 2)
    assert v2.tolist() == [[[True, False]]]
    np.testing.assert_allclose(l1.numpy(), [e1, e1], rtol=1e-5)
    np.testing.assert_allclose(l2.numpy(), [e2], rtol=1e-5)
    total, _ = Regr3D().loss(gt1, gt2, pred1, pred2)
    assert float(total) == pytest.approx(e1 + e2, rel=1e-5)


def test_confloss_hand_computed():
    gt1, gt2, pred1, pred2 = _pair()
    s = 13 / 3
    e1, e2 = abs(4 / s - 1), math.sqrt((3 / s) ** 2 + (4 / s - 1) ** 2)
    total, det = ConfLoss(Regr3D(), alpha=0.2)(gt1, gt2, pred1, pred2)
    want = (2 * e1 - 0.2 * math.log(2)) + (1.5 * e2 - 0.2 * math.log(1.5))
    assert float(total) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        ConfLoss(Regr3D(), alpha=0)


def test_regr3d_scale_invariance_and_scale_shift_inv():
    g = torch.randn(2, 4, 5, 3) + _t([0, 0, 5])
    h = torch.randn(2, 4, 5, 3) + _t([0, 0, 5])
    v = torch.ones(2, 4, 5, dtype=torch.bool)
    eye = torch.eye(4).expand(2, 4, 4)
    gt1, gt2 = dict(pts3d=g, valid_mask=v, camera_pose=eye), dict(pts3d=h, valid_mask=v, camera_pose=eye)
    conf = torch.ones(2, 4, 5)
    scaled = (dict(pts3d=3 * g, conf=conf), dict(pts3d_in_other_view=3 * h, conf=conf))
    assert float(Regr3D().loss(gt1, gt2, *scaled)[0]) < 1e-5
    shift = _t([0, 0, 2.5])
    moved = (dict(pts3d=3 * g + shift, conf=conf), dict(pts3d_in_other_view=3 * h + shift, conf=conf))
    assert float(Regr3D().loss(gt1, gt2, *moved)[0]) > 1e-2  # Regr3D is not shift invariant
    assert float(Regr3D_ScaleShiftInv().loss(gt1, gt2, *moved)[0]) < 1e-4
    noisy = (dict(pts3d=g + 0.3, conf=conf), dict(pts3d_in_other_view=h - 0.3, conf=conf))
    assert float(Regr3D_ScaleShiftInv().loss(gt1, gt2, *noisy)[0]) > 1e-2


# ---------------------------------------------------------------------------------------------------- views

def test_rescale_crop_intrinsics_hand_computed():
    rgb = np.zeros((40, 60, 3), np.uint8)
    depth = np.full((40, 60), 2.0, np.float32)
    K = np.array([[50.0, 0, 29.5], [0, 50.0, 19.5], [0, 0, 1]])
    img, dep, K2, msk = rescale_crop(rgb, depth, K, (30, 20))  # factor 0.5, no crop
    np.testing.assert_allclose(K2, [[25, 0, 14.5], [0, 25, 9.5], [0, 0, 1]])
    assert img.shape == (20, 30, 3) and dep.shape == (20, 30) and msk.all() and np.all(dep == 2)
    img, dep, K3, _ = rescale_crop(rgb, depth, K, (32, 32))  # scale 0.8 -> 48x32, centred crop of 32 (x0 = 8)
    np.testing.assert_allclose(K3, [[40, 0, (29.5 + 0.5) * 0.8 - 0.5 - 8], [0, 40, (19.5 + 0.5) * 0.8 - 0.5], [0, 0, 1]])
    with pytest.raises(ValueError, match="sizes differ"):
        rescale_crop(rgb[:10], depth, K, (16, 16))


def test_depth_to_world_and_crop_keep_points():
    from dust3r_ns.synth import make_scene, random_pair, render

    sc = make_scene(4)
    c2w, K = random_pair(sc, np.random.default_rng(0), 48, 64)
    r = render(sc, c2w[0], K[0], 48, 64, points=True)
    pts, valid = depth_to_world(r["depth"], K[0], c2w[0])
    assert (valid == r["valid"]).all()
    np.testing.assert_allclose(pts[valid], r["pts3d"][valid], atol=1e-3)
    _, dep, K2, msk = rescale_crop(r["rgb"], r["depth"], K[0], (32, 48), r["valid"])  # crop only (scale 1)
    p2, v2 = depth_to_world(dep, K2, c2w[0])
    x0 = int(round(K[0][0, 2] - K2[0, 2]))
    np.testing.assert_allclose(p2[v2 & msk], r["pts3d"][:, x0:x0 + 32][v2 & msk], atol=1e-3)


def test_color_jitter_deterministic():
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    a = color_jitter(rgb, np.random.default_rng(1), 0.5)
    b = color_jitter(rgb, np.random.default_rng(1), 0.5)
    assert a.dtype == np.uint8 and (a == b).all() and (a != rgb).any()
    assert (color_jitter(rgb, np.random.default_rng(1), 0.0) == rgb).all()


# ---------------------------------------------------------------------------------------------------- datasets

def test_synthetic_scenes_deterministic_and_consistent():
    ds = SyntheticScenes(4, (48, 32), seed=3)
    a1, a2 = ds[1]
    b1, b2 = SyntheticScenes(4, (48, 32), seed=3)[1]
    c1, _ = SyntheticScenes(4, (48, 32), seed=4)[1]
    assert torch.equal(a1["img"], b1["img"]) and np.array_equal(a2["pts3d"], b2["pts3d"])
    assert not torch.equal(a1["img"], c1["img"])
    assert a1["img"].shape == (3, 32, 48) and tuple(a1["true_shape"]) == (32, 48)
    assert a1["valid_mask"].mean() > 0.5 and a1["img"].min() >= -1 and a1["img"].max() <= 1
    # view 2's valid points project into view 2's camera at their own pixels (poses/intrinsics consistent)
    w2c = np.linalg.inv(a2["camera_pose"].astype(np.float64))
    cam = a2["pts3d"][a2["valid_mask"]] @ w2c[:3, :3].T + w2c[:3, 3]
    uv = cam @ a2["camera_intrinsics"].astype(np.float64).T
    vv, uu = np.nonzero(a2["valid_mask"])
    np.testing.assert_allclose(uv[:, 0] / uv[:, 2], uu, atol=2e-2)
    np.testing.assert_allclose(uv[:, 1] / uv[:, 2], vv, atol=2e-2)
    v1, v2 = collate_pairs([ds[0], ds[(2, 0, 1)]])
    assert v1["img"].shape == (2, 3, 32, 48) and v1["camera_pose"].shape == (2, 4, 4) and v2["pts3d"].dtype == torch.float32


def test_synthetic_scenes_baseline_sampling_wired_from_config():
    """TrainConfig.baseline_sampling / same_ring reach the train and test sets; 'log' gives shorter baselines."""
    from dust3r_ns.train.loop import TrainConfig, build_datasets

    train, test = build_datasets(TrainConfig(train_pairs=12, test_pairs=2, baseline_deg=(0.5, 60.0),
                                             baseline_sampling="log", same_ring=1.0))
    assert (train.baseline_sampling, train.same_ring) == ("log", 1.0) == (test.baseline_sampling, test.same_ring)
    uni, _ = build_datasets(TrainConfig(train_pairs=12, test_pairs=2, baseline_deg=(0.5, 60.0)))
    assert (uni.baseline_sampling, uni.same_ring) == ("uniform", 0.0)

    def camera_gaps(ds):  # distance between the two camera centres of each pair
        return np.array([np.linalg.norm(np.diff([c2w[:3, 3] for _, c2w, _ in ds.render_pair(i, (16, 12))], axis=0))
                         for i in range(len(ds))])

    # log-uniform separations on one ring: the two cameras are much closer together than uniform independent draws
    assert np.median(camera_gaps(train)) < 0.5 * np.median(camera_gaps(uni))
    with pytest.raises(ValueError, match="baseline_sampling"):
        SyntheticScenes(2, (32, 16), baseline_sampling="cubic")
    with pytest.raises(ValueError, match="same_ring"):
        SyntheticScenes(2, (32, 16), same_ring=1.5)


def _write_co3d(root, n_frames=12, bad=()):
    rng = np.random.default_rng(0)
    seq = root / "apple" / "seq_a"
    for sub in ("images", "depths", "masks"):
        (seq / sub).mkdir(parents=True)
    frames = list(range(0, 2 * n_frames, 2))
    for f in frames:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3)).astype(np.uint8)).save(seq / "images" / f"frame{f:06d}.jpg")
        c2w = np.eye(4)
        c2w[:3, 3] = [0.1 * f, 0, 0]
        K = np.array([[30.0, 0, 15.5], [0, 30.0, 11.5], [0, 0, 1]])
        np.savez(seq / "images" / f"frame{f:06d}.npz", camera_pose=c2w, camera_intrinsics=K, maximum_depth=np.float32(4.0))
        d = np.full((24, 32), 0 if f in bad else 32767, np.uint16)
        d[12, 16] = 0  # one hole
        Image.fromarray(d).save(seq / "depths" / f"frame{f:06d}.jpg.geometric.png")
        Image.fromarray(np.full((24, 32), 255, np.uint8)).save(seq / "masks" / f"frame{f:06d}.png")
    for split in ("train", "test"):
        (root / f"selected_seqs_{split}.json").write_text(json.dumps({"apple": {"seq_a": frames}}))
    return frames


def test_co3d_preprocessed_fixture(tmp_path):
    frames = _write_co3d(tmp_path, bad={0})
    ds = Co3dPreprocessed(tmp_path, "train", (32, 16), seed=0)
    assert len(ds) == 7 + 2  # position gaps 5 (7 pairs) and 10 (2 pairs) among 12 frames
    assert ds.pairs[0] == ("apple", "seq_a", frames[0], frames[5])
    v1, v2 = ds[2]  # frames[1] and frames[6]
    assert v1["img"].shape == (3, 16, 32) and v1["skipped"] == 0
    z = 32767 * 4.0 / 65535
    assert v1["depthmap"][v1["valid_mask"]] == pytest.approx(z, rel=1e-6)
    assert not v1["valid_mask"].all()  # the hole stays invalid
    # world points: camera at x = 0.1 * frame, identity rotation
    f1 = ds.pairs[2][2]
    u, v = 20, 8
    K = v1["camera_intrinsics"]
    np.testing.assert_allclose(v1["pts3d"][v, u], [(u - K[0, 2]) * z / K[0, 0] + 0.1 * f1, (v - K[1, 2]) * z / K[1, 1], z],
                               atol=1e-4)
    # pairs 0 and 1 use frame 0 whose depth is all zero: skipped (counted), pair 2 returned
    w1, _ = ds[0]
    assert w1["skipped"] == 2 and w1["instance"] == v1["instance"]


def test_co3d_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="selected_seqs_train.json"):
        Co3dPreprocessed(tmp_path, "train")
    (tmp_path / "selected_seqs_train.json").write_text("{bad")
    with pytest.raises(ValueError, match="not valid JSON"):
        Co3dPreprocessed(tmp_path, "train")


def test_parse_resolution_and_sampler():
    assert parse_resolution((512, 384, 512, 336)) == [(512, 384), (512, 336)]
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_resolution((100, 64))
    s0, s1 = PairBatchSampler(20, 3, 2, rank=0, world=2, seed=5), PairBatchSampler(20, 3, 2, rank=1, world=2, seed=5)
    b0, b1 = list(s0), list(s1)
    assert len(b0) == len(s0) == 3 and all(len(b) == 3 for b in b0)
    i0, i1 = {x[0] for b in b0 for x in b}, {x[0] for b in b1 for x in b}
    assert not i0 & i1 and len(i0 | i1) == 18
    assert [b[0][1] for b in b0] == [b[0][1] for b in b1]  # same resolution per global batch
    assert b0 == list(PairBatchSampler(20, 3, 2, rank=0, world=2, seed=5))
    s0.set_epoch(1)
    assert list(s0) != b0 and all(x[2] == 1 for b in s0 for x in b)
    s0.set_epoch(1, start_batch=2)
    tail = list(s0)
    s0.set_epoch(1)
    assert len(tail) == 1 and tail == list(s0)[2:]


def test_lr_schedule():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_epochs=2, epochs=10)
    assert lr_at(cfg, 0) == 0 and lr_at(cfg, 1) == pytest.approx(5e-4)
    assert lr_at(cfg, 2) == pytest.approx(1e-3) and lr_at(cfg, 6) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(cfg, 10) == pytest.approx(1e-5)


def test_presets_and_cli_override():
    for name in ("dust3r_224_linear", "dust3r_512_linear", "dust3r_512_dpt", "synthetic_tiny",
                 "bundled_tiny_stage1_128", "bundled_tiny_stage1b_128", "bundled_tiny_stage2_224",
                 "bundled_tiny_stage3_224"):
        assert load_preset(name)["model"].startswith("AsymmetricCroCo3DStereo(")
    s3 = make_config(["--preset", "bundled_tiny_stage3_224"])
    assert s3.baseline_sampling == "mixed" and 0 < s3.baseline_deg[0] < 5 and 0 < s3.same_ring < 1
    assert make_config(["--preset", "bundled_tiny_stage2_224"]).baseline_sampling == "uniform"  # default kept
    cfg = make_config(["--preset", "dust3r_512_linear", "--batch-size", "2"])
    assert cfg.batch_size == 2 and cfg.accum_iter == 2 and len(cfg.resolution) == 10 and "ManyAR" in cfg.model
    with pytest.raises(FileNotFoundError, match="known presets"):
        load_preset("nope")


# ---------------------------------------------------------------------------------------------------- loop

def _cfg(tmp_path, name, **kw):
    base = dict(model=TEST_MODEL, resolution=(32, 32), train_pairs=6, test_pairs=2, batch_size=2, epochs=2,
                warmup_epochs=0.5, lr=1e-3, jitter=0.2, output_dir=str(tmp_path / name), progress=False,
                tensorboard=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_train_resume_is_exact(tmp_path):
    full = run(_cfg(tmp_path, "full", tensorboard=True))
    assert (tmp_path / "full" / "checkpoint-best.pth").is_file() and (tmp_path / "full" / "tb").is_dir()
    assert full["steps"] == 6 and math.isfinite(full["Regr3D_ScaleShiftInv"])
    part = run(_cfg(tmp_path, "part", save_every_steps=1, stop_after_steps=4))  # "killed" after step 4 (epoch 1)
    assert part["stopped_at_step"] == 4
    ck = torch.load(tmp_path / "part" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert (ck["epoch"], ck["batch_in_epoch"], ck["step"]) == (1, 1, 4) and "optimizer" in ck and "rng" in ck
    resumed = run(_cfg(tmp_path, "part", resume="last"))
    assert resumed["steps"] == 6
    a, b = _weights(tmp_path / "full" / "checkpoint-last.pth"), _weights(tmp_path / "part" / "checkpoint-last.pth")
    assert any(not torch.equal(a[k], ck["model"][k]) for k in a)  # the resumed run did train
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_stop_after_epochs_keeps_the_long_schedule(tmp_path):
    """The first epoch of a 3-epoch schedule, evaluated and saved, equals the first epoch of the full run."""
    cut = run(_cfg(tmp_path, "cut", epochs=3, stop_after_epochs=1))
    ck = torch.load(tmp_path / "cut" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert cut["steps"] == 3 and ck["epoch"] == 1 and (tmp_path / "cut" / "checkpoint-best.pth").is_file()
    assert math.isfinite(cut["Regr3D_ScaleShiftInv"])
    full = run(_cfg(tmp_path, "full3", epochs=3, stop_after_steps=3))
    a = full["model"].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], ck["model"][k], rtol=1e-5, atol=1e-6)
    assert full["stopped_at_step"] == 3


def test_checkpoint_loads_as_model_and_resume_errors(tmp_path):
    from dust3r_ns.model.checkpoint import load_model

    run(_cfg(tmp_path, "r", epochs=1, accum_iter=2))
    m = load_model(tmp_path / "r" / "checkpoint-last.pth")
    assert m.config["enc_embed_dim"] == 32
    with pytest.raises(FileNotFoundError, match="not found"):
        run(_cfg(tmp_path, "none", resume="last"))
    # initialise another run from it: everything loads, reported in the log
    res = run(_cfg(tmp_path, "init", epochs=1, lr=0.0, min_lr=0.0, pretrained=str(tmp_path / "r" / "checkpoint-last.pth")))
    assert "initialised from" in (tmp_path / "init" / "log.txt").read_text()
    for k, v in m.state_dict().items():
        assert torch.equal(res["model"].state_dict()[k], v), k  # lr 0: weights stay those loaded


@pytest.mark.cuda
def test_train_cuda_amp(tmp_path):
    res = run(_cfg(tmp_path, "gpu", epochs=1, device="cuda", amp="fp16"))
    assert res["steps"] == 3 and math.isfinite(res["loss"])
    ck = torch.load(tmp_path / "gpu" / "checkpoint-last.pth", map_location="cpu", weights_only=False)
    assert ck["scaler"]["scale"] > 0


def test_main_reports_one_line_errors(capsys, tmp_path):
    from dust3r_ns.train.loop import main

    with pytest.raises(SystemExit) as e:
        main(["--preset", "nope"])
    assert e.value.code == 2 and "known presets" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--dataset", "co3d", "--output-dir", str(tmp_path / "o")])
    assert "--data-root" in capsys.readouterr().err
