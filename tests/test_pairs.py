"""Scene graphs on small N."""

import numpy as np
import pytest

from dust3r_ns.pairs import default_scene_graph, graph_edges, is_retrieval, make_pairs, retrieval_edges


def unordered(edges):
    return {tuple(sorted(e)) for e in edges}


def test_complete():
    e = graph_edges(4, "complete", symmetrize=False)
    assert e == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    s = graph_edges(4, "complete")
    assert len(s) == 12 and s[6:] == [(j, i) for i, j in e]


def test_swin_cyclic_and_noncyclic():
    assert unordered(graph_edges(6, "swin-1", False)) == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5)}
    assert unordered(graph_edges(6, "swin-1-noncyclic", False)) == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)}
    assert len(graph_edges(6, "swin-2", False)) == 12
    assert len(graph_edges(6, "swin-2-noncyclic", False)) == 9


def test_logwin():
    assert unordered(graph_edges(8, "logwin-3-noncyclic", False)) == {
        (i, i + d) for i in range(8) for d in (1, 2, 4) if i + d < 8}
    cyc = unordered(graph_edges(8, "logwin-3", False))
    assert (0, 7) in cyc and (4, 0) not in cyc and (0, 4) in cyc


def test_oneref():
    assert graph_edges(4, "oneref-2", False) == [(2, 0), (2, 1), (2, 3)]
    assert graph_edges(3, "oneref", False) == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="reference image 5"):
        graph_edges(3, "oneref-5")


def test_single_image_is_monocular():
    assert graph_edges(1, "complete") == [(0, 0), (0, 0)]
    v = [{"idx": 0}]
    assert make_pairs(v, "swin-3") == [(v[0], v[0]), (v[0], v[0])]


@pytest.mark.parametrize("bad", ["full", "swin-0", "complete-noncyclic", "swin-x", ""])
def test_bad_graph_names(bad):
    with pytest.raises(ValueError, match="scene graph"):
        graph_edges(5, bad)


def test_no_images_and_default():
    with pytest.raises(ValueError, match="no images"):
        graph_edges(0)
    assert default_scene_graph(5) == "complete"
    g = default_scene_graph(64)
    assert is_retrieval(g) and default_scene_graph(64, ordered=True) == g + "+swin-2"
    desc = np.random.default_rng(0).standard_normal((64, 16))
    desc /= np.linalg.norm(desc, axis=1, keepdims=True)
    assert len(retrieval_edges(desc, g)) < len(graph_edges(64, "complete")) / 4


def test_prefilter_seq_and_cyc():
    seq = graph_edges(6, "complete", False, prefilter="seq2")
    assert unordered(seq) == {(i, j) for i in range(6) for j in range(i + 1, 6) if j - i <= 2}
    cyc = unordered(graph_edges(6, "complete", False, prefilter="cyc1"))
    assert cyc == {(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 5)}
    v = [{"idx": i} for i in range(6)]
    pairs = make_pairs(v, "complete", True, prefilter="seq1")
    assert len(pairs) == 10 and all(abs(a["idx"] - b["idx"]) == 1 for a, b in pairs)
    for bad in ("seq0", "foo3", "seq"):
        with pytest.raises(ValueError, match="prefilter"):
            graph_edges(6, "complete", prefilter=bad)


def test_symmetrized_edges_cover_both_orders():
    for g in ("complete", "swin-2", "logwin-2", "oneref-1", "swin-3-noncyclic"):
        e = graph_edges(7, g)
        half = len(e) // 2
        assert len(set(e)) == len(e) and e[half:] == [(j, i) for i, j in e[:half]], g
        assert all(i != j for i, j in e), g
        assert {i for p in e for i in p} == set(range(7)), g  # every image takes part


def test_non_string_graph():
    with pytest.raises(ValueError, match="scene graph"):
        graph_edges(3, None)


def test_sequential_graph_names_declare_the_order():
    from dust3r_ns.pairs import declares_order

    for graph in ("swin", "swin-3", "swin-2-noncyclic", "logwin-4", "logwin-3-noncyclic", "retrieval-8+swin-2",
                  "retrieval-8+far+swin-2", default_scene_graph(64, ordered=True)):
        assert declares_order(graph), graph
    for graph in ("complete", "oneref-2", "retrieval", "retrieval-8+far", default_scene_graph(64)):
        assert not declares_order(graph), graph
    with pytest.raises(ValueError, match="unknown scene graph"):
        declares_order("ring-3")
