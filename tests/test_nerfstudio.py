"""Tests for dust3r_ns.nerfstudio: dataparser geometry, reconstruction cache, bad inputs, CPU rasterizer,
the splatfacto model's CPU path, and `ns-train dust3r-splatfacto` end to end on CPU (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nerfstudio")

from dust3r_ns import conventions as cv  # noqa: E402
from dust3r_ns.align import AlignConfig  # noqa: E402
from dust3r_ns.nerfstudio.dataparser import Dust3rDataParser, Dust3rDataParserConfig  # noqa: E402
from dust3r_ns.nerfstudio.method import NS_CHECKPOINT_GLOBALS  # noqa: E402
from dust3r_ns.nerfstudio.rasterizer import project_gaussians, rasterize_dense  # noqa: E402
from dust3r_ns.cache import CacheConfig, SceneError  # noqa: E402
from dust3r_ns.pipeline import NetworkConfig, PairsConfig, PointsConfig  # noqa: E402
from dust3r_ns.scene import Reconstruction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ORIG_W, ORIG_H = 64, 48
# network image = orig scaled by 0.5 then 2 rows cropped at the top: 32x20
TRANSFORM = np.array([0.5, 0.5, 0.0, 2.0])
NET_W, NET_H = 32, 20


def look_at_c2w(eye, target, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    z = np.asarray(target, float) - eye
    z /= np.linalg.norm(z)
    x = np.cross(-np.asarray(up, float), z)
    x /= np.linalg.norm(x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    T[:3, 3] = eye
    return T


def fake_reconstruction(names: list[str], seed: int = 0, sizes=None, same_pose: bool = False) -> Reconstruction:
    """A consistent reconstruction (random depths, cameras around the origin) shaped like the aligner's output."""
    rng = np.random.default_rng(seed)
    n = len(names)
    c2w = np.stack([look_at_c2w(np.array([np.sin(a) * 3, rng.normal() * 0.3, -np.cos(a) * 3]), [0, 0, 0])
                    for a in np.linspace(-0.6, 0.6, n)])
    if same_pose:  # rotation-only capture with a tiny jitter
        c2w = np.repeat(c2w[:1], n, axis=0)
        c2w[:, :3, 3] += rng.normal(size=(n, 3)) * 1e-8
    K = np.array([[30.0, 0, 15.7], [0, 31.0, 9.8], [0, 0, 1]])
    return Reconstruction(
        names=names, orig_sizes=np.array(sizes if sizes is not None else [[ORIG_W, ORIG_H]] * n),
        transforms=np.tile(TRANSFORM, (n, 1)), c2w=c2w, K=np.tile(K, (n, 1, 1)),
        depths=[rng.uniform(2.0, 4.0, (NET_H, NET_W)).astype(np.float32) for _ in range(n)],
        confs=[rng.uniform(1.0, 6.0, (NET_H, NET_W)).astype(np.float32) for _ in range(n)],
        rgbs=[rng.integers(0, 256, (NET_H, NET_W, 3), dtype=np.uint8) for _ in range(n)],
        meta={"mode": "fake"})


