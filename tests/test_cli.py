"""The `dust3r-ns` command line: infer/reconstruct end to end on the bundled example, and bad inputs -> one line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dust3r_ns.cli import main
from dust3r_ns.model.checkpoint import save_hf
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.predictions import PairPredictions
from dust3r_ns.scene import Reconstruction

REPO_EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "synthetic_room"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(img_size=(224, 224), enc_embed_dim=32, enc_depth=1, enc_num_heads=2,
                                    dec_embed_dim=32, dec_depth=1, dec_num_heads=2)
    return str(save_hf(model, tmp_path_factory.mktemp("model") / "tiny"))


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def test_infer_writes_pairs(tiny_model, photos, tmp_path):
    out = tmp_path / "pairs.npz"
    assert main(["infer", str(photos), "--model", tiny_model, "--out", str(out), "--size", "224"]) == 0
    preds = PairPredictions.load(out)
    assert preds.pts1.shape == (6, 224, 224, 3) and preds.conf2.shape == (6, 224, 224)
    assert preds.edges[:, 0].tolist() == [1, 2, 2, 0, 0, 1]
    assert preds.names == ["p0.png", "p1.png", "p2.png"] and preds.images[1].path == str(photos / "p1.png")
    assert not preds.ordered                                  # a photo folder is an unordered set


def test_ordered_frames_are_recorded_in_the_pairs(tiny_model, photos, tmp_path):
    """`--ordered` (frames of one sequence, in name order) travels with the pairs, in an .npz and in a pair store,
    to the aligner's sequence prior."""
    args = ["infer", str(photos), "--model", tiny_model, "--ordered"]
    assert main(args + ["--out", str(tmp_path / "pairs.npz")]) == 0
    assert PairPredictions.load(tmp_path / "pairs.npz").ordered
    assert main(args + ["--store", "disk", "--out", str(tmp_path / "store")]) == 0
    assert PairPredictions.load(tmp_path / "store").ordered


def test_full_frame_feeds_the_224_network_the_whole_photo(tiny_model, photos, tmp_path):
    """--full-frame: 80x60 photos enter a 224 model as 288x224 (not the 224x224 centre square) and the cameras are
    still expressed in the photos' own pixels (principal point at their centre)."""
    out = tmp_path / "pairs.npz"
    assert main(["infer", str(photos), "--model", tiny_model, "--out", str(out), "--full-frame"]) == 0
    assert PairPredictions.load(out).pts1.shape == (6, 224, 288, 3)
    assert main(["reconstruct", str(photos), "--model", tiny_model, "--out", str(tmp_path / "rec"), "--full-frame",
                 "--no-use-cache"]) == 0
    rec = Reconstruction.load(tmp_path / "rec" / "reconstruction.npz")
    assert rec.transforms[:, 2].tolist() == [5.0] * 3 and np.abs(rec.K_orig[:, :2, 2] - [39.5, 29.5]).max() < 0.5


def test_reconstruct_with_disk_store_cleans_up(tiny_model, photos, tmp_path, monkeypatch):
    # --store disk: the pair store is written under the cache folder (not the working folder) and removed after
    # the alignment
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    import dust3r_ns.pipeline as pipeline
    seen, engine = [], pipeline.inference_graph

    def spy(*args, store_path=None, **kw):
        seen.append(store_path)
        return engine(*args, store_path=store_path, **kw)

    monkeypatch.setattr(pipeline, "inference_graph", spy)
    args = ["reconstruct", str(photos), "--model", tiny_model, "--cache-dir", str(cache), "--no-use-cache"]
    assert main(args + ["--out", str(tmp_path / "disk"), "--store", "disk"]) == 0
    assert main(args + ["--out", str(tmp_path / "ram"), "--store", "float16"]) == 0
    assert seen[0] is not None and Path(seen[0]).parent.parent == cache and seen[1] is None
    assert list(work.iterdir()) == [] and not list(cache.glob(".pairs-*"))
    a = Reconstruction.load(tmp_path / "disk" / "reconstruction.npz")
    assert a.c2w.shape == (3, 4, 4) and np.isfinite(a.c2w).all() and a.meta["polish_iterations"] == 0


