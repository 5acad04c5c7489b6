"""`dust3r-ns bench splat`: held-out views stay out of training, the protocol's pose mapping, and one tiny run of
every row (the quick configuration) with finite metrics and registration that lowers the photometric error."""

import math

import numpy as np
import pytest

pytest.importorskip("nerfstudio")

from dust3r_ns.bench import splat  # noqa: E402
from dust3r_ns.nerfstudio.method import make_config  # noqa: E402


def test_held_out_views_are_interleaved_and_never_trained():
    case = splat.make_case(3, 4, 2, 12, 16, "moderate")
    n = 6
    assert sorted(case["train_idx"] + case["test_idx"]) == list(range(n))
    assert not set(case["train_idx"]) & set(case["test_idx"])
    assert 0 in case["train_idx"] and n - 1 in case["train_idx"]   # held-out views lie between training views
    train_c = np.stack([v["c2w"][:3, 3] for v in case["train"]])
    for v in case["test"]:
        assert np.linalg.norm(train_c - v["c2w"][:3, 3], axis=1).min() > 1e-3
    with pytest.raises(ValueError, match="held-out"):
        splat.make_case(3, 4, 0, 12, 16, "moderate")


def test_map_held_out_inverts_a_similarity():
    rng = np.random.default_rng(0)
    from dust3r_ns.geometry import so3_exp
    import torch

    def poses(k):
        out = np.tile(np.eye(4), (k, 1, 1))
        for i in range(k):
            out[i, :3, :3] = so3_exp(torch.from_numpy(rng.normal(size=3))).numpy()
            out[i, :3, 3] = rng.normal(size=3)
        return out

    train_gt, test_gt = poses(5), poses(2)
    s, R, t = 0.37, so3_exp(torch.tensor([0.3, -1.0, 0.5], dtype=torch.float64)).numpy(), np.array([1.0, 2.0, -3.0])
    sim = lambda P: np.concatenate([np.concatenate([R @ P[:, :3, :3], (s * P[:, :3, 3] @ R.T + t)[..., None]], 2),  # noqa: E731
                                    P[:, 3:]], 1)
    mapped = splat.map_held_out(sim(train_gt), train_gt, test_gt)
    np.testing.assert_allclose(mapped, sim(test_gt), atol=1e-9)


def test_rows_differ_from_the_method_only_in_initialisation(tmp_path):
    base = make_config()
    for row in splat.ROWS:
        tc = splat.trainer_config(tmp_path, tmp_path / "out", row, 7, 123, num_seeds=55)
        assert tc.max_num_iterations == 7 and tc.pipeline.datamanager.dataparser.points.max_points == 123
        assert tc.optimizers == base.optimizers
        m, b = tc.pipeline.model, base.pipeline.model
        mode = m.camera_optimizer.mode
        default = b.camera_optimizer.mode
        expected = {"gt": "off", "dust3r": "off", "random": default,
                    "dust3r-refine": default if default != "off" else splat.REFINE_MODE}
        assert mode == expected[row]
        assert m.random_init == (row == "random") and (row != "random" or m.num_random == 55)
        for name in ("densify_grad_thresh", "refine_every", "warmup_length", "cull_alpha_thresh", "sh_degree",
                     "num_downscales", "resolution_schedule", "ssim_lambda"):
            assert getattr(m, name) == getattr(b, name), name
        assert m.footprint_scale == b.footprint_scale
        assert splat.trainer_config(tmp_path, tmp_path, row, 7, 123, 55, footprint_scale=1.25
                                    ).pipeline.model.footprint_scale == 1.25
        assert splat.trainer_config(tmp_path, tmp_path, row, 7, 123, 55, downscales=0
                                    ).pipeline.model.num_downscales == 0
    with pytest.raises(ValueError, match="unknown row"):
        splat.trainer_config(tmp_path, tmp_path, "colmap", 1, 1)


