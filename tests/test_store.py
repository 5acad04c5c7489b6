"""The pair store on disk: round trip, atomic writes, validation on open, the engine writing into it, the aligner
streaming from it (against the in-memory path) and the memory estimate's refusal."""

import numpy as np
import pytest
import torch

from dust3r_ns.align import AlignError, estimate_memory, global_align
from dust3r_ns.images import make_view
from dust3r_ns.inference import inference_graph
from dust3r_ns.metrics import pose_metrics
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.predictions import (DiskMaps, PairPredictions, PairStoreWriter, PredictionsError, open_store,
                                   to_storage)
from dust3r_ns.reconstruct import predictions_input
from dust3r_ns.synth.toy import make_pairs_output
from test_predictions import _preds

TINY = dict(enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2)


def _write(preds: PairPredictions, path, dtype=torch.float16, chunk=2):
    H, W = preds.images[0].shape
    with PairStoreWriter(path, preds.images, preds.edges, H, W, dtype) as w:
        for a in range(0, preds.n_edges, chunk):
            sl = slice(a, a + chunk)
            w.write(a, dict(pts1=preds.pts1[sl], pts2=preds.pts2[sl], conf1=preds.conf1[sl], conf2=preds.conf2[sl]))
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_store_round_trip(tmp_path, dtype):
    preds = _preds(edges=((0, 1), (1, 0), (1, 2), (2, 1), (0, 2)))
    path = _write(preds, tmp_path / "pairs", dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]           # no temporary folder left
    back = PairPredictions.load(path)                                         # a folder opens as a store
    assert back.on_disk and back.uniform and back.dtype == dtype and back.names == preds.names
    assert np.array_equal(back.edges, preds.edges) and all(np.array_equal(a.rgb, b.rgb)
                                                           for a, b in zip(back.images, preds.images))
    assert not back.ordered
    # float32: bit-exact; float16: exactly the in-memory float16 conversion (to_storage; ~3 significant digits)
    ref = preds.astype(dtype)
    for key in ("pts1", "pts2", "conf1", "conf2"):
        m, r = getattr(back, key), getattr(ref, key)
        assert torch.equal(m[:], r)
        assert torch.equal(m[3], r[3]) and torch.equal(m[1:4], r[1:4])
        idx = torch.tensor([4, 0, 0, 2, 3])                                   # unsorted, repeated, with runs
        assert torch.equal(m[idx], r[idx])
    if dtype == torch.float16:
        assert (back.pts1[:].float() - preds.pts1).abs().max() <= 1e-3 * preds.pts1.abs().max()
    assert back.mean_confidence() == pytest.approx(ref.mean_confidence(), rel=1e-6)
    back.check_values()
    # saving a store's predictions as one .npz reads them into it
    again = PairPredictions.load(back.save(tmp_path / "pairs.npz"))
    assert torch.equal(again.conf2, ref.conf2)
    assert predictions_input([path]) == path


