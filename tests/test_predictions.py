"""`PairPredictions`: the typed boundary between inference and alignment (validation, persistence, reference adapter)."""

import argparse
import os

import numpy as np
import pytest
import torch

from dust3r_ns.align import global_align
from dust3r_ns.images import make_view
from dust3r_ns.inference import inference
from dust3r_ns.predictions import PairPredictions, PredictionsError
from test_network import golden_entry, golden_weights, rel_err


def _preds(shapes=((6, 8), (6, 8), (6, 8)), edges=((0, 1), (1, 0), (1, 2), (2, 1)), seed=0) -> PairPredictions:
    """Random predictions over images of the given network shapes (stacked when all shapes agree)."""
    g = torch.Generator().manual_seed(seed)
    infos = [make_view(k, rgb=np.random.default_rng(k).integers(0, 255, (*hw, 3), dtype=np.uint8),
                       name=f"im{k}.png", path=f"/photos/im{k}.png", orig_size=(2 * hw[1], 2 * hw[0]),
                       transform=[0.5, 0.5, 0.25, 0.25]).info for k, hw in enumerate(shapes)]
    maps = {"pts1": [], "pts2": [], "conf1": [], "conf2": []}
    for i, j in edges:
        for key, k, tail in (("pts1", i, (3,)), ("pts2", j, (3,)), ("conf1", i, ()), ("conf2", j, ())):
            t = torch.rand(*shapes[k], *tail, generator=g)
            maps[key].append(t + 1 if key.startswith("conf") else t)
    if len(set(shapes)) == 1:
        maps = {k: torch.stack(v) for k, v in maps.items()}
    return PairPredictions(images=infos, edges=np.array(edges), **maps)


def _equal(a: PairPredictions, b: PairPredictions) -> None:
    assert a.names == b.names and np.array_equal(a.edges, b.edges) and a.uniform == b.uniform
    for ia, ib in zip(a.images, b.images):
        assert (ia.path, ia.orig_size) == (ib.path, ib.orig_size)
        assert np.array_equal(ia.transform, ib.transform) and np.array_equal(ia.rgb, ib.rgb)
    for e in range(a.n_edges):
        for x, y in zip(a.edge(e), b.edge(e)):
            assert torch.equal(x, y)


@pytest.mark.parametrize("shapes", [((6, 8),) * 3, ((6, 8), (8, 6), (6, 8))])
def test_save_load_round_trip(tmp_path, shapes):
    preds = _preds(shapes)
    path = preds.save(tmp_path / "pairs.npz")
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.npz"]   # no temp file left
    _equal(preds, PairPredictions.load(path))


def test_ordered_flag_survives_save_load_and_conversion(tmp_path):
    """`ordered` (frames of one sequence) is saved, loaded and kept by `astype`; files written before the flag
    existed load as unordered."""
    from dust3r_ns.fileio import save_npz
    from dust3r_ns.predictions import FORMAT_KIND, FORMAT_VERSION

    preds = _preds()
    preds.ordered = True
    back = PairPredictions.load(preds.save(tmp_path / "seq.npz"))
    assert back.ordered and back.astype(torch.float16).ordered
    with np.load(tmp_path / "seq.npz") as z:
        old = {k: z[k] for k in z.files if k not in ("ordered", "format_kind", "format_version")}
    save_npz(tmp_path / "old.npz", old, FORMAT_KIND, FORMAT_VERSION, "pair predictions")
    assert not PairPredictions.load(tmp_path / "old.npz").ordered


@pytest.mark.parametrize("shapes", [((6, 8),) * 3, ((6, 8), (8, 6), (6, 8))])
def test_reference_adapter_round_trip(shapes):
    preds = _preds(shapes)
    ref = preds.to_reference()
    assert ref["view1"]["idx"] == [0, 1, 1, 2] and ref["view2"]["idx"] == [1, 0, 2, 1]
    assert isinstance(ref["pred1"]["pts3d"], torch.Tensor) == preds.uniform
    back = PairPredictions.from_reference(ref)
    assert back.names == preds.names and np.array_equal(back.edges, preds.edges)
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(back.images, preds.images))  # colours from `img`
    for e in range(preds.n_edges):
        for x, y in zip(preds.edge(e), back.edge(e)):
            assert torch.equal(x, y)


def test_damaged_files_name_the_file(tmp_path):
    good = _preds().save(tmp_path / "good.npz")
    data = good.read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for name, match in (("cut.npz", "not a readable pair predictions file"),
                        ("other.npz", "not a dust3r_ns pair predictions file"),
                        ("missing.npz", "no such pair predictions file")):
        with pytest.raises(PredictionsError, match=match) as e:
            PairPredictions.load(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)


