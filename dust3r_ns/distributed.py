"""Pair inference sharded over processes with `torch.distributed` (launched by `torchrun`; NCCL on GPUs, gloo on CPU).

Every rank encodes all images and chooses the same pairs (the choice is deterministic), then decodes the decoder
batches b with b mod world == rank, exactly the batches one process would form, and writes them as its shard
(`rank<r>.npz` in a shared folder, atomically). After a barrier rank 0 reads every shard, puts the batches back in
order and returns the `PairPredictions` one process would have computed; the other ranks return None (rank 0 goes
on to align and export). Several nodes work through torchrun's rendezvous, given a shard folder they all see.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from dust3r_ns.fileio import open_npz, save_npz
from dust3r_ns.images import View
from dust3r_ns.inference import (announce_order, batches, check_views, choose_pairs, decode_batch, encode_images,
                                 predictions_from_chunks)
from dust3r_ns.predictions import PairPredictions, to_storage

SHARD_KIND = "dust3r_ns.pair_shard"
SHARD_VERSION = 1
KEYS = (("pred1", "pts3d"), ("pred1", "conf"), ("pred2", "pts3d_in_other_view"), ("pred2", "conf"))


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment (RANK, WORLD_SIZE); (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: str) -> str:
    """This rank's device: cuda:LOCAL_RANK for a plain 'cuda', else as given."""
    if device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(1, torch.cuda.device_count())}"
    return device


def init(device: str) -> None:
    """Join the process group of this torchrun job (NCCL for CUDA devices, else gloo), once."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        torch.distributed.init_process_group(backend)


@torch.inference_mode()
def sharded_inference(views: list[View], model, scene_graph: str, shard_dir: str | os.PathLike, device="cpu",
                      batch_size: int = 8, amp=None, verbose: bool = True, store_dtype: torch.dtype = torch.float32,
                      ordered: bool = False) -> Optional[PairPredictions]:
    """This rank's share of the pair inference (module docstring); rank 0 returns the whole `PairPredictions`
    (`ordered`: the views are frames of one sequence, as in `inference.inference_graph`)."""
    rank, size = world()
    device = rank_device(str(device))
    if size > 1:
        init(device)
    views, same = check_views(views)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    model = model.to(dev).eval()
    feats = encode_images(model, views, dev, batch_size, amp, verbose and rank == 0)
    pairs, sequential = choose_pairs(views, scene_graph, feats)
    ordered = announce_order(ordered, sequential, verbose and rank == 0, scene_graph)
    plan = batches(pairs, batch_size)
    mine = [b for b in range(len(plan)) if b % size == rank]
    arrays: dict[str, np.ndarray] = {"batches": np.array(mine, dtype=np.int64)}
    for b in tqdm(mine, desc=f"pairs (rank {rank}/{size})", disable=not verbose, leave=False):
        start, end = plan[b]
        r1, r2 = (to_storage(r, store_dtype) for r in decode_batch(model, pairs[start:end], feats, dev, amp))
        for (part, key), res in zip(KEYS, (r1, r1, r2, r2)):
            arrays[f"{b}.{part}.{key}"] = res[key].numpy()
    shard_dir = Path(shard_dir)
    save_npz(shard_dir / f"rank{rank}.npz", arrays, SHARD_KIND, SHARD_VERSION, "pair inference shard")
    if size > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    chunks1: list[dict] = [{} for _ in plan]
    chunks2: list[dict] = [{} for _ in plan]
    for r in range(size):
        with open_npz(shard_dir / f"rank{r}.npz", SHARD_KIND, SHARD_VERSION, "pair inference shard",
                      "run the torchrun job again") as z:
            for b in z["batches"].tolist():
                for part, key in KEYS:
                    (chunks1 if part == "pred1" else chunks2)[b][key] = torch.from_numpy(z[f"{b}.{part}.{key}"])
    missing = [b for b in range(len(plan)) if not chunks1[b]]
    if missing:
        raise ValueError(f"{shard_dir}: the shards lack decoder batches {missing[:5]}; run the torchrun job again")
    shutil.rmtree(shard_dir, ignore_errors=True)
    return predictions_from_chunks(views, pairs, chunks1, chunks2, same, ordered)
