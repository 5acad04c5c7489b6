"""RoPE2D: pure PyTorch == golden reference == compiled CPU kernel (and CUDA kernel where a GPU exists)."""

import os
import subprocess
import sysconfig
import time

import numpy as np
import pytest
import torch

from dust3r_ns.model.rope import RoPE2D
from dust3r_ns.model.rope_ext import make_rope2d
from dust3r_ns.model.rope_ext import CSRC, RoPE2DExt, cuda_home, cuda_include_paths, get_extension

NO_EXT = os.environ.get("DUST3R_NS_NO_EXT", "") not in ("", "0")


@pytest.fixture(scope="module")
def ext():
    mod = get_extension()
    if mod is None and NO_EXT:
        pytest.skip("DUST3R_NS_NO_EXT is set")
    assert mod is not None, "the C++ RoPE extension failed to build on a machine with a compiler"
    return mod


def grid_pos(B, h, w):
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((rows, cols), -1).reshape(1, -1, 2).expand(B, -1, -1).contiguous()


def test_torch_rope_matches_golden(golden_dir):
    d = np.load(golden_dir / "rope2d_io.npz")
    out = RoPE2D(100.0)(torch.from_numpy(d["tokens"]), torch.from_numpy(d["pos"]))
    assert np.abs(out.numpy() - d["out"]).max() <= 1e-6 * np.abs(d["out"]).max()


def test_cpu_extension_matches_golden_and_torch(golden_dir, ext):
    d = np.load(golden_dir / "rope2d_io.npz")
    rope = RoPE2DExt(100.0, ext)
    out = rope(torch.from_numpy(d["tokens"]), torch.from_numpy(d["pos"]))
    assert np.abs(out.numpy() - d["out"]).max() <= 1e-6 * np.abs(d["out"]).max()
    x = torch.randn(2, 3, 6 * 7, 64)
    pos = grid_pos(2, 6, 7)
    assert torch.allclose(rope(x, pos), RoPE2D(100.0)(x, pos), atol=1e-6)
    # non-contiguous input (a transposed view) gives the same result
    xt = torch.randn(2, 6 * 7, 3, 64).transpose(1, 2)
    assert torch.allclose(rope(xt, pos), RoPE2D(100.0)(xt, pos), atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cpu_extension_half_precision(ext, dtype, tol):
    x = torch.randn(1, 2, 20, 32)
    pos = grid_pos(1, 4, 5)
    ref = RoPE2D(100.0)(x, pos)
    out = RoPE2DExt(100.0, ext)(x.to(dtype), pos)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()


def test_cpu_extension_gradient_is_inverse_rotation(ext):
    x = torch.randn(2, 2, 12, 16, requires_grad=True)
    pos = grid_pos(2, 3, 4)
    g = torch.randn(2, 2, 12, 16)
    (RoPE2DExt(100.0, ext)(x, pos) * g).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    (RoPE2D(100.0)(x, pos) * g).sum().backward()
    assert torch.allclose(ours, x.grad, atol=1e-6)


def test_factory_backends(ext):
    assert type(make_rope2d(100.0, "torch")) is RoPE2D
    assert isinstance(make_rope2d(100.0, "ext"), RoPE2DExt)
    with pytest.raises(ValueError, match="backend"):
        make_rope2d(100.0, "fast")


def test_fallback_notice_when_disabled(tmp_path):
    code = ("import torch; from dust3r_ns.model.rope import RoPE2D; from dust3r_ns.model.rope_ext import make_rope2d; "
            "r = make_rope2d(100.0); assert type(r) is RoPE2D; print('ok')")
    env = dict(os.environ, DUST3R_NS_NO_EXT="1")
    res = subprocess.run(["python", "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout
    notices = [line for line in res.stderr.splitlines() if "PyTorch RoPE" in line]
    assert len(notices) == 1 and "DUST3R_NS_NO_EXT" in notices[0]


def test_cuda_source_compiles_with_nvcc(tmp_path):
    """The CUDA kernel compiles for Hopper (sm_90) with this machine's nvcc, GPU or not."""
    from torch.utils import cpp_extension

    home = cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    inc = cpp_extension.include_paths(device_type="cuda") + cuda_include_paths() + [sysconfig.get_paths()["include"]]
    obj = tmp_path / "rope2d_cuda.o"
    cmd = [f"{home}/bin/nvcc", "-c", str(CSRC / "rope2d_cuda.cu"), "-o", str(obj), "-std=c++20",
           "-gencode=arch=compute_90,code=sm_90", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC"]
    cmd += [a for i in inc for a in ("-I", i)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert obj.stat().st_size > 10_000
    print(f"nvcc compile: {time.perf_counter() - t0:.1f} s")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_cuda_extension_matches_torch(dtype, tol):
    from dust3r_ns.model.rope_ext import build

    ext = build(with_cuda=True)
    assert ext.with_cuda
    x = torch.randn(2, 16, 24 * 32, 64, device="cuda")
    pos = grid_pos(2, 24, 32).cuda()
    ref = RoPE2D(100.0)(x, pos)
    out = RoPE2DExt(100.0, ext)(x.to(dtype), pos)
    assert (out.float() - ref).abs().max() <= tol * ref.abs().max()
    xg = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    (RoPE2DExt(100.0, ext)(xg, pos) * g).sum().backward()
    grad = xg.grad.clone()
    xg.grad = None
    (RoPE2D(100.0)(xg, pos) * g).sum().backward()
    assert torch.allclose(grad, xg.grad, atol=1e-5)


def test_kernel_sources_ship_inside_the_package():
    """rope_ext builds from dust3r_ns/csrc (a link to csrc/ that wheels copy), so non-editable installs compile too."""
    import tomllib
    from pathlib import Path

    from dust3r_ns.model import rope_ext

    assert (rope_ext.CSRC / "rope2d.cpp").is_file() and (rope_ext.CSRC / "rope2d_cuda.cu").is_file()
    assert rope_ext.CSRC.parent == Path(rope_ext.__file__).parents[1]
    root = Path(__file__).resolve().parents[1]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["dust3r_ns"]
    assert "csrc/*" in data
