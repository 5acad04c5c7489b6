"""Pair inference sharded over processes by torchrun (gloo on CPU) equals the single-process predictions exactly."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dust3r_ns.model.checkpoint import save_hf
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.predictions import PairPredictions

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_torchrun_two_ranks_equal_one_process(tmp_path):
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(img_size=(224, 224), enc_embed_dim=32, enc_depth=1, enc_num_heads=2,
                                    dec_embed_dim=32, dec_depth=1, dec_num_heads=2)
    tiny = str(save_hf(model, tmp_path / "tiny"))
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(photos / f"p{i}.png")
    common = ["infer", str(photos), "--model", tiny, "--batch-size", "3", "--device", "cpu"]
    one = _run(["-m", "dust3r_ns.cli", *common, "--out", str(tmp_path / "one.npz")], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}", "-m", "dust3r_ns.cli", *common, "--out", str(tmp_path / "two.npz")],
               tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 processes" in two.stderr
    a, b = PairPredictions.load(tmp_path / "one.npz"), PairPredictions.load(tmp_path / "two.npz")
    assert a.n_edges == 12 and np.array_equal(a.edges, b.edges) and a.names == b.names
    for key in ("pts1", "pts2", "conf1", "conf2"):
        assert torch.equal(getattr(a, key), getattr(b, key)), key
    assert not (tmp_path / ".two.npz.shards").exists()      # shards removed once merged