def test_store_write_is_atomic(tmp_path):
    preds = _preds()
    path = tmp_path / "pairs"
    with pytest.raises(RuntimeError, match="boom"):
        with PairStoreWriter(path, preds.images, preds.edges, 6, 8) as w:
            w.write(0, dict(pts1=preds.pts1[:1], pts2=preds.pts2[:1], conf1=preds.conf1[:1], conf2=preds.conf2[:1]))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []                                     # nothing left behind
    _write(preds, path)
    old = open_store(path).pts1[:]
    # an incomplete store is refused and the old one stays as it was
    with pytest.raises(PredictionsError, match="incomplete, 3 of 4 edges"):
        with PairStoreWriter(path, preds.images, preds.edges, 6, 8) as w:
            w.write(0, dict(pts1=preds.pts1[:1], pts2=preds.pts2[:1], conf1=preds.conf1[:1], conf2=preds.conf2[:1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs"]
    assert torch.equal(open_store(path).pts1[:], old)
    # bad values are refused when written
    bad = preds.conf1[:2].clone()
    bad[1, 0, 0] = float("nan")
    with pytest.raises(PredictionsError, match="conf1 of edges 0..1 holds NaN"):
        with PairStoreWriter(tmp_path / "bad", preds.images, preds.edges, 6, 8) as w:
            w.write(0, dict(pts1=preds.pts1[:2], pts2=preds.pts2[:2], conf1=bad, conf2=preds.conf2[:2]))
    assert not (tmp_path / "bad").exists()
    # one image shape per store
    mixed = _preds(((6, 8), (8, 6), (6, 8)))
    with pytest.raises(PredictionsError, match="one image shape"):
        PairStoreWriter(tmp_path / "mixed", mixed.images, mixed.edges, 6, 8).__enter__()
    assert not (tmp_path / "mixed").exists()


def test_store_validated_on_open(tmp_path):
    path = _write(_preds(), tmp_path / "pairs")
    f = path / "pts2.npy"
    data = f.read_bytes()
    f.write_bytes(data[:-10])                                                  # truncated
    with pytest.raises(PredictionsError, match=r"pts2\.npy: .*truncated or foreign"):
        open_store(path)
    f.write_bytes(b"not an array at all" * 10)                                 # foreign
    with pytest.raises(PredictionsError, match=r"pts2\.npy: not a readable pair-store array"):
        open_store(path)
    f.write_bytes(data)
    open_store(path)
    (path / "meta.npz").write_bytes(b"PK garbage")
    with pytest.raises(PredictionsError, match=r"meta\.npz: not a readable pair store"):
        PairPredictions.load(path)
    with pytest.raises(PredictionsError, match="no such pair store"):
        open_store(tmp_path)
    assert isinstance(_preds().pts1, torch.Tensor) and not isinstance(_preds().pts1, DiskMaps)


def test_engine_writes_the_store_as_in_memory(tmp_path):
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(landscape_only=False, **TINY).eval()
    g = torch.Generator().manual_seed(0)
    views = [make_view(i, img=torch.rand(1, 3, 32, 48, generator=g) * 2 - 1) for i in range(6)]
    mem = inference_graph(views, model, "retrieval-2", verbose=False, store_dtype=torch.float16, batch_size=3)
    disk = inference_graph(views, model, "retrieval-2", verbose=False, store_dtype=torch.float16, batch_size=3,
                           store_path=tmp_path / "pairs")
    assert disk.on_disk and np.array_equal(disk.edges, mem.edges)
    for key in ("pts1", "pts2", "conf1", "conf2"):
        assert torch.equal(getattr(disk, key)[:], getattr(mem, key))


def _toy_store(tmp_path, n=6, hw=(24, 32)):
    out, gt = make_pairs_output(n=n, noise=0.01, seed=3, shapes=[hw] * n)
    preds = PairPredictions.from_reference(out).astype(torch.float16)
    return preds, open_store(_write(preds, tmp_path / "pairs", chunk=7)), gt


def test_aligner_streams_the_store_as_in_memory(tmp_path):
    # 24x32: one resolution (no coarse grid, no polish): the same float32 arithmetic on the same float16 values,
    # read in other chunks, gives the in-memory result exactly
    preds, stored, _ = _toy_store(tmp_path / "a")
    a, b = global_align(preds, verbose=False), global_align(stored, verbose=False)
    assert np.array_equal(a.c2w, b.c2w) and np.array_equal(a.K, b.K)
    assert all(np.array_equal(x, y) for x, y in zip(a.depths + a.confs, b.depths + b.confs))
    assert a.meta["edges_rejected"] == b.meta["edges_rejected"] and a.meta["iterations"] == b.meta["iterations"]
    with pytest.raises(AlignError, match="mode='fast' only"):
        global_align(stored, mode="baseline", verbose=False)


def test_aligner_on_the_store_skips_only_the_polish(tmp_path):
    # 96x128: coarse grid (stride 2) streamed from the store, full-resolution depth passes streamed; the in-memory
    # path adds 5 full-resolution polish iterations, which the store path leaves out
    preds, stored, gt = _toy_store(tmp_path, n=6, hw=(96, 128))
    a, b = global_align(preds, verbose=False), global_align(stored, verbose=False)
    assert a.meta["polish_iterations"] == 5 and b.meta["polish_iterations"] == 0
    scale = np.abs(a.c2w[:, :3, 3]).max()
    assert np.abs(a.c2w - b.c2w).max() <= 5e-3 * scale                     # measured: 1.1e-3 x scale
    assert np.allclose(a.K[:, 0, 0], b.K[:, 0, 0], rtol=5e-3)               # measured: 1.5e-3
    assert max(np.abs(x / y - 1).max() for x, y in zip(a.depths, b.depths)) <= 1e-2   # measured: 3.5e-3
    assert b.meta["loss"] <= a.meta["loss"] * (1 + 1e-3)                    # measured: +2.7e-4
    pa, pb = pose_metrics(a.c2w, gt["c2w"]), pose_metrics(b.c2w, gt["c2w"])
    assert pb["rra_max_deg"] <= pa["rra_max_deg"] + 0.05 and pb["ate_pct"] <= pa["ate_pct"] + 0.1


def test_memory_estimate_and_refusal_follow_the_store(tmp_path):
    preds, stored, _ = _toy_store(tmp_path, n=5)
    N, E, (H, W) = preds.n_images, preds.n_edges, preds.images[0].shape
    ram, disk = estimate_memory(N, E, H, W, "fast", 4), estimate_memory(N, E, H, W, "fast", 4, on_disk=True)
    assert disk < ram
    # N=1000 with ~13 ordered pairs per image at 224x224: the in-memory stacks alone exceed 8 GiB, the streamed
    # path's estimate does not
    assert estimate_memory(1000, 13000, 224, 224, "fast", 2) > 8 * 2**30
    assert estimate_memory(1000, 13000, 224, 224, "fast", 2, on_disk=True) < 8 * 2**30
    budget = (ram + disk) // 2
    with pytest.raises(AlignError, match=r"needs ~.* GiB.*a pair store on disk \(--store disk\)"):
        global_align(preds, memory_limit_bytes=budget, verbose=False)
    rec = global_align(stored, memory_limit_bytes=budget, verbose=False)
    assert len(rec.depths) == N
    with pytest.raises(AlignError, match="swin|fewer images"):
        global_align(stored, memory_limit_bytes=disk // 2, verbose=False)
    assert to_storage({"conf": torch.tensor([1e6])}, torch.float16)["conf"].item() == 65504


def test_stored_weights_drop_and_restore(tmp_path):
    # robust.drop_edges / restore_edges on a streamed PairData: dropped edges read as zero weights, re-admitted
    # ones read their stored weights again; anything else cannot be written into the store's weights
    from dust3r_ns.align.data import pair_data
    from dust3r_ns.align.robust import drop_edges, restore_edges

    _, stored, _ = _toy_store(tmp_path, n=5)
    data = pair_data(stored)
    before = data.weights(1).clone()
    rejected = np.zeros(data.n_edges, bool)
    rejected[[1, 4, 7]] = True
    saved = drop_edges([data], rejected)
    after = data.weights(1)
    assert (after[torch.as_tensor(rejected)] == 0).all() and torch.equal(after[~torch.as_tensor(rejected)],
                                                                          before[~torch.as_tensor(rejected)])
    back = np.zeros(data.n_edges, bool)
    back[[4, 7]] = True
    restore_edges(saved, back)
    w = data.weights(1)
    assert torch.equal(w[[4, 7]], before[[4, 7]]) and (w[1] == 0).all()
    with pytest.raises(ValueError, match="stored values"):
        data.w1[torch.tensor([1])] = before[[1]] + 1
    assert (data.weights(1)[1] == 0).all()


def test_store_refuses_a_disk_without_room(tmp_path, monkeypatch):
    """A store that cannot fit is refused before any pair is decoded, with its size and the disk's free space; a disk
    that fills while the edges come (another process) gives the same one-line error and leaves no folder."""
    import errno
    import shutil

    from dust3r_ns import predictions as P

    preds = _preds()
    w = PairStoreWriter(tmp_path / "pairs", preds.images, preds.edges, 6, 8)
    assert w.nbytes() == 4 * 6 * 8 * 8 * 2                         # 4 edges x 48 px x (3 + 3 + 1 + 1) x float16
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: usage._replace(free=w.nbytes() - 1))
    with pytest.raises(PredictionsError, match=r"needs 0.00 GiB and its disk has 0.00 GiB free; free some space"):
        w.__enter__()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(P.shutil, "disk_usage", lambda p: usage._replace(free=10 ** 9))

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(PredictionsError, match="--store float16"):
        with PairStoreWriter(tmp_path / "pairs", preds.images, preds.edges, 6, 8) as w:
            monkeypatch.setattr(P.os, "pwrite", full)
            w.write(0, dict(pts1=preds.pts1[:1], pts2=preds.pts2[:1], conf1=preds.conf1[:1], conf2=preds.conf2[:1]))
    assert list(tmp_path.iterdir()) == []


def test_store_never_replaces_a_folder_that_is_not_a_store(tmp_path):
    preds = _preds()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.png").write_bytes(b"x")
    with pytest.raises(PredictionsError, match="is not a pair store"):
        _write(preds, other)
    assert [p.name for p in other.iterdir()] == ["a.png"]
    (tmp_path / "empty").mkdir()
    _write(preds, tmp_path / "empty")                    # an empty folder, or an older store, is fine
    _write(preds, tmp_path / "empty")
    assert (tmp_path / "empty" / "meta.npz").is_file()
