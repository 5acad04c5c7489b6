"""Checkpoint I/O: constructor-string parsing, official key lists, `.pth` / HF round trips, DPT aliases,
CroCo initialisation, hub offline errors, and the security cases (code-carrying pickles, broken files)."""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dust3r_ns.model import checkpoint as C
from dust3r_ns.model.checkpoint import CheckpointError

OFFICIAL_SPECS = {
    "224_linear": "AsymmetricCroCo3DStereo(pos_embed='RoPE100', img_size=(224, 224), head_type='linear', "
                  "output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=1024, "
                  "enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12)",
    "512_linear": "AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', "
                  "img_size=(512, 512), head_type='linear', output_mode='pts3d', depth_mode=('exp', -inf, inf), "
                  "conf_mode=('exp', 1, inf), enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, "
                  "dec_depth=12, dec_num_heads=12)",
    "512_dpt": "AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(512, 512), "
               "head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
               "enc_embed_dim=1024, enc_depth=24, enc_num_heads=16, dec_embed_dim=768, dec_depth=12, dec_num_heads=12)",
}
TINY_LINEAR = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', img_size=(64, 64), head_type='linear', "
               "output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), enc_embed_dim=64, "
               "enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4)")
TINY_DPT = ("AsymmetricCroCo3DStereo(pos_embed='RoPE100', patch_embed_cls='ManyAR_PatchEmbed', img_size=(64, 64), "
            "head_type='dpt', output_mode='pts3d', depth_mode=('exp', -inf, inf), conf_mode=('exp', 1, inf), "
            "enc_embed_dim=32, enc_depth=2, enc_num_heads=2, dec_embed_dim=32, dec_depth=4, dec_num_heads=2)")


def tiny(spec: str, seed: int = 0, **override) -> torch.nn.Module:
    _, kw = C.parse_model_spec(spec)
    kw.update(override)
    torch.manual_seed(seed)
    model = C.build_model(kw).eval()
    with torch.no_grad():  # non-trivial values everywhere (LayerNorms, biases, mask token)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def run(model: torch.nn.Module, h: int = 48, w: int = 64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    img1, img2 = (torch.rand(1, 3, h, w, generator=g) * 2 - 1 for _ in range(2))
    shape = torch.tensor([[h, w]])
    with torch.no_grad():
        return model({"img": img1, "true_shape": shape}, {"img": img2, "true_shape": shape})


def assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module, **kw):
    (p1, p2), (q1, q2) = run(a, **kw), run(b, **kw)
    for x, y in ((p1, q1), (p2, q2)):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def one_line_naming(exc: pytest.ExceptionInfo, path) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("name", sorted(OFFICIAL_SPECS))
def test_parse_official_specs_and_round_trip(name):
    cls, kw = C.parse_model_spec(OFFICIAL_SPECS[name])
    assert cls == "AsymmetricCroCo3DStereo"
    assert kw["depth_mode"] == ("exp", -math.inf, math.inf) and kw["conf_mode"] == ("exp", 1, math.inf)
    assert kw["img_size"] == ((224, 224) if name.startswith("224") else (512, 512))
    assert kw["head_type"] == name.split("_")[1] and kw["enc_embed_dim"] == 1024
    text = C.format_model_spec(kw)
    assert "-inf" in text and "'ManyAR_PatchEmbed'" in text or name.startswith("224")
    assert C.parse_model_spec(text) == (cls, kw)
    if name == "512_dpt":  # the official format, character for character
        assert text == OFFICIAL_SPECS[name]


def test_parse_accepts_literal_forms():
    cls, kw = C.parse_model_spec("  DUSt3R(img_size=[512, 384], depth_mode=('exp', -math.inf, np.inf), "
                                 "landscape_only=False, mlp_ratio=4., freeze='none')  ")
    assert cls == "AsymmetricCroCo3DStereo"
    assert kw == {"img_size": (512, 384), "depth_mode": ("exp", -math.inf, math.inf), "landscape_only": False,
                  "mlp_ratio": 4.0, "freeze": "none"}
    assert C.parse_model_spec("CroCoNet(enc_embed_dim=1024, mask_ratio=0.9)")[0] == "CroCoNet"


