"""The nerfstudio / COLMAP workflow as users run it (issue 16, items 3, 4, 8, 9): `reconstruct` and the `dust3r`
dataparser share one cache, a reconstruction folder feeds the dataparser without the network, nerfstudio's own
parsers read the export without prompts, downscales, 8-bit RGB `images/`, umask permissions, and faults (kills at
every rename, a full disk, two writers of one cache entry) that never lose or corrupt a result."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nerfstudio")

from dust3r_ns.nerfstudio.method import NS_CHECKPOINT_GLOBALS  # noqa: E402
from test_nerfstudio import FakeBuild, fake_reconstruction, parser_config, write_photos  # noqa: E402

import dust3r_ns.nerfstudio.dataparser as dp_mod  # noqa: E402
import dust3r_ns.reconstruct as rc_mod  # noqa: E402
from dust3r_ns import fileio  # noqa: E402
from dust3r_ns.export import export_dataset, read_ply  # noqa: E402
from dust3r_ns.images import load_images, open_rgb  # noqa: E402
from dust3r_ns import cache as scene_cache  # noqa: E402
from dust3r_ns.cache import CacheConfig, SceneError  # noqa: E402
from dust3r_ns.pipeline import NetworkConfig, PointsConfig  # noqa: E402
from dust3r_ns.reconstruct import ReconstructConfig  # noqa: E402
from dust3r_ns.scene import Reconstruction  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "test/fake-model"  # a hub name: identifies the model in cache keys, never loaded (the build is faked)


@pytest.fixture
def builds(monkeypatch):
    """Replace the network + alignment of both commands by one counting fake (`FakeBuild`)."""
    fb = FakeBuild()

    def fake(paths, network, pairs, align_cfg, points, label="", **inputs):
        return fb(None, network.model, paths)

    for mod in (scene_cache, dp_mod, rc_mod):
        monkeypatch.setattr(mod, "build_reconstruction", fake)
    monkeypatch.setattr(fileio, "STALE_AFTER_S", 0.0)  # a killed writer's leftovers are stale at once
    return fb


def reconstruct(photos, out: Path, **kw) -> Reconstruction:
    inputs = [photos] if isinstance(photos, Path) else list(photos)
    return rc_mod.run(ReconstructConfig(images=inputs, out=out, network=NetworkConfig(model=MODEL),
                                        points=PointsConfig(conf_thr=1.5, max_points=kw.pop("max_points", 400)), **kw))


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below `root` (relative path -> bytes) and every folder (relative path/ -> b"")."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root)) + ("/" if p.is_dir() else "")] = b"" if p.is_dir() else p.read_bytes()
    return out


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def in_child(fn, setup=None) -> tuple[int, str]:
    """Run `fn()` in a forked process (its faults stay there); return (exit code, outcome text)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        code, msg = 0, "ok"
        try:
            if setup is not None:
                setup()
            fn()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            code, msg = 3, f"{type(e).__name__}: {e}"
        with contextlib.suppress(OSError):
            os.write(w, msg.encode()[:60000])
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode()


KILLED = 137
KILL_POINTS = ((os, "rename"), (os, "replace"), (os, "link"), (os, "fsync"), (fileio, "_exchange"))


def kill_at(k: int, points=KILL_POINTS):
    """A child setup that makes the process die (like SIGKILL: no cleanup runs) at the k-th file-system step."""
    def setup():
        count = [0]

        def wrap(orig):
            def step(*a, **kw):
                if count[0] == k:
                    os._exit(KILLED)
                count[0] += 1
                return orig(*a, **kw)
            return step

        for mod, name in points:
            setattr(mod, name, wrap(getattr(mod, name)))
    return setup


def full_disk(n_bytes: int):
    """A child setup: every file write past `n_bytes` fails (EFBIG), as on a full disk, for Python and C++ writers."""
    def setup():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return setup