def test_validation():
    p = _preds()
    with pytest.raises(PredictionsError, match="0..2"):
        PairPredictions(images=p.images, edges=[(0, 3)] * 4, pts1=p.pts1, pts2=p.pts2, conf1=p.conf1, conf2=p.conf2)
    with pytest.raises(PredictionsError, match=r"images \[2\] appear in no pair"):
        PairPredictions(images=p.images, edges=[(0, 1)] * 4, pts1=p.pts1, pts2=p.pts2, conf1=p.conf1, conf2=p.conf2)
    with pytest.raises(PredictionsError, match="pts2 of pair 1"):
        q = _preds(((6, 8), (8, 6), (6, 8)))
        bad = list(q.pts2)
        bad[1] = bad[1][:-1]
        PairPredictions(images=q.images, edges=q.edges, pts1=q.pts1, pts2=bad, conf1=q.conf1, conf2=q.conf2)
    nan = p.pts1.clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(PredictionsError, match="NaN"):
        PairPredictions(images=p.images, edges=p.edges, pts1=nan, pts2=p.pts2, conf1=p.conf1,
                        conf2=p.conf2).check_values()


def test_alignment_same_from_predictions_and_reference_dict():
    synth = pytest.importorskip("dust3r_ns.synth")
    from dust3r_ns.pairs import graph_edges

    scene = synth.make_scene(0)
    c2w, K = synth.camera_path(scene, 4, "moderate", seed=0, H=24, W=32)
    views = synth.render_views(scene, c2w, K, 24, 32)
    ref = synth.oracle_pairs(views, graph_edges(4, "complete"), noise=synth.NoiseConfig(), seed=0)
    preds = PairPredictions.from_reference(ref)
    torch.set_num_threads(1)
    a = global_align(preds, verbose=False)
    b = global_align(ref, verbose=False)
    assert np.array_equal(a.c2w, b.c2w) and np.array_equal(a.K, b.K) and a.meta["loss"] == b.meta["loss"]


@pytest.mark.parametrize("key", ["tiny_linear", "tiny_dpt_manyar"])
def test_engine_predictions_match_golden(golden_dir, tmp_path, key):
    """The engine's `PairPredictions`, through the reference adapter, equal the reference outputs. Each golden case
    is a symmetrized batch (instances 0,1 / 1,0): the reference encodes image 0 = img1[0] and image 1 = img2[0] once
    and runs the pairs (0, 1) and (1, 0)."""
    from dust3r_ns.model.checkpoint import load_model

    entry, sd = golden_entry(golden_dir, key)
    path = tmp_path / f"{key}.pth"
    torch.save({"model": golden_weights(sd), "args": argparse.Namespace(model=entry["spec"])}, os.fspath(path))
    model = load_model(str(path)).eval()
    io = np.load(golden_dir / entry["io"])
    for c in range(len(entry["cases"])):
        img1, img2 = torch.from_numpy(io[f"case{c}_img1"]), torch.from_numpy(io[f"case{c}_img2"])
        views = [make_view(0, img=img1[0:1]), make_view(1, img=img2[0:1])]
        preds = inference([(views[0], views[1]), (views[1], views[0])], model, verbose=False)
        out = PairPredictions.from_reference(preds.to_reference()).to_reference()
        assert rel_err(out["pred1"]["pts3d"], io[f"case{c}_pts3d"]) <= 1e-4
        assert rel_err(out["pred1"]["conf"], io[f"case{c}_conf"]) <= 1e-4
        assert rel_err(out["pred2"]["pts3d_in_other_view"], io[f"case{c}_pts3d_in_other_view"]) <= 1e-4
        assert rel_err(out["pred2"]["conf"], io[f"case{c}_conf2"]) <= 1e-4


def test_float16_storage_round_trip_and_alignment(tmp_path):
    synth = pytest.importorskip("dust3r_ns.synth")
    from dust3r_ns.metrics import pose_metrics
    from dust3r_ns.pairs import graph_edges

    p = _preds()
    big = p.conf1.clone()
    big[0, 0, 0] = 1e6                                         # beyond float16: clamped, stays finite
    p = PairPredictions(images=p.images, edges=p.edges, pts1=p.pts1, pts2=p.pts2, conf1=big, conf2=p.conf2)
    half = p.astype(torch.float16)
    assert half.dtype == torch.float16 and half.conf1.dtype == torch.float16
    assert float(half.conf1[0, 0, 0]) == 65504.0 and torch.allclose(half.pts2.float(), p.pts2, rtol=1e-3)
    again = PairPredictions.load(half.save(tmp_path / "half.npz"))
    assert again.dtype == torch.float16 and torch.equal(again.pts1, half.pts1)
    # aligning float16 predictions (stored and solved in float16 storage) lands where float32 does
    scene = synth.make_scene(0)
    c2w, K = synth.camera_path(scene, 5, "moderate", seed=0, H=24, W=32)
    ref = PairPredictions.from_reference(
        synth.oracle_pairs(synth.render_views(scene, c2w, K, 24, 32), graph_edges(5, "complete"),
                           noise=synth.NoiseConfig(), seed=0))
    a = global_align(ref, verbose=False)
    b = global_align(ref.astype(torch.float16), dtype="float16", verbose=False)
    ma, mb = pose_metrics(a.c2w, c2w), pose_metrics(b.c2w, c2w)
    assert abs(mb["ate_pct"] - ma["ate_pct"]) < 0.5 and mb["rra_max_deg"] < ma["rra_max_deg"] + 0.2