def write_photos(folder: Path, n: int, seed: int = 0, size=(ORIG_W, ORIG_H)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


class FakeBuild:
    """Replaces the network + alignment: counts calls and returns `fake_reconstruction` for the given photos."""

    def __init__(self, sizes=None, same_pose: bool = False):
        self.calls = 0
        self.sizes = sizes
        self.same_pose = same_pose

    def __call__(self, parser, model, paths):
        self.calls += 1
        return fake_reconstruction([Path(p).name for p in paths], sizes=self.sizes, same_pose=self.same_pose)


@pytest.fixture
def fake_build(monkeypatch):
    fb = FakeBuild()
    monkeypatch.setattr(Dust3rDataParser, "_build", lambda self, model, paths, *_: fb(self, model, paths))
    return fb


def parser_config(data: Path, model: str, conf_thr: float, max_points: int = 100_000, image_size=None,
                  align_mode: str = "fast", cache_dir=None, use_cache: bool = True, **kw) -> Dust3rDataParserConfig:
    """The dataparser config with the embedded network/pairs/align/points/cache configs set from flat options."""
    return Dust3rDataParserConfig(data=data, network=NetworkConfig(model=model), pairs=PairsConfig(image_size=image_size),
                                  align=AlignConfig(mode=align_mode),
                                  points=PointsConfig(conf_thr=conf_thr, max_points=max_points),
                                  cache=CacheConfig(cache_dir=cache_dir, use_cache=use_cache), **kw)


def parser_for(data: Path, tmp_path: Path, **kw) -> Dust3rDataParser:
    return parser_config(data, str(tmp_path / "no_model.pth"), cache_dir=tmp_path / "cache",
                         conf_thr=kw.pop("conf_thr", 1.5), **kw).setup()


# ---------------------------------------------------------------- dataparser geometry
def test_seed_points_project_onto_source_pixels(tmp_path, fake_build):
    data = tmp_path / "photos"
    write_photos(data, 4)
    parser = parser_for(data, tmp_path, eval_mode="all", max_points=500)
    out = parser.get_dataparser_outputs("train")
    cams = out.cameras
    xyz = out.metadata["points3D_xyz"]
    rgb = out.metadata["points3D_rgb"]
    assert xyz.dtype == torch.float32 and rgb.dtype == torch.uint8 and xyz.shape == rgb.shape and len(xyz) == 500
    assert cams.camera_to_worlds.shape == (4, 3, 4)
    assert (cams.width == ORIG_W).all() and (cams.height == ORIG_H).all()
    # scaled like the COLMAP parser: camera positions within [-1, 1], max |t| == 1
    assert torch.isclose(cams.camera_to_worlds[:, :, 3].abs().max(), torch.tensor(1.0), atol=1e-5)

    src = parser.points_src
    rec = parser.scene.rec
    # expected nerfstudio pixel (+0.5 centre convention) of each point's source pixel in its original image
    uv_orig = cv.pixel_net_to_orig(src[:, [2, 1]].astype(np.float64), rec.transforms[src[:, 0]])
    expected = torch.from_numpy(cv.to_colmap_pixel(uv_orig)).float()
    k = torch.from_numpy(src[:, 0])
    c2w = cams.camera_to_worlds[k]
    p_cam = ((xyz - c2w[:, :, 3])[:, None, :] @ c2w[:, :, :3]).squeeze(1)  # R^T (X - t), OpenGL axes
    depth = -p_cam[:, 2]
    assert (depth > 0).all()
    u = cams.fx[k, 0] * p_cam[:, 0] / depth + cams.cx[k, 0]
    v = cams.fy[k, 0] * -p_cam[:, 1] / depth + cams.cy[k, 0]
    err = torch.stack([u, v], -1) - expected
    assert err.abs().max() < 2e-3, err.abs().max()

    # and through nerfstudio's own ray generation: each point lies on the ray of its source pixel
    coords = torch.stack([expected[:, 1], expected[:, 0]], -1)  # (y, x)
    rays = cams.generate_rays(camera_indices=k[:, None], coords=coords)
    to_pt = xyz - rays.origins
    along = (to_pt * rays.directions).sum(-1, keepdim=True)
    off = (to_pt - along * rays.directions).norm(dim=-1)
    assert (along[:, 0] > 0).all() and off.max() < 1e-4 * (1 + along.max()), off.max()

    # dataparser_transform / scale map the reconstruction's world points to the returned ones
    T = out.dataparser_transform.double().numpy()
    world = np.stack([rec.points_world(int(i))[int(vv), int(uu)] for i, vv, uu in src])
    mapped = (world @ T[:, :3].T + T[:, 3]) * out.dataparser_scale
    np.testing.assert_allclose(mapped, xyz.double().numpy(), atol=1e-4)


def test_seed_footprints_become_initial_scales(tmp_path, fake_build):
    """A seed at camera depth z in an image of focal f (training images, downscaled) has footprint z / f; the model
    with footprint_scale k starts with scale k z / f on all three axes (0: splatfacto's nearest-neighbour scales)."""
    from nerfstudio.data.scene_box import SceneBox

    from dust3r_ns.nerfstudio.model import Dust3rSplatfactoModelConfig

    data = tmp_path / "photos"
    write_photos(data, 3)
    parser = parser_for(data, tmp_path, eval_mode="all", max_points=300, downscale_factor=2)
    out = parser.get_dataparser_outputs("train")
    cams, xyz, rgb = out.cameras, out.metadata["points3D_xyz"], out.metadata["points3D_rgb"]
    fp = out.metadata["points3D_footprint"]
    assert fp.dtype == torch.float32 and fp.shape == (len(xyz),)
    k = torch.from_numpy(parser.points_src[:, 0])
    c2w = cams.camera_to_worlds[k]
    depth = -((xyz - c2w[:, :, 3])[:, None, :] @ c2w[:, :, :3]).squeeze(1)[:, 2]  # OpenGL camera looks down -z
    focal = torch.sqrt(cams.fx[k, 0] * cams.fy[k, 0])
    assert (cams.width == ORIG_W // 2).all()   # the focal of the downscaled training images
    torch.testing.assert_close(fp, depth / focal, rtol=1e-4, atol=1e-7)

    def model(scale, metadata):
        with pytest.warns(UserWarning, match="LPIPS") if not _lpips_available() else _null():
            return Dust3rSplatfactoModelConfig(footprint_scale=scale).setup(
                scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=len(cams),
                metadata=metadata, seed_points=(xyz, rgb), device="cpu")

    scales = torch.exp(model(1.5, out.metadata).scales.detach())  # [M, 3]
    torch.testing.assert_close(scales, (1.5 * fp)[:, None].expand(-1, 3), rtol=1e-5, atol=0.0)
    knn = torch.exp(model(0.0, out.metadata).scales.detach())
    assert not torch.allclose(knn, scales, rtol=0.1)   # off: splatfacto's own initialisation
    with pytest.raises(ValueError, match="footprint-scale"):
        model(-1.0, out.metadata)
    with pytest.raises(ValueError, match="one footprint per seed point"):
        model(1.5, {**out.metadata, "points3D_footprint": fp[:-1]})


def test_scale_when_cameras_do_not_move(tmp_path, monkeypatch):
    """Cameras at one spot (rotation-only capture): the scale comes from the points, not from ~0 translations."""
    fb = FakeBuild(same_pose=True)
    monkeypatch.setattr(Dust3rDataParser, "_build", lambda self, model, paths, *_: fb(self, model, paths))
    data = tmp_path / "photos"
    write_photos(data, 3)
    out = parser_for(data, tmp_path, eval_mode="all").get_dataparser_outputs("train")
    xyz = out.metadata["points3D_xyz"]
    assert 0.1 < out.dataparser_scale < 10 and torch.isfinite(xyz).all()
    assert 0.5 < float(torch.quantile(xyz.abs().flatten(), 0.95)) < 2.0
    assert out.cameras.camera_to_worlds[:, :, 3].abs().max() < 1e-3


def test_split_interval_and_fraction(tmp_path, fake_build):
    data = tmp_path / "photos"
    write_photos(data, 10)
    p = parser_for(data, tmp_path, eval_mode="interval", eval_interval=4)
    train, val = p.get_dataparser_outputs("train"), p.get_dataparser_outputs("val")
    names_t = [f.name for f in train.image_filenames]
    names_v = [f.name for f in val.image_filenames]
    assert names_v == ["img_00.png", "img_04.png", "img_08.png"] and len(names_t) == 7
    assert not set(names_t) & set(names_v)
    # the frame does not depend on the split: the same image has the same camera in both splits
    assert torch.equal(train.dataparser_transform, val.dataparser_transform)
    assert fake_build.calls == 1  # one reconstruction per parser
    p2 = parser_for(data, tmp_path, eval_mode="fraction", train_split_fraction=0.7)
    assert len(p2.get_dataparser_outputs("train").image_filenames) == 7


# ---------------------------------------------------------------- cache
def test_cache_hit_miss_and_option_change(tmp_path, fake_build):
    data = tmp_path / "photos"
    paths = write_photos(data, 3)
    out1 = parser_for(data, tmp_path, eval_mode="all").get_dataparser_outputs("train")
    assert fake_build.calls == 1
    entries = [e for e in (tmp_path / "cache").iterdir() if not e.name.startswith(".")]
    assert len(entries) == 1 and (entries[0] / "manifest.json").is_file()
    assert not [e for e in (tmp_path / "cache").iterdir() if e.name.startswith(".")]  # no temp leftovers
    p2 = parser_for(data, tmp_path, eval_mode="all")
    out2 = p2.get_dataparser_outputs("train")
    assert fake_build.calls == 1 and p2.scene.hit  # reused
    assert torch.equal(out1.metadata["points3D_xyz"], out2.metadata["points3D_xyz"])
    # options that change the reconstruction are part of the key; nerfstudio-side options are not
    parser_for(data, tmp_path, eval_mode="interval", max_points=10).get_dataparser_outputs("train")
    assert fake_build.calls == 1
    parser_for(data, tmp_path, eval_mode="all", align_mode="baseline").get_dataparser_outputs("train")
    assert fake_build.calls == 2
    # changed image contents -> miss
    Image.fromarray(np.zeros((ORIG_H, ORIG_W, 3), np.uint8)).save(paths[1])
    parser_for(data, tmp_path, eval_mode="all").get_dataparser_outputs("train")
    assert fake_build.calls == 3
    # use_cache=False always recomputes
    parser_for(data, tmp_path, eval_mode="all", use_cache=False).get_dataparser_outputs("train")
    assert fake_build.calls == 4


@pytest.mark.parametrize("damage", ["truncate_npz", "garbage_manifest", "delete_npz"])
def test_cache_corruption_rebuilds(tmp_path, fake_build, damage):
    data = tmp_path / "photos"
    write_photos(data, 3)
    parser_for(data, tmp_path, eval_mode="all").get_dataparser_outputs("train")
    (entry,) = [e for e in (tmp_path / "cache").iterdir() if not e.name.startswith(".")]
    npz = entry / "reconstruction.npz"
    if damage == "truncate_npz":
        npz.write_bytes(npz.read_bytes()[:200])
    elif damage == "garbage_manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        npz.unlink()
    with pytest.warns(UserWarning, match="unusable.*recomputing"):
        p = parser_for(data, tmp_path, eval_mode="all")
        p.get_dataparser_outputs("train")
    assert fake_build.calls == 2 and not p.scene.hit
    p3 = parser_for(data, tmp_path, eval_mode="all")
    p3.get_dataparser_outputs("train")
    assert p3.scene.hit and fake_build.calls == 2  # the rebuilt entry is valid


def test_exif_rotated_photo_gets_upright_copy(tmp_path, monkeypatch):
    data = tmp_path / "photos"
    write_photos(data, 2)
    # a JPEG stored 48x64 with EXIF orientation 6 (rotate 90 deg): upright it is 64x48 like the others
    raw = Image.fromarray(np.random.default_rng(3).integers(0, 256, (ORIG_W, ORIG_H, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    raw.save(data / "img_02.jpg", exif=exif.tobytes())
    fb = FakeBuild()
    monkeypatch.setattr(Dust3rDataParser, "_build", lambda self, model, paths, *_: fb(self, model, paths))
    p = parser_for(data, tmp_path, eval_mode="all")
    out = p.get_dataparser_outputs("train")
    files = out.image_filenames
    assert files[0] == data / "img_00.png" and files[1] == data / "img_01.png"
    assert files[2].parent.parent == p.scene.entry and files[2].name == "img_02.jpg.png"
    with Image.open(files[2]) as im:
        assert im.size == (ORIG_W, ORIG_H) and im.getexif().get(0x0112, 1) == 1
    # nerfstudio's own dataset loads every image at the camera's size
    from nerfstudio.data.datasets.base_dataset import InputDataset

    ds = InputDataset(out)
    for i in range(3):
        img = ds.get_numpy_image(i)
        assert img.shape == (int(out.cameras.height[i]), int(out.cameras.width[i]), 3)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(tmp_path, fake_build):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SceneError, match="no photos found"):
        parser_for(empty, tmp_path).get_dataparser_outputs("train")
    with pytest.raises(SceneError, match="no such folder"):
        parser_for(tmp_path / "missing", tmp_path).get_dataparser_outputs("train")
    one = tmp_path / "one"
    write_photos(one, 1)
    with pytest.raises(SceneError, match="only one photo.*at least 2"):
        parser_for(one, tmp_path).get_dataparser_outputs("train")
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "notes.txt").write_text("hello")
    with pytest.raises(SceneError, match="non-image file"):
        parser_for(texts, tmp_path).get_dataparser_outputs("train")
    broken = tmp_path / "broken"
    write_photos(broken, 2)
    (broken / "zz.png").write_bytes(b"not a png at all")
    with pytest.raises(SceneError, match=r"zz\.png: not a readable image"):
        parser_for(broken, tmp_path).get_dataparser_outputs("train")
    with pytest.raises(SceneError, match="must be a folder"):
        parser_for(broken / "zz.png", tmp_path).get_dataparser_outputs("train")
    assert fake_build.calls == 0


def test_alignment_failure_is_explained(tmp_path, monkeypatch):
    import dust3r_ns.pipeline as pl

    def bad_align(*a, **k):
        raise ValueError("Reconstruction.c2w/K contain non-finite values")

    monkeypatch.setattr(pl, "run_pairs", lambda *a, **k: None)
    monkeypatch.setattr(pl, "align_inputs", bad_align)
    data = tmp_path / "photos"
    write_photos(data, 2)
    with pytest.raises(SceneError, match="global alignment failed.*non-finite.*check --model"):
        parser_for(data, tmp_path).get_dataparser_outputs("train")
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # nothing cached


def test_too_few_confident_points(tmp_path, fake_build):
    data = tmp_path / "photos"
    write_photos(data, 2)
    with pytest.raises(SceneError, match="lower .*conf-thr"):
        parser_for(data, tmp_path, conf_thr=100.0).get_dataparser_outputs("train")


# ---------------------------------------------------------------- CPU rasterizer
def test_rasterizer_matches_gsplat_reference_projection():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics

    from dust3r_ns.nerfstudio.rasterizer import eval_sh

    g = torch.Generator().manual_seed(0)
    N = 60
    means = torch.randn(N, 3, generator=g) * 1.5 + torch.tensor([0.0, 0.0, 3.0])  # many beyond the image edges
    quats, scales = torch.randn(N, 4, generator=g), torch.rand(N, 3, generator=g) * 0.2 + 0.01
    vm = torch.eye(4)[None]
    K = torch.tensor([[[60.0, 0, 25.0], [0, 55, 30.0], [0, 0, 1]]])  # off-centre principal point
    mine = project_gaussians(means, quats, scales, vm, K, 64, 48)
    cov, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False, triu=False)
    radii, m2d, depths, conics, comp = _fully_fused_projection(means, cov, vm, K, 64, 48, calc_compensations=True)
    assert torch.equal(mine["radii"], radii) and (radii > 0).sum() > 10
    vis = radii > 0  # culled ones (behind the camera, off-screen) are never used
    torch.testing.assert_close(mine["means2d"][vis], m2d[vis])
    torch.testing.assert_close(mine["conics"][vis], conics[vis])
    torch.testing.assert_close(mine["compensation"][vis], comp[vis])
    dirs, coeffs = torch.randn(N, 3, generator=g), torch.randn(N, 16, 3, generator=g)
    for deg in range(4):
        torch.testing.assert_close(eval_sh(deg, dirs, coeffs), _spherical_harmonics(deg, dirs, coeffs))


def brute_force_render(means2d, conics, opac, feats, depths, radii, W, H):
    """Per-pixel front-to-back loop (the compositing rule of gsplat's kernel)."""
    out = torch.zeros(H, W, feats.shape[-1], dtype=torch.float64)
    acc = torch.zeros(H, W, dtype=torch.float64)
    order = [int(i) for i in torch.argsort(depths) if radii[i] > 0]
    for v in range(H):
        for u in range(W):
            T = 1.0
            for i in order:
                dx, dy = u + 0.5 - means2d[i, 0], v + 0.5 - means2d[i, 1]
                a, b, c = conics[i]
                power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
                if power > 0:
                    continue
                alpha = min(0.999, float(opac[i] * torch.exp(power)))
                if alpha < 1 / 255:
                    continue
                if T * (1 - alpha) < 1e-4:
                    break
                out[v, u] += alpha * T * feats[i]
                acc[v, u] += alpha * T
                T *= 1 - alpha
    return out, acc


def test_rasterizer_kept_and_checkpointed_bands_agree():
    """Bands kept for backward (keep_elems large) and checkpointed ones (keep_elems 0) give the same render, gradients
    and absgrad; a budget in between mixes both."""
    g = torch.Generator().manual_seed(2)
    N, W, H = 30, 11, 9
    base = dict(means=torch.randn(N, 3, generator=g) * 0.4 + torch.tensor([0.0, 0, 2.5]),
                quats=torch.randn(N, 4, generator=g), scales=torch.rand(N, 3, generator=g) * 0.15 + 0.05,
                opacities=torch.rand(N, generator=g) * 0.9 + 0.05, colors=torch.rand(N, 3, generator=g))
    K = torch.tensor([[[14.0, 0, 5.1], [0, 13.0, 4.4], [0, 0, 1]]])
    results = []
    for keep in (0, 200, 10 ** 9):
        p = {k: v.clone().requires_grad_() for k, v in base.items()}
        render, alpha, info = rasterize_dense(**p, viewmats=torch.eye(4)[None], Ks=K, width=W, height=H,
                                              render_mode="RGB+ED", absgrad=True, chunk_elems=60, tile_size=4,
                                              keep_elems=keep)
        (render.square().sum() + alpha.sum()).backward()
        results.append([render.detach(), alpha.detach(), info["means2d"].absgrad] + [v.grad for v in p.values()])
    assert results[0][-1].abs().sum() > 0
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rasterizer_compositing_and_gradients():
    g = torch.Generator().manual_seed(1)
    N, W, H = 25, 12, 9
    means = (torch.randn(N, 3, generator=g, dtype=torch.float64) * 0.4 + torch.tensor([0.0, 0, 2.5])).requires_grad_()
    quats = torch.randn(N, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(N, 3, generator=g, dtype=torch.float64) * 0.15 + 0.05
    opac = (torch.rand(N, generator=g, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    cols = torch.rand(N, 3, generator=g, dtype=torch.float64).requires_grad_()
    vm = torch.eye(4, dtype=torch.float64)[None]
    K = torch.tensor([[[14.0, 0, 6.1], [0, 13.0, 4.4], [0, 0, 1]]], dtype=torch.float64)
    render, alpha, info = rasterize_dense(means, quats, scales, opac, cols, vm, K, W, H, render_mode="RGB+ED",
                                          absgrad=True, chunk_elems=40, tile_size=5)  # tiles + chunks
    assert render.shape == (1, H, W, 4) and alpha.shape == (1, H, W, 1)
    ref, acc = brute_force_render(info["means2d"][0].detach(), info["conics"][0].detach(), opac.detach(),
                                  torch.cat([cols, info["depths"][0, :, None]], -1).detach(),
                                  info["depths"][0].detach(), info["radii"][0], W, H)
    torch.testing.assert_close(alpha[0, ..., 0].detach(), acc)
    torch.testing.assert_close(render[0, ..., :3].detach(), ref[..., :3])
    torch.testing.assert_close(render[0, ..., 3].detach(), ref[..., 3] / acc.clamp(min=1e-10))
    assert acc.max() > 0.5
    # gradients: analytic vs finite differences, and absgrad >= |grad| per Gaussian
    info["means2d"].retain_grad()
    (render[..., :3].sum() + alpha.sum()).backward()
    m2g, absg = info["means2d"].grad, info["means2d"].absgrad
    assert (absg >= m2g.abs() - 1e-12).all() and absg.sum() > m2g.abs().sum()

    k = 5  # gradcheck on 5 Gaussians (the others fixed) keeps the test fast

    def f(m, o, c):
        mm = torch.cat([m, means.detach()[k:]])
        oo = torch.cat([o, opac.detach()[k:]])
        cc = torch.cat([c, cols.detach()[k:]])
        r, a, _ = rasterize_dense(mm, quats, scales, oo, cc, vm, K, W, H)
        return (r * torch.linspace(0.5, 1.5, W, dtype=r.dtype)[:, None]).sum() + a.sum()

    inputs = tuple(t.detach()[:k].clone().requires_grad_() for t in (means, opac, cols))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-4)


@pytest.mark.cuda
def test_rasterizer_matches_gsplat_cuda():
    """On a GPU: the CPU fallback renders what gsplat renders (image, alpha, radii, 2D means and their gradients)."""
    from gsplat.rendering import rasterization

    g = torch.Generator().manual_seed(2)
    N, W, H = 300, 40, 30
    means = torch.randn(N, 3, generator=g) * 0.5 + torch.tensor([0.0, 0.0, 3.0])
    quats = torch.randn(N, 4, generator=g)
    scales = torch.rand(N, 3, generator=g) * 0.08 + 0.01
    opac = torch.rand(N, generator=g) * 0.9 + 0.05
    coeffs = torch.randn(N, 16, 3, generator=g) * 0.3
    vm = torch.eye(4)[None]
    K = torch.tensor([[[35.0, 0, 20.2], [0, 36.0, 14.7], [0, 0, 1]]])
    results = []
    for dev, fn in (("cpu", rasterize_dense), ("cuda", rasterization)):
        m = means.to(dev).requires_grad_()
        r, a, info = fn(m, quats.to(dev), scales.to(dev), opac.to(dev), coeffs.to(dev), vm.to(dev), K.to(dev), W, H,
                        sh_degree=3, packed=False, absgrad=True, render_mode="RGB+ED")
        info["means2d"].retain_grad()
        (r[..., :3] * torch.linspace(0, 1, 3, device=dev)).sum().backward()
        results.append({"render": r.detach().cpu(), "alpha": a.detach().cpu(), "radii": info["radii"].cpu(),
                        "means2d": info["means2d"].detach().cpu(), "grad": info["means2d"].grad.cpu(),
                        "absgrad": info["means2d"].absgrad.cpu(), "means_grad": m.grad.cpu()})
    cpu, gpu = results
    assert torch.equal(cpu["radii"], gpu["radii"])
    for key, atol in (("means2d", 1e-3), ("alpha", 2e-3), ("render", 5e-3), ("grad", 5e-3), ("absgrad", 5e-3),
                      ("means_grad", 5e-3)):
        scale = float(gpu[key].abs().max()) or 1.0
        assert float((cpu[key] - gpu[key]).abs().max()) <= atol * max(1.0, scale), key


# ---------------------------------------------------------------- model CPU path (no subprocess)
def test_model_cpu_path_trains_one_step(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("exercises the CPU fallback")
    from nerfstudio.cameras.cameras import Cameras

    from dust3r_ns.nerfstudio.model import Dust3rSplatfactoModelConfig

    g = torch.Generator().manual_seed(0)
    xyz = torch.randn(200, 3, generator=g) * 0.3
    rgb = torch.randint(0, 256, (200, 3), generator=g, dtype=torch.uint8)
    cfg = Dust3rSplatfactoModelConfig(num_downscales=0)
    from nerfstudio.data.scene_box import SceneBox

    with pytest.warns(UserWarning, match="LPIPS") if not _lpips_available() else _null():
        model = cfg.setup(scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])), num_train_data=1,
                          metadata={}, seed_points=(xyz, rgb), device="cpu")
    # seed colours set without .cuda(): DC term reproduces the colours
    from nerfstudio.models.splatfacto import SH2RGB

    torch.testing.assert_close(SH2RGB(model.features_dc.detach()), rgb.float() / 255)
    c2w = torch.tensor([[[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 2.0]]])  # OpenGL: looks down -z at the origin
    cam = Cameras(camera_to_worlds=c2w, fx=30.0, fy=30.0, cx=16.0, cy=12.0, width=32, height=24)
    model.train()
    model.step_cb(_FakeOptimizers(), 1)  # step 0 would reset opacities (needs real optimizers)
    out = model.get_outputs(cam)
    assert out["rgb"].shape == (24, 32, 3) and out["accumulation"].max() > 0
    loss = model.get_loss_dict(out, {"image": torch.rand(24, 32, 3)})["main_loss"]
    loss.backward()
    assert model.means.grad is not None and model.means.grad.abs().sum() > 0
    assert model.info["means2d"].absgrad.abs().sum() > 0
    backend = sys.modules.get("gsplat.cuda._backend")
    assert backend is not None and "dust3r_ns stub" in (backend.__doc__ or "")
    model.step_post_backward(1)  # gsplat strategy bookkeeping accepts our info dict
    assert model.strategy_state["count"].sum() > 0
    model.eval()
    ev = model.get_outputs(cam)
    assert ev["depth"].shape == (24, 32, 1)


def test_gsplat_cuda_calls_fail_fast_without_cuda():
    """Without CUDA, any gsplat CUDA kernel call raises at once instead of starting the hour-long JIT build."""
    if torch.cuda.is_available():
        pytest.skip("only meaningful without CUDA")
    from gsplat.cuda._wrapper import spherical_harmonics

    from dust3r_ns.nerfstudio.model import block_gsplat_cuda_jit

    block_gsplat_cuda_jit()  # what the model does when it is built without CUDA

    with pytest.raises(RuntimeError, match="without CUDA"):
        spherical_harmonics(1, torch.randn(4, 3), torch.randn(4, 4, 3))


class _FakeOptimizers:
    optimizers: dict = {}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _lpips_available() -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()


# ---------------------------------------------------------------- ns-train end to end (CPU)
TINY_SPEC = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', img_size=(224, 224), head_type='linear', "
             "output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=32, "
             "enc_depth=1, enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2)")


def _tiny_model(folder: Path) -> Path:
    """A tiny DUSt3R whose output is geometric by construction (random weights give points behind the camera,
    which no alignment can use): residual branches are zeroed, the patch embedding copies the patch's mean red
    and green (the test photos encode column and row there) and the linear heads turn them (+ the pixel's offset
    in its patch) into a ray direction in front of the camera with confidence ~8."""
    from dust3r_ns.model import checkpoint as C

    _, kw = C.parse_model_spec(TINY_SPEC)
    model = C.build_model(kw).eval()
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    D, p, big = 32, 16, 20.0
    sd["patch_embed.proj.weight"][0, 0] = 1.0 / p ** 2
    sd["patch_embed.proj.weight"][1, 1] = 1.0 / p ** 2
    sd["patch_embed.proj.bias"][2:] = big * torch.tensor([1.0, -1.0]).repeat((D - 2) // 2)
    for name in ("enc_norm", "dec_norm") + tuple(k[:-len(".weight")] for k in sd if "norm" in k and
                                                  k.startswith(("enc_blocks", "dec_blocks")) and k.endswith("weight")):
        sd[f"{name}.weight"] = torch.ones(D)
    sd["enc_norm.weight"][:2] = big  # undo the layer norm's division by ~big for the two signal channels
    sd["decoder_embed.weight"] = torch.eye(D)
    jj = torch.arange(p, dtype=torch.float32)
    for head in ("downstream_head1", "downstream_head2"):
        w, b = sd[f"{head}.proj.weight"], sd[f"{head}.proj.bias"]
        w[0:p * p, 0] = 0.5  # x <- column (red)
        w[p * p:2 * p * p, 1] = 0.5  # y <- row (green)
        b[0:p * p] = (0.5 * (jj - 7.5) / 150).repeat(p)  # + offset within the patch
        b[p * p:2 * p * p] = (0.5 * (jj - 7.5) / 150).repeat_interleave(p)
        b[2 * p * p:3 * p * p] = 1.0  # z
        b[3 * p * p:] = 2.0  # confidence 1 + e^2
    model.load_state_dict(sd)
    C.save_hf(model, folder)
    return folder


def _smooth_photos(folder: Path, n: int = 3) -> None:
    """Small photos whose red/green channels are column/row ramps (read by `_tiny_model`), blue a texture."""
    folder.mkdir(parents=True)
    v, u = np.mgrid[0:ORIG_H, 0:ORIG_W].astype(np.float32)
    for i in range(n):
        img = np.stack([255 * u / (ORIG_W - 1), 255 * v / (ORIG_H - 1), 128 + 100 * np.sin((u + 3 * i) / 5)], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"view_{i}.png")


def _ns_env() -> dict:
    """Environment of the `ns-*` subprocesses: this checkout first on PYTHONPATH (so they run the code under test,
    not an installed copy) and the plugin registered through nerfstudio's environment hooks (works with or without
    installed entry points)."""
    env = dict(os.environ)
    env["NERFSTUDIO_METHOD_CONFIGS"] = "dust3r-splatfacto=dust3r_ns.nerfstudio.method:dust3r_splatfacto"
    env["NERFSTUDIO_DATAPARSER_CONFIGS"] = "dust3r=dust3r_ns.nerfstudio.dataparser:dust3r_dataparser"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # the workaround this plugin makes unnecessary
    env.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
    return env


def _ns_run(tmp_path: Path, script: str, args: list[str], timeout: int = 600) -> tuple[str, float]:
    """Run `python -m nerfstudio.scripts.<script> ARGS` in a subprocess; assert exit 0; return (log, seconds)."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", f"nerfstudio.scripts.{script}", *args], env=_ns_env(),
                         capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    elapsed = time.perf_counter() - t0
    log = res.stdout[-4000:] + res.stderr  # stderr whole: the dataparser's progress lines come early in it
    assert res.returncode == 0, f"ns {script} {' '.join(args)} failed:\n{log}"
    assert "Setting up CUDA" not in log  # gsplat's JIT never started
    return log, elapsed


def _load_ckpt(path: Path) -> dict:
    """A nerfstudio checkpoint, weights-only, with exactly the plugin's numpy allow-list."""
    with torch.serialization.safe_globals(list(NS_CHECKPOINT_GLOBALS)):
        return torch.load(path, map_location="cpu", weights_only=True)


def _ns_train(tmp_path: Path, data: Path, parser_args: list[str], iters: int = 3, out: Path | None = None,
              train_args: tuple[str, ...] = ()) -> tuple[dict, float, str]:
    """Run `ns-train dust3r-splatfacto` (CPU, no viewer) in a subprocess; return (checkpoint, seconds, log)."""
    out = out or tmp_path / "outputs"
    log, elapsed = _ns_run(tmp_path, "train", [
        "dust3r-splatfacto", "--data", str(data), "--output-dir", str(out), "--max-num-iterations", str(iters),
        "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True", *train_args, "dust3r", *parser_args])
    ckpts = sorted(out.rglob("step-*.ckpt"))
    assert ckpts and list(out.rglob("dataparser_transforms.json")), log
    return _load_ckpt(ckpts[-1]), elapsed, log


def _read_ply_floats(path: Path) -> np.ndarray:
    """The vertices of a binary little-endian PLY whose properties are all float (a structured array)."""
    raw = path.read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    header = raw[:end].decode().splitlines()
    assert "format binary_little_endian 1.0" in header, header[:3]
    count = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    props = [h.split() for h in header if h.startswith("property")]
    assert all(p[1] == "float" for p in props), props
    dtype = np.dtype([(p[2], "<f4") for p in props])
    assert len(raw) - end == count * dtype.itemsize
    return np.frombuffer(raw, dtype=dtype, offset=end, count=count)


def test_plugin_allows_exactly_nerfstudio_checkpoint_globals(tmp_path):
    """After the plugin is imported, torch's default (weights-only) load accepts nerfstudio's numpy float64
    learning rates, and still refuses other numpy scalars and arbitrary callables."""
    from dust3r_ns.nerfstudio import method

    method.allow_checkpoint_globals()  # idempotent: the import already did it
    allowed = torch.serialization.get_safe_globals()
    assert all(allowed.count(g) == 1 for g in NS_CHECKPOINT_GLOBALS)
    ok = tmp_path / "ok.ckpt"
    torch.save({"lr": np.float64(1.6e-4), "_last_lr": [np.float64(2.5e-3)], "w": torch.ones(2)}, ok)
    state = torch.load(ok, map_location="cpu")  # torch's default: weights_only=True
    assert state["lr"] == np.float64(1.6e-4) and isinstance(state["_last_lr"][0], np.float64)
    for name, obj in (("f32", {"lr": np.float32(0.5)}), ("call", {"f": os.getcwd})):
        bad = tmp_path / f"{name}.ckpt"
        torch.save(obj, bad)
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(bad, map_location="cpu")


def test_ns_cycle_train_eval_export_resume(tmp_path, fake_build):
    """What users run after training, with torch's weights-only default and no environment workaround:
    `ns-train dust3r-splatfacto` -> `ns-eval` -> `ns-export gaussian-splat` -> resume with `--load-dir`
    (CPU, tiny photos, 3 + 2 iterations; the reconstruction comes from the cache filled here)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU end-to-end path; on GPUs gsplat is used")
    data = tmp_path / "photos"
    write_photos(data, 4)  # eval_interval 8: img_00 is the eval photo, three train photos
    parser_args = ["--model", "cached-model", "--conf-thr", "1.0", "--max-points", "300"]
    parser_config(data, "cached-model", conf_thr=1.0, max_points=300).setup().get_dataparser_outputs("train")
    ckpt, _, log = _ns_train(tmp_path, data, parser_args, iters=3)
    assert "reusing cached reconstruction" in log and ckpt["step"] == 2
    (config,) = (tmp_path / "outputs").rglob("config.yml")
    models = config.parent / "nerfstudio_models"
    means = ckpt["pipeline"]["_model.gauss_params.means"]

    # ns-eval: loads the checkpoint, renders the eval photo, writes finite PSNR/SSIM
    _ns_run(tmp_path, "eval", ["--load-config", str(config), "--output-path", str(tmp_path / "eval.json")])
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["checkpoint"].endswith("step-000000002.ckpt")
    assert np.isfinite(results["results"]["psnr"]) and 0 < results["results"]["psnr"] < 100
    assert np.isfinite(results["results"]["ssim"])

    # ns-export gaussian-splat: the checkpoint's Gaussians, all of them, as a PLY
    _ns_run(tmp_path, "exporter", ["gaussian-splat", "--load-config", str(config),
                                    "--output-dir", str(tmp_path / "export")])
    verts = _read_ply_floats(tmp_path / "export" / "splat.ply")
    xyz = np.stack([verts["x"], verts["y"], verts["z"]], -1)
    assert xyz.shape == tuple(means.shape)
    np.testing.assert_allclose(np.sort(xyz, axis=0), np.sort(means.numpy(), axis=0), atol=1e-6)

    # resume: 2 more iterations from the saved step, optimiser and scheduler state included
    ckpt2, _, log2 = _ns_train(tmp_path, data, parser_args, iters=2, out=tmp_path / "resumed",
                               train_args=("--load-dir", str(models)))
    assert "Done loading Nerfstudio checkpoint" in log2.replace("\n", " ")
    assert ckpt2["step"] == 4  # steps 3 and 4 ran after the loaded step 2
    sched1, sched2 = ckpt["schedulers"]["means"], ckpt2["schedulers"]["means"]
    assert sched2["last_epoch"] == sched1["last_epoch"] + 2
    means2 = ckpt2["pipeline"]["_model.gauss_params.means"]
    assert means2.shape == means.shape and (means2 - means).abs().max() < 0.05 and not torch.equal(means2, means)


def test_nerfstudio_data_parser_loads_exported_points(tmp_path):
    """`ns-train splatfacto --data EXPORT/` reads transforms.json and its PLY through nerfstudio's own parser, which
    imports open3d for the points (needs the Debian library libusb-1.0-0 that README's setup installs)."""
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    from dust3r_ns.export.dataset import export_dataset

    rec = fake_reconstruction([f"img_{i:02d}.png" for i in range(3)])
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    export_dataset(rec, tmp_path / "scene", formats=("ply", "nerfstudio"), images=photos, conf_thr=1.5,
                   max_points=200)
    out = NerfstudioDataParserConfig(data=tmp_path / "scene", load_3D_points=True,
                                     eval_mode="all").setup().get_dataparser_outputs("train")
    xyz, rgb = out.metadata["points3D_xyz"], out.metadata["points3D_rgb"]
    header = (tmp_path / "scene" / "sparse_pc.ply").read_bytes().split(b"end_header")[0].decode()
    n_ply = int(next(h for h in header.splitlines() if h.startswith("element vertex")).split()[-1])
    assert 100 <= n_ply <= 200 and xyz.shape == (n_ply, 3)
    assert rgb.dtype == torch.uint8 and torch.isfinite(xyz).all()
    assert len(out.image_filenames) == 3 and (out.cameras.width == ORIG_W).all()


@pytest.mark.slow
def test_ns_train_cpu_from_cached_reconstruction(tmp_path, fake_build):
    """ns-train on CPU with the reconstruction taken from the cache (isolates the nerfstudio side from the
    network and the alignment; `test_ns_train_cpu_full_pipeline` covers the same in CI)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU end-to-end path; on GPUs gsplat is used")
    data = tmp_path / "photos"
    write_photos(data, 3)
    p = parser_config(data, "cached-model", conf_thr=1.0, max_points=400).setup()
    seeds = p.get_dataparser_outputs("train").metadata["points3D_xyz"]
    ckpt, elapsed, log = _ns_train(tmp_path, data, ["--model", "cached-model", "--conf-thr", "1.0",
                                                     "--max-points", "400"])
    assert "reusing cached reconstruction" in log
    means = ckpt["pipeline"]["_model.gauss_params.means"]
    assert ckpt["step"] == 2 and means.shape == seeds.shape  # 3 iterations, no densification yet
    assert torch.isfinite(means).all() and (means - seeds).abs().max() < 0.05
    assert not torch.equal(means, seeds)  # the optimiser moved them
    assert elapsed < 120, f"ns-train took {elapsed:.0f} s"


def test_ns_train_cpu_full_pipeline(tmp_path):
    """`ns-train dust3r-splatfacto --data photos/` with a tiny random DUSt3R: inference, alignment, cache, training."""
    pytest.importorskip("dust3r_ns.images")
    pytest.importorskip("dust3r_ns.pairs")
    if torch.cuda.is_available():
        pytest.skip("the CPU end-to-end path; on GPUs gsplat is used")
    data = tmp_path / "photos"
    _smooth_photos(data)
    model_dir = _tiny_model(tmp_path / "tiny_model")
    ckpt, elapsed, log = _ns_train(tmp_path, data, ["--model", str(model_dir), "--image-size", "224",
                                                     "--conf-thr", "1.0", "--max-points", "300"])
    assert (data / ".dust3r_cache").is_dir() and "reconstructing 3 photos" in log
    means = ckpt["pipeline"]["_model.gauss_params.means"]
    assert ckpt["step"] == 2 and 4 <= means.shape[0] <= 300 and torch.isfinite(means).all()
    # the tiny model sees the same geometry in every photo: all cameras coincide; the scale comes from the points
    assert float(torch.quantile(means.abs().flatten(), 0.95)) < 5.0
    # the cache written by ns-train is reused here, and the Gaussians started from its seed points
    p = parser_config(data, str(model_dir), image_size=224, conf_thr=1.0, max_points=300).setup()
    seeds = p.get_dataparser_outputs("train").metadata["points3D_xyz"]
    assert p.scene.hit and means.shape == seeds.shape
    assert (means - seeds).abs().max() < 0.05 and not torch.equal(means, seeds)
    assert elapsed < 180, f"ns-train took {elapsed:.0f} s"