def coloured_photos(folder: Path, names, colour: int, size=(64, 48)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    v, u = np.mgrid[0:size[1], 0:size[0]]
    for k, name in enumerate(names):
        img = np.stack([u * 3 % 256, v * 5 % 256, np.full_like(u, (colour + 40 * k) % 256)], -1).astype(np.uint8)
        Image.fromarray(img).save(folder / name)
    return folder


# ---------------------------------------------------------------- item 3: one cache, reconstruction folders
def test_reconstruct_and_dataparser_share_one_cache(tmp_path, builds):
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    reconstruct(photos, tmp_path / "out")
    assert builds.calls == 1 and (photos / ".dust3r_cache").is_dir()
    p = parser_config(photos, MODEL, conf_thr=1.5).setup()
    p.get_dataparser_outputs("train")
    assert builds.calls == 1 and p.scene.hit  # ns-train after reconstruct: DUSt3R ran once
    reconstruct(photos, tmp_path / "out2")
    assert builds.calls == 1
    # the other order: the dataparser first, then reconstruct
    photos2 = tmp_path / "photos2"
    write_photos(photos2, 3, seed=5)
    parser_config(photos2, MODEL, conf_thr=1.5).setup().get_dataparser_outputs("train")
    assert builds.calls == 2
    reconstruct(photos2, tmp_path / "out3")
    assert builds.calls == 2
    a = Reconstruction.load(tmp_path / "out3" / "reconstruction.npz")
    b = Reconstruction.load(next((photos2 / ".dust3r_cache").glob("*/reconstruction.npz")))
    assert np.array_equal(a.c2w, b.c2w) and a.names == b.names
    # --no-use-cache recomputes
    reconstruct(photos2, tmp_path / "out4", cache=CacheConfig(use_cache=False))
    assert builds.calls == 3


def test_dataparser_reuses_a_reconstruction_folder(tmp_path, builds):
    photos = tmp_path / "photos"
    write_photos(photos, 4)
    out = tmp_path / "out"
    reconstruct(photos, out)
    ref = parser_config(photos, MODEL, conf_thr=1.5, eval_mode="all").setup().get_dataparser_outputs("train")
    for data in (out, out / "reconstruction.npz"):
        p = parser_config(data, "never-loaded-model", conf_thr=1.5, eval_mode="all").setup()
        got = p.get_dataparser_outputs("train")
        assert builds.calls == 1  # no network
        assert [f.parent for f in got.image_filenames] == [out / "images"] * 4
        assert torch.allclose(got.cameras.camera_to_worlds, ref.cameras.camera_to_worlds, atol=1e-6)
        assert torch.equal(got.cameras.fx, ref.cameras.fx) and torch.equal(got.metadata["points3D_xyz"],
                                                                           ref.metadata["points3D_xyz"])
    # a folder without its images says what to do
    shutil.rmtree(out / "images")
    with pytest.raises(SceneError, match=r"images.*missing.*--images"):
        parser_config(out, MODEL, conf_thr=1.5).setup().get_dataparser_outputs("train")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "reconstruction.npz").write_bytes(b"garbage")
    with pytest.raises(SceneError, match="not a usable reconstruction"):
        parser_config(tmp_path / "bad", MODEL, conf_thr=1.5).setup().get_dataparser_outputs("train")


# ---------------------------------------------------------------- item 4: downscales, nerfstudio's own parsers
def big_photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    v, u = np.mgrid[0:1536, 0:2048]
    for i in range(n):
        img = np.stack([u % 256, v % 256, (u + v + 30 * i) % 256], -1).astype(np.uint8)
        Image.fromarray(img).save(folder / f"big_{i}.jpg", quality=90)
    return folder


def test_auto_downscale_of_2048x1536_photos(tmp_path, monkeypatch, builds):
    builds.sizes = [[2048, 1536]] * 3
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # any prompt would raise EOFError
    photos = big_photos(tmp_path / "photos")
    p = parser_config(photos, MODEL, conf_thr=1.5, eval_mode="all").setup()
    out = p.get_dataparser_outputs("train")
    assert p.downscale() == 2  # 2048 / 2 <= 1600
    assert (out.cameras.width == 1024).all() and (out.cameras.height == 768).all()
    full = parser_config(photos, MODEL, conf_thr=1.5, eval_mode="all", downscale_factor=1).setup()
    out1 = full.get_dataparser_outputs("train")
    assert torch.allclose(out.cameras.fx * 2, out1.cameras.fx) and torch.allclose(out.cameras.cx * 2, out1.cameras.cx)
    assert all(f.parent == p.scene.entry / "images_2" for f in out.image_filenames)
    from nerfstudio.data.datasets.base_dataset import InputDataset

    ds = InputDataset(out)
    for i in range(3):
        assert ds.get_numpy_image(i).shape == (768, 1024, 3)
    assert parser_config(photos, MODEL, conf_thr=1.5, downscale_factor=4).setup().get_dataparser_outputs(
        "train").cameras.width[0, 0] == 512
    assert builds.calls == 1