def test_infer_writes_a_pair_store_folder(tiny_model, photos, tmp_path, capsys):
    """README: `dust3r-ns infer frames/ --out pairs/ --store disk` writes a pair store folder that `reconstruct`
    aligns; an .npz name with --store disk, and an existing folder that is not a store, are refused up front."""
    args = ["infer", str(photos), "--model", tiny_model, "--store", "disk"]
    assert main(args + ["--out", str(tmp_path / "pairs") + "/"]) == 0
    assert (tmp_path / "pairs" / "meta.npz").is_file()
    assert main(args + ["--out", str(tmp_path / "pairs")]) == 0                    # a store is replaced
    assert main(["reconstruct", str(tmp_path / "pairs"), "--out", str(tmp_path / "scene")]) == 0
    assert Reconstruction.load(tmp_path / "scene" / "reconstruction.npz").c2w.shape == (3, 4, 4)
    capsys.readouterr()
    assert main(args + ["--out", str(tmp_path / "pairs.npz")]) == 2
    assert "a folder (a pair store); name one" in capsys.readouterr().err
    names = sorted(p.name for p in photos.iterdir())
    assert main(args + ["--out", str(photos)]) == 2                               # the photos stay
    assert "is not a pair store" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == names


def test_infer_output_feeds_reconstruct(tiny_model, photos, tmp_path):
    """`infer` then `reconstruct PAIRS.npz` gives the same cameras as `reconstruct` on the photos."""
    pairs = tmp_path / "pairs.npz"
    assert main(["infer", str(photos), "--model", tiny_model, "--out", str(pairs)]) == 0
    assert main(["reconstruct", str(pairs), "--out", str(tmp_path / "a")]) == 0
    assert main(["reconstruct", str(photos), "--model", tiny_model, "--out", str(tmp_path / "b")]) == 0
    a = Reconstruction.load(tmp_path / "a" / "reconstruction.npz")
    b = Reconstruction.load(tmp_path / "b" / "reconstruction.npz")
    assert a.names == b.names and np.array_equal(a.c2w, b.c2w) and np.array_equal(a.K, b.K)
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == ["p0.png", "p1.png", "p2.png"]


