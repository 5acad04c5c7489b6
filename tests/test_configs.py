"""Presets ship inside the package: model presets build the published architectures exactly; a built wheel holds
every preset file (read through importlib.resources, so they work from an installed wheel)."""

import json
import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest

from dust3r_ns.model.checkpoint import build_model, parse_model_spec
from dust3r_ns.train.loop import CONFIG_DIR, load_preset, preset_names

PRESET_DIR = resources.files("dust3r_ns") / "configs"
PRESETS = sorted((q for q in (PRESET_DIR / "models").iterdir() if q.name.endswith(".json")), key=lambda q: q.name)
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name[: -len(".json")])
def test_preset_matches_official_keys(preset, official_dir):
    cfg = json.loads(preset.read_text())
    _, kwargs = parse_model_spec(cfg["spec"])
    model = build_model(kwargs, meta=True)
    keys = json.loads((official_dir / f"{cfg['name']}.keys.json").read_text())
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(n, list(s)) for n, s, _ in keys]
    assert cfg["hub"] == f"naver/{cfg['name']}"


def test_three_presets():
    assert len(PRESETS) == 3


def test_train_presets_are_package_data():
    assert str(CONFIG_DIR) == str(PRESET_DIR)
    names = preset_names()
    assert "synthetic_tiny" in names and "dust3r_512_dpt" in names and len(names) == 8
    for name in names:
        assert load_preset(name)["preset"] == name
    assert not (REPO / "configs").exists()  # one copy, inside the package


def test_wheel_contains_presets_and_py_typed(tmp_path):
    """Build a wheel (offline, no build isolation) from a copy of the sources and look for every preset file."""
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / f, src / f)
    shutil.copytree(REPO / "dust3r_ns", src / "dust3r_ns", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(tmp_path / "out"), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    (wheel,) = (tmp_path / "out").glob("dust3r_ns-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "dust3r_ns" / "configs").rglob("*") if p.is_file()}
    assert len(shipped) == 14 and shipped <= names, sorted(shipped - names)
    assert "dust3r_ns/py.typed" in names
    assert {"dust3r_ns/weights/dust3r_tiny_synthetic_224/config.json",
            "dust3r_ns/weights/dust3r_tiny_synthetic_224/model.safetensors"} <= names