def test_nerfstudio_parsers_read_the_export_without_flags_or_prompts(tmp_path, monkeypatch, builds):
    """nerfstudio's own parsers on a reconstruct output of 2048x1536 photos: no prompt (stdin empty), the
    automatic downscale finds images_2/, and the seed points load where the parser's configuration allows."""
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.dataparsers.colmap_dataparser import ColmapDataParserConfig

    builds.sizes = [[2048, 1536]] * 3
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    out = tmp_path / "out"
    reconstruct(big_photos(tmp_path / "photos"), out, max_points=300)
    n_ply = len(read_ply(out / "sparse_pc.ply")[0])
    fx_full = json.loads((out / "transforms.json").read_text())["frames"][0]["fl_x"]
    for f in (2, 4, 8):
        with Image.open(out / f"images_{f}" / "big_0.jpg") as im:
            assert im.size == (2048 // f, 1536 // f)
    # `ns-train splatfacto --data out/`: splatfacto's dataparser config sets load_3D_points=True
    cfg = method_configs["splatfacto"].pipeline.datamanager.dataparser
    cfg.data = out
    ns = cfg.setup().get_dataparser_outputs("train")
    assert len(ns.metadata["points3D_xyz"]) == n_ply
    assert all(f.parent.name == "images_2" for f in ns.image_filenames)
    assert float(ns.cameras.fx[0, 0]) == pytest.approx(fx_full / 2, rel=1e-6)
    # the COLMAP parser with --colmap-path sparse/0: no prompt, images_2/ used, points loaded
    col = ColmapDataParserConfig(data=out, colmap_path=Path("sparse/0")).setup().get_dataparser_outputs("train")
    assert len(col.metadata["points3D_xyz"]) == n_ply
    assert all(f.parent.name == "images_2" for f in col.image_filenames)
    assert float(col.cameras.fx[0, 0]) == pytest.approx(fx_full / 2, rel=1e-6)


def test_ns_train_on_a_reconstruction_folder_at_auto_downscale(tmp_path, builds):
    """`ns-train dust3r-splatfacto --data out/` on 2048x1536 photos: the reconstruction is reused (no network),
    the downscale is chosen automatically (images_2), nothing is asked (stdin closed)."""
    if torch.cuda.is_available():
        pytest.skip("the CPU end-to-end path; on GPUs gsplat is used")
    builds.sizes = [[2048, 1536]] * 3
    out = tmp_path / "out"
    reconstruct(big_photos(tmp_path / "photos"), out, max_points=200)
    env = dict(os.environ)
    env["NERFSTUDIO_METHOD_CONFIGS"] = "dust3r-splatfacto=dust3r_ns.nerfstudio.method:dust3r_splatfacto"
    env["NERFSTUDIO_DATAPARSER_CONFIGS"] = "dust3r=dust3r_ns.nerfstudio.dataparser:dust3r_dataparser"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "nerfstudio.scripts.train", "dust3r-splatfacto", "--data", str(out),
           "--output-dir", str(tmp_path / "outputs"), "--max-num-iterations", "2", "--vis", "tensorboard",
           "--viewer.quit-on-train-completion", "True", "dust3r", "--conf-thr", "1.5", "--max-points", "200"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         stdin=subprocess.DEVNULL)
    log = res.stdout[-3000:] + res.stderr[-6000:]
    assert res.returncode == 0, log
    assert "reusing the reconstruction" in log and "reconstructing" not in log
    ckpts = sorted((tmp_path / "outputs").rglob("step-*.ckpt"))
    assert ckpts, log
    with torch.serialization.safe_globals(list(NS_CHECKPOINT_GLOBALS)):
        ckpt = torch.load(ckpts[-1], map_location="cpu", weights_only=True)
    means = ckpt["pipeline"]["_model.gauss_params.means"]
    assert ckpt["step"] == 1 and torch.isfinite(means).all() and len(means) == len(read_ply(out / "sparse_pc.ply")[0])
    assert (out / "images_2" / "big_0.jpg").is_file()