@pytest.mark.parametrize("spec, fragment", [
    ("AsymmetricCroCo3DStereo(enc_depth=__import__('os').system('touch x'))", "not a literal"),
    ("AsymmetricCroCo3DStereo(enc_depth=os.system('x'))", "not a literal"),
    ("AsymmetricCroCo3DStereo(head_type=(lambda: 'dpt')())", "not a literal"),
    ("AsymmetricCroCo3DStereo(head_type=open('/etc/passwd').read())", "not a literal"),
    ("AsymmetricCroCo3DStereo(img_size=[512][0])", "not a literal"),
    ("AsymmetricCroCo3DStereo(img_size=1+1)", "not a literal"),
    ("AsymmetricCroCo3DStereo(head_type=x.__class__)", "not a literal"),
    ("AsymmetricCroCo3DStereo(head_type=f'{x}')", "not a literal"),
    ("AsymmetricCroCo3DStereo(**{'a': 1})", "'**'"),
    ("AsymmetricCroCo3DStereo('dpt')", "positional"),
    ("__import__('os').system('x')", "expected one call"),
    ("models.AsymmetricCroCo3DStereo(head_type='dpt')", "expected one call"),
    ("Evil(head_type='dpt')", "unknown model class 'Evil'"),
    ("AsymmetricCroCo3DStereo(foo=1)", "unknown model option 'foo'"),
    ("AsymmetricCroCo3DStereo(enc_depth='24')", "positive integer"),
    ("AsymmetricCroCo3DStereo(img_size=(1, 2, 3))", "(height, width)"),
    ("AsymmetricCroCo3DStereo(depth_mode='exp')", "(mode, vmin, vmax)"),
    ("AsymmetricCroCo3DStereo(head_type='dpt'", "cannot parse"),
    ("AsymmetricCroCo3DStereo(head_type='dpt'); import os", "cannot parse"),
    ("AsymmetricCroCo3DStereo(head_type='dpt', head_type='linear')", "given twice"),
    ("AsymmetricCroCo3DStereo(img_size=" + "(" * 200 + "1" + ")" * 200 + ")", "AsymmetricCroCo3DStereo"),
    ("AsymmetricCroCo3DStereo(head_type='" + "x" * 5000 + "')", "too long"),
])
def test_parse_refuses(spec, fragment):
    with pytest.raises(CheckpointError) as exc:
        C.parse_model_spec(spec, "some/file.pth")
    msg = one_line_naming(exc, "some/file.pth")
    assert fragment in msg


# ------------------------------------------------------------------------------------------------ official key lists
@pytest.mark.parametrize("name", sorted(OFFICIAL_SPECS))
def test_official_names_and_shapes(official_dir, name):
    keys = json.loads((official_dir / f"DUSt3R_ViTLarge_BaseDecoder_{name}.keys.json").read_text())
    expected = {k: tuple(s) for k, s, _ in keys}
    assert len(expected) == len(keys) == (1009 if name.endswith("dpt") else 877)
    _, kw = C.parse_model_spec(OFFICIAL_SPECS[name])
    for options in (kw, C.inference_options(kw)):
        model = C.build_model(options, meta=True)  # instant: no memory
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    # the strict loader accepts a file with exactly these entries (meta tensors: nothing is allocated) ...
    sd = {k: torch.empty(s, device="meta") for k, s in expected.items()}
    assert C.load_state_dict_checked(model, sd, "official.pth", assign=True) == []
    # ... and the HF layout without the DPT duplicates, or a file without the second decoder
    hf = {k: v for k, v in sd.items() if ".scratch.layer_rn." not in k}
    assert len(hf) == len(sd) - (8 if name.endswith("dpt") else 0)
    C.load_state_dict_checked(model, hf, "model.safetensors", assign=True)
    croco = {k: v for k, v in sd.items() if not k.startswith("dec_blocks2.")}
    copied = C.load_state_dict_checked(model, croco, "nodec2.pth", assign=True)
    assert len(copied) == len(sd) - len(croco) > 0


