"""Pair-inference engine: runs a list of image pairs through DUSt3R, encoding every image once.

The reference runs the full network per pair, so with a complete graph each image is encoded 2(N-1) times.
Here the encoder runs once per distinct image (batched by image shape), then decoders and heads run batched over
pairs, ``batch_size`` pairs at a time. The result has the reference's structure (``view1``, ``view2``,
``pred1``, ``pred2``; views with ``img``, ``true_shape``, ``idx``, ``instance``), on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch
from tqdm import tqdm

AMP_DTYPES = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _key(view: dict):
    """Identity of an image inside a run: its index when given, else the object."""
    return ("idx", int(view["idx"])) if "idx" in view else ("obj", id(view))


def _true_shape(view: dict) -> torch.Tensor:
    ts = view.get("true_shape")
    if ts is None:
        return torch.tensor(view["img"].shape[-2:]).reshape(1, 2)
    return torch.as_tensor(np.asarray(ts)).reshape(1, 2).long()


def _autocast(device: torch.device, amp):
    if amp not in AMP_DTYPES:
        raise ValueError(f"unknown amp {amp!r}: use None/'fp32', 'bf16' or 'fp16'")
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ValueError("fp16 autocast needs CUDA; use amp='bf16' on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def _collate_views(views: list[dict]) -> dict:
    out: dict = {}
    same = len({tuple(v["img"].shape[-2:]) for v in views}) == 1
    for k in views[0]:
        vals = [v[k] for v in views]
        if k == "img":
            out[k] = torch.cat([x.reshape(1, *x.shape[-3:]) for x in vals]) if same else [x[0] for x in vals]
        elif k == "true_shape":
            out[k] = torch.cat([torch.as_tensor(np.asarray(x)).reshape(1, 2) for x in vals])
        elif k == "idx":
            out[k] = [int(x) for x in vals]
        else:
            out[k] = vals
    return out


def _cat_preds(chunks: list[dict], same: bool) -> dict:
    keys = chunks[0].keys()
    if same:
        return {k: torch.cat([c[k] for c in chunks]) for k in keys}
    return {k: [t for c in chunks for t in c[k]] for k in keys}


@torch.inference_mode()
def encode_images(model, views: list[dict], device, batch_size: int = 8, amp=None, verbose: bool = False):
    """Encoder tokens and positions for each distinct view: {key: (feat (N, C), pos (N, 2))} on `device`."""
    device = torch.device(device)
    unique: dict = {}
    for v in views:
        unique.setdefault(_key(v), v)
    by_shape = defaultdict(list)
    for k, v in unique.items():
        by_shape[(tuple(v["img"].shape[-2:]), tuple(_true_shape(v)[0].tolist()))].append(k)
    cache = {}
    bar = tqdm(total=len(unique), desc="encode", disable=not verbose, leave=False)
    for keys in by_shape.values():
        for s in range(0, len(keys), batch_size):
            ks = keys[s : s + batch_size]
            img = torch.cat([unique[k]["img"].reshape(1, *unique[k]["img"].shape[-3:]) for k in ks]).to(device)
            shape = torch.cat([_true_shape(unique[k]) for k in ks]).to(device)
            with _autocast(device, amp):
                feat, pos = model.encode(img, shape)
            for i, k in enumerate(ks):
                cache[k] = (feat[i], pos[i])
            bar.update(len(ks))
    bar.close()
    return cache


@torch.inference_mode()
def inference(pairs, model, device="cpu", batch_size: int = 8, amp=None, verbose: bool = True) -> dict:
    """Run every (view1, view2) pair; returns the reference output structure with tensors on the CPU.

    Pairs are processed in order; consecutive pairs of equal image shapes share a decoder batch. When the images
    have different shapes the per-pair tensors are returned as lists, as the reference does.
    """
    if len(pairs) == 0:
        raise ValueError("no image pairs to run: give at least one image (one image is paired with itself)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    model = model.to(device).eval()
    feats = encode_images(model, [v for p in pairs for v in p], device, batch_size, amp, verbose)

    same = len({tuple(v["img"].shape[-2:]) for p in pairs for v in p}) == 1
    chunks1, chunks2 = [], []
    bar = tqdm(total=len(pairs), desc="pairs", disable=not verbose, leave=False)
    start = 0
    while start < len(pairs):
        # a batch of consecutive pairs with identical (shape1, shape2)
        sig = lambda p: (tuple(p[0]["img"].shape[-2:]), tuple(p[1]["img"].shape[-2:]))  # noqa: E731
        end = start + 1
        while end < len(pairs) and end - start < batch_size and sig(pairs[end]) == sig(pairs[start]):
            end += 1
        batch = pairs[start:end]
        f1 = torch.stack([feats[_key(a)][0] for a, _ in batch])
        p1 = torch.stack([feats[_key(a)][1] for a, _ in batch])
        f2 = torch.stack([feats[_key(b)][0] for _, b in batch])
        p2 = torch.stack([feats[_key(b)][1] for _, b in batch])
        s1 = torch.cat([_true_shape(a) for a, _ in batch]).to(device)
        s2 = torch.cat([_true_shape(b) for _, b in batch]).to(device)
        with _autocast(device, amp):
            dec1, dec2 = model.decode(f1, p1, f2, p2)
        with torch.autocast(device_type=device.type, enabled=False):
            r1 = model.head_forward(1, dec1, s1)
            r2 = model.head_forward(2, dec2, s2)
        r2["pts3d_in_other_view"] = r2.pop("pts3d")
        chunks1.append({k: v.float().cpu() for k, v in r1.items()})
        chunks2.append({k: v.float().cpu() for k, v in r2.items()})
        bar.update(end - start)
        start = end
    bar.close()
    return {
        "view1": _collate_views([a for a, _ in pairs]),
        "view2": _collate_views([b for _, b in pairs]),
        "pred1": _cat_preds(chunks1, same),
        "pred2": _cat_preds(chunks2, same),
    }


@torch.inference_mode()
def inference_per_pair(pairs, model, device="cpu", verbose: bool = False) -> dict:
    """The reference-style path: the whole network once per pair (each image re-encoded for every pair)."""
    device = torch.device(device)
    model = model.to(device).eval()
    chunks1, chunks2 = [], []
    for a, b in tqdm(pairs, desc="pairs (per-pair)", disable=not verbose, leave=False):
        v1 = {"img": a["img"].to(device), "true_shape": _true_shape(a).to(device)}
        v2 = {"img": b["img"].to(device), "true_shape": _true_shape(b).to(device)}
        r1, r2 = model(v1, v2)
        chunks1.append({k: v.cpu() for k, v in r1.items()})
        chunks2.append({k: v.cpu() for k, v in r2.items()})
    same = len({tuple(v["img"].shape[-2:]) for p in pairs for v in p}) == 1
    return {
        "view1": _collate_views([a for a, _ in pairs]),
        "view2": _collate_views([b for _, b in pairs]),
        "pred1": _cat_preds(chunks1, same),
        "pred2": _cat_preds(chunks2, same),
    }