def test_quick_bench_runs_every_row(tmp_path, capsys):
    rows = splat.run(splat.SplatBenchConfig(quick=True, threads=1, work_dir=str(tmp_path),
                                            json_out=str(tmp_path / "splat.json"), cache_dir=str(tmp_path / "cache")))
    assert [r["row"] for r in rows] == list(splat.ROWS)
    for r in rows:
        for k in ("psnr", "ssim", "psnr_unreg", "ssim_unreg", "train_s", "l1_before", "l1_after", "train_rra_deg"):
            assert math.isfinite(r[k]), (r["row"], k)
        assert r["gaussians"] > 0 and "registration" in r["protocol"]
        assert not set(r["held_out"]) & set(r["train_arc"]) and len(r["train_names"]) == r["views"]
        assert r["l1_after"] <= r["l1_before"]
    # the reconstructions that training read hold only the training views
    from dust3r_ns.scene import Reconstruction

    for sub in ("gt", "dust3r"):
        rec = Reconstruction.load(tmp_path / "scene3_n3" / sub / "reconstruction.npz")
        assert rec.names == rows[0]["train_names"]
    assert any(r["l1_after"] < r["l1_before"] for r in rows if r["row"] != "gt")
    assert rows[0]["train_rra_deg"] < 1e-3   # gt row: the training cameras are the ground truth
    out = capsys.readouterr().out
    assert "mean over cases" in out and "gap to gt" in out
    assert (tmp_path / "splat.json").is_file()
    assert len(list((tmp_path / "cache").glob("*/reconstruction.npz"))) == 1   # the DUSt3R rows' reconstruction


def test_downscaled_image_and_intrinsics_agree():
    import torch

    K = np.array([[40.0, 0, 15.5], [0, 40.0, 11.5], [0, 0, 1]])   # principal point at the centre of a 24x32 image
    image = torch.rand(24, 32, 3)
    Ks, small = splat.downscaled(K, image, 2)
    assert small.shape == (12, 16, 3)
    np.testing.assert_allclose(Ks[:2, 2], [7.5, 5.5])   # still the centre of the 12x16 image
    np.testing.assert_allclose(Ks[0, 0], 20.0)
    torch.testing.assert_close(small[0, 0], image[:2, :2].reshape(4, 3).mean(0))
    K1, same = splat.downscaled(K, image, 1)
    assert same is image and np.array_equal(K1, K)


class _TexturedWall(__import__("torch").nn.Module):
    """A frozen splat stand-in for registration: Gaussians on a wall 3 units in front of the identity (OpenCV)
    camera, smooth colour pattern, rendered by the CPU rasterizer as `Dust3rSplatfactoModel` renders."""

    def __init__(self):
        import torch

        super().__init__()
        g = torch.linspace(-2.0, 2.0, 24)
        y, x = torch.meshgrid(g, g, indexing="ij")
        self.means = torch.nn.Parameter(torch.stack([x, y, 3.0 + 0.3 * torch.sin(2 * x)], -1).reshape(-1, 3))
        self.colors = torch.stack([0.5 + 0.4 * torch.sin(3 * x), 0.5 + 0.4 * torch.cos(2 * y),
                                   0.5 + 0.4 * torch.sin(x + 2 * y)], -1).reshape(-1, 3)
        self.device = torch.device("cpu")

    def get_outputs(self, camera):
        import torch
        from dust3r_ns.conventions import opengl_c2w_to_opencv_w2c_torch
        from dust3r_ns.nerfstudio.rasterizer import rasterize_dense

        n = len(self.means)
        render, alpha, _ = rasterize_dense(
            means=self.means, quats=torch.tensor([[1.0, 0, 0, 0]]).expand(n, 4), scales=torch.full((n, 3), 0.12),
            opacities=torch.full((n,), 0.9), colors=self.colors,
            viewmats=opengl_c2w_to_opencv_w2c_torch(camera.camera_to_worlds), Ks=camera.get_intrinsics_matrices(),
            width=int(camera.width.item()), height=int(camera.height.item()))
        return {"rgb": render[0, ..., :3] + (1 - alpha[0])}


