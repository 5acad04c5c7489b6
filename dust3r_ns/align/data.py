"""`PairPredictions` -> one stack of edge predictions on the alignment device (`PairData`).

The pair predictions are stored once: pts1 (E,H,W,3) = points of image i in camera i's frame, pts2 (E,H,W,3) =
points of image j in camera i's frame, and log-confidence weights w1, w2 (E,H,W). Images of different network
shapes are padded (top-left anchored) to a common (H,W) with zero weight, so the pixel grid stays exact.

Predictions in a pair store on disk (`PairPredictions.on_disk`) are not stacked in memory: the full-resolution
`PairData` reads them edge range by edge range (`DiskMaps`; weights through `StoredWeights`), and `coarse` builds
its sub-sampled stacks by streaming the store in chunks of edges.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dust3r_ns.predictions import DiskMaps, PairPredictions, PredictionsError


class AlignError(ValueError):
    """Bad input to global alignment (malformed output dict, disconnected pair graph, not enough memory, ...)."""


class StoredWeights:
    """Log-confidence weights of a stored confidence stack, read on demand: w = log(max(conf, 1)) as float32 (the
    writer checked the values: finite, positive), zero on dropped edges (assigning 0 to edges drops them, as
    `robust.drop_edges` does; assigning their stored weights gives them back, as `robust.restore_edges` does)."""

    def __init__(self, conf: DiskMaps) -> None:
        self.conf = conf
        self.dropped = np.zeros(len(conf), bool)

    shape = property(lambda self: self.conf.shape)
    device = property(lambda self: self.conf.device)
    dtype = torch.float32

    def __len__(self) -> int:
        return len(self.conf)

    def __getitem__(self, idx) -> torch.Tensor:
        w = self.conf[idx].float().clamp_min_(1.0).log_()     # (values were checked when the store was written)
        drop = self.dropped[np.arange(len(self))[idx] if not isinstance(idx, torch.Tensor) else idx.cpu().numpy()]
        if np.any(drop):
            w[torch.as_tensor(drop)] = 0
        return w

    def __setitem__(self, idx, value) -> None:
        ks = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
        if isinstance(value, (int, float)) and value == 0:
            self.dropped[ks] = True
            return
        # giving dropped edges back (`robust.restore_edges`): only their stored weights themselves
        was = self.dropped[ks].copy()
        self.dropped[ks] = False
        if not torch.equal(self[idx], torch.as_tensor(value, dtype=torch.float32)):
            self.dropped[ks] = was
            raise ValueError("stored weights can only be set to 0 (dropping edges) or back to their stored values")


@dataclass
class PairData:
    edges: torch.Tensor          # (E,2) int64 (i, j)
    pts1: torch.Tensor           # (E,H,W,3) storage dtype
    pts2: torch.Tensor           # (E,H,W,3)
    w1: torch.Tensor             # (E,H,W) log-confidence weights (0 on padding)
    w2: torch.Tensor             # (E,H,W)
    shapes: np.ndarray           # (N,2) (H,W) true network shape per image
    names: list[str]
    orig_sizes: np.ndarray       # (N,2) (W,H)
    transforms: np.ndarray       # (N,4)
    rgbs: list[np.ndarray]       # (H_i,W_i,3) uint8
    stride: int = 1              # pixel (r, c) of the stacks is pixel (stride*r, stride*c) of the images

    @property
    def n_images(self) -> int:
        return len(self.shapes)

    @property
    def on_disk(self) -> bool:
        """True when the maps are read from a pair store (`DiskMaps`, `StoredWeights`)."""
        return isinstance(self.pts1, DiskMaps)

    @functools.cached_property
    def edges_np(self) -> np.ndarray:
        """(E,2) int64 edge list on the host (cached: the edges never change)."""
        return self.edges.cpu().numpy()

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[0])

    @property
    def HW(self) -> tuple[int, int]:
        return int(self.pts1.shape[1]), int(self.pts1.shape[2])

    def valid(self) -> torch.Tensor:
        """(N,H,W) bool mask of real (non-padded) pixels per image (on this data's pixel grid)."""
        H, W = self.HW
        dev = self.pts1.device
        s = self.stride
        hh = torch.as_tensor(self.shapes[:, 0], device=dev)[:, None, None]
        ww = torch.as_tensor(self.shapes[:, 1], device=dev)[:, None, None]
        return (s * torch.arange(H, device=dev)[None, :, None] < hh) & (s * torch.arange(W, device=dev)[None, None, :] < ww)

    def weights(self, which: int, sl: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 log-confidence weights of side 1 or 2 (zero on padding)."""
        w = self.w1 if which == 1 else self.w2
        return (w[:] if sl is None else w[sl]).float()

    def conf(self, which: int, sl: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 confidences (exp of the stored log-confidence; 0 on padding, which has log-weight 0)."""
        w = self.weights(which, sl)
        return torch.where(w > 0, w.exp(), torch.zeros_like(w))

    def coarse(self, stride: int) -> "PairData":
        """Contiguous copy of the stacks sub-sampled by `stride` (pixel coordinates stay exact)."""
        if stride == 1:
            return self
        if self.on_disk:
            return self._coarse_streamed(stride)
        sub = lambda t: t[:, ::stride, ::stride].contiguous()  # noqa: E731
        # point maps stored channels-first (E,3,h,w), seen through a (E,h,w,3) view: the solver's hot loops read
        # them channels-first (core.channels_first) without a copy
        cf = lambda t: t[:, ::stride, ::stride].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # noqa: E731
        return PairData(edges=self.edges, pts1=cf(self.pts1), pts2=cf(self.pts2), w1=sub(self.w1), w2=sub(self.w2),
                        shapes=self.shapes, names=self.names, orig_sizes=self.orig_sizes, transforms=self.transforms,
                        rgbs=self.rgbs, stride=self.stride * stride)

    def _coarse_streamed(self, stride: int, elems: int = 1 << 22) -> "PairData":
        """`coarse` of stored maps: edge chunks of about `elems` values read, sub-sampled and copied into the
        in-memory stacks (float32 weights; points in the `DiskMaps` dtype, as the in-memory stacks keep theirs: the
        solver's passes upcast them chunk by chunk, so float16 maps cost no precision and half the memory)."""
        E, (H, W) = self.n_edges, self.HW
        h, w = -(-H // stride), -(-W // stride)
        pts = [torch.empty(E, 3, h, w, dtype=self.pts1.dtype) for _ in range(2)]    # channels-first, seen as [E, h, w, 3]
        ws = [torch.empty(E, h, w) for _ in range(2)]
        per = max(1, elems // (H * W * 3))
        for a in range(0, E, per):
            sl = slice(a, min(a + per, E))
            for k, (p, wt) in enumerate(((self.pts1, self.w1), (self.pts2, self.w2))):
                x = p[sl][:, ::stride, ::stride].float()
                if not bool(torch.isfinite(x).all()):
                    raise AlignError(f"{p.path}: NaN/inf points in edges {sl.start}..{sl.stop - 1}; check the "
                                     "network output (fp16 overflow?) and run `dust3r-ns infer` again")
                pts[k][sl] = x.permute(0, 3, 1, 2)          # (back to the stored dtype: exact)
                ws[k][sl] = wt[sl][:, ::stride, ::stride]
        cl = lambda t: t.permute(0, 2, 3, 1)  # noqa: E731
        return PairData(edges=self.edges, pts1=cl(pts[0]), pts2=cl(pts[1]), w1=ws[0], w2=ws[1], shapes=self.shapes,
                        names=self.names, orig_sizes=self.orig_sizes, transforms=self.transforms, rgbs=self.rgbs,
                        stride=self.stride * stride)


def as_predictions(output: Any, n_images: int | None = None) -> PairPredictions:
    """`PairPredictions` as they are; the reference output dict through its adapter (AlignError when malformed)."""
    if isinstance(output, PairPredictions):
        return output
    try:
        return PairPredictions.from_reference(output, n_images=n_images)
    except PredictionsError as e:
        raise AlignError(str(e)) from None


def _log_weights(confs: Any, P: int, H: int, W: int, dev: torch.device, dtype: torch.dtype, what: str) -> torch.Tensor:
    if isinstance(confs, torch.Tensor) and tuple(confs.shape) == (P, H, W):   # stacked: one vectorised pass
        c = confs.detach().to(dev, torch.float32)
        if not bool((torch.isfinite(c) & (c > 0)).all()):
            raise AlignError(f"{what} has non-finite or non-positive values; confidences are 1 + exp(x)")
        return c.clamp_min(1.0).log().to(dtype)
    out = torch.zeros(P, H, W, dtype=dtype, device=dev)
    for p, c in enumerate(confs):
        c = c.detach().to(dev, torch.float32)
        if not torch.isfinite(c).all() or bool((c <= 0).any()):
            raise AlignError(f"{what} of pair {p} has non-finite or non-positive values; confidences are 1 + exp(x)")
        out[p, : c.shape[0], : c.shape[1]] = c.clamp_min(1.0).log()
    return out


def pair_data(preds: PairPredictions, device: str | torch.device = "cpu",
              store_dtype: torch.dtype = torch.float32) -> PairData:
    """Stack the predictions on `device` in the storage dtype (no copy when they are already stacked there), as
    log-confidence weights, padding mixed image shapes with zero weight."""
    P = preds.n_edges
    shapes = preds.shapes
    H, W = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    dev = torch.device(device)
    images = preds.images
    meta = dict(shapes=shapes, names=[im.name for im in images],
                orig_sizes=np.array([im.orig_size for im in images], dtype=np.int64).reshape(-1, 2),
                transforms=np.stack([im.transform for im in images]).astype(np.float64), rgbs=[im.rgb for im in images])
    if preds.on_disk:
        if dev.type != "cpu":
            raise AlignError("predictions in a pair store on disk align on the CPU; use --align.device cpu or keep "
                             "them in memory (--store float16)")
        return PairData(edges=torch.as_tensor(preds.edges, dtype=torch.int64), pts1=preds.pts1, pts2=preds.pts2,
                        w1=StoredWeights(preds.conf1), w2=StoredWeights(preds.conf2), **meta)

    def stack(maps: Any) -> torch.Tensor:
        if isinstance(maps, torch.Tensor):
            return maps.detach().to(dev, store_dtype)
        out = torch.zeros((P, H, W) + tuple(maps[0].shape[2:]), dtype=store_dtype, device=dev)
        for p, t in enumerate(maps):
            out[p, : t.shape[0], : t.shape[1]] = t.detach().to(dev, store_dtype)
        return out

    pts1, pts2 = stack(preds.pts1), stack(preds.pts2)
    for name, t in (("pred1 pts3d", pts1), ("pred2 pts3d_in_other_view", pts2)):
        if not torch.isfinite(t).all():
            raise AlignError(f"{name} contains NaN/inf values; check the network output (fp16 overflow?)")
    # log-confidence weights, stored instead of the confidences (the reference's 'log' confidence transform)
    w1 = _log_weights(preds.conf1, P, H, W, dev, store_dtype, "pred1 conf")
    w2 = _log_weights(preds.conf2, P, H, W, dev, store_dtype, "pred2 conf")
    return PairData(edges=torch.as_tensor(preds.edges, dtype=torch.int64, device=dev), pts1=pts1, pts2=pts2,
                    w1=w1, w2=w2, **meta)


def parse_output(output: Any, device: str | torch.device = "cpu", store_dtype: torch.dtype = torch.float32,
                 n_images: int | None = None) -> PairData:
    """`PairData` from `PairPredictions` or the reference output dict (see `as_predictions`, `pair_data`)."""
    return pair_data(as_predictions(output, n_images), device, store_dtype)
