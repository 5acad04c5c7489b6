"""Pair-inference engine: runs a list of image pairs through DUSt3R, encoding every image once.

The reference runs the full network per pair, so with a complete graph each image is encoded 2(N-1) times.
Here the encoder runs once per distinct image (batched by image shape), then decoders and heads run batched over
pairs, ``batch_size`` pairs at a time. Pairs are (`View`, `View`) tuples (`make_pairs`); the result is a
`PairPredictions` on the CPU (its `to_reference()` gives the reference output dict).
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from dust3r_ns.images import View
from dust3r_ns.pairs import declares_order, graph_edges, is_retrieval, retrieval_edges
from dust3r_ns.predictions import PairPredictions, PairStoreWriter, PredictionsError, open_store, to_storage
from dust3r_ns.retrieval import looks_sequential, vlad_descriptors

AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _true_shape(view: View) -> torch.Tensor:
    return torch.as_tensor(view.true_shape).reshape(1, 2).long()


def _autocast(device: torch.device, amp):
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp {amp!r}: use None/'fp32', 'bf16' or 'fp16'")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use amp='bf16' on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _cat_preds(chunks: list[dict], same: bool) -> dict:
    keys = chunks[0].keys()
    if same:
        return {k: torch.cat([c[k] for c in chunks]) for k in keys}
    return {k: [t for c in chunks for t in c[k]] for k in keys}


def check_views(views: list[View]) -> tuple[list[View], bool]:
    """The views numbered 0..N-1 (each index once), and whether all their shapes agree."""
    if not views:
        raise ValueError("no images: give at least one image")
    return _check_pairs([(v, v) for v in views])


def _check_pairs(pairs) -> tuple[list[View], bool]:
    """The distinct views of the pairs, by index (0..N-1, each index one view), and whether all shapes agree."""
    if len(pairs) == 0:
        raise ValueError("no image pairs to run: give at least one image (one image is paired with itself)")
    by_idx: dict[int, View] = {}
    for p in pairs:
        for v in p:
            if not isinstance(v, View):
                raise ValueError(f"pairs must hold View objects (load_images / make_view, then make_pairs), got "
                                 f"{type(v).__name__}")
            if by_idx.setdefault(v.idx, v) is not v and by_idx[v.idx].info is not v.info:
                raise ValueError(f"two different images carry index {v.idx}; number the views 0..N-1")
    N = max(by_idx) + 1
    missing = sorted(set(range(N)) - set(by_idx))
    if missing:
        raise ValueError(f"images {missing} appear in no pair; number the views 0..N-1 and pair them all")
    views = [by_idx[k] for k in range(N)]
    return views, len({tuple(v.img.shape[-2:]) for v in views}) == 1


def predictions_from_chunks(views: list[View], pairs, chunks1: list[dict], chunks2: list[dict], same: bool,
                            ordered: bool = False) -> PairPredictions:
    """`PairPredictions` from the per-batch head outputs, in pair order."""
    p1, p2 = _cat_preds(chunks1, same), _cat_preds(chunks2, same)
    try:
        return PairPredictions(images=[v.info for v in views], edges=[(a.idx, b.idx) for a, b in pairs],
                               pts1=p1["pts3d"], pts2=p2["pts3d_in_other_view"], conf1=p1["conf"], conf2=p2["conf"],
                               ordered=ordered)
    except PredictionsError as e:
        raise ValueError(str(e)) from None


@torch.inference_mode()
def encode_images(model, views: list[View], device, batch_size: int = 8, amp=None, verbose: bool = False):
    """Encoder tokens and positions of each distinct view: {idx: (feat [T, C], pos [T, 2])} on `device`."""
    device = torch.device(device)
    unique: dict = {}
    for v in views:
        unique.setdefault(v.idx, v)
    by_shape = defaultdict(list)
    for k, v in unique.items():
        by_shape[tuple(v.img.shape[-2:])].append(k)
    cache = {}
    bar = tqdm(total=len(unique), desc="encode", disable=not verbose, leave=False)
    for keys in by_shape.values():
        for s in range(0, len(keys), batch_size):
            ks = keys[s : s + batch_size]
            img = torch.cat([unique[k].img for k in ks]).to(device)
            shape = torch.cat([_true_shape(unique[k]) for k in ks]).to(device)
            with _autocast(device, amp):
                feat, pos = model.encode(img, shape)
            for i, k in enumerate(ks):
                cache[k] = (feat[i], pos[i])
            bar.update(len(ks))
    bar.close()
    return cache


@torch.inference_mode()
def inference(pairs, model, device="cpu", batch_size: int = 8, amp=None, verbose: bool = True,
              store_dtype: torch.dtype = torch.float32) -> PairPredictions:
    """Run every (view1, view2) pair; returns the `PairPredictions` (tensors on the CPU), edges in pair order.

    Consecutive pairs of equal image shapes share a decoder batch. When the images have different shapes the
    per-pair maps are lists, as the reference's are. `store_dtype` float16 keeps the maps in half precision (each
    batch converted as it is decoded).
    """
    views, same = _check_pairs(pairs)
    device, model = _prepare(model, device, batch_size)
    feats = encode_images(model, views, device, batch_size, amp, verbose)
    return _decode_pairs(model, pairs, views, same, feats, device, batch_size, amp, verbose, store_dtype)


@torch.inference_mode()
def inference_graph(views: list[View], model, scene_graph: str, device="cpu", batch_size: int = 8, amp=None,
                    verbose: bool = True, store_dtype: torch.dtype = torch.float32,
                    store_path: str | Path | None = None, ordered: bool = False) -> PairPredictions:
    """Encode every view once, choose the pairs of `scene_graph` (a retrieval graph ranks pairs by VLAD descriptors
    of the encoder tokens, `retrieval.vlad_descriptors` + `pairs.retrieval_edges`), then decode only those pairs.

    store_path: write each decoded batch into a pair store folder there (`PairStoreWriter`, in `store_dtype`)
    instead of keeping the maps in memory; the result then reads them from disk (`open_store`).
    ordered: the views are frames of one sequence in index order (a video); recorded in the predictions, as is a
    retrieval graph's finding that the views in index order look like one (`choose_pairs`)."""
    views, same = check_views(views)
    device, model = _prepare(model, device, batch_size)
    feats = encode_images(model, views, device, batch_size, amp, verbose)
    pairs, sequential = choose_pairs(views, scene_graph, feats)
    ordered = announce_order(ordered, sequential, verbose, scene_graph)
    if store_path is not None:
        return _decode_to_store(model, pairs, views, feats, device, batch_size, amp, verbose, store_dtype,
                                Path(store_path), ordered)
    return _decode_pairs(model, pairs, views, same, feats, device, batch_size, amp, verbose, store_dtype, ordered)


