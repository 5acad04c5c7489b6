"""Tests for dust3r_ns.export: COLMAP (pycolmap read-back, reprojection), PLY, transforms.json, GLB."""

from __future__ import annotations

import json

import numpy as np
import pycolmap
import pytest
import trimesh
from PIL import Image

from dust3r_ns import conventions as cv
from dust3r_ns.export import (
    ExportError,
    read_colmap,
    read_ply,
    read_transforms_json,
    write_colmap,
    write_glb,
    write_ply,
    write_transforms_json,
)
from dust3r_ns.export.glb import GLB_WORLD_FLIP, load_glb
from dust3r_ns.scene import Reconstruction


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up=(0.0, -1.0, 0.0)) -> np.ndarray:
    """OpenCV camera-to-world looking from eye to target (y down = -up)."""
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(-np.asarray(up), z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = eye
    return T


def make_recon(seed: int = 0, same_size: bool = False) -> Reconstruction:
    """A known random scene: 3 cameras looking at random points, random depths, network 32x24 images."""
    rng = np.random.default_rng(seed)
    n, H, W = 3, 24, 32
    orig_sizes = np.array([[80, 64], [80, 64], [67, 50]]) if not same_size else np.array([[80, 64]] * 3)
    c2w, K, transforms, depths, confs, rgbs = [], [], [], [], [], []
    for i in range(n):
        eye = rng.normal(size=3)
        eye = 4.0 * eye / np.linalg.norm(eye)
        c2w.append(look_at_c2w(eye, rng.uniform(-0.5, 0.5, 3)))
        Wo, Ho = orig_sizes[i]
        s = max(W / Wo, H / Ho) * rng.uniform(1.0, 1.2)  # resize so the crop fits, then crop at an offset
        x0 = rng.uniform(0, Wo * s - W)
        y0 = rng.uniform(0, Ho * s - H)
        t = np.array([s, s, x0, y0])
        K_orig = np.array([[rng.uniform(60, 90), 0, Wo / 2 + rng.uniform(-2, 2)],
                           [0, rng.uniform(60, 90), Ho / 2 + rng.uniform(-2, 2)], [0, 0, 1]])
        if same_size:
            K_orig = np.array([[75.0, 0, 40.0], [0, 76.0, 31.0], [0, 0, 1]])
            t = np.array([0.5, 0.5, 4.0, 4.0])
        transforms.append(t)
        K.append(cv.K_orig_to_net(K_orig, t))
        depths.append(rng.uniform(2.0, 6.0, (H, W)).astype(np.float32))
        confs.append(rng.uniform(1.0, 5.0, (H, W)).astype(np.float32))
        rgbs.append(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
    return Reconstruction(names=[f"img_{i:02d}.png" for i in range(n)], orig_sizes=orig_sizes,
                          transforms=np.array(transforms), c2w=np.array(c2w), K=np.array(K),
                          depths=depths, confs=confs, rgbs=rgbs)


@pytest.fixture(scope="module")
def recon() -> Reconstruction:
    return make_recon()


def project(K: np.ndarray, w2c: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    p = (xyz @ w2c[:3, :3].T + w2c[:3, 3]) @ K.T
    return p[..., :2] / p[..., 2:3]


# ---------------------------------------------------------------- COLMAP
@pytest.mark.parametrize("text", [False, True])
def test_colmap_read_back_poses_cameras_and_reprojection(recon, tmp_path, text):
    out = tmp_path / "sparse" / "0"
    write_colmap(recon, out, text=text, conf_thr=2.0, max_points=0, depth_tol=0)   # single-image tracks
    ext = "txt" if text else "bin"
    assert {f.name for f in out.iterdir()} >= {f"cameras.{ext}", f"images.{ext}", f"points3D.{ext}"}
    xyz, rgb, src = recon.pointcloud(conf_thr=2.0, max_points=None)
    rec = pycolmap.Reconstruction(str(out))
    assert rec.num_images() == 3 and rec.num_cameras() == 3 and rec.num_points3D() == len(xyz) > 0
    K_orig = recon.K_orig
    w2c = cv.c2w_to_w2c(recon.c2w)
    for i in range(3):
        im = rec.image(i + 1)
        assert im.name == recon.names[i]
        np.testing.assert_allclose(im.cam_from_world().matrix(), w2c[i, :3], atol=1e-5)
        cam = rec.camera(im.camera_id)
        assert (cam.width, cam.height) == tuple(recon.orig_sizes[i])
        assert cam.model.name == "PINHOLE"
        fx, fy, cx, cy = cam.params
        np.testing.assert_allclose([fx, fy], [K_orig[i, 0, 0], K_orig[i, 1, 1]], rtol=1e-12)
        np.testing.assert_allclose([cx, cy], K_orig[i, :2, 2] + 0.5, atol=1e-9)  # COLMAP +0.5 convention
    # Every point reprojects onto its single keypoint, both via pycolmap and a manual projection.
    errs_manual, errs_pycolmap, seen = [], [], 0
    for pid, p in rec.points3D.items():
        (el,) = p.track.elements
        im = rec.image(el.image_id)
        kp = np.asarray(im.points2D[el.point2D_idx].xy)
        assert im.points2D[el.point2D_idx].point3D_id == pid
        cam = rec.camera(im.camera_id)
        Kc = cam.calibration_matrix()
        errs_manual.append(np.linalg.norm(project(Kc, im.cam_from_world().matrix(), p.xyz) - kp))
        X_cam = im.cam_from_world() * p.xyz
        errs_pycolmap.append(np.linalg.norm(np.asarray(cam.img_from_cam(X_cam[None])).ravel()[:2] - kp))
        seen += 1
    assert seen == len(xyz)
    assert max(errs_manual) < 1e-3 and max(errs_pycolmap) < 1e-3  # float32 xyz; far below the 0.5 px bar
    # The keypoint of a point is its source pixel mapped by hand to original COLMAP pixels.
    p = rec.point3D(1)
    (el,) = p.track.elements
    k = int(np.argmin(np.linalg.norm(xyz.astype(np.float64) - p.xyz, axis=1)))
    i, v, u = src[k]
    sx, sy, x0, y0 = recon.transforms[i]
    expected = [(u + 0.5 + x0) / sx - 0.5 + 0.5, (v + 0.5 + y0) / sy - 0.5 + 0.5]
    np.testing.assert_allclose(rec.image(el.image_id).points2D[el.point2D_idx].xy, expected, atol=1e-9)
    np.testing.assert_array_equal(p.color, rgb[k])


def test_colmap_overwrite_removes_stale_format(recon, tmp_path):
    out = tmp_path / "model"
    write_colmap(recon, out, text=False, max_points=50)
    (out / "keep_me.txt").write_text("user file")
    write_colmap(recon, out, text=True, max_points=40)
    names = {f.name for f in out.iterdir()}
    assert "cameras.bin" not in names and "cameras.txt" in names and "keep_me.txt" in names
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp folders left behind
    assert pycolmap.Reconstruction(str(out)).num_points3D() == len(recon.pointcloud(max_points=40)[0])


def test_colmap_shared_camera(tmp_path):
    rc = make_recon(seed=1, same_size=True)
    write_colmap(rc, tmp_path / "m", shared_camera=True, max_points=200)
    rec = pycolmap.Reconstruction(str(tmp_path / "m"))
    assert rec.num_cameras() == 1 and all(im.camera_id == 1 for im in rec.images.values())
    np.testing.assert_allclose(rec.camera(1).params, [75.0, 76.0, 40.5, 31.5], atol=1e-9)
    with pytest.raises(ExportError, match="same original size"):
        write_colmap(make_recon(seed=1), tmp_path / "m2", shared_camera=True)


def test_colmap_unwritable_output(recon, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ExportError, match="writable"):
        write_colmap(recon, blocker / "sparse", max_points=10)
    with pytest.raises(ExportError, match="not a folder"):
        write_colmap(recon, blocker, max_points=10)


def test_colmap_images_dir_check(recon, tmp_path):
    imgs = tmp_path / "images"
    imgs.mkdir()
    for name, (w, h) in zip(recon.names, recon.orig_sizes):
        Image.new("RGB", (int(w), int(h))).save(imgs / name)
    write_colmap(recon, tmp_path / "ok", images_dir=imgs, max_points=10)
    Image.new("RGB", (10, 10)).save(imgs / recon.names[1])
    with pytest.raises(ExportError, match="expects 80x64"):
        write_colmap(recon, tmp_path / "bad", images_dir=imgs, max_points=10)
    # A 180-degree EXIF rotation keeps the size but COLMAP would see the image upside down.
    w, h = recon.orig_sizes[1]
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.new("RGB", (int(w), int(h))).save(imgs / recon.names[1], exif=exif)
    with pytest.raises(ExportError, match="EXIF orientation"):
        write_colmap(recon, tmp_path / "bad", images_dir=imgs, max_points=10)
    (imgs / recon.names[1]).unlink()
    with pytest.raises(ExportError, match="not found"):
        write_colmap(recon, tmp_path / "bad", images_dir=imgs, max_points=10)
    assert not (tmp_path / "bad").exists()


# ---------------------------------------------------------------- PLY
def test_ply_round_trip_and_trimesh(tmp_path):
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(500, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, (500, 3), dtype=np.uint8)
    path = write_ply(tmp_path / "pc.ply", xyz, rgb)
    assert path.read_bytes().startswith(b"ply\nformat binary_little_endian 1.0\n")
    xyz2, rgb2 = read_ply(path)
    np.testing.assert_array_equal(xyz2, xyz)
    np.testing.assert_array_equal(rgb2, rgb)
    pc = trimesh.load(path)
    assert isinstance(pc, trimesh.PointCloud) and len(pc.vertices) == 500
    np.testing.assert_allclose(pc.vertices, xyz, atol=0)
    np.testing.assert_array_equal(np.asarray(pc.colors)[:, :3], rgb)
    # Float colours in [0, 1] are accepted; float64 xyz is stored as float32.
    write_ply(tmp_path / "f.ply", xyz.astype(np.float64), rgb / 255.0)
    np.testing.assert_array_equal(read_ply(tmp_path / "f.ply")[1], rgb)
    # Empty cloud.
    write_ply(tmp_path / "e.ply", np.zeros((0, 3)), np.zeros((0, 3), np.uint8))
    assert read_ply(tmp_path / "e.ply")[0].shape == (0, 3)


def test_ply_errors(tmp_path):
    with pytest.raises(ExportError, match=r"\(M, 3\)"):
        write_ply(tmp_path / "x.ply", np.zeros((4, 2)), np.zeros((4, 3), np.uint8))
    with pytest.raises(ExportError, match="NaN"):
        write_ply(tmp_path / "x.ply", np.full((1, 3), np.nan), np.zeros((1, 3), np.uint8))
    (tmp_path / "t.ply").write_bytes(b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nend_header\n1\n")
    with pytest.raises(ExportError, match="binary_little_endian"):
        read_ply(tmp_path / "t.ply")
    good = write_ply(tmp_path / "g.ply", np.zeros((10, 3)), np.zeros((10, 3), np.uint8)).read_bytes()
    (tmp_path / "trunc.ply").write_bytes(good[:-5])
    with pytest.raises(ExportError, match="truncated"):
        read_ply(tmp_path / "trunc.ply")
    assert not (tmp_path / "x.ply").exists()


# ---------------------------------------------------------------- nerfstudio transforms.json
def test_transforms_json_round_trip_and_rays(recon, tmp_path):
    path = write_transforms_json(recon, tmp_path / "ns", conf_thr=2.0, max_points=300)
    meta = json.loads(path.read_text())
    assert meta["camera_model"] == "OPENCV" and meta["ply_file_path"] == "sparse_pc.ply"
    assert [f["file_path"] for f in meta["frames"]] == [f"images/{n}" for n in recon.names]
    back = read_transforms_json(path)
    np.testing.assert_allclose(back["c2w"], recon.c2w, rtol=0, atol=1e-12)
    np.testing.assert_allclose(back["K_orig"], recon.K_orig, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(back["sizes"], recon.orig_sizes)
    np.testing.assert_allclose(meta["frames"][0]["cx"], recon.K_orig[0, 0, 2] + 0.5, atol=1e-12)
    xyz, rgb, src = recon.pointcloud(conf_thr=2.0, max_points=300)
    xyz_ply, rgb_ply = read_ply(tmp_path / "ns" / "sparse_pc.ply")
    np.testing.assert_array_equal(xyz_ply, xyz)
    np.testing.assert_array_equal(rgb_ply, rgb)
    # nerfstudio's ray through continuous image coordinate (x, y) (pixel centres at +0.5), in OpenGL camera axes:
    # d = ((x - cx)/fx, -(y - cy)/fy, -1), rotated by transform_matrix. It must hit each point's source pixel.
    for k in range(0, len(xyz), 37):
        i, v, u = src[k]
        f = meta["frames"][i]
        uo, vo = cv.pixel_net_to_orig(np.array([u, v], float), recon.transforms[i])
        x, y = uo + 0.5, vo + 0.5
        T = np.array(f["transform_matrix"])
        d = T[:3, :3] @ np.array([(x - f["cx"]) / f["fl_x"], -(y - f["cy"]) / f["fl_y"], -1.0])
        to_point = xyz[k].astype(np.float64) - T[:3, 3]
        cosang = d @ to_point / np.linalg.norm(d) / np.linalg.norm(to_point)
        assert cosang > 1 - 1e-10


def test_transforms_json_without_ply_and_image_check(recon, tmp_path):
    write_transforms_json(recon, tmp_path, ply_name=None, images_subdir="rgb")
    meta = json.loads((tmp_path / "transforms.json").read_text())
    assert "ply_file_path" not in meta and meta["frames"][2]["file_path"] == "rgb/img_02.png"
    assert not list(tmp_path.glob("*.ply"))
    with pytest.raises(ExportError, match="does not exist"):
        write_transforms_json(recon, tmp_path / "x", check_images_exist=True)
    (tmp_path / "bad.json").write_text("{\"frames\": []}")
    with pytest.raises(ExportError, match="non-empty"):
        read_transforms_json(tmp_path / "bad.json")


# ---------------------------------------------------------------- GLB
def test_glb_loads_back(recon, tmp_path):
    xyz, rgb, _ = recon.pointcloud(max_points=400)
    path = write_glb(tmp_path / "scene.glb", xyz, rgb, recon.c2w, recon.K, recon.shapes[:, ::-1])
    scene = load_glb(path)
    clouds = [g for g in scene.geometry.values() if isinstance(g, trimesh.PointCloud)]
    paths = [g for g in scene.geometry.values() if isinstance(g, trimesh.path.Path3D)]
    assert len(clouds) == 1 and len(paths) == 3
    pts = clouds[0].vertices
    assert len(pts) == len(xyz)
    np.testing.assert_allclose(pts, xyz @ GLB_WORLD_FLIP[:3, :3].T, atol=1e-5)  # y-up world
    # Frustum apexes are the (flipped) camera centres.
    verts = np.concatenate([p.vertices for p in paths])
    for c in recon.c2w[:, :3, 3] @ GLB_WORLD_FLIP[:3, :3].T:
        assert np.min(np.linalg.norm(verts - c, axis=1)) < 1e-5
    # glTF content: one POINTS primitive with colours, one coloured LINES primitive per camera.
    import struct

    raw = path.read_bytes()
    (json_len,) = struct.unpack("<I", raw[12:16])
    gltf = json.loads(raw[20:20 + json_len])
    modes = sorted((m["primitives"][0].get("mode"), "COLOR_0" in m["primitives"][0]["attributes"])
                   for m in gltf["meshes"])
    assert modes == [(0, True), (1, True), (1, True), (1, True)]
    with pytest.raises(ExportError, match="c2w"):
        write_glb(tmp_path / "bad.glb", xyz, rgb, recon.c2w[:2], recon.K, recon.shapes)


# ---------------------------------------------------------------- whole dataset + CLI entry point
def test_export_dataset_and_cli(recon, tmp_path):
    from dust3r_ns.export import copy_images, export_dataset
    from dust3r_ns.export.cli import ExportConfig, run
    from dust3r_ns.pipeline import PointsConfig

    src = tmp_path / "orig"
    src.mkdir()
    for k, (name, (w, h)) in enumerate(zip(recon.names, recon.orig_sizes)):
        if k == 2:  # stored sideways with an EXIF "rotate 90" tag: copied upright
            exif = Image.Exif()
            exif[0x0112] = 6
            Image.new("RGB", (int(h), int(w)), (k, 0, 0)).save(src / name, exif=exif)
        else:
            Image.new("RGB", (int(w), int(h)), (k, 0, 0)).save(src / name)
    npz = recon.save(tmp_path / "recon.npz")
    written = run(ExportConfig(recon=npz, out=tmp_path / "ds", images=src,
                                 points=PointsConfig(conf_thr=2.0, max_points=500)))
    ds = tmp_path / "ds"
    assert set(written) == {"images", "colmap", "ply", "nerfstudio", "glb"}
    for name, (w, h) in zip(recon.names, recon.orig_sizes):
        with Image.open(ds / "images" / name) as im:
            assert im.size == (w, h) and im.getexif().get(0x0112, 1) == 1
    assert (ds / "images" / recon.names[0]).read_bytes() == (src / recon.names[0]).read_bytes()
    xyz, _, _ = recon.pointcloud(conf_thr=2.0, max_points=500)
    assert pycolmap.Reconstruction(str(ds / "sparse" / "0")).num_points3D() == len(xyz)
    np.testing.assert_array_equal(read_ply(ds / "sparse_pc.ply")[0], xyz)
    meta = json.loads((ds / "transforms.json").read_text())
    assert meta["ply_file_path"] == "sparse_pc.ply"
    assert all((ds / f["file_path"]).is_file() for f in meta["frames"])
    write_transforms_json(recon, ds, check_images_exist=True, ply_name=None)  # the copies pass the check
    assert (ds / "scene.glb").is_file()
    # Subset of formats; bad inputs.
    out2 = export_dataset(recon, tmp_path / "ds2", formats=("ply",), max_points=50)
    assert set(out2) == {"ply"} and not (tmp_path / "ds2" / "transforms.json").exists()
    with pytest.raises(ExportError, match="unknown export format"):
        export_dataset(recon, tmp_path / "ds3", formats=("obj",))
    with pytest.raises(ExportError, match="3 images"):
        copy_images(recon, [src / recon.names[0]], tmp_path / "imgs")


def _read_classic_colmap_binary(folder):
    """Minimal reader of the classic COLMAP binary layout (what nerfstudio's and 3DGS's own readers parse)."""
    import struct

    cams = {}
    with open(folder / "cameras.bin", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for _ in range(n):
            cid, model, w, h = struct.unpack("<iiQQ", f.read(24))
            assert model == 1  # PINHOLE
            cams[cid] = (w, h, struct.unpack("<4d", f.read(32)))
    images = {}
    with open(folder / "images.bin", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for _ in range(n):
            iid, *qt, cid = struct.unpack("<i7di", f.read(64))
            name = b""
            while (c := f.read(1)) != b"\0":
                name += c
            (m,) = struct.unpack("<Q", f.read(8))
            pts = np.frombuffer(f.read(24 * m), dtype=[("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
            images[iid] = (np.array(qt[:4]), np.array(qt[4:]), cid, name.decode(), pts)
    points = {}
    with open(folder / "points3D.bin", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for _ in range(n):
            pid, x, y, z, r, g, b, err, tl = struct.unpack("<Q3d3BdQ", f.read(51))
            track = struct.unpack(f"<{2 * tl}i", f.read(8 * tl))
            points[pid] = (np.array([x, y, z]), (r, g, b), track)
    return cams, images, points


def test_colmap_binary_classic_layout(recon, tmp_path):
    """The binary files parse with the classic layout; quaternions match conventions.rotmat_to_qvec_wxyz."""
    write_colmap(recon, tmp_path / "m", max_points=300, depth_tol=0)   # single-image tracks
    cams, images, points = _read_classic_colmap_binary(tmp_path / "m")
    w2c = cv.c2w_to_w2c(recon.c2w)
    K = cv.K_to_colmap(recon.K_orig)
    assert len(images) == 3 and len(points) == len(recon.pointcloud(max_points=300)[0])
    for i in range(3):
        q, t, cid, name, pts = images[i + 1]
        assert name == recon.names[i]
        q_ref = cv.rotmat_to_qvec_wxyz(w2c[i, :3, :3])
        np.testing.assert_allclose(q * np.sign(q[0]), q_ref, atol=1e-12)
        np.testing.assert_allclose(t, w2c[i, :3, 3], atol=1e-12)
        w, h, params = cams[cid]
        assert (w, h) == tuple(recon.orig_sizes[i])
        np.testing.assert_allclose(params, [K[i, 0, 0], K[i, 1, 1], K[i, 0, 2], K[i, 1, 2]], rtol=1e-12)
        # Manual projection with the parsed quaternion/translation hits the parsed keypoints.
        R = cv.qvec_wxyz_to_rotmat(q)
        for x, y, pid in pts:
            X = points[int(pid)][0]
            p = K[i] @ (R @ X + t)
            assert np.hypot(p[0] / p[2] - x, p[1] / p[2] - y) < 1e-3


@pytest.mark.parametrize("text", [False, True])
def test_read_colmap_inverts_write_colmap(recon, tmp_path, text):
    write_colmap(recon, tmp_path / "m", text=text, max_points=20)
    back = read_colmap(tmp_path / "m")
    assert back["names"] == recon.names and back["model_names"] == ["PINHOLE"] * 3
    np.testing.assert_allclose(back["c2w"], recon.c2w, atol=1e-12)
    np.testing.assert_allclose(back["K_orig"], recon.K_orig, atol=1e-9)
    np.testing.assert_array_equal(back["sizes"], recon.orig_sizes)
    with pytest.raises(ExportError, match="no COLMAP model"):
        read_colmap(tmp_path)


def test_registry_drives_export_dataset_and_the_cli(recon, tmp_path, monkeypatch):
    import typing

    from dust3r_ns.export import FORMATS, WRITERS, DatasetOptions, export_dataset
    from dust3r_ns.export import dataset as ds_mod
    from dust3r_ns.export.cli import ExportConfig, Format

    assert FORMATS == tuple(WRITERS) == ("colmap", "ply", "nerfstudio", "glb")
    assert typing.get_args(Format) == FORMATS and ExportConfig.formats == FORMATS
    for name, write in WRITERS.items():
        assert typing.get_type_hints(write)["recon"] is Reconstruction, name
    # a registered writer is called in registry order with the shared point cloud; the check names the keys
    calls = []

    def write_npz(recon_: Reconstruction, out_dir, opts: DatasetOptions):
        calls.append((recon_, out_dir, opts.formats, len(opts.points[0])))
        return out_dir

    monkeypatch.setitem(ds_mod.WRITERS, "npz", write_npz)
    written = export_dataset(recon, tmp_path / "ds", formats=("npz", "ply"), max_points=40)
    n_points = len(recon.pointcloud(max_points=40)[0])
    # writers fill the dataset's temporary folder beside the output; the result names the final paths
    assert list(written) == ["ply", "npz"] and len(calls) == 1
    got_recon, got_dir, got_formats, got_n = calls[0]
    assert got_recon is recon and got_dir.parent == tmp_path and got_dir.name.startswith(".ds.")
    assert (got_formats, got_n) == (("npz", "ply"), n_points)
    assert written["npz"] == tmp_path / "ds" and written["ply"] == tmp_path / "ds" / "sparse_pc.ply"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    with pytest.raises(ExportError, match=r"choose from \['colmap', 'ply', 'nerfstudio', 'glb', 'npz'\]"):
        export_dataset(recon, tmp_path / "ds3", formats=("obj",))
