"""The `dust3r-ns` command line: infer/reconstruct end to end on the bundled example, and bad inputs -> one line."""

import subprocess
import sys

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
