"""The pair-inference engine equals a plain per-pair forward of the same model, and keeps the reference structure."""

import itertools

import pytest
import torch

from dust3r_ns.images import make_view
from dust3r_ns.inference import inference, inference_per_pair
from dust3r_ns.model.network import AsymmetricCroCo3DStereo

TINY = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=48, dec_depth=2, dec_num_heads=4)


def views(n, h=48, w=64, seed=0, first=0):
    g = torch.Generator().manual_seed(seed)
    return [make_view(first + i, img=torch.rand(1, 3, h, w, generator=g) * 2 - 1) for i in range(n)]


def complete_pairs(vs):
    pairs = [(vs[i], vs[j]) for i, j in itertools.combinations(range(len(vs)), 2)]
    return pairs + [(b, a) for a, b in pairs]


@pytest.mark.parametrize("head_type", ["linear", "dpt"])
def test_engine_equals_per_pair(head_type):
    torch.manual_seed(0)
    cfg = dict(TINY, dec_depth=4) if head_type == "dpt" else TINY
    model = AsymmetricCroCo3DStereo(head_type=head_type, landscape_only=False, **cfg)
    h, w = (48, 64) if head_type == "linear" else (32, 48)  # the DPT head is heavy at full resolution on CPU
    pairs = complete_pairs(views(4, h, w))
    ref = inference_per_pair(pairs, model).to_reference()
    preds = inference(pairs, model, batch_size=5, verbose=False)
    assert preds.edges.tolist() == [[a.idx, b.idx] for a, b in pairs] and preds.uniform
    assert preds.n_images == 4 and all(preds.images[v.idx] is v.info for p in pairs for v in p)
    out = preds.to_reference()
    assert out["view1"]["idx"] == [a.idx for a, _ in pairs]
    assert out["view2"]["instance"] == [str(b.idx) for _, b in pairs]
    assert out["view1"]["img"].shape == (12, 3, h, w)
    assert out["view1"]["true_shape"].tolist() == [[h, w]] * 12
    for p in ("pred1", "pred2"):
        for k, v in ref[p].items():
            assert out[p][k].shape == v.shape
            assert torch.allclose(out[p][k], v, rtol=1e-5, atol=1e-5), (p, k)
    assert set(out["pred2"]) == {"pts3d_in_other_view", "conf"}


def test_engine_mixed_shapes_returns_lists():
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(landscape_only=False, **TINY)
    vs = views(2) + views(2, 64, 48, seed=1, first=2)
    pairs = complete_pairs(vs)
    ref = inference_per_pair(pairs, model).to_reference()
    preds = inference(pairs, model, batch_size=4, verbose=False)
    assert not preds.uniform and preds.shapes.tolist() == [[48, 64]] * 2 + [[64, 48]] * 2
    out = preds.to_reference()
    assert isinstance(out["pred1"]["pts3d"], list) and len(out["pred1"]["pts3d"]) == len(pairs)
    for a, b in zip(out["pred2"]["pts3d_in_other_view"], ref["pred2"]["pts3d_in_other_view"]):
        assert torch.allclose(a, b, atol=1e-5)


def test_engine_bf16_close_to_fp32():
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(landscape_only=False, **TINY)
    pairs = complete_pairs(views(3))
    ref = inference(pairs, model, verbose=False).to_reference()
    out = inference(pairs, model, amp="bf16", verbose=False).to_reference()
    for p, k in (("pred1", "pts3d"), ("pred2", "pts3d_in_other_view")):
        err = (out[p][k] - ref[p][k]).abs().max() / ref[p][k].abs().max()
        assert err < 0.05, err
        assert out[p][k].dtype == torch.float32


def test_engine_rejects_bad_arguments():
    model = AsymmetricCroCo3DStereo(**TINY)
    with pytest.raises(ValueError, match="no image pairs"):
        inference([], model)
    with pytest.raises(ValueError, match="amp"):
        inference(complete_pairs(views(2)), model, amp="int8", verbose=False)


@pytest.mark.cuda
@pytest.mark.parametrize("amp,tol", [(None, 1e-3), ("bf16", 5e-2), ("fp16", 1e-2)])
def test_engine_on_cuda_matches_cpu(amp, tol):
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(head_type="dpt", landscape_only=False, **dict(TINY, dec_depth=4))
    pairs = complete_pairs(views(3))
    ref = inference(pairs, model, device="cpu", verbose=False).to_reference()
    out = inference(pairs, model, device="cuda", amp=amp, verbose=False).to_reference()
    for p, k in (("pred1", "pts3d"), ("pred2", "pts3d_in_other_view"), ("pred2", "conf")):
        assert out[p][k].device.type == "cpu" and out[p][k].dtype == torch.float32
        err = (out[p][k] - ref[p][k]).abs().max() / ref[p][k].abs().max()
        assert err < tol, (p, k, float(err))
