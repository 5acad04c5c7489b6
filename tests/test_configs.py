"""Model presets in configs/models build the published architectures exactly."""

import json
from pathlib import Path

import pytest
import torch

from dust3r_ns.model.checkpoint import build_model, parse_model_spec

PRESETS = sorted((Path(__file__).resolve().parents[1] / "configs" / "models").glob("*.json"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_preset_matches_official_keys(preset, official_dir):
    cfg = json.loads(preset.read_text())
    _, kwargs = parse_model_spec(cfg["spec"])
    model = build_model(kwargs, meta=True)
    keys = json.loads((official_dir / f"{cfg['name']}.keys.json").read_text())
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(n, list(s)) for n, s, _ in keys]
    assert cfg["hub"] == f"naver/{cfg['name']}"


def test_three_presets():
    assert len(PRESETS) == 3
