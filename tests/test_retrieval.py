"""Retrieval pair graphs: content descriptors from the encoder, k nearest images + spanning tree, decode only those."""

import numpy as np
import pytest
import torch

from dust3r_ns.images import make_view
from dust3r_ns.inference import encode_images, inference, inference_graph
from dust3r_ns.model.network import AsymmetricCroCo3DStereo
from dust3r_ns.pairs import graph_edges, make_pairs, retrieval_edges
from dust3r_ns.retrieval import looks_sequential, vlad_descriptors

TINY = dict(enc_embed_dim=32, enc_depth=1, enc_num_heads=2, dec_embed_dim=32, dec_depth=1, dec_num_heads=2)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_edges_neighbours_tree_and_window():
    rng = np.random.default_rng(0)
    # three tight clusters of 5 images far apart: kNN alone would leave them disconnected
    centres = rng.standard_normal((3, 8)) * 10
    desc = _unit(np.concatenate([c + 0.1 * rng.standard_normal((5, 8)) for c in centres]))
    und = {tuple(e) for e in retrieval_edges(desc, "retrieval-2", symmetrize=False)}
    S = desc @ desc.T
    np.fill_diagonal(S, -np.inf)
    for i in range(15):                                   # each image's two best matches are paired with it
        for j in np.argsort(-S[i])[:2]:
            assert (min(i, j), max(i, j)) in und
    parent = list(range(15))                              # connected (union-find over the edges)

    def find(a):
        while parent[a] != a:
            a = parent[a]
        return a
    for i, j in und:
        parent[find(i)] = find(j)
    assert len({find(i) for i in range(15)}) == 1
    assert len(und) <= 15 * 2 + 14                        # O(N k): kNN + spanning tree
    win = {tuple(e) for e in retrieval_edges(desc, "retrieval-2+swin-1", symmetrize=False)}
    assert und | {(i, i + 1) for i in range(14)} == win
    sym = retrieval_edges(desc, "retrieval-2")
    assert sym[len(sym) // 2:] == [(j, i) for i, j in sym[: len(sym) // 2]]


def test_far_links_sit_at_doubling_similarity_ranks():
    # images on a circle: similarity rank grows with the distance along it
    n, k = 40, 3
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    desc = _unit(np.stack([np.cos(a), np.sin(a), 0.2 * np.ones(n)], 1))
    base = {tuple(e) for e in retrieval_edges(desc, f"retrieval-{k}", symmetrize=False)}
    far = {tuple(e) for e in retrieval_edges(desc, f"retrieval-{k}+far-2", symmetrize=False)}
    S = desc @ desc.T
    np.fill_diagonal(S, -np.inf)
    want = set()
    for i in range(n):
        order = np.argsort(-S[i], kind="stable")
        for r in (2 * k, 4 * k):                           # 1-based ranks 2K and 4K
            j = int(order[r - 1])
            want.add((min(i, j), max(i, j)))
    assert base < far and far == base | want
    assert max(abs(i - j) % n for i, j in far - base) > max(abs(i - j) % n for i, j in base if abs(i - j) < n / 2)
    assert len(far) <= n * (k + 2) + n - 1                 # O(N (K + F))
    # '+far': every doubling rank that exists (6, 12, 24 of 39 here)
    assert retrieval_edges(desc, f"retrieval-{k}+far", symmetrize=False) == \
        retrieval_edges(desc, f"retrieval-{k}+far-3", symmetrize=False) == \
        retrieval_edges(desc, f"retrieval-{k}+far-70", symmetrize=False) != far
    # ranks beyond the image count are skipped, not wrapped
    assert retrieval_edges(desc[:8], "retrieval-3+far-3", symmetrize=False) == \
        retrieval_edges(desc[:8], "retrieval-3+far-1", symmetrize=False)


def test_graph_names_and_errors():
    desc = _unit(np.random.default_rng(1).standard_normal((6, 4)))
    assert retrieval_edges(desc[:1], "retrieval-3") == [(0, 0), (0, 0)]
    with pytest.raises(ValueError, match="K, F and W must be >= 1"):
        retrieval_edges(desc, "retrieval-0")
    with pytest.raises(ValueError, match="K, F and W must be >= 1"):
        retrieval_edges(desc, "retrieval-2+far-0")
    with pytest.raises(ValueError, match="unknown scene graph"):
        retrieval_edges(desc, "retrieval-2+swin")
    with pytest.raises(ValueError, match="needs the images' descriptors"):
        graph_edges(6, "retrieval-3")


def test_vlad_ranks_same_content_higher():
    g = torch.Generator().manual_seed(0)
    scenes = [torch.randn(196, 64, generator=g) for _ in range(4)]
    # two views per scene: the same token population, shuffled and perturbed
    tokens = [s[torch.randperm(196, generator=g)] + 0.3 * torch.randn(196, 64, generator=g) for s in scenes for _ in range(2)]
    d = vlad_descriptors(tokens, k=8, dim=16)
    assert np.allclose(np.linalg.norm(d, axis=1), 1) and np.array_equal(d, vlad_descriptors(tokens, k=8, dim=16))
    S = d @ d.T
    np.fill_diagonal(S, -np.inf)
    assert all(int(np.argmax(S[i])) == i ^ 1 for i in range(8))


def test_layout_tells_mirrored_views_apart():
    """Two views of one room from opposite sides see the same things mirrored: the global VLAD scores them as
    duplicates, the 2 x 2 layout blocks rank the nearby view (same layout, perturbed tokens) first."""
    g = torch.Generator().manual_seed(0)
    side = 14
    pos = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    grid = torch.randn(side, side, 64, generator=g)       # [14, 14, 64]: one image's tokens in place
    grid[:, : side // 2] += 2.0 * torch.randn(64, generator=g)   # left and right halves differ in content
    base = grid.reshape(-1, 64)
    near = base + 0.3 * torch.randn(base.shape, generator=g)
    mirrored = grid.flip(1).reshape(-1, 64)               # the same tokens, left and right swapped
    others = [torch.randn(side * side, 64, generator=g) for _ in range(3)]
    tokens = [base, near, mirrored] + others
    flat = vlad_descriptors(tokens, k=8, dim=16)
    assert flat[0] @ flat[2] > flat[0] @ flat[1] and np.isclose(flat[0] @ flat[2], 1)   # blind to the layout
    d = vlad_descriptors(tokens, k=8, dim=16, positions=[pos] * len(tokens))
    assert d.shape == (6, 5 * 8 * 16) and np.allclose(np.linalg.norm(d, axis=1), 1)
    assert d[0] @ d[1] > d[0] @ d[2] + 0.1
    assert np.allclose(d[:, : 8 * 16] * np.sqrt(5), flat)   # the first block is the global VLAD
    assert np.array_equal(vlad_descriptors(tokens, k=8, dim=16, positions=[pos] * 6, grid=1), flat)
    with pytest.raises(ValueError, match="position arrays"):
        vlad_descriptors(tokens, positions=[pos])


def test_inference_graph_decodes_only_the_chosen_pairs():
    torch.manual_seed(0)
    model = AsymmetricCroCo3DStereo(landscape_only=False, **TINY).eval()
    g = torch.Generator().manual_seed(0)
    views = [make_view(i, img=torch.rand(1, 3, 32, 48, generator=g) * 2 - 1) for i in range(7)]
    preds = inference_graph(views, model, "retrieval-2", verbose=False)
    feats = encode_images(model, views, "cpu")
    desc = vlad_descriptors([feats[k][0] for k in range(7)], positions=[feats[k][1] for k in range(7)])
    want = retrieval_edges(desc, "retrieval-2")
    assert preds.edges.tolist() == [list(e) for e in want] and preds.n_edges < 7 * 6
    # the same pairs through the plain engine give the same maps
    ref = inference([(views[i], views[j]) for i, j in want], model, verbose=False)
    assert torch.equal(preds.pts2, ref.pts2) and torch.equal(preds.conf1, ref.conf1)
    # named graphs are the make_pairs graphs
    a = inference_graph(views, model, "swin-2", verbose=False)
    b = inference(make_pairs(views, "swin-2"), model, verbose=False)
    assert np.array_equal(a.edges, b.edges) and torch.equal(a.pts1, b.pts1)


def test_cache_keys_name_the_recipe_of_retrieval_graphs(monkeypatch):
    """Pairs chosen by content change with the recipe (descriptors, far-link floor): reconstruction cache keys of
    retrieval and default graphs change with it, those of fixed graphs do not."""
    from dust3r_ns import retrieval
    from dust3r_ns.align import AlignConfig, robust
    from dust3r_ns.cache import reconstruction_options
    from dust3r_ns.pipeline import NetworkConfig, PairsConfig, PointsConfig

    def key(graph):
        return reconstruction_options(NetworkConfig(), PairsConfig(scene_graph=graph), AlignConfig(), PointsConfig())

    for name, value in (("RECIPE", "another-recipe"), ("SEQUENCE_GAP", 0.2)):   # pairs, and the order they read
        before = {g: key(g) for g in (None, "retrieval-8+far", "swin-3", "complete")}
        monkeypatch.setattr(retrieval, name, value)
        assert key(None) != before[None] and key("retrieval-8+far") != before["retrieval-8+far"]
        assert key("swin-3") == before["swin-3"] and key("complete") == before["complete"]
    before = {g: key(g) for g in (None, "swin-3", "complete")}
    monkeypatch.setattr(robust, "SEQUENCE_RULE", "another rule")          # how the aligner reads an order
    assert key(None) != before[None] and key("swin-3") != before["swin-3"]
    assert key("complete") == before["complete"]


def test_far_links_skip_images_less_alike_than_unrelated_ones():
    """A closed loop: descriptors on a circle (cosine = cos of the angle between views). The far links at ranks 8
    and 16 (about 36 and 72 degrees) stay; rank 32 (the other side, about 144 degrees, negative cosine) does not."""
    from dust3r_ns.pairs import FAR_MIN_SIMILARITY

    n, k = 40, 4
    theta = np.radians(np.arange(n) * 360.0 / n)
    desc = np.stack([np.cos(theta), np.sin(theta)], 1)
    edges = set(retrieval_edges(desc, f"retrieval-{k}+far", symmetrize=False))
    near = set(retrieval_edges(desc, f"retrieval-{k}", symmetrize=False))
    gaps = {min(abs(i - j), n - abs(i - j)) for i, j in edges - near}
    assert gaps == {4, 8}                                   # ranks 8 and 16 (each side) of every image
    assert all(desc[i] @ desc[j] > FAR_MIN_SIMILARITY for i, j in edges - near)
    assert edges == set(retrieval_edges(desc, f"retrieval-{k}+far-2", symmetrize=False))   # rank 32: none kept


def test_sequence_found_by_content_in_index_order():
    """Descriptors along a path (each view like its index neighbours): a sequence in index order, not once shuffled;
    too few images to tell are not one."""
    rng = np.random.default_rng(0)
    steps = rng.standard_normal((60, 16))
    desc = _unit(np.cumsum(steps, 0) + 0.1 * rng.standard_normal((60, 16)))    # a random walk: nearby = alike
    assert looks_sequential(desc)
    assert not any(looks_sequential(desc[np.random.default_rng(s).permutation(60)]) for s in range(20))
    assert not looks_sequential(desc[:2])


def test_engine_records_rendered_frames_in_order_as_a_sequence():
    """The bundled model on a rendered 24-frame orbit: its content neighbours are index neighbours, so the engine
    records the frames as ordered (the aligner's sequence prior); the same frames shuffled are an unordered set."""
    from dust3r_ns.bench.robust import render_orbit
    from dust3r_ns.model.checkpoint import load_model
    from dust3r_ns.pipeline import default_model_source

    frames, _, _ = render_orbit(24, 112, 112, "wide", 0)
    net = load_model(default_model_source())
    order = np.random.default_rng(0).permutation(24)
    for idx, sequence in ((np.arange(24), True), (order, False)):
        views = [make_view(k, rgb=frames[int(f)]["rgb"]) for k, f in enumerate(idx)]
        preds = inference_graph(views, net, "retrieval-3", verbose=False)
        assert preds.ordered == sequence
        assert inference_graph(views, net, "retrieval-3", verbose=False, ordered=True).ordered   # given: kept
    assert inference_graph(views[:6], net, "swin-2-noncyclic", verbose=False).ordered       # the graph's name says so
    assert not inference_graph(views[:6], net, "complete", verbose=False).ordered