def test_state_dict_mismatch_is_one_line(official_dir):
    keys = json.loads((official_dir / "DUSt3R_ViTLarge_BaseDecoder_224_linear.keys.json").read_text())
    model = C.build_model(C.parse_model_spec(OFFICIAL_SPECS["224_linear"])[1], meta=True)
    sd = {k: torch.empty(s, device="meta") for k, s, _ in keys}
    del sd["enc_norm.weight"]
    sd["extra.weight"] = torch.empty(3, device="meta")
    sd["decoder_embed.weight"] = torch.empty(768, 512, device="meta")
    with pytest.raises(CheckpointError) as exc:
        C.load_state_dict_checked(model, sd, "x/ckpt.pth", assign=True)
    msg = one_line_naming(exc, "x/ckpt.pth")
    assert "1 missing (enc_norm.weight)" in msg and "1 unexpected (extra.weight)" in msg
    assert "decoder_embed.weight: file [768, 512] vs model [768, 1024]" in msg


# ------------------------------------------------------------------------------------------------ round trips
def test_pth_round_trip_tiny_linear(tmp_path):
    model = tiny(TINY_LINEAR)
    path = C.save_pth(model, tmp_path / "ckpt.pth", lr=1e-4, train_dataset="synthetic",
                      entries={"epoch": 3, "best_so_far": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pth"]  # no temporary file left
    # the official structure, readable by a weights-only load with Namespace allow-listed
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "args", "epoch", "best_so_far"} and isinstance(raw["args"], argparse.Namespace)
    assert raw["args"].lr == 1e-4 and raw["args"].model.startswith("AsymmetricCroCo3DStereo(pos_embed='RoPE100'")
    assert C.parse_model_spec(raw["args"].model)[1] == model.config
    loaded = C.load_model(path, inference=False)
    assert loaded.config == model.config and not loaded.training
    assert all(p.requires_grad and not p.is_meta for p in loaded.parameters())
    assert_same_weights(model, loaded)
    assert_same_outputs(model, loaded)
    rc = C.read_checkpoint(path)
    assert rc.entries == {"epoch": 3, "best_so_far": 0.5} and rc.args.train_dataset == "synthetic"


@pytest.fixture(scope="module")
def dpt_model() -> torch.nn.Module:
    """One tiny DPT model for the tests below (the DPT head has fixed 256-channel layers: ~37M parameters)."""
    return tiny(TINY_DPT, landscape_only=False, patch_embed_cls="PatchEmbedDust3R")


def test_inference_options_replace_manyar(tmp_path):
    model = tiny(TINY_DPT)
    assert model.config["patch_embed_cls"] == "ManyAR_PatchEmbed" and model.config["landscape_only"]
    path = C.save_pth(model, tmp_path / "dpt.pth")
    inf_model = C.load_model(path)  # default: as the reference inference loader
    assert inf_model.config["patch_embed_cls"] == "PatchEmbedDust3R" and inf_model.config["landscape_only"] is False
    train_model = C.load_model(path, inference=False)
    assert train_model.config == model.config
    assert_same_weights(model, inf_model)
    assert_same_outputs(model, train_model)


def test_hf_round_trip_tiny_dpt_aliases(tmp_path, dpt_model):
    from safetensors import safe_open

    model = dpt_model
    folder = C.save_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["depth_mode"] == ["exp", -math.inf, math.inf] and cfg["img_size"] == [64, 64]
    assert "Infinity" in (folder / "config.json").read_text()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored, meta = set(f.keys()), f.metadata()
    dup = {f"downstream_head{h}.dpt.scratch.layer_rn.{i}.weight" for h in (1, 2) for i in range(4)}
    assert not dup & stored and len(stored) == len(model.state_dict()) - 8
    assert meta["downstream_head1.dpt.scratch.layer_rn.0.weight"] == "downstream_head1.dpt.scratch.layer1_rn.weight"
    for source in (folder, folder / "model.safetensors"):
        loaded = C.load_model(source, inference=False)
        assert loaded.config == model.config
        s = loaded.downstream_head2.dpt.scratch
        assert s.layer_rn[3].weight is s.layer4_rn.weight  # still one module under two names
        assert_same_weights(model, loaded)
        assert_same_outputs(model, loaded, h=64, w=48)  # portrait


def test_hf_official_layout_without_metadata(tmp_path, dpt_model):
    """As the published files: the duplicates absent, no metadata, JSON lists and Infinity in config.json."""
    from safetensors.torch import save_file

    model = dpt_model
    sd = {k: v.clone() for k, v in model.state_dict().items() if ".scratch.layer_rn." not in k}
    save_file(sd, str(tmp_path / "model.safetensors"))
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in model.config.items()
           if k not in ("mlp_ratio", "norm_im2_in_dec", "patch_size")}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = C.load_model(tmp_path, inference=False)
    assert loaded.config == model.config
    assert_same_outputs(model, loaded)