@pytest.mark.parametrize("case", ["empty", "non_images", "missing"])
def test_bad_inputs_one_line_errors(tiny_model, tmp_path, capsys, case):
    folder = tmp_path / "in"
    folder.mkdir()
    if case == "non_images":
        (folder / "a.jpg").write_text("nope")
        (folder / "b.png").write_bytes(b"")
    target = str(folder if case != "missing" else tmp_path / "nowhere")
    code = main(["reconstruct", target, "--model", tiny_model, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("dust3r-ns reconstruct: error:")


def test_existing_output_needs_overwrite(tiny_model, photos, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["reconstruct", str(photos), "--model", tiny_model, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_unwritable_output(tiny_model, photos, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["reconstruct", str(photos), "--model", tiny_model, "--out", str(blocker / "out")]) == 2
    assert "error" in capsys.readouterr().err


def test_missing_model_is_one_line(photos, tmp_path, capsys):
    assert main(["infer", str(photos), "--model", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.pth" in err[0]


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "dust3r_ns.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "reconstruct" in res.stdout and "bench" in res.stdout


# ---------------------------------------------------------------- validated before anything is computed
@pytest.fixture
def no_compute(monkeypatch):
    """Fail the test if the network is loaded or the alignment starts."""
    import dust3r_ns.pipeline as P

    def boom(*a, **k):
        raise AssertionError("computation started before the input was validated")

    monkeypatch.setattr(P, "load_model", boom)
    monkeypatch.setattr(P, "global_align", boom)


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dust3r-ns {command}: error:"), err
    return err[0]


def test_control_character_in_file_name_refused_up_front(photos, tmp_path, capsys, no_compute):
    Image.new("RGB", (80, 60)).save(photos / "bad\nname.png")
    assert main(["reconstruct", str(photos), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys, "reconstruct")
    assert "bad\\nname.png" in line and "rename" in line and not (tmp_path / "out").exists()
    assert main(["infer", str(photos / "p0.png"), str(photos / "bad\nname.png")]) == 2
    assert "control character" in _one_error_line(capsys, "infer")


@pytest.mark.parametrize("flag", ["--device", "--align.device", "--align-device"])
def test_unavailable_device_refused_up_front(photos, tmp_path, capsys, no_compute, flag):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["reconstruct", str(photos), "--out", str(tmp_path / "out"), flag, "cuda"]) == 2
    line = _one_error_line(capsys, "reconstruct")
    assert "no CUDA GPU" in line and "cpu" in line
    assert main(["reconstruct", str(photos), "--out", str(tmp_path / "out"), flag, "gpu"]) == 2
    assert "not a torch device" in _one_error_line(capsys, "reconstruct")


def test_train_unavailable_device_refused(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    assert main(["train", "--device", "cuda:0", "--output-dir", str(tmp_path / "run")]) == 2
    assert "no CUDA GPU" in _one_error_line(capsys, "train") and not (tmp_path / "run").exists()


def test_bad_point_options_refused_by_the_parser(photos, tmp_path, capsys, no_compute):
    for argv in (["reconstruct", str(photos), "--max-points", "-5"], ["export", "r.npz", "--out", "o",
                                                                      "--max-points", "-5"],
                 ["reconstruct", str(photos), "--conf-thr", "nan"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "max_points must be >= 0" in err or "conf_thr must be a finite number" in err


def test_infer_output_name_checked_up_front(photos, tmp_path, capsys, no_compute):
    assert main(["infer", str(photos), "--out", str(tmp_path / "pairs.bin")]) == 2
    assert ".npz" in _one_error_line(capsys, "infer")


def _saved_predictions(tmp_path):
    from test_predictions import _preds

    preds = _preds()
    for im in preds.images:
        object.__setattr__(im, "path", "")  # no photos to copy
    return preds.save(tmp_path / "pairs.npz")


def test_conf_thr_above_every_confidence_warns(tmp_path, capsys):
    """`--conf-thr 1e9`: the outputs are still written (cameras, depths), with one warning that names the highest
    confidence and the fix; `export` of the saved reconstruction warns the same way."""
    pairs = _saved_predictions(tmp_path)
    assert main(["reconstruct", str(pairs), "--out", str(tmp_path / "out"), "--conf-thr", "1e9",
                 "--align.mode", "fast"]) == 0
    warn = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "--conf-thr 1e+09" in warn[0] and "lower --conf-thr" in warn[0]
    rec = Reconstruction.load(tmp_path / "out" / "reconstruction.npz")
    assert f"{max(float(c.max()) for c in rec.confs):.3g}" in warn[0]
    assert main(["export", str(tmp_path / "out" / "reconstruction.npz"), "--out", str(tmp_path / "re"),
                 "--conf-thr", "1e9", "--formats", "colmap"]) == 0
    assert "warning: no reconstructed pixel" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "out" / "reconstruction.npz"), "--out", str(tmp_path / "re2"),
                 "--formats", "ply", "--conf-thr", "1.5"]) == 0  # these confidences lie in (1, 2)
    assert "warning" not in capsys.readouterr().err and (tmp_path / "re2" / "sparse_pc.ply").is_file()


class _FullDisk(__import__("io").FileIO):
    """A file that takes `budget` bytes, then fails like a full disk."""

    budget = 0

    def write(self, b):
        n = len(memoryview(b))
        if _FullDisk.budget < n:
            raise OSError(28, "No space left on device")
        _FullDisk.budget -= n
        return super().write(b)


def test_infer_full_disk_is_one_line(photos, tmp_path, capsys, monkeypatch):
    """A full disk while `infer` saves: one error line, no finaliser traceback, no partial or temporary file."""
    import builtins
    import gc
    import io

    import dust3r_ns.cli as cli_mod
    import dust3r_ns.fileio as fileio
    from test_predictions import _preds

    real_open = builtins.open

    def full_disk_open(path, mode="r", *a, **k):
        if "w" in mode and "b" in mode:
            return io.BufferedWriter(_FullDisk(path, "w"))
        return real_open(path, mode, *a, **k)

    size = _preds().save(tmp_path / "whole.npz").stat().st_size
    (tmp_path / "whole.npz").unlink()
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(cli_mod, "run_pairs", lambda *a, **k: _preds())
    monkeypatch.setattr(fileio, "open", full_disk_open, raising=False)
    for budget in (0, size // 2, size - 30):  # fails in the first entry, mid-archive, in the central directory
        _FullDisk.budget = budget
        assert main(["infer", str(photos), "--out", str(tmp_path / "pairs.npz")]) == 2
        assert "No space left on device" in _one_error_line(capsys, "infer")
        gc.collect()
        assert not unraisable, unraisable[0].exc_value
        assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # a thread traceback fails it
def test_train_tensorboard_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """tensorboard's writer thread fails (full disk): no thread traceback, one error line naming the log folder."""
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    from dust3r_ns.train.loop import main as train_main
    from test_train import _cfg

    def full(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RecordWriter, "write", full)
    before = set(threading.enumerate())
    with pytest.raises(SystemExit) as e:
        train_main(_cfg(tmp_path, "run", tensorboard=True, epochs=1))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dust3r-ns train: error: tensorboard log"), err
    assert "No space left on device" in err[0] and "--no-tensorboard" in err[0]
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]  # the writer thread is gone