def announce_order(ordered: bool, sequential: bool, verbose: bool, scene_graph: str) -> bool:
    """Whether the predictions are ordered: given so (a video, --ordered), by the scene graph's name (a sequential
    window: `pairs.declares_order`), or the images in name order look like a sequence by content (`sequential`);
    the last two are said on stderr when `verbose`."""
    by_name = declares_order(scene_graph)
    if (sequential or by_name) and not ordered and verbose:
        why = (f"the scene graph {scene_graph} pairs the photos by their order" if by_name else
               "the photos in name order look like one sequence (their most similar photos are near in the order)")
        print(f"{why}: neighbouring photos are trusted more in the alignment (--align.robust.sequence-weight 1: not)",
              file=sys.stderr)
    return ordered or sequential or by_name


def _prepare(model, device, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    return device, model.to(device).eval()


def batches(pairs, batch_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of the decoder batches: up to `batch_size` consecutive pairs of equal image shapes."""
    sig = lambda p: (tuple(p[0].img.shape[-2:]), tuple(p[1].img.shape[-2:]))  # noqa: E731
    out, start = [], 0
    while start < len(pairs):
        end = start + 1
        while end < len(pairs) and end - start < batch_size and sig(pairs[end]) == sig(pairs[start]):
            end += 1
        out.append((start, end))
        start = end
    return out


def decode_batch(model, batch, feats: dict, device: torch.device, amp) -> tuple[dict, dict]:
    """Decoders and heads of one batch of pairs: (head-1 maps, head-2 maps) as float32 CPU tensors
    (`pts3d`, `conf`; `pts3d_in_other_view`, `conf`)."""
    f1 = torch.stack([feats[a.idx][0] for a, _ in batch])
    p1 = torch.stack([feats[a.idx][1] for a, _ in batch])
    f2 = torch.stack([feats[b.idx][0] for _, b in batch])
    p2 = torch.stack([feats[b.idx][1] for _, b in batch])
    s1 = torch.cat([_true_shape(a) for a, _ in batch]).to(device)
    s2 = torch.cat([_true_shape(b) for _, b in batch]).to(device)
    with _autocast(device, amp):
        dec1, dec2 = model.decode(f1, p1, f2, p2)
    with torch.autocast(device_type=device.type, enabled=False):
        r1 = model.head_forward(1, dec1, s1)
        r2 = model.head_forward(2, dec2, s2)
    r2["pts3d_in_other_view"] = r2.pop("pts3d")
    return {k: v.float().cpu() for k, v in r1.items()}, {k: v.float().cpu() for k, v in r2.items()}


def choose_pairs(views: list[View], scene_graph: str, feats: dict) -> tuple[list[tuple[View, View]], bool]:
    """(the ordered pairs of `scene_graph` over the views, whether the views in index order look like one sequence):
    a retrieval graph ranks pairs by the VLAD descriptors of the encoder features `feats`, which also tell whether
    content neighbours are index neighbours (`retrieval.looks_sequential`; False for the other graphs)."""
    if len(views) == 1:
        return [(views[0], views[0])] * 2, False
    if is_retrieval(scene_graph):
        desc = vlad_descriptors([feats[k][0] for k in range(len(views))],
                                positions=[feats[k][1] for k in range(len(views))])
        return [(views[i], views[j]) for i, j in retrieval_edges(desc, scene_graph)], looks_sequential(desc)
    return [(views[i], views[j]) for i, j in graph_edges(len(views), scene_graph)], False


def _decode_pairs(model, pairs, views: list[View], same: bool, feats: dict, device: torch.device, batch_size: int,
                  amp, verbose: bool, store_dtype: torch.dtype = torch.float32, ordered: bool = False
                  ) -> PairPredictions:
    """Decoders and heads over the pairs, batch by batch (`batches`)."""
    chunks1, chunks2 = [], []
    bar = tqdm(total=len(pairs), desc="pairs", disable=not verbose, leave=False)
    for start, end in batches(pairs, batch_size):
        r1, r2 = decode_batch(model, pairs[start:end], feats, device, amp)
        chunks1.append(to_storage(r1, store_dtype))
        chunks2.append(to_storage(r2, store_dtype))
        bar.update(end - start)
    bar.close()
    return predictions_from_chunks(views, pairs, chunks1, chunks2, same, ordered)


def _decode_to_store(model, pairs, views: list[View], feats: dict, device: torch.device, batch_size: int, amp,
                     verbose: bool, store_dtype: torch.dtype, path: Path, ordered: bool = False) -> PairPredictions:
    """`_decode_pairs` writing batch by batch into a pair store at `path` (memory: one batch of maps)."""
    H, W = views[0].info.shape
    edges = [(a.idx, b.idx) for a, b in pairs]
    bar = tqdm(total=len(pairs), desc="pairs", disable=not verbose, leave=False)
    try:
        with PairStoreWriter(path, [v.info for v in views], edges, H, W, store_dtype, ordered) as out:
            for start, end in batches(pairs, batch_size):
                r1, r2 = decode_batch(model, pairs[start:end], feats, device, amp)
                out.write(start, dict(pts1=r1["pts3d"], pts2=r2["pts3d_in_other_view"], conf1=r1["conf"],
                                      conf2=r2["conf"]))
                bar.update(end - start)
    except PredictionsError as e:
        raise ValueError(str(e)) from None
    finally:
        bar.close()
    return open_store(path)


@torch.inference_mode()
def inference_per_pair(pairs, model, device="cpu", verbose: bool = False) -> PairPredictions:
    """The reference-style path: the whole network once per pair (each image re-encoded for every pair)."""
    views, same = _check_pairs(pairs)
    device = torch.device(device)
    model = model.to(device).eval()
    chunks1, chunks2 = [], []
    for a, b in tqdm(pairs, desc="pairs (per-pair)", disable=not verbose, leave=False):
        v1 = {"img": a.img.to(device), "true_shape": _true_shape(a).to(device)}
        v2 = {"img": b.img.to(device), "true_shape": _true_shape(b).to(device)}
        r1, r2 = model(v1, v2)
        chunks1.append({k: v.cpu() for k, v in r1.items()})
        chunks2.append({k: v.cpu() for k, v in r2.items()})
    return predictions_from_chunks(views, pairs, chunks1, chunks2, same)


class _EngineModule(types.ModuleType):
    """This module, callable as its `inference` function: `from dust3r_ns import inference` gives this module
    once it has been imported (Python binds submodules on their package), and it must still run pairs."""

    def __call__(self, pairs, model, device="cpu", batch_size: int = 8, amp=None, verbose: bool = True
                 ) -> PairPredictions:
        return inference(pairs, model, device=device, batch_size=batch_size, amp=amp, verbose=verbose)


sys.modules[__name__].__class__ = _EngineModule
