"""Outlier edges in global alignment (`dust3r_ns.align.robust`): structured wrong pairs are found and dropped."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from dust3r_ns.align import AlignConfig, global_align
from dust3r_ns.align.robust import (chain_rotations, consensus_rotations, keep_structure, reject_edges,
                                    rotation_residuals, sequence_weights, spanning_tree)
from dust3r_ns.bench.robust import angle_ratios, edge_rotation_errors, inject_gross_edges, render_orbit
from dust3r_ns.geometry import so3_exp
from dust3r_ns.metrics import pose_metrics
from dust3r_ns.pairs import graph_edges
from dust3r_ns.predictions import PairPredictions
from dust3r_ns import synth


def test_spanning_tree_is_maximum_weight_and_skips_self_edges():
    i = np.array([0, 1, 0, 2, 1])
    j = np.array([1, 2, 2, 2, 0])
    w = np.array([1.0, 5.0, 3.0, 9.0, 0.5])
    tree = spanning_tree(3, i, j, w)
    assert sorted(tree) == [1, 2]                       # (1,2) w5 and (0,2) w3; the self-edge (2,2) is skipped


def test_keep_structure_never_disconnects_or_orphans_an_image():
    edges = np.array([(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)])
    keep = keep_structure(3, edges, [0, 1, 2, 3, 4, 5])
    kept = edges[keep]
    assert set(kept[:, 0].tolist()) == {0, 1, 2}          # every image still a first view
    assert len(kept) < len(edges)                         # but redundant edges did go


def test_keep_structure_incremental_matches_checking_every_remainder():
    from dust3r_ns.align.robust import _ok

    rng = np.random.default_rng(3)
    for trial in range(60):
        N = int(rng.integers(2, 12))
        E = int(rng.integers(1, 4 * N))
        edges = rng.integers(0, N, size=(E, 2))
        if trial % 3 == 0:                                 # a ring (+ its reverse): bridges only after drops
            edges = np.concatenate([edges, [(k, (k + 1) % N) for k in range(N)], [((k + 1) % N, k) for k in range(N)]])
        order = rng.permutation(len(edges))[: int(rng.integers(0, len(edges) + 1))].tolist()
        order = order + order[: len(order) // 3]           # repeated indices are no-ops
        want = np.ones(len(edges), bool)                   # the definition: drop if the remainder passes `_ok`
        for k in order:
            was = want[k]
            want[k] = False
            if not _ok(N, edges[want]):
                want[k] = was
        assert np.array_equal(keep_structure(N, edges, order), want), trial


def _ring_rotations(n: int, step_deg: float) -> torch.Tensor:
    ax = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    return torch.stack([so3_exp(ax * np.radians(step_deg * k)) for k in range(n)])


def test_consensus_rotations_reject_structured_mutually_consistent_outliers():
    # an arc of 16 cameras, cyclic window graph: the wrap-around pairs (the long ones) all claim the two ends of
    # the arc are 5 deg apart (mutually consistent, both directions) and are a bit less confident
    n = 16
    Rg = _ring_rotations(n, 8.0)
    e = np.array(graph_edges(n, "swin-2", symmetrize=True))
    i, j = e[:, 0], e[:, 1]
    rng = np.random.default_rng(0)
    noise = so3_exp(torch.from_numpy(rng.normal(0, np.radians(1.0), (len(e), 3))))
    Rrel = Rg[i].transpose(1, 2) @ Rg[j] @ noise
    wrap = np.abs(i - j) > 2
    # the wrong world: a closed ring of 8 deg steps (cyclic index offset d = j - i mod n, in -n/2..n/2)
    d = (j - i + n // 2) % n - n // 2
    ax = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    fake = so3_exp(ax[None] * torch.from_numpy(np.radians(8.0 * d))[:, None])
    Rrel[wrap] = fake[wrap]
    w = torch.from_numpy(np.where(wrap, 0.8, 1.0))
    keep, rep = reject_edges(n, e, Rrel, torch.ones(len(e), dtype=torch.float64), w)
    assert not keep[wrap].any()                            # every wrong pair dropped
    assert keep[~wrap].mean() > 0.9                        # and hardly any right one
    R, r = consensus_rotations(n, i, j, Rrel, w, 15.0, 8)
    good = torch.rad2deg(rotation_residuals(R, i, j, Rrel))[torch.from_numpy(~wrap)]
    assert float(good.max()) < 5.0


def test_sequence_prior_keeps_a_closed_loop_from_folding():
    # 16 frames of a closed 360-deg loop (22.5 deg steps), pairs up to 2 apart around the loop; the network's wrong
    # pairs link each frame to the far side (8 apart), seen mirrored: they claim the two sides face alike, as
    # confident as the right pairs. The folded world (half the loop, twice) then has more support than the loop;
    # as frames of a video, the sequence's neighbours count more and the loop wins.
    n = 16
    yaw = lambda deg: so3_exp(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64) * math.radians(deg))  # noqa: E731
    Rg = torch.stack([yaw(22.5 * k) for k in range(n)])
    fold = torch.stack([yaw(22.5 * (k % 8)) for k in range(n)])
    und = [(a, b) for a in range(n) for b in range(a + 1, n) if min(b - a, n - b + a) <= 2 or b - a == 8]
    e = np.array(und + [(b, a) for a, b in und])
    i, j = e[:, 0], e[:, 1]
    wrong = np.abs(i - j) == 8
    noise = so3_exp(torch.from_numpy(np.random.default_rng(0).normal(0, math.radians(1.0), (len(e), 3))))
    true_rel = Rg[i].transpose(1, 2) @ Rg[j]
    Rrel = torch.where(torch.from_numpy(wrong)[:, None, None], fold[i].transpose(1, 2) @ fold[j], true_rel) @ noise
    w = torch.ones(len(e), dtype=torch.float64)
    seq = sequence_weights(e, 2, 5.0)
    assert torch.equal(seq, torch.from_numpy(np.where((np.abs(i - j) <= 2), 5.0, 1.0)))   # not the loop's closure
    closed = sequence_weights(e, 2, 5.0, n)                    # the graph links the ends: its seam pairs count too
    assert torch.equal(closed, torch.from_numpy(np.where(np.minimum(np.abs(i - j), n - np.abs(i - j)) <= 2, 5.0, 1.0)))
    assert not torch.equal(closed, seq)
    for weights, folded in ((w, True), (w * seq, False), (w * closed, False)):
        R, _ = consensus_rotations(n, i, j, Rrel, weights, 15.0, 32)
        err = torch.rad2deg(rotation_residuals(R, i, j, true_rel))
        assert (float(err.max()) > 90) == folded
        keep, _ = reject_edges(n, e, Rrel, torch.ones(len(e), dtype=torch.float64), weights)
        assert int(keep[wrong].sum()) == (int(wrong.sum()) if folded else 0)   # the fold keeps every wrong pair
    assert keep[~wrong].all()                                                  # the loop every right one


def test_a_graph_closes_the_sequence_when_it_pairs_its_ends_as_neighbours():
    from dust3r_ns.align.robust import closes_loop
    from dust3r_ns.pairs import graph_edges

    n = 20
    for graph, closed in (("swin-3", True), ("logwin-4", True), ("swin-2", True), ("swin-1", False),
                          ("swin-3-noncyclic", False), ("logwin-4-noncyclic", False), ("complete", False)):
        assert closes_loop(np.array(graph_edges(n, graph)), n, 2) == closed, graph
    open_path = [(a, a + d) for a in range(n) for d in (1, 2) if a + d < n] + [(0, n - 1)]   # one far link to the end
    assert not closes_loop(np.array(open_path), n, 2)
    assert closes_loop(np.array(open_path + [(n - 2, 0), (n - 1, 1)]), n, 2)
    assert not closes_loop(np.array(graph_edges(5, "swin-3")), 5, 2)                   # too short to tell a seam
    e = np.array(graph_edges(n, "swin-2-noncyclic"))
    assert torch.equal(sequence_weights(e, 2, 3.0, n), sequence_weights(e, 2, 3.0))      # open: plain index gaps


def test_alignment_reads_the_sequence_order_from_the_predictions(orbit_case, monkeypatch):
    import dust3r_ns.align.api as api

    seen = []
    real = api.detect_outliers
    monkeypatch.setattr(api, "detect_outliers", lambda data, cfg, ordered=False: seen.append(ordered)
                        or real(data, cfg, ordered))
    preds, _ = orbit_case
    for ordered in (False, True):
        p = PairPredictions(images=preds.images, edges=preds.edges, pts1=preds.pts1, pts2=preds.pts2,
                            conf1=preds.conf1, conf2=preds.conf2, ordered=ordered)
        assert global_align(p, verbose=False, niter=5).meta["ordered"] == int(ordered)   # recorded with the result
    assert seen == [False, True]


def test_chain_rotations_follow_the_tree():
    Rg = _ring_rotations(4, 20.0)
    i, j = np.array([0, 1, 2]), np.array([1, 2, 3])
    R = chain_rotations(4, i, j, Rg[i].transpose(1, 2) @ Rg[j], [0, 1, 2])
    assert torch.allclose(R, Rg[0:1].transpose(1, 2) @ Rg, atol=1e-12)


@pytest.fixture(scope="module")
def orbit_case():
    n, H, W = 12, 24, 32
    views, c2w, _ = render_orbit(n, H, W, "wide", 0)
    edges = graph_edges(n, "logwin-3", symmetrize=True)
    out = synth.oracle_pairs(views, edges, seed=0)
    preds = PairPredictions.from_reference(out, n_images=n)
    gt = dict(c2w=c2w, K=np.stack([v["K"] for v in views]), depth=np.stack([v["depth"] for v in views]),
              valid=np.stack([v["valid"] for v in views]))
    return preds, gt


def test_injected_structured_gross_edges_are_gross_and_paired(orbit_case):
    preds, gt = orbit_case
    bad, mask = inject_gross_edges(preds, gt, 0.2, seed=0)
    err = edge_rotation_errors(bad, gt)
    assert mask.sum() == 2 * round(0.2 * preds.n_edges / 2)          # both directions of 20% of the pairs
    assert (err[mask] > 45).all() and (err[~mask] < 10).all()
    pairs = {(int(a), int(b)) for a, b in preds.edges[mask]}
    assert all((b, a) in pairs for a, b in pairs)


def test_alignment_drops_structured_gross_edges_and_keeps_the_clean_accuracy(orbit_case):
    preds, gt = orbit_case
    bad, mask = inject_gross_edges(preds, gt, 0.2, seed=0)
    clean = global_align(preds, verbose=False)
    assert clean.meta["edges_rejected"] <= 0.05 * preds.n_edges
    rob = global_align(bad, verbose=False)
    plain = global_align(bad, AlignConfig().replace(robust=False), verbose=False)
    ate = {k: pose_metrics(r.c2w, gt["c2w"])["ate_pct"] for k, r in (("clean", clean), ("rob", rob), ("plain", plain))}
    rejected = np.array([int(k) for k in rob.meta["rejected_edges"].split(",") if k])
    assert rob.meta["edges_rejected"] == len(rejected)
    assert mask[rejected].sum() == mask.sum()                        # every gross edge rejected
    assert ate["rob"] <= 1.5 * ate["clean"]
    assert ate["plain"] > 3 * ate["clean"]                           # without it the wrong pairs drag the solve
    assert pose_metrics(rob.c2w, gt["c2w"])["rra_max_deg"] < 5.0


def test_drop_and_restore_edges_round_trip():
    from types import SimpleNamespace
    from dust3r_ns.align.robust import drop_edges, restore_edges
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.rand(5, 2, 3, generator=g), torch.rand(5, 2, 3, generator=g)
    d = SimpleNamespace(w1=w1, w2=w2)
    c = SimpleNamespace(w1=w1[:, ::2].clone(), w2=w2)          # a coarse copy sharing one stack
    before = [t.clone() for t in (d.w1, d.w2, c.w1)]
    rej = np.array([False, True, False, True, True])
    saved = drop_edges([d, c], rej)
    assert len(saved) == 3                                      # the shared stack is zeroed (and saved) once
    assert all(float(t[torch.from_numpy(rej)].abs().sum()) == 0 for t in (d.w1, d.w2, c.w1))
    back = np.array([False, True, False, False, True])
    restore_edges(saved, back)
    for t, b in zip((d.w1, d.w2, c.w1), before):
        assert torch.equal(t[torch.from_numpy(~rej | back)], b[torch.from_numpy(~rej | back)])
        assert float(t[3].abs().sum()) == 0                     # edge 3 stays dropped


def test_readmission_restores_good_long_edges_that_a_bent_consensus_rejected():
    # an arc of 24 cameras (5 deg steps), window graph of 2 plus long links (10 steps apart); the short pairs
    # over-rotate systematically by 30% (as the bundled model's do) and the long links are less confident, so the
    # consensus follows the chained short pairs, bends, and the (accurate) long links disagree with it by more
    # than the rejection threshold; four long links are truly wrong (they claim a near-zero rotation)
    from dust3r_ns.align.averaging import average_rotations
    from dust3r_ns.align.robust import readmit_edges
    from dust3r_ns.metrics import rotation_angle_deg
    n, step = 24, 5.0
    Rg = _ring_rotations(n, step)
    pairs = [(a, a + d) for a in range(n) for d in (1, 2) if a + d < n] + [(a, a + 10) for a in range(0, n - 10, 2)]
    e = np.array(pairs + [(b, a) for a, b in pairs])
    i, j = e[:, 0], e[:, 1]
    ax = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    d = torch.from_numpy((j - i).astype(np.float64))
    long = np.abs(j - i) == 10
    bias = torch.where(torch.from_numpy(long), 1.0, 1.3)
    Rrel = so3_exp(ax[None] * torch.deg2rad(step * d * bias)[:, None])
    wrong = long & np.isin(np.minimum(i, j), [0, 6, 8, 12])
    Rrel[torch.from_numpy(wrong)] = so3_exp(ax[None] * torch.deg2rad(torch.sign(d) * 2.0)[:, None])[
        torch.from_numpy(wrong)]
    w = torch.from_numpy(np.where(long, 0.3, 1.0))     # prior (consensus) weights
    keep, _ = reject_edges(n, e, Rrel, torch.ones(len(e), dtype=torch.float64), w)
    rejected = ~keep
    assert rejected[wrong].all()
    assert rejected[long & ~wrong].any()                 # the over-eager part: good long links went too

    def solve(mask):                  # rotation averaging over the kept edges, all weighted alike (the "solve")
        ti, tj = torch.as_tensor(i[mask]), torch.as_tensor(j[mask])
        R0 = chain_rotations(n, i[mask], j[mask], Rrel[torch.from_numpy(mask)], spanning_tree(n, i[mask], j[mask],
                                                                                           np.ones(mask.sum())))
        R = average_rotations(ti, tj, Rrel[torch.from_numpy(mask)], torch.ones(len(ti), dtype=torch.float64), R0, 0)
        c2w = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
        c2w[:, :3, :3] = R
        return c2w

    def end_error(c2w):                                  # drift: rotation error between the arc's two ends
        rel = c2w[0, :3, :3].T @ c2w[-1, :3, :3]
        return float(rotation_angle_deg((rel.T @ Rg[0].T @ Rg[-1])[None].numpy())[0])

    c2w = solve(keep)
    back, res = readmit_edges(c2w, e, Rrel, w, rejected, rejected, readmit_deg=20.0, factor=4.0)
    assert not back[wrong].any()                         # the wrong links stay out
    assert back[rejected & ~wrong].all()                 # every good rejected link comes back
    final = keep | back
    assert end_error(solve(final)) < 0.8 * end_error(c2w)   # and the long links hold the arc straighter


def test_alignment_readmits_good_edges_that_an_over_eager_consensus_rejected(orbit_case, monkeypatch):
    # the consensus is made over-eager on purpose: besides its own rejections it drops every good longest-offset
    # pair; the re-admission after the solve must bring exactly those back and keep the gross ones out
    import dust3r_ns.align.api as api
    from dust3r_ns.align import robust

    preds, gt = orbit_case
    bad, mask = inject_gross_edges(preds, gt, 0.2, seed=0)
    off = np.abs(bad.edges[:, 0] - bad.edges[:, 1])
    extra = (off == off[~mask].max()) & ~mask
    assert extra.sum() >= 2

    def eager(data, cfg, ordered=False):
        rej, rep = robust.detect_outliers(data, cfg, ordered)
        return rej | extra, rep

    monkeypatch.setattr(api, "detect_outliers", eager)
    rec = global_align(bad, verbose=False)
    rejected = np.zeros(len(mask), bool)
    rejected[[int(k) for k in rec.meta["rejected_edges"].split(",") if k]] = True
    assert rec.meta["edges_readmitted"] >= extra.sum()
    assert not rejected[extra].any()                                 # the good ones are back
    assert rejected[mask].all()                                      # the gross ones stay out
    stay = global_align(bad, AlignConfig().replace(robust=dataclasses.replace(AlignConfig().robust, readmit=False)),
                        verbose=False)
    assert stay.meta["edges_readmitted"] == 0 and stay.meta["edges_rejected"] >= mask.sum() + extra.sum()


def test_angle_ratios_read_a_systematic_over_rotation_per_bin():
    true = np.array([2.0, 4.0, 7.0, 15.0, 30.0, 60.0, 90.0])
    pred = true * np.array([1.8, 1.8, 1.3, 1.2, 1.1, 1.0, 0.1])
    err = np.abs(pred - true)
    out = angle_ratios(pred, true, err, gross_deg=45.0)
    assert out["0-5"] == pytest.approx(1.8) and out["5-10"] == pytest.approx(1.3)
    assert out["20-40"] == pytest.approx(1.1) and out["40-180"] == pytest.approx(1.0)   # the gross edge is left out


def test_a_readmitted_edge_that_the_re_solved_poses_cannot_explain_goes_out_again(orbit_case, monkeypatch):
    # one ordered edge between neighbours is made wrong by a moderate 18 deg: above the rejection threshold (10 deg),
    # below the re-admission one (30 deg). The consensus is forced to reject it together with a good edge; after the
    # solve both are re-admitted on trial, and only the good one stays within trial_deg (12 deg here) of the
    # re-solved poses
    import dust3r_ns.align.api as api
    from dust3r_ns.align import robust

    preds, gt = orbit_case
    E = preds.edges
    fwd = [k for k, (a, b) in enumerate(E) if b == a + 1]
    wrong, good = fwd[3], fwd[7]
    pts2 = preds.pts2.clone()
    p = pts2[wrong].double().reshape(-1, 3)
    c = p.mean(0)
    pts2[wrong] = ((p - c) @ so3_exp(torch.tensor([0.0, math.radians(18.0), 0.0], dtype=torch.float64)).T + c
                   ).reshape(pts2[wrong].shape).to(pts2.dtype)
    bad = PairPredictions(images=preds.images, edges=E, pts1=preds.pts1, pts2=pts2, conf1=preds.conf1,
                          conf2=preds.conf2)
    forced = np.zeros(len(E), bool)
    forced[[wrong, good]] = True

    def eager(data, cfg, ordered=False):
        rej, rep = robust.detect_outliers(data, cfg, ordered)
        return rej | forced, rep

    calls = []
    real = api.readmit_edges

    def spy(*args):
        out = real(*args)
        calls.append((args[5].copy(), out[0].copy(), out[1].copy()))   # (candidates, re-admitted, residuals)
        return out

    monkeypatch.setattr(api, "detect_outliers", eager)
    monkeypatch.setattr(api, "readmit_edges", spy)
    rob = dataclasses.replace(AlignConfig().robust, readmit_deg=30.0, trial_deg=12.0)
    rec = global_align(bad, AlignConfig().replace(robust=rob), verbose=False)
    rejected = np.zeros(len(E), bool)
    rejected[[int(k) for k in rec.meta["rejected_edges"].split(",") if k]] = True
    assert len(calls) == 2
    (_, first, res1), (trial, kept, res2) = calls
    assert first[wrong] and first[good] and 10.0 < res1[wrong] < 30.0         # both came back on trial
    assert (trial == first).all() and kept[good] and not kept[wrong]
    assert res2[wrong] > 12.0 and res2[good] < 10.0
    assert rejected[wrong] and not rejected[good]                              # the wrong one went out again
    assert rec.meta["edges_readmitted"] == int(kept.sum())
