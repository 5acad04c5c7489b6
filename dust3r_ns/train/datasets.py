"""Training datasets of view pairs: `SyntheticScenes` (procedural, rendered on the fly) and `Co3dPreprocessed`.

An item index is an int or a tuple (idx, resolution_index, epoch) as produced by `PairBatchSampler`, so that all
pairs of a batch share a resolution and augmentation depends only on (seed, idx, epoch) (exact resumes). Items are
(view1, view2) dicts from `views.make_view` plus `skipped` (bad samples passed over before this one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .views import make_view


class BadSample(ValueError):
    """A sample that cannot be used (no valid depth, unreadable file); the dataset moves on to the next one."""


def parse_resolution(res) -> list[tuple[int, int]]:
    """(W, H) or a flat sequence W1 H1 W2 H2 ... or a list of pairs -> list of (W, H), each a multiple of 16."""
    if isinstance(res, int):
        res = (res, res)
    flat = [int(v) for r in res for v in (r if isinstance(r, (list, tuple)) else [r])]
    if not flat or len(flat) % 2:
        raise ValueError(f"resolution must be W H pairs, got {res!r}")
    out = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    for w, h in out:
        if w <= 0 or h <= 0 or w % 16 or h % 16:
            raise ValueError(f"resolution {w}x{h}: width and height must be positive multiples of 16 (patch size)")
    return out


class PairDataset:
    """Base class: resolution list, index decoding, bad-sample skipping."""

    name = "pairs"

    def __init__(self, resolution, seed: int = 0, jitter: float = 0.0, max_skip: int = 20):
        self.resolutions = parse_resolution(resolution)
        self.seed, self.jitter, self.max_skip = int(seed), float(jitter), int(max_skip)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_pair(self, idx: int, size_wh: tuple[int, int], rng: np.random.Generator) -> tuple[dict, dict]:
        raise NotImplementedError  # pragma: no cover

    def __getitem__(self, index):
        idx, ri, epoch = (index, 0, 0) if isinstance(index, (int, np.integer)) else index
        n = len(self)
        size = self.resolutions[int(ri) % len(self.resolutions)]
        last = None
        for k in range(self.max_skip + 1):
            i = (int(idx) + k) % n
            rng = np.random.default_rng([self.seed, i, int(epoch), 11])
            try:
                v1, v2 = self.get_pair(i, size, rng)
                if not v1["valid_mask"].any() or not v2["valid_mask"].any():
                    raise BadSample(f"{self.name} sample {i}: no valid depth")
            except BadSample as exc:
                last = exc
                continue
            v1["skipped"] = v2["skipped"] = k
            v1["idx"], v2["idx"] = i, i
            return v1, v2
        raise RuntimeError(f"{self.name}: {self.max_skip + 1} consecutive bad samples from index {idx} (last: {last}); "
                           "check the dataset")


class SyntheticScenes(PairDataset):
    """Pairs of views of random procedural scenes (dust3r_ns.synth), rendered on the fly with exact depth.

    Deterministic per (seed, index): scene, cameras (angular separation from baseline_deg, uniform, log-uniform or half
    and half per `baseline_sampling`; both cameras on one radius and height with probability `same_ring`, see
    `synth.random_pair`), lighting; colour jitter also depends on the epoch. `cache=True` keeps rendered samples in
    memory (per process) for later epochs.
    """

    name = "SyntheticScenes"

    def __init__(self, n_pairs: int = 1000, resolution=(224, 224), seed: int = 0, baseline_deg=(5.0, 60.0),
                 focal_range=(0.8, 1.2), jitter: float = 0.0, cache: bool = False, baseline_sampling: str = "uniform",
                 same_ring: float = 0.0):
        super().__init__(resolution, seed, jitter)
        if n_pairs < 1:
            raise ValueError(f"SyntheticScenes: n_pairs must be >= 1, got {n_pairs}")
        self.n = int(n_pairs)
        self.baseline_deg, self.focal_range = tuple(baseline_deg), tuple(focal_range)
        if baseline_sampling not in ("uniform", "log", "mixed"):
            raise ValueError(f"SyntheticScenes: baseline_sampling must be 'uniform', 'log' or 'mixed', got "
                             f"{baseline_sampling!r}")
        if not 0.0 <= same_ring <= 1.0:
            raise ValueError(f"SyntheticScenes: same_ring is a probability in [0, 1], got {same_ring}")
        self.baseline_sampling, self.same_ring = baseline_sampling, float(same_ring)
        self.cache = cache
        self._cache: dict = {}

    def __len__(self) -> int:
        return self.n

    def render_pair(self, idx: int, size_wh: tuple[int, int]):
        key = (idx, size_wh)
        if key in self._cache:
            return self._cache[key]
        from ..synth import make_scene, random_pair, render

        W, H = size_wh
        rng = np.random.default_rng([self.seed, idx, 5])
        scene = make_scene(int(rng.integers(1 << 30)))
        try:
            c2w, K = random_pair(scene, rng, H, W, baseline_deg=self.baseline_deg, focal_range=self.focal_range,
                                 baseline_sampling=self.baseline_sampling, same_ring=self.same_ring)
        except ValueError as exc:
            raise BadSample(str(exc)) from None
        shadows = bool(rng.random() < 0.7)
        out = [(render(scene, c2w[k], K[k], H, W, shadows=shadows), c2w[k], K[k]) for k in range(2)]
        out = [({key: r[key] for key in ("rgb", "depth", "valid")}, c, k) for r, c, k in out]  # what get_pair reads
        if self.cache:
            self._cache[key] = out
        return out

    def get_pair(self, idx, size_wh, rng):
        views = []
        for k, (r, c2w, K) in enumerate(self.render_pair(idx, size_wh)):
            views.append(make_view(r["rgb"], r["depth"], K, c2w, size_wh, mask=r["valid"], rng=rng,
                                   jitter=self.jitter, label=f"synth{self.seed}_{idx}", instance=f"{idx}_{k}",
                                   dataset=self.name))
        return views[0], views[1]


class Co3dPreprocessed(PairDataset):
    """CO3D as written by DUSt3R's preprocessing script (see module docs of the trainer for the layout).

    Pairs are frames i, j of a selected sequence whose positions in the frame list differ by 5, 10, ..., 30.
    `mask_bg=True` also invalidates depth outside the object mask.
    """

    name = "Co3d"
    DELTAS = tuple(range(5, 31, 5))

    def __init__(self, root: str | os.PathLike, split: str = "train", resolution=(224, 224), seed: int = 0,
                 jitter: float = 0.0, mask_bg: bool = False):
        super().__init__(resolution, seed, jitter)
        self.root = Path(root)
        index = self.root / f"selected_seqs_{split}.json"
        if not index.is_file():
            raise FileNotFoundError(f"Co3dPreprocessed: {index} not found; point --data-root at the output folder "
                                    "of the CO3D preprocessing")
        try:
            seqs = json.loads(index.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"Co3dPreprocessed: {index} is not valid JSON ({exc.msg}); re-run the preprocessing")
        if not isinstance(seqs, dict):
            raise ValueError(f"Co3dPreprocessed: {index} must map category -> sequence -> frame list")
        self.mask_bg = mask_bg
        self.pairs: list[tuple[str, str, int, int]] = []
        for cat in sorted(seqs):
            for seq in sorted(seqs[cat]):
                frames = [int(f) for f in seqs[cat][seq]]
                for i in range(len(frames)):
                    for d in self.DELTAS:
                        if i + d < len(frames):
                            self.pairs.append((cat, seq, frames[i], frames[i + d]))
        if not self.pairs:
            raise ValueError(f"Co3dPreprocessed: {index} yields no frame pairs (sequences need > 5 frames)")

    def __len__(self) -> int:
        return len(self.pairs)

    def load_frame(self, cat: str, seq: str, frame: int, size_wh, rng, k: int) -> dict:
        d = self.root / cat / seq
        img_p, cam_p = d / "images" / f"frame{frame:06d}.jpg", d / "images" / f"frame{frame:06d}.npz"
        dep_p, msk_p = d / "depths" / f"frame{frame:06d}.jpg.geometric.png", d / "masks" / f"frame{frame:06d}.png"
        try:
            rgb = np.asarray(Image.open(img_p).convert("RGB"))
            with np.load(cam_p, allow_pickle=False) as z:
                c2w = np.asarray(z["camera_pose"], np.float64)
                K = np.asarray(z["camera_intrinsics"], np.float64)
                max_depth = float(z["maximum_depth"])
            depth = np.asarray(Image.open(dep_p)).astype(np.float64) * (max_depth / 65535.0)
            mask = np.asarray(Image.open(msk_p).convert("L")) > 25 if self.mask_bg else None
        except (OSError, KeyError, ValueError) as exc:
            raise BadSample(f"Co3d frame {d}/{frame}: {exc}") from None
        if c2w.shape != (4, 4) or K.shape != (3, 3) or depth.shape != rgb.shape[:2]:
            raise BadSample(f"Co3d frame {d}/{frame}: bad shapes pose {c2w.shape} K {K.shape} depth {depth.shape}")
        return make_view(rgb, depth.astype(np.float32), K, c2w, size_wh, mask=mask, rng=rng, jitter=self.jitter,
                         label=f"{cat}/{seq}", instance=f"{cat}/{seq}/{frame}", dataset=self.name)

    def get_pair(self, idx, size_wh, rng):
        cat, seq, f1, f2 = self.pairs[idx]
        return (self.load_frame(cat, seq, f1, size_wh, rng, 0), self.load_frame(cat, seq, f2, size_wh, rng, 1))


def collate_pairs(batch: list) -> tuple[dict, dict]:
    """List of (view1, view2) -> (view1, view2) batched dicts (tensors stacked, strings/ints listed)."""
    import torch

    out = []
    for k in range(2):
        views = [b[k] for b in batch]
        d = {}
        for key in views[0]:
            vals = [v[key] for v in views]
            if isinstance(vals[0], torch.Tensor):
                d[key] = torch.stack(vals)
            elif isinstance(vals[0], np.ndarray):
                d[key] = torch.from_numpy(np.stack(vals))
            else:
                d[key] = vals
        out.append(d)
    return out[0], out[1]


class PairBatchSampler:
    """Distributed, seedable batch sampler: each global batch of `batch_size * world` indices is split between ranks;
    each batch draws one resolution index. Yields lists of (idx, res_idx, epoch). `start_batch` skips batches
    (resume mid-epoch)."""

    def __init__(self, n: int, batch_size: int, n_res: int = 1, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if n < batch_size * world:
            raise ValueError(f"dataset of {n} pairs is smaller than one global batch ({batch_size} x {world} ranks)")
        self.n, self.bs, self.n_res, self.rank, self.world = n, batch_size, n_res, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        return self.n // (self.bs * self.world) - self.start_batch

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch, 3])
        perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
        nb = self.n // (self.bs * self.world)
        res = rng.integers(0, self.n_res, nb)
        for b in range(self.start_batch, nb):
            g = perm[b * self.bs * self.world:(b + 1) * self.bs * self.world]
            mine = g[self.rank * self.bs:(self.rank + 1) * self.bs]
            yield [(int(i), int(res[b]), self.epoch) for i in mine]