def test_missing_second_decoder_is_copied(tmp_path):
    model = tiny(TINY_LINEAR)
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("dec_blocks2.")}
    torch.save({"model": sd, "args": argparse.Namespace(model=C.model_spec(model))}, tmp_path / "a.pth")
    loaded = C.load_model(tmp_path / "a.pth")
    for k, v in loaded.dec_blocks2.state_dict().items():
        assert torch.equal(v, sd["dec_blocks." + k])
    assert loaded.dec_blocks2[0].norm1.weight.data_ptr() != loaded.dec_blocks[0].norm1.weight.data_ptr()


def test_bare_state_dict_needs_spec(tmp_path):
    model = tiny(TINY_LINEAR)
    torch.save(model.state_dict(), tmp_path / "bare.pth")
    with pytest.raises(CheckpointError) as exc:
        C.load_model(tmp_path / "bare.pth")
    msg = one_line_naming(exc, tmp_path / "bare.pth")
    assert "spec=" in msg and "official checkpoint" in msg        # a CLI user's fix, and the library's
    assert_same_outputs(model, C.load_model(tmp_path / "bare.pth", spec=TINY_LINEAR))
    assert_same_outputs(model, C.load_model(tmp_path / "bare.pth", config=model.config))


def test_croco_init(tmp_path):
    model = tiny(TINY_LINEAR)
    sd = {k: v for k, v in model.state_dict().items()
          if not k.startswith(("dec_blocks2.", "downstream_head"))}
    sd["prediction_head.weight"] = torch.randn(768, 48)
    spec = "CroCoNet(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4)"
    torch.save({"model": sd, "args": argparse.Namespace(model=spec)}, tmp_path / "croco.pth")
    with pytest.raises(CheckpointError) as exc:
        C.load_model(tmp_path / "croco.pth")
    assert "load_croco_init" in one_line_naming(exc, tmp_path / "croco.pth")
    fresh = tiny(TINY_LINEAR, seed=5)
    head_before = fresh.downstream_head1.state_dict()
    report = C.load_croco_init(fresh, tmp_path / "croco.pth")
    assert report["unexpected"] == ["prediction_head.weight"]
    assert report["missing"] and all(k.startswith("downstream_head") for k in report["missing"])
    assert len(report["copied"]) == len(fresh.dec_blocks2.state_dict()) > 0
    after = fresh.state_dict()
    for k in report["loaded"]:
        src = sd[k] if k in sd else sd["dec_blocks." + k[len("dec_blocks2."):]]
        assert torch.equal(after[k], src), k
    for k, v in head_before.items():
        assert torch.equal(fresh.downstream_head1.state_dict()[k], v)
    # a CroCo constructor string that is not plain literals does not matter for initialisation
    odd = spec[:-1] + ", norm_layer=partial(nn.LayerNorm, eps=1e-6))"
    torch.save({"model": sd, "args": argparse.Namespace(model=odd)}, tmp_path / "croco2.pth")
    again = tiny(TINY_LINEAR, seed=6)
    assert C.load_croco_init(again, tmp_path / "croco2.pth")["loaded"] == report["loaded"]
    with pytest.raises(CheckpointError, match="not a literal"):
        C.load_model(tmp_path / "croco2.pth")
    # an explicit spec replaces the file's (here: the CroCo weights without heads are then incomplete)
    with pytest.raises(CheckpointError, match="missing"):
        C.load_model(tmp_path / "croco2.pth", spec=TINY_LINEAR)
    wrong = tiny(TINY_LINEAR.replace("enc_embed_dim=64", "enc_embed_dim=32"))
    with pytest.raises(CheckpointError) as exc:
        C.load_croco_init(wrong, tmp_path / "croco.pth")
    assert "wrong shape" in one_line_naming(exc, tmp_path / "croco.pth")