def test_coarse_to_fine_registration_recovers_a_misplaced_pose():
    """The held-out protocol's registration: from a pose a few degrees and centimetres off (DUSt3R-sized error)
    the pyramid returns close to the pose that rendered the image, with a lower finest-level L1."""
    import torch
    from dust3r_ns.geometry import so3_exp

    model = _TexturedWall()
    K = np.array([[50.0, 0, 31.5], [0, 50.0, 23.5], [0, 0, 1]])
    truth = np.eye(4)
    with torch.no_grad():
        image = model.get_outputs(splat.ns_camera(torch.from_numpy(
            splat.cv.opencv_to_opengl_c2w(truth)[:3]), K, 48, 64))["rgb"]   # [48, 64, 3]
    start = np.eye(4)
    start[:3, :3] = so3_exp(torch.tensor([0.02, 0.06, 0.01], dtype=torch.float64)).numpy()   # 3.7 deg
    start[:3, 3] = [0.12, -0.05, 0.08]
    c2w, before, after = splat.register_pyramid(model, start, K, image, [4, 2], 60, 4e-3)
    assert after < 0.5 * before
    angle = lambda A: math.degrees(math.acos(np.clip((np.trace(A[:3, :3]) - 1) / 2, -1, 1)))  # noqa: E731
    assert angle(c2w) < 0.6 * angle(start)   # (a wall leaves rotation and translation partly ambiguous)
    assert np.linalg.norm(c2w[:3, 3]) < 0.6 * np.linalg.norm(start[:3, 3])
    assert all(p.requires_grad for p in model.parameters())   # the splat's flags are restored
    with pytest.raises(ValueError, match="register-downscale"):
        splat.register_pyramid(model, start, K, image, [], 1, 1e-3)


def test_full_frame_reaches_the_dust3r_rows(tmp_path):
    """--full-frame: the DUSt3R rows' reconstruction saw the whole 4:3 photos (288x224), and is cached apart from the
    reference-crop one."""
    case = splat.make_case(3, 3, 1, 24, 32, "moderate")
    photos = splat.write_photos(tmp_path / "photos", case["train"])
    sq, ff = (splat.dust3r_reconstruction(photos, tmp_path / "cache", full_frame=f) for f in (False, True))
    assert np.shape(sq.depths[0]) == (224, 224) and np.shape(ff.depths[0]) == (224, 288)
    assert len(list((tmp_path / "cache").glob("*/reconstruction.npz"))) == 2


def test_model_option_reaches_the_dust3r_rows(tmp_path):
    """--model: the DUSt3R rows reconstruct with the given checkpoint (here the bundled model with its decoder's last
    block rescaled), cached apart from the bundled model's reconstruction."""
    import torch

    from dust3r_ns.model import checkpoint as C
    from dust3r_ns.pipeline import default_model_source

    model = C.load_model(default_model_source())
    with torch.no_grad():
        for p in model.dec_blocks[-1].parameters():
            p.mul_(1.5)
    other = C.save_hf(model, tmp_path / "other")
    case = splat.make_case(3, 3, 1, 24, 32, "moderate")
    photos = splat.write_photos(tmp_path / "photos", case["train"])
    bundled, again = (splat.dust3r_reconstruction(photos, tmp_path / "cache") for _ in range(2))
    mine = splat.dust3r_reconstruction(photos, tmp_path / "cache", model=str(other))
    assert np.array_equal(bundled.depths[0], again.depths[0])          # the second call read the cache
    assert not np.allclose(bundled.depths[0], mine.depths[0], rtol=1e-3)
    assert len(list((tmp_path / "cache").glob("*/reconstruction.npz"))) == 2