# ---------------------------------------------------------------- item 9: images/ is what the cameras describe
def odd_images(folder: Path) -> list[Path]:
    """One image per troublesome kind, each at least 16 px."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    v, u = np.mgrid[0:30, 0:40]
    rgb = np.stack([u * 6, v * 8, (u + v) * 3], -1).astype(np.uint8)
    paths = []
    g16 = (u * 1600 + v * 50).astype(np.uint16)  # up to ~64k: 8-bit clipping makes it all white
    Image.fromarray(g16).save(folder / "grey16.png")
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=32).save(folder / "palette.png")
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16).save(folder / "anim.gif")
    rgba = np.concatenate([rgb, rng.integers(0, 256, (30, 40, 1), dtype=np.uint8)], -1)
    Image.fromarray(rgba).save(folder / "alpha.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey8.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2))).save(folder / "sideways.jpg", exif=exif)
    Image.fromarray(rgb).save(folder / "plain.jpg", quality=95)
    Image.fromarray(rgb).save(folder / "plain.png")
    import cv2

    cv2.imwrite(str(folder / "rgb16.png"), (rgb.astype(np.uint16) * 257)[..., ::-1])
    for name in ("grey16.png", "cmyk.jpg", "palette.png", "anim.gif", "alpha.png", "grey8.png", "sideways.jpg",
                 "plain.jpg", "plain.png", "rgb16.png"):
        paths.append(folder / name)
    return paths


def test_images_folder_holds_what_the_network_saw(tmp_path):
    import cv2
    import imageio.v2 as imageio

    srcs = odd_images(tmp_path / "src")
    seen = [np.asarray(open_rgb(p)) for p in srcs]  # what the network's preprocessing starts from
    assert seen[0].max() < 255 and seen[0].mean() < 200  # 16-bit grey is scaled, not clipped to white
    g16 = np.asarray(Image.open(srcs[0]), dtype=np.float64)
    assert np.abs(seen[0][..., 0] - g16 / 257).max() <= 0.5
    view = load_images([srcs[0]], size=224)[0]
    assert view.rgb.mean() < 200
    rec = fake_reconstruction([p.name for p in srcs], sizes=[im.shape[1::-1] for im in seen])
    out = tmp_path / "ds"
    export_dataset(rec, out, images=srcs, conf_thr=1.5, max_points=200, reconstruction=True)
    meta = json.loads((out / "transforms.json").read_text())
    files = [out / f["file_path"] for f in meta["frames"]]
    expected_names = ["grey16.png", "cmyk.jpg.png", "palette.png", "anim.gif.png", "alpha.png", "grey8.png",
                      "sideways.jpg.png", "plain.jpg", "plain.png", "rgb16.png"]
    assert [f.name for f in files] == expected_names
    assert Reconstruction.load(out / "reconstruction.npz").names == expected_names
    import pycolmap

    assert sorted(im.name for im in pycolmap.Reconstruction(str(out / "sparse" / "0")).images.values()) == sorted(
        expected_names)
    for src, f, want in zip(srcs, files, seen):
        by_pil = np.array(Image.open(f), dtype=np.uint8)  # nerfstudio's loader
        by_cv2 = cv2.imread(str(f), cv2.IMREAD_UNCHANGED)  # COLMAP-style tools
        by_imageio = imageio.imread(f)  # gsplat's trainer
        for got in (by_pil, by_cv2[..., ::-1], by_imageio):
            assert got.dtype == np.uint8 and got.shape == want.shape, (f.name, got.dtype, got.shape)
            tol = 2 if f.suffix == ".jpg" else 0  # byte-copied JPEGs: decoders may round differently
            assert np.abs(got.astype(int) - want).max() <= tol, f.name
    assert (out / "images" / "plain.jpg").read_bytes() == srcs[7].read_bytes()  # 8-bit RGB JPEG: byte copy
    with Image.open(out / "images_2" / "anim.gif.png") as im:
        assert im.size == (20, 15) and im.mode == "RGB"


# ---------------------------------------------------------------- item 8: permissions follow the umask
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_cache_entries_and_outputs_follow_the_umask(tmp_path, builds, umask):
    photos = tmp_path / "photos"
    write_photos(photos, 2)
    Image.fromarray(np.zeros((48, 64), np.uint8)).convert("P").save(photos / "img_09.png")  # gets an RGB copy
    old = os.umask(umask)
    try:
        p = parser_config(photos, MODEL, conf_thr=1.5, downscale_factor=2).setup()
        p.get_dataparser_outputs("train")
        reconstruct(photos, tmp_path / "out")
    finally:
        os.umask(old)
    entry = p.scene.entry
    assert (entry / "images" / "img_09.png").is_file() and (entry / "images_2").is_dir()
    for root in (photos / ".dust3r_cache", tmp_path / "out"):
        paths = [root, *root.rglob("*")]
        assert len(paths) > 5
        for q in paths:
            mode = stat.S_IMODE(q.stat().st_mode)
            assert mode == (0o777 if q.is_dir() else 0o666) & ~umask, (q, oct(mode))


# ---------------------------------------------------------------- item 9: faults
def two_datasets(tmp_path: Path):
    names = ["a.png", "b.png", "c.png"]
    old_rec, new_rec = fake_reconstruction(names, seed=1), fake_reconstruction(names, seed=2)
    old_src = coloured_photos(tmp_path / "old_src", names, 10)
    new_src = coloured_photos(tmp_path / "new_src", names, 200)
    return old_rec, old_src, new_rec, new_src


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_export_killed_at_every_step_leaves_old_or_new(tmp_path, monkeypatch, exchange):
    """Kill the export over an existing dataset at each rename/link/fsync: the dataset is the old one or the
    new one (after the next run's recovery), never a mix; the next export cleans every leftover."""
    monkeypatch.setattr(fileio, "STALE_AFTER_S", 0.0)
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    old_rec, old_src, new_rec, new_src = two_datasets(tmp_path)
    pristine = tmp_path / "pristine"
    export_dataset(old_rec, pristine, images=old_src, max_points=100, downscales=(2,))
    (pristine / "notes.txt").write_text("the user's file")
    new_ref = tmp_path / "new_ref"
    shutil.copytree(pristine, new_ref)
    export_dataset(new_rec, new_ref, images=new_src, max_points=100, downscales=(2,))
    old_snap, new_snap = snapshot(pristine), snapshot(new_ref)
    assert old_snap != new_snap and new_snap["notes.txt"] == b"the user's file"
    ds = tmp_path / "work" / "ds"
    outcomes = []
    for k in range(400):
        shutil.rmtree(ds.parent, ignore_errors=True)
        ds.parent.mkdir()
        shutil.copytree(pristine, ds)
        code, msg = in_child(lambda: export_dataset(new_rec, ds, images=new_src, max_points=100, downscales=(2,)),
                             setup=kill_at(k))
        assert code in (0, KILLED), msg
        fileio.recover_dir(ds)  # what the next run does first
        snap = snapshot(ds)
        assert snap in (old_snap, new_snap), f"kill point {k}: a mix of old and new files"
        outcomes.append("new" if snap == new_snap else "old")
        export_dataset(new_rec, ds, images=new_src, max_points=100, downscales=(2,))  # the next run
        assert snapshot(ds) == new_snap and hidden(ds.parent) == [], f"kill point {k}: {hidden(ds.parent)}"
        if code == 0:
            break
    assert code == 0 and "old" in outcomes and outcomes[-1] == "new" and len(outcomes) > 20


def test_export_on_a_full_disk_fails_and_keeps_the_dataset(tmp_path, monkeypatch):
    old_rec, old_src, new_rec, new_src = two_datasets(tmp_path)
    ds = tmp_path / "ds"
    export_dataset(old_rec, ds, images=old_src, max_points=300)
    before = snapshot(ds)
    for formats, limit in ((("colmap",), 4000), (("colmap", "ply", "nerfstudio", "glb"), 3000)):
        for target in (ds, tmp_path / "fresh"):
            code, msg = in_child(lambda: export_dataset(new_rec, target, formats=formats, images=new_src,
                                                        max_points=300), setup=full_disk(limit))
            assert code == 3 and msg.startswith("ExportError") and "free disk space" in msg, msg
        assert snapshot(ds) == before and not (tmp_path / "fresh").exists()
    # pycolmap itself reports nothing: only the read-back catches its truncated points3D.bin
    code, msg = in_child(lambda: export_dataset(new_rec, tmp_path / "fresh", formats=("colmap",), max_points=300),
                         setup=full_disk(4000))
    assert code == 3 and "does not read back" in msg, msg
    monkeypatch.setattr(fileio, "STALE_AFTER_S", 0.0)
    export_dataset(new_rec, ds, images=new_src, max_points=300)  # the next run cleans what the failures left
    assert hidden(tmp_path) == [] and hidden(ds) == []


def test_reconstruct_overwrite_killed_between_renames(tmp_path, monkeypatch, builds):
    """The issue's case: `reconstruct --overwrite` killed between its two renames (file systems without an
    atomic exchange). The next run, or the dataparser, puts the old result back; nothing hidden stays behind."""
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    photos = tmp_path / "photos"
    write_photos(photos, 3)
    # count the renames of an --overwrite run: the swap of --out is its last two
    reconstruct(photos, tmp_path / "out_b")
    real_rename, n = os.rename, [0]

    def counting(*a, **kw):
        n[0] += 1
        return real_rename(*a, **kw)

    monkeypatch.setattr(os, "rename", counting)
    reconstruct(photos, tmp_path / "out_b", overwrite=True, max_points=300)
    monkeypatch.setattr(os, "rename", real_rename)
    between = kill_at(n[0] - 1, points=((os, "rename"),))

    out = tmp_path / "out"
    reconstruct(photos, out)
    before = snapshot(out)
    code, msg = in_child(lambda: reconstruct(photos, out, overwrite=True, max_points=300), setup=between)
    assert code == KILLED, msg
    assert not out.exists() and any(h.endswith(".old") for h in hidden(tmp_path))  # the window of the issue
    with pytest.raises(ValueError, match="exists; pass --overwrite"):
        reconstruct(photos, out)  # the next run puts the old result back first
    assert snapshot(out) == before
    code, msg = in_child(lambda: reconstruct(photos, out, overwrite=True, max_points=300), setup=between)
    assert code == KILLED and not out.exists(), msg
    parser_config(out, MODEL, conf_thr=1.5).setup().get_dataparser_outputs("train")  # --data out/ recovers it
    assert snapshot(out) == before
    # killed elsewhere in the export: the next run leaves no hidden folder beside --out
    code, _ = in_child(lambda: reconstruct(photos, out, overwrite=True), setup=kill_at(5, points=((os, "replace"),)))
    assert code == KILLED and hidden(tmp_path)
    reconstruct(photos, out, overwrite=True)
    assert hidden(tmp_path) == [] and builds.calls == 1


def test_two_dataparsers_finishing_the_same_entry(tmp_path, monkeypatch):
    """Another process stores the entry while ours computes: ours uses it instead of failing; and a writer
    that finds the entry created between its check and its rename replaces it instead of 'Directory not empty'."""
    data = tmp_path / "photos"
    write_photos(data, 3)
    calls = []

    def build(self, model, paths, *_):
        calls.append(len(calls))
        if len(calls) == 1:  # the "other process" finishes first, during our computation
            other = parser_config(data, MODEL, conf_thr=1.5, cache_dir=tmp_path / "cache").setup()
            other.get_dataparser_outputs("train")
            assert not other.scene.hit
        return fake_reconstruction([Path(p).name for p in paths], seed=len(calls))

    monkeypatch.setattr(dp_mod.Dust3rDataParser, "_build", build)
    p = parser_config(data, MODEL, conf_thr=1.5, cache_dir=tmp_path / "cache").setup()
    p.get_dataparser_outputs("train")
    assert len(calls) == 2 and p.scene.hit  # the other's entry is used
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")
    np.testing.assert_array_equal(p.scene.rec.c2w, fake_reconstruction(["x"] * 3, seed=2).c2w)

    # the commit itself: the entry appears between the existence check and the rename
    real_rename = os.rename
    target = tmp_path / "cache2" / "entry"
    target.parent.mkdir()

    fired = [False]

    def racing_rename(src, dst, *a, **kw):  # the other writer's entry appears once, right before our rename
        if Path(dst) == target and not target.exists() and not fired[0]:
            fired[0] = True
            target.mkdir()
            (target / "theirs").write_text("x")
        return real_rename(src, dst, *a, **kw)

    for exchange in (True, False):
        shutil.rmtree(target, ignore_errors=True)
        fired[0] = False
        if not exchange:
            monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "rename", racing_rename)
        with fileio.atomic_dir(target, replace=True) as tmp:
            (tmp / "ours").write_text("y")
        monkeypatch.setattr(os, "rename", real_rename)
        assert fired[0] and sorted(f.name for f in target.iterdir()) == ["ours"]
        assert hidden(target.parent) == []