def test_freeze_and_dtype_preserved(tmp_path):
    model = tiny(TINY_LINEAR, freeze="encoder")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and "enc_blocks.0.attn.qkv.weight" in frozen
    half = {k: v.half() for k, v in model.state_dict().items()}
    torch.save({"model": half, "args": argparse.Namespace(model=C.model_spec(model))}, tmp_path / "h.pth")
    loaded = C.load_model(tmp_path / "h.pth")
    assert {n for n, p in loaded.named_parameters() if not p.requires_grad} == frozen
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.enc_norm.weight, half["enc_norm.weight"].float())


@pytest.mark.parametrize("name", ["tiny_linear", "tiny_dpt_manyar"])
def test_golden_through_loader(tmp_path, golden_dir, name):
    """The reference's tiny models: weights regenerated as documented, saved as .pth, loaded by our loader
    (for the ManyAR DPT model this also checks the inference options: its case 1 is a portrait image)."""
    g = json.loads((golden_dir / "golden.json").read_text())[name]
    sd = {}
    for i, (key, shape) in enumerate(g["state_dict"]):
        z = np.random.default_rng(i).standard_normal(shape).astype(np.float32)
        if len(shape) == 1:
            z = 1 + 0.1 * z if ("norm" in key and key.endswith(".weight")) else 0.02 * z
        else:
            z = z / np.sqrt(np.prod(shape[1:]))
        sd[key] = torch.from_numpy(z.astype(np.float32))
    torch.save({"model": sd, "args": argparse.Namespace(model=g["spec"])}, tmp_path / "golden.pth")
    model = C.load_model(tmp_path / "golden.pth")
    io = np.load(golden_dir / f"{name}_io.npz")
    assert len(g["cases"]) >= 1
    for k in range(len(g["cases"])):
        img1, img2 = (torch.from_numpy(io[f"case{k}_img{j}"]) for j in (1, 2))
        shape = torch.tensor([img1.shape[-2:]] * img1.shape[0])
        v1 = {"img": img1, "true_shape": shape, "instance": ["0", "1"]}
        v2 = {"img": img2, "true_shape": shape, "instance": ["1", "0"]}
        with torch.no_grad():
            p1, p2 = model(v1, v2)
        for ours, ref in ((p1["pts3d"], "pts3d"), (p1["conf"], "conf"),
                          (p2["pts3d_in_other_view"], "pts3d_in_other_view"), (p2["conf"], "conf2")):
            r = io[f"case{k}_{ref}"]
            assert np.abs(ours.numpy() - r).max() / np.abs(r).max() <= 1e-4, ref


