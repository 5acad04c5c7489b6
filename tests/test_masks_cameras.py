"""Photo masks and known cameras: mask I/O and resampling, masked alignment and point clouds, cameras files
(COLMAP, transforms.json, cameras.json), --focal, the exports (masks/ + mask_path), the CLI flags, device default."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dust3r_ns import conventions as cv
from dust3r_ns.align import AlignConfig
from dust3r_ns.cli import main
from dust3r_ns.export import write_colmap, write_transforms_json
from dust3r_ns.export.dataset import export_dataset
from dust3r_ns.images import preprocess
from dust3r_ns.masks import MaskError, mask_to_net, read_mask
from dust3r_ns.metrics import pose_metrics
from dust3r_ns.pipeline import (CamerasConfig, MasksConfig, NetworkConfig, align_inputs, known_cameras,
                                read_cameras_file, resolve_device)
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.scene import Reconstruction
from dust3r_ns.synth.toy import make_pairs_output

N, H, W = 4, 24, 32          # toy network images; originals are 4x larger (transform 0.25, no crop)


def toy(seed=0):
    out, gt = make_pairs_output(n=N, shapes=[(H, W)] * N, seed=seed, meta=True)
    return PairPredictions.from_reference(out), gt


def save_mask(path, mask):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(path)


# ---------------------------------------------------------------- device default
def test_device_defaults_to_cuda_when_available(monkeypatch):
    assert NetworkConfig().device is None and AlignConfig().device is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda" and resolve_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    with pytest.raises(ValueError, match="no CUDA GPU"):   # an explicit CUDA device without a GPU is refused
        resolve_device("cuda:1")


# ---------------------------------------------------------------- mask files
def test_mask_follows_the_image_resize_and_crop(tmp_path):
    rng = np.random.default_rng(0)
    Wo, Ho = 200, 130
    mask = np.zeros((Ho, Wo), bool)
    mask[20:110, 30:170] = True
    mask[rng.uniform(size=mask.shape) < 0.01] ^= True
    for size in (224, 512):
        img = Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, -1))
        crop, transform = preprocess(img, size)   # the image path: LANCZOS/BICUBIC resize + centre crop
        ref = np.asarray(crop)[..., 0] >= 128
        got = mask_to_net(mask, transform, ref.shape)
        assert got.shape == ref.shape and (got == ref).mean() > 0.97


def test_bad_masks_are_named_with_the_fix(tmp_path):
    save_mask(tmp_path / "ok.png", np.ones((10, 12), bool))
    assert read_mask(tmp_path / "ok.png", (12, 10)).all()
    with pytest.raises(MaskError, match="no such mask"):
        read_mask(tmp_path / "missing.png", (12, 10))
    with pytest.raises(MaskError, match="12x10 but its photo is 13x10"):
        read_mask(tmp_path / "ok.png", (13, 10))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8) + 255).save(tmp_path / "rgb.png")
    with pytest.raises(MaskError, match="one-channel"):
        read_mask(tmp_path / "rgb.png", (12, 10))
    save_mask(tmp_path / "zero.png", np.zeros((10, 12), bool))
    with pytest.raises(MaskError, match="all 0"):
        read_mask(tmp_path / "zero.png", (12, 10))
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(MaskError, match="not a readable mask"):
        read_mask(tmp_path / "junk.png", (12, 10))


# ---------------------------------------------------------------- masked alignment
def _corrupt_left_half(preds: PairPredictions, img: int) -> PairPredictions:
    """Image `img`'s left half predicted 3x too far, with high confidence, in every pair (a moving object)."""
    pts1, pts2 = preds.pts1.clone(), preds.pts2.clone()
    c1, c2 = preds.conf1.clone(), preds.conf2.clone()
    for e, (i, j) in enumerate(preds.edges):
        if i == img:
            pts1[e, :, : W // 2] *= 3
            c1[e, :, : W // 2] = 50
        if j == img:
            pts2[e, :, : W // 2] *= 3
            c2[e, :, : W // 2] = 50
    return PairPredictions(images=preds.images, edges=preds.edges, pts1=pts1, pts2=pts2, conf1=c1, conf2=c2)


def test_masks_remove_pixels_from_alignment_and_point_cloud(tmp_path):
    preds, gt = toy()
    bad = _corrupt_left_half(preds, 1)
    masks = tmp_path / "masks"
    for k, im in enumerate(preds.images):
        m = np.ones((im.orig_size[1], im.orig_size[0]), bool)
        if k == 1:
            m[:, : im.orig_size[0] // 2] = False
        save_mask(masks / (im.name.rsplit(".", 1)[0] + ".png"), m)
    cfg = AlignConfig(niter=50)
    plain = align_inputs(bad, cfg, masks=MasksConfig(use_masks=False), device="cpu", verbose=False)
    masked = align_inputs(bad, cfg, masks=MasksConfig(masks=masks), device="cpu", verbose=False)
    e_plain = pose_metrics(plain.c2w, gt["c2w"])["rra_mean_deg"]
    e_masked = pose_metrics(masked.c2w, gt["c2w"])["rra_mean_deg"]
    # the corrupted half pulls the unmasked alignment off (little since the IRLS solver and its full-resolution
    # phase: 1.6e-3 deg against 1.6e-4 masked, measured); masked, the toy's exact pairs give the truth
    assert e_masked < 0.2 * e_plain and e_masked < 1e-3
    assert plain.image_masks is None and masked.meta["masks_dir"] == str(masks.resolve())
    assert masked.image_masks[1][:, : W // 2].sum() == 0 and masked.image_masks[1][:, W // 2:].all()
    _, _, src = masked.pointcloud(conf_thr=1.0, max_points=None)
    assert len(src) and not ((src[:, 0] == 1) & (src[:, 2] < W // 2)).any()
    assert ((src[:, 0] == 1) & (src[:, 2] >= W // 2)).any()
    # saved and loaded with the reconstruction
    back = Reconstruction.load(masked.save(tmp_path / "rec.npz"))
    assert all((a == b).all() for a, b in zip(back.image_masks, masked.image_masks))
    # a missing mask file is an error naming it
    (masks / "img2.png").unlink()
    with pytest.raises(MaskError, match="img2.png: no such mask"):
        align_inputs(bad, cfg, masks=MasksConfig(masks=masks), device="cpu", verbose=False)


def test_masks_folder_is_found_beside_images_and_exported_for_nerfstudio(tmp_path):
    preds, _ = toy()
    root = tmp_path / "scene"
    for im in preds.images:       # photos in scene/images, masks in scene/masks (nerfstudio's layout)
        Image.fromarray(np.zeros((im.orig_size[1], im.orig_size[0], 3), np.uint8)).save(root / "images" / im.name) \
            if (root / "images").mkdir(parents=True, exist_ok=True) is None else None
        m = np.ones((im.orig_size[1], im.orig_size[0]), bool)
        m[:10] = False
        save_mask(root / "masks" / (im.name.rsplit(".", 1)[0] + ".png"), m)
    rec = align_inputs(preds, AlignConfig(niter=5), device="cpu", verbose=False, photo_folder=root / "images")
    assert rec.image_masks is not None and not rec.image_masks[0][:2].any()
    out = tmp_path / "ds"
    written = export_dataset(rec, out, formats=("nerfstudio", "ply"), masks=rec.meta["masks_dir"])
    meta = json.loads((out / "transforms.json").read_text())
    for frame, name in zip(meta["frames"], rec.names):
        assert frame["mask_path"] == f"masks/{name.rsplit('.', 1)[0]}.png"
        with Image.open(out / frame["mask_path"]) as im:
            assert im.mode == "L" and im.size == (frame["w"], frame["h"])
            arr = np.asarray(im)
        assert set(np.unique(arr)) == {0, 255} and not arr[:10].any() and arr[10:].all()
    assert written["masks"] == out / "masks"
    ns_utils = pytest.importorskip("nerfstudio.data.utils.data_utils")
    t = ns_utils.get_image_mask_tensor_from_path(out / meta["frames"][0]["mask_path"])
    assert t.shape == (4 * H, 4 * W, 1) and t.dtype == torch.bool and not t[:10].any() and t[10:].all()


# ---------------------------------------------------------------- known cameras
def _cameras_json(path, preds, gt, scale=1):
    K_orig = cv.K_net_to_orig(gt["K"], np.stack([im.transform for im in preds.images]))
    if scale != 1:
        K_orig = cv.K_orig_to_net(K_orig, np.array([scale, scale, 0, 0]))
    path.write_text(json.dumps(dict(images=[im.name for im in preds.images], c2w=gt["c2w"].tolist(),
                                    K=K_orig.tolist(), width=4 * W * scale, height=4 * H * scale)))
    return K_orig


def test_known_cameras_file_fixes_poses_and_intrinsics(tmp_path):
    preds, gt = toy(1)
    js = tmp_path / "cameras.json"
    K_orig = _cameras_json(js, preds, gt)
    rec = align_inputs(preds, AlignConfig(niter=30), cameras=CamerasConfig(cameras=js), device="cpu", verbose=False)
    np.testing.assert_allclose(rec.c2w, gt["c2w"], atol=1e-9)
    np.testing.assert_allclose(rec.K_orig, K_orig, atol=1e-6)
    # exact toy predictions + the true cameras: metric depths
    rel = np.abs(np.stack(rec.depths) / np.stack(gt["depth"]) - 1)
    assert np.median(rel) < 1e-3
    # intrinsics only: the poses are estimated (up to a similarity) and the focals are the known ones
    rec2 = align_inputs(preds, AlignConfig(niter=30), cameras=CamerasConfig(cameras=js, cameras_fix="intrinsics"),
                        device="cpu", verbose=False)
    np.testing.assert_allclose(rec2.K_orig, K_orig, atol=1e-6)
    assert not np.allclose(rec2.c2w, gt["c2w"], atol=1e-3) and pose_metrics(rec2.c2w, gt["c2w"])["rra_max_deg"] < 0.05
    # a file written for 2x larger photos: intrinsics rescaled to the photos
    _cameras_json(js, preds, gt, scale=2)
    K_known, c2w_known = known_cameras(CamerasConfig(cameras=js, cameras_fix="intrinsics"), preds.images)
    assert c2w_known is None
    np.testing.assert_allclose(K_known, K_orig, atol=1e-9)


def test_cameras_files_of_colmap_and_nerfstudio_read_alike(tmp_path):
    preds, gt = toy(2)
    rec = align_inputs(preds, AlignConfig(niter=5), device="cpu", verbose=False)
    write_colmap(rec, tmp_path / "sparse" / "0", max_points=50)
    write_transforms_json(rec, tmp_path, ply_name=None)
    for src in (tmp_path / "sparse" / "0", tmp_path / "sparse" / "0" / "images.bin", tmp_path / "transforms.json"):
        cams = read_cameras_file(src)
        order = [cams["names"].index(n) for n in rec.names]
        np.testing.assert_allclose(cams["c2w"][order], rec.c2w, atol=1e-9)
        np.testing.assert_allclose(cams["K_orig"][order], rec.K_orig, atol=1e-6)
    K, P = known_cameras(CamerasConfig(cameras=tmp_path / "transforms.json"), preds.images)
    np.testing.assert_allclose(P, rec.c2w, atol=1e-9)
    with pytest.raises(ValueError, match="no such file"):
        read_cameras_file(tmp_path / "nope.json")
    (tmp_path / "other.json").write_text(json.dumps(dict(images=["x.jpg"], c2w=[np.eye(4).tolist()],
                                                         K=[np.eye(3).tolist()])))
    with pytest.raises(ValueError, match="none of its 1 images"):
        known_cameras(CamerasConfig(cameras=tmp_path / "other.json"), preds.images)
    (tmp_path / "bad.json").write_text(json.dumps(dict(images=["x.jpg"])))
    with pytest.raises(ValueError, match="needs 'images', 'c2w'"):
        read_cameras_file(tmp_path / "bad.json")


def test_known_focal(tmp_path):
    preds, gt = toy(3)
    f = 4 * float(gt["K"][0, 0, 0])
    rec = align_inputs(preds, AlignConfig(niter=20, shared_focal=True), cameras=CamerasConfig(focal=f), device="cpu",
                       verbose=False)
    np.testing.assert_allclose(rec.K_orig[:, 0, 0], f, rtol=1e-9)
    np.testing.assert_allclose(rec.K_orig[:, :2, 2], [[(4 * W - 1) / 2, (4 * H - 1) / 2]] * N, atol=1e-9)
    with pytest.raises(ValueError, match="--focal must be a positive"):
        CamerasConfig(focal=-1.0)


def test_reconstruct_cli_takes_cameras_masks_and_tracks(tmp_path, capsys):
    preds, gt = toy(4)
    preds.save(tmp_path / "pairs.npz")
    _cameras_json(tmp_path / "cams.json", preds, gt)
    masks = tmp_path / "m"
    for im in preds.images:
        m = np.ones((im.orig_size[1], im.orig_size[0]), bool)
        m[-8:] = False
        save_mask(masks / (im.name.rsplit(".", 1)[0] + ".png"), m)
    out = tmp_path / "out"
    rc = main(["reconstruct", str(tmp_path / "pairs.npz"), "--out", str(out), "--cameras", str(tmp_path / "cams.json"),
               "--masks", str(masks), "--conf-thr", "1.0", "--tracks.depth-tol", "0.05", "--niter", "10",
               "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    rec = Reconstruction.load(out / "reconstruction.npz")
    np.testing.assert_allclose(rec.c2w, gt["c2w"], atol=1e-9)
    assert rec.image_masks is not None and not rec.image_masks[0][-2:].any()
    meta = json.loads((out / "transforms.json").read_text())
    assert all((out / f["mask_path"]).is_file() for f in meta["frames"])
    import pycolmap

    model = pycolmap.Reconstruction(str(out / "sparse" / "0"))
    # (the toy's per-image depth surfaces differ, so only some points are seen by several images)
    assert model.compute_mean_track_length() > 1.1
    assert main(["reconstruct", str(tmp_path / "pairs.npz"), "--out", str(tmp_path / "o2"), "--cameras",
                 str(tmp_path / "missing.json")]) == 2
    assert "--cameras" in capsys.readouterr().err


def test_dataparser_uses_masks_and_known_cameras(tmp_path, monkeypatch):
    """The `dust3r` dataparser with photos/masks/: masked alignment, nerfstudio mask_filenames, cache key."""
    pytest.importorskip("nerfstudio")
    import dust3r_ns.nerfstudio.dataparser as dp
    import dust3r_ns.pipeline as pipeline
    from dust3r_ns.cache import CacheConfig

    preds, gt = toy(5)
    data = tmp_path / "photos"
    data.mkdir()
    for im in preds.images:
        Image.fromarray(np.zeros((im.orig_size[1], im.orig_size[0], 3), np.uint8)).save(data / im.name)
        m = np.ones((im.orig_size[1], im.orig_size[0]), bool)
        m[:, :16] = False
        save_mask(data / "masks" / (im.name.rsplit(".", 1)[0] + ".png"), m)
    calls = []
    monkeypatch.setattr(pipeline, "run_pairs", lambda *a, **k: calls.append(1) or preds)
    js = tmp_path / "cams.json"
    _cameras_json(js, preds, gt)

    def parser(**kw):
        return dp.Dust3rDataParserConfig(data=data, network=NetworkConfig(model=str(tmp_path / "m.pth")),
                                         cache=CacheConfig(cache_dir=tmp_path / "cache"), eval_mode="all",
                                         **kw).setup()

    p = parser(cameras=CamerasConfig(cameras=js))
    out = p.get_dataparser_outputs("train")
    assert [f.name for f in out.mask_filenames] == [f"img{k}.png" for k in range(N)]
    assert all(f.parent == data / "masks" for f in out.mask_filenames)
    np.testing.assert_allclose(p.scene.rec.c2w, gt["c2w"], atol=1e-9)
    assert not (p.points_src[:, 2] < 4).any()           # the masked 16 original columns = 4 network columns
    assert len(calls) == 1
    parser(cameras=CamerasConfig(cameras=js)).get_dataparser_outputs("train")
    assert len(calls) == 1                               # cache hit
    out2 = parser(cameras=CamerasConfig(cameras=js), masks=MasksConfig(use_masks=False)).get_dataparser_outputs("train")
    assert len(calls) == 2 and out2.mask_filenames is None
