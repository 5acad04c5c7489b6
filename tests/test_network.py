"""The network against the reference: golden outputs of tiny checkpoints (via our loader) and official key lists."""

import ast
import json

import numpy as np
import pytest
import torch

from dust3r_ns.model.network import AsymmetricCroCo3DStereo, is_symmetrized

CONFIGS = {
    "224_linear": dict(img_size=(224, 224), head_type="linear"),
    "512_linear": dict(img_size=(512, 512), head_type="linear", patch_embed_cls="ManyAR_PatchEmbed"),
    "512_dpt": dict(img_size=(512, 512), head_type="dpt", patch_embed_cls="ManyAR_PatchEmbed"),
}


def golden_weights(entries):
    """The reference README's formula: per state-dict index i, a seeded standard normal, scaled by kind."""
    out = {}
    for i, (name, shape) in enumerate(entries):
        z = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            w = 1 + 0.1 * z if ("norm" in name and name.endswith(".weight")) else 0.02 * z
        else:
            w = z / np.sqrt(np.prod(shape[1:]))
        out[name] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    return out


def golden_entry(golden_dir, key):
    entry = json.loads((golden_dir / "golden.json").read_text())[key]
    sd = entry["state_dict"]
    return entry, (ast.literal_eval(sd) if isinstance(sd, str) else sd)


def rel_err(ours, ref):
    ours = ours.detach().cpu().numpy()
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def golden_checkpoints(golden_dir, tmp_path_factory):
    """Tiny golden checkpoints written in the official .pth format from the README's weight formula."""
    import argparse

    tmp = tmp_path_factory.mktemp("golden_ckpt")
    paths = {}
    for key in ("tiny_linear", "tiny_dpt_manyar"):
        entry, sd = golden_entry(golden_dir, key)
        path = tmp / f"{key}.pth"
        torch.save({"model": golden_weights(sd), "args": argparse.Namespace(model=entry["spec"])}, path)
        paths[key] = path
    return paths


@pytest.mark.parametrize("key", ["tiny_linear", "tiny_dpt_manyar"])
def test_golden_outputs(golden_dir, golden_checkpoints, key):
    from dust3r_ns.model.checkpoint import load_model

    entry, _ = golden_entry(golden_dir, key)
    model = load_model(str(golden_checkpoints[key])).eval()
    io = np.load(golden_dir / entry["io"])
    for c in range(len(entry["cases"])):
        img1, img2 = torch.from_numpy(io[f"case{c}_img1"]), torch.from_numpy(io[f"case{c}_img2"])
        shape = torch.tensor([list(img1.shape[-2:])] * 2)
        v1 = dict(img=img1, true_shape=shape, idx=[0, 1], instance=["0", "1"])
        v2 = dict(img=img2, true_shape=shape, idx=[1, 0], instance=["1", "0"])
        with torch.inference_mode():
            p1, p2 = model(v1, v2)
        assert rel_err(p1["pts3d"], io[f"case{c}_pts3d"]) <= 1e-4
        assert rel_err(p1["conf"], io[f"case{c}_conf"]) <= 1e-4
        assert rel_err(p2["pts3d_in_other_view"], io[f"case{c}_pts3d_in_other_view"]) <= 1e-4
        assert rel_err(p2["conf"], io[f"case{c}_conf2"]) <= 1e-4


def test_symmetrized_detection():
    assert is_symmetrized({"instance": ["0", "1"]}, {"instance": ["1", "0"]})
    assert not is_symmetrized({"instance": ["0", "1"]}, {"instance": ["1", "2"]})
    assert not is_symmetrized({"instance": ["0"]}, {"instance": ["1"]})
    assert not is_symmetrized({}, {})


def test_math_and_sdpa_attention_agree(golden_dir):
    entry, sd = golden_entry(golden_dir, "tiny_linear")
    call = ast.parse(entry["spec"].replace("inf", "1e999"), mode="eval").body
    model = AsymmetricCroCo3DStereo(**{k.arg: ast.literal_eval(k.value) for k in call.keywords}).eval()
    model.load_state_dict(golden_weights(sd))
    img = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        a = model(dict(img=img), dict(img=img.flip(0)))
        model.set_attention_impl("math")
        b = model(dict(img=img), dict(img=img.flip(0)))
    for x, y in zip(a, b):
        for k in x:
            assert torch.allclose(x[k], y[k], rtol=1e-4, atol=1e-5)


def test_landscape_only_head_transposes_portrait():
    """ManyAR + landscape_only: a portrait image stored transposed in a landscape batch comes back transposed."""
    torch.manual_seed(0)
    kw = dict(img_size=(64, 64), enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32, dec_depth=1,
              dec_num_heads=2)
    many = AsymmetricCroCo3DStereo(patch_embed_cls="ManyAR_PatchEmbed", landscape_only=True, **kw).eval()
    plain = AsymmetricCroCo3DStereo(landscape_only=False, **kw).eval()
    plain.load_state_dict(many.state_dict())
    portrait = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        ref1, ref2 = plain(dict(img=portrait), dict(img=portrait))
        land = portrait.transpose(-1, -2)  # what a landscape-only loader stores
        ts = torch.tensor([[64, 48]])
        out1, out2 = many(dict(img=land, true_shape=ts), dict(img=land, true_shape=ts))
    assert out1["pts3d"].shape == (1, 48, 64, 3)
    assert torch.allclose(out1["pts3d"].transpose(1, 2), ref1["pts3d"], atol=1e-5)
    assert torch.allclose(out2["conf"].transpose(1, 2), ref2["conf"], atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_names_and_shapes(official_dir, name):
    keys = json.loads((official_dir / f"DUSt3R_ViTLarge_BaseDecoder_{name}.keys.json").read_text())
    with torch.device("meta"):
        model = AsymmetricCroCo3DStereo(**CONFIGS[name])
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(n, list(s)) for n, s, _ in keys]  # names, shapes and order


def test_official_224_forward_runs():
    """Full-size ViT-L/ViT-B 224 linear model, random weights, one pair on CPU."""
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(**CONFIGS["224_linear"]).eval()
    img = torch.rand(1, 3, 224, 224) * 2 - 1
    with torch.inference_mode():
        p1, p2 = model(dict(img=img), dict(img=img.flip(-1)))
    assert p1["pts3d"].shape == (1, 224, 224, 3) and p2["pts3d_in_other_view"].shape == (1, 224, 224, 3)
    assert torch.isfinite(p1["pts3d"]).all() and (p2["conf"] >= 1).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["512_linear", "512_dpt"])
def test_official_512_forward_runs(name):
    torch.manual_seed(0)
    cfg = dict(CONFIGS[name], patch_embed_cls="PatchEmbedDust3R", landscape_only=False)
    model = AsymmetricCroCo3DStereo(**cfg).eval()
    img = torch.rand(1, 3, 384, 512) * 2 - 1
    with torch.inference_mode():
        p1, p2 = model(dict(img=img), dict(img=img))
    assert p1["pts3d"].shape == (1, 384, 512, 3) and torch.isfinite(p2["pts3d_in_other_view"]).all()