# ------------------------------------------------------------------------------------------------ security / bad files
class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("style", ["torch_zip", "pickle2", "pickle4"])
def test_pickle_carrying_code_is_refused_without_running(tmp_path, style):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    obj = {"model": {"w": torch.zeros(2)}, "args": _Payload(marker)}
    if style == "torch_zip":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2 if style == "pickle2" else 4))
    with pytest.raises(CheckpointError) as exc:
        C.load_model(path)
    msg = one_line_naming(exc, path)
    assert not marker.exists()
    assert "refusing" in msg and "system" in msg
    with pytest.raises(CheckpointError):
        C.load_croco_init(tiny(TINY_LINEAR), path)
    assert not marker.exists()


def test_spec_with_code_in_file_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    model = tiny(TINY_LINEAR)
    spec = f"AsymmetricCroCo3DStereo(enc_depth=__import__('os').system('touch {marker}'))"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(model=spec)}, tmp_path / "s.pth")
    with pytest.raises(CheckpointError) as exc:
        C.load_model(tmp_path / "s.pth")
    assert "not a literal" in one_line_naming(exc, tmp_path / "s.pth")
    assert not marker.exists()


@pytest.fixture
def good_pth(tmp_path) -> Path:
    return C.save_pth(tiny(TINY_LINEAR), tmp_path / "good.pth")


def test_truncated_file(good_pth, tmp_path):
    data = good_pth.read_bytes()
    for n, cut in enumerate((len(data) // 2, len(data) - 30, 100)):
        bad = tmp_path / f"trunc{n}.pth"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as exc:
            C.load_model(bad)
        assert "truncated" in one_line_naming(exc, bad) or "not a PyTorch checkpoint" in str(exc.value)
    hf = C.save_hf(tiny(TINY_LINEAR), tmp_path / "hf")
    st = hf / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as exc:
        C.load_model(hf)
    assert "truncated" in one_line_naming(exc, st)


@pytest.mark.parametrize("content, fragment", [
    (os.urandom(4096), "not a PyTorch checkpoint"),
    (b'{"model": "AsymmetricCroCo3DStereo()"}', "JSON"),
    (b"", "empty"),
])
def test_not_a_checkpoint(tmp_path, content, fragment):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as exc:
        C.load_model(path)
    assert fragment in one_line_naming(exc, path)


def test_wrong_content_in_valid_files(tmp_path, good_pth):
    sd = tiny(TINY_LINEAR).state_dict()
    cases = {
        "shape.pth": {"model": {**sd, "enc_norm.weight": torch.zeros(65)}, "args": argparse.Namespace(model=TINY_LINEAR)},
        "unknown.pth": {"model": sd, "args": argparse.Namespace(model=TINY_LINEAR[:-1] + ", foo=3)")},
        "list.pth": [1, 2, 3],
        "nomodel.pth": {"optimizer": {"lr": 1.0}, "epoch": 3},
        "notensor.pth": {"model": {"w": [1, 2]}, "args": argparse.Namespace(model=TINY_LINEAR)},
    }
    expect = {"shape.pth": "enc_norm.weight: file [65] vs model [64]", "unknown.pth": "unknown model option 'foo'",
              "list.pth": "not a dict", "nomodel.pth": "no 'model' state dict", "notensor.pth": "not a named tensor"}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError) as exc:
            C.load_model(tmp_path / name)
        assert expect[name] in one_line_naming(exc, tmp_path / name), name


def test_bad_hf_folders(tmp_path):
    model = tiny(TINY_LINEAR)
    folder = C.save_hf(model, tmp_path / "hf")
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "foo": 1}))
    with pytest.raises(CheckpointError) as exc:
        C.load_model(folder)
    assert "unknown model option 'foo'" in one_line_naming(exc, cfg_path)
    cfg_path.write_text("{not json")
    with pytest.raises(CheckpointError) as exc:
        C.load_model(folder)
    assert "not valid JSON" in one_line_naming(exc, cfg_path)
    cfg_path.unlink()
    with pytest.raises(CheckpointError) as exc:
        C.load_model(folder)
    assert "config=" in one_line_naming(exc, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError) as exc:
        C.load_model(folder)
    assert "model.safetensors" in one_line_naming(exc, folder)


