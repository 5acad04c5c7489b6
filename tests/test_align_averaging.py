"""Tests of the fast mode's global pose-graph step (dust3r_ns.align.averaging): SO(3) log, exact recovery on
noise-free graphs, and less drift than spanning-tree chaining on long noisy chains (swin graphs)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dust3r_ns.align import global_align
from dust3r_ns.align.averaging import pose_graph_average
from dust3r_ns.align.data import parse_output
from dust3r_ns.align.init import mst_init
from dust3r_ns.align.problem import Constraints
from dust3r_ns.geometry import so3_exp, so3_log
from dust3r_ns.synth.toy import make_pairs_output
from dust3r_ns.metrics import pose_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def swin(n: int, k: int) -> list[tuple[int, int]]:
    return [e for i in range(n) for d in range(1, k + 1) if i + d < n for e in ((i, i + d), (i + d, i))]


def test_so3_log_inverts_exp_up_to_pi():
    g = torch.Generator().manual_seed(0)
    axis = torch.nn.functional.normalize(torch.randn(200, 3, generator=g, dtype=torch.float64), dim=-1)
    ang = torch.cat([torch.rand(190, generator=g, dtype=torch.float64) * (math.pi - 1e-3),
                     torch.tensor([0.0, 1e-9, 1e-6, 1e-3, 0.5, 2.0, 3.0, 3.14, math.pi - 1e-6, 1.0], dtype=torch.float64)])
    w = axis * ang[:, None]
    np.testing.assert_allclose(so3_exp(so3_log(so3_exp(w))).numpy(), so3_exp(w).numpy(), atol=1e-9)
    small = ang < 3.0
    np.testing.assert_allclose(so3_log(so3_exp(w[small])).numpy(), w[small].numpy(), atol=1e-9)


def test_noise_free_graph_recovered_exactly():
    n = 10
    out, gt = make_pairs_output(n=n, edges=swin(n, 2), seed=4)
    data = parse_output(out)
    st = mst_init(data, Constraints(), global_step=True)
    pm = pose_metrics(st.c2w.double().numpy(), gt["c2w"])
    assert pm["rra_max_deg"] < 1e-2 and pm["ate_pct"] < 1e-2


def test_rotation_averaging_starts_anywhere_reasonable():
    """From a start 10 deg off per camera, the averaged rotations still agree with the exact graph's."""
    n = 8
    out, gt = make_pairs_output(n=n, edges=swin(n, 2), seed=5)
    data = parse_output(out)
    e = data.edges.cpu().numpy()
    first = torch.tensor([int(np.nonzero(e[:, 0] == i)[0][0]) for i in range(n)])
    R0 = torch.tensor(gt["c2w"][:, :3, :3]) @ so3_exp(torch.randn(n, 3, dtype=torch.float64) * 0.1)
    lam, R, C = pose_graph_average(data, data.pts1[first], torch.ones(data.n_edges), R0)
    est = np.tile(np.eye(4), (n, 1, 1))
    est[:, :3, :3], est[:, :3, 3] = R.numpy(), C.numpy()
    pm = pose_metrics(est, gt["c2w"])
    assert pm["rra_max_deg"] < 1e-2 and pm["ate_pct"] < 1e-2
    assert torch.all(lam > 0)


def test_long_noisy_chain_drifts_less_than_tree_chaining():
    n = 24
    out, gt = make_pairs_output(n=n, edges=swin(n, 3), noise=0.03, seed=6)
    data = parse_output(out)
    tree = pose_metrics(mst_init(data, Constraints()).c2w.double().numpy(), gt["c2w"])
    avg = pose_metrics(mst_init(data, Constraints(), global_step=True).c2w.double().numpy(), gt["c2w"])
    assert avg["ate_pct"] < tree["ate_pct"] and avg["rra_mean_deg"] <= tree["rra_mean_deg"] * 1.05


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_mode_on_swin_graph_converges_sooner_with_global_step(seed):
    """Ray-cast scene, 20 views on an arc, swin-2 graph, oracle pairs with per-pair rigid/scale errors.
    (Before the solver's joint camera/edge step the tree start stopped at the 100-iteration cap, ATE 0.88% and 1.05%
    against 0.71% and 0.53% from the averaged start; with it both starts reach the same optimum, ATE 0.31%/0.27% at
    seed 0 and 0.28%/0.27% at seed 1, and the averaged start in fewer iterations: 37/47 and 41/49.)"""
    from dust3r_ns.bench.align import make_case

    out, gt = make_case("synth", 20, 24, 32, "swin-2", 0.01, seed)
    on = global_align(out, verbose=False)             # default: global step on
    off = global_align(out, verbose=False, global_step=False)
    ate_on, ate_off = (pose_metrics(r.c2w, gt["c2w"])["ate_pct"] for r in (on, off))
    assert ate_on < 0.5 and ate_on < 1.25 * ate_off
    assert on.meta["iterations"] <= off.meta["iterations"]