def test_missing_file(tmp_path):
    for source in (tmp_path / "nope.pth", "naver/model.pth", "./relative/dir"):
        with pytest.raises(CheckpointError) as exc:
            C.load_model(source)
        assert "checkpoint not found" in one_line_naming(exc, source)


@pytest.mark.parametrize("name", ["naver/DUSt3R_ViTLarge_BaseDecoder_512_dpt", "DUSt3R_ViTLarge_BaseDecoder_224_linear"])
def test_hub_offline_gives_clear_error(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    with pytest.raises(CheckpointError) as exc:
        C.load_model(name)
    repo = name if "/" in name else "naver/" + name
    msg = one_line_naming(exc, repo)
    assert "cannot download" in msg and "offline?" in msg and "config.json and model.safetensors" in msg
    local = "checkpoints/" + repo.split("/")[1]
    assert local in msg
    # following the advice works
    C.save_hf(tiny(TINY_LINEAR), tmp_path / local)
    assert C.load_model(local).config["enc_embed_dim"] == 64


def test_save_refuses_non_plain_args_and_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError):
        C.save_pth(tiny(TINY_LINEAR), tmp_path / "x.pth", callback=object())
    assert list(tmp_path.iterdir()) == []
    # overwriting keeps the old file until the new one is complete, and paths become strings
    p = C.save_pth(tiny(TINY_LINEAR), tmp_path / "x.pth", output_dir=tmp_path)
    assert C.read_checkpoint(p).args.output_dir == str(tmp_path)


def test_hub_download_path(tmp_path, monkeypatch):
    """Online path with hf_hub_download replaced by a fake serving a local snapshot folder."""
    import huggingface_hub

    snapshot = C.save_hf(tiny(TINY_LINEAR), tmp_path / "snapshot")
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, local_files_only=False, **kw):
        calls.append((repo_id, filename, cache_dir, local_files_only))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    model = C.load_model("naver/DUSt3R_ViTLarge_BaseDecoder_224_linear")
    assert model.config["enc_embed_dim"] == 64
    assert [c[1] for c in calls] == ["config.json", "model.safetensors"]
    assert all(c[0] == "naver/DUSt3R_ViTLarge_BaseDecoder_224_linear" and c[2] == str(tmp_path / "cache")
               and c[3] is False for c in calls)


@pytest.mark.cuda
def test_load_to_cuda_matches_cpu(tmp_path, dpt_model):
    model = dpt_model
    path = C.save_pth(model, tmp_path / "dpt.pth")
    cpu = C.load_model(path)
    gpu = C.load_model(path, device="cuda")
    assert all(p.is_cuda for p in gpu.parameters())
    g = torch.Generator().manual_seed(3)
    views = [{"img": torch.rand(2, 3, 64, 48, generator=g) * 2 - 1, "true_shape": torch.tensor([[64, 48]] * 2)}
             for _ in range(2)]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 for the comparison
    try:
        with torch.no_grad():
            ref = cpu(*views)
            out = gpu(*[{k: v.cuda() for k, v in view.items()} for view in views])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    for r, o in zip(ref, out):
        for k in r:
            err = (o[k].cpu() - r[k]).abs().max() / r[k].abs().max()
            assert err < 1e-4, (k, float(err))
    C.save_hf(gpu, tmp_path / "hf")  # saving from a CUDA model
    assert_same_weights(cpu, C.load_model(tmp_path / "hf"))


def test_hub_unknown_repo_message(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    def fake_download(repo_id, filename, **kw):
        raise EntryNotFoundError(f"{filename} not in {repo_id}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(CheckpointError) as exc:
        C.load_model("someone/not-a-dust3r-repo")
    msg = one_line_naming(exc, "someone/not-a-dust3r-repo")
    assert "has no config.json there" in msg and "offline" not in msg
