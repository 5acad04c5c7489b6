"""Parse the pair-inference output (reference structure) into one stack of edge predictions for alignment.

The pair predictions are stored once: pts1 (E,H,W,3) = points of image i in camera i's frame, pts2 (E,H,W,3) =
points of image j in camera i's frame, and log-confidence weights w1, w2 (E,H,W). Images of different network
shapes are padded (top-left anchored) to a common (H,W) with zero weight, so the pixel grid stays exact.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch


class AlignError(ValueError):
    """Bad input to global alignment (malformed output dict, disconnected pair graph, not enough memory, ...)."""


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
        return (w if sl is None else w[sl]).float()

    def conf(self, which: int, sl: slice | torch.Tensor | None = None) -> torch.Tensor:
        """float32 confidences (exp of the stored log-confidence; 0 on padding, which has log-weight 0)."""
        w = self.weights(which, sl)
        return torch.where(w > 0, w.exp(), torch.zeros_like(w))

    def coarse(self, stride: int) -> "PairData":
        """Contiguous copy of the stacks sub-sampled by `stride` (pixel coordinates stay exact)."""
        if stride == 1:
            return self
        sub = lambda t: t[:, ::stride, ::stride].contiguous()  # noqa: E731
        # point maps stored channels-first (E,3,h,w), seen through a (E,h,w,3) view: the solver's hot loops read
        # them channels-first (core.channels_first) without a copy
        cf = lambda t: t[:, ::stride, ::stride].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)  # noqa: E731
        return PairData(edges=self.edges, pts1=cf(self.pts1), pts2=cf(self.pts2), w1=sub(self.w1), w2=sub(self.w2),
                        shapes=self.shapes, names=self.names, orig_sizes=self.orig_sizes, transforms=self.transforms,
                        rgbs=self.rgbs, stride=self.stride * stride)


def _idx_list(x: Any, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, np.ndarray):
        return [int(v) for v in x.reshape(-1)]
    try:
        return [int(v) for v in x]
    except TypeError as e:
        raise AlignError(f"output['{what}']['idx'] must be a list of ints or a tensor, got {type(x).__name__}") from e


def _per_pair(x: Any, n_pairs: int, key: str, what: str) -> list[torch.Tensor]:
    """Split a stacked (P,...) tensor or a list of (1,...)/(...) tensors into P tensors."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(x)
        if x.shape[0] != n_pairs:
            raise AlignError(f"output['{what}']['{key}'] has {x.shape[0]} entries, expected {n_pairs} pairs")
        return list(x.unbind(0))
    if isinstance(x, (list, tuple)):
        if len(x) != n_pairs:
            raise AlignError(f"output['{what}']['{key}'] has {len(x)} entries, expected {n_pairs} pairs")
        out = []
        for t in x:
            t = torch.as_tensor(t)
            out.append(t[0] if t.dim() in (4,) or (key == "conf" and t.dim() == 3 and t.shape[0] == 1) else t)
        return out
    raise AlignError(f"output['{what}']['{key}'] must be a tensor or a list of tensors, got {type(x).__name__}")


def _meta(view: dict, key: str, p: int) -> Any:
    v = view.get(key)
    if v is None:
        return None
    try:
        return v[p]
    except (IndexError, TypeError, KeyError):
        return None


def _log_weights(confs: list[torch.Tensor], P: int, H: int, W: int, dev: torch.device, dtype: torch.dtype,
                 what: str, orig: Any = None) -> torch.Tensor:
    if isinstance(orig, torch.Tensor) and tuple(orig.shape) == (P, H, W):   # stacked: one vectorised pass
        c = orig.detach().to(dev, torch.float32)
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


def parse_output(output: dict, device: str | torch.device = "cpu", store_dtype: torch.dtype = torch.float32,
                 n_images: int | None = None) -> PairData:
    """Build `PairData` from the reference pair-inference output dict (see module doc)."""
    for k in ("view1", "view2", "pred1", "pred2"):
        if k not in output:
            raise AlignError(f"pair output lacks '{k}': pass the dict returned by inference(pairs, model, ...)")
    v1, v2, p1, p2 = output["view1"], output["view2"], output["pred1"], output["pred2"]
    if "pts3d" not in p1 or "pts3d_in_other_view" not in p2 or "conf" not in p1 or "conf" not in p2:
        raise AlignError("pair output must hold pred1['pts3d'], pred1['conf'], pred2['pts3d_in_other_view'], pred2['conf']")
    ii, jj = _idx_list(v1["idx"], "view1"), _idx_list(v2["idx"], "view2")
    if len(ii) != len(jj) or not ii:
        raise AlignError(f"view1/view2 idx lengths differ or are empty ({len(ii)} vs {len(jj)})")
    P = len(ii)
    a1 = _per_pair(p1["pts3d"], P, "pts3d", "pred1")
    a2 = _per_pair(p2["pts3d_in_other_view"], P, "pts3d_in_other_view", "pred2")
    c1 = _per_pair(p1["conf"], P, "conf", "pred1")
    c2 = _per_pair(p2["conf"], P, "conf", "pred2")
    N = max(max(ii), max(jj)) + 1 if n_images is None else n_images
    if min(min(ii), min(jj)) < 0 or max(max(ii), max(jj)) >= N:
        raise AlignError(f"image indices must lie in 0..{N - 1}")
    shapes = np.zeros((N, 2), np.int64)
    seen = np.zeros(N, bool)
    for p in range(P):
        for img, pts, conf in ((ii[p], a1[p], c1[p]), (jj[p], a2[p], c2[p])):
            if pts.dim() != 3 or pts.shape[-1] != 3 or tuple(conf.shape) != tuple(pts.shape[:2]):
                raise AlignError(f"pair {p}: point map {tuple(pts.shape)} / confidence {tuple(conf.shape)} are not (H,W,3)/(H,W)")
            hw = np.array(pts.shape[:2])
            if seen[img] and (shapes[img] != hw).any():
                raise AlignError(f"image {img} appears with two shapes {tuple(shapes[img])} and {tuple(hw)}")
            shapes[img], seen[img] = hw, True
    if not seen.all():
        missing = np.nonzero(~seen)[0].tolist()
        raise AlignError(f"images {missing} appear in no pair; add pairs for them (make_pairs over all views)")
    H, W = int(shapes[:, 0].max()), int(shapes[:, 1].max())
    uniform = bool((shapes == shapes[0]).all())
    dev = torch.device(device)

    def stack(lst: Sequence[torch.Tensor], fill: float, orig: Any) -> torch.Tensor:
        if uniform and isinstance(orig, torch.Tensor) and orig.dim() >= 3 and orig.shape[0] == P:
            return orig.detach().to(dev, store_dtype)   # no copy when already on device in the storage dtype
        if uniform:
            return torch.stack([t.detach().to(dev, store_dtype) for t in lst])
        out = torch.full((P, H, W) + tuple(lst[0].shape[2:]), fill, dtype=store_dtype, device=dev)
        for p, t in enumerate(lst):
            out[p, : t.shape[0], : t.shape[1]] = t.detach().to(dev, store_dtype)
        return out

    # stack once, straight into the storage dtype/device (no float32 duplicate when storing float16)
    pts1 = stack(a1, 0.0, p1["pts3d"])
    pts2 = stack(a2, 0.0, p2["pts3d_in_other_view"])
    for name, t in (("pred1 pts3d", pts1), ("pred2 pts3d_in_other_view", pts2)):
        if not torch.isfinite(t).all():
            raise AlignError(f"{name} contains NaN/inf values; check the network output (fp16 overflow?)")
    # log-confidence weights, stored instead of the confidences (the reference's 'log' confidence transform)
    w1 = _log_weights(c1, P, H, W, dev, store_dtype, "pred1 conf", p1["conf"])
    w2 = _log_weights(c2, P, H, W, dev, store_dtype, "pred2 conf", p2["conf"])
    del a1, a2, c1, c2

    names = [f"image_{k:04d}" for k in range(N)]
    orig_sizes = np.stack([shapes[:, 1], shapes[:, 0]], -1).astype(np.int64)
    transforms = np.tile(np.array([1.0, 1.0, 0.0, 0.0]), (N, 1))
    rgbs: list[np.ndarray | None] = [None] * N
    for view, idxs in ((v1, ii), (v2, jj)):
        for p, img in enumerate(idxs):
            nm = _meta(view, "name", p)
            if nm is not None:
                names[img] = str(nm)
            osz = _meta(view, "orig_size", p)
            if osz is not None:
                orig_sizes[img] = np.asarray(torch.as_tensor(osz).cpu(), dtype=np.int64).reshape(-1)[:2]
            tr = _meta(view, "transform", p)
            if tr is not None:
                transforms[img] = np.asarray(torch.as_tensor(tr).cpu(), dtype=np.float64).reshape(-1)[:4]
            if rgbs[img] is None:
                rgb = _meta(view, "rgb", p)
                if rgb is not None:
                    rgbs[img] = np.asarray(torch.as_tensor(rgb).cpu()).astype(np.uint8).reshape(*shapes[img], 3)
                else:
                    im = _meta(view, "img", p)
                    if im is not None:
                        im = torch.as_tensor(im).detach().float().cpu()
                        im = im[0] if im.dim() == 4 else im
                        rgbs[img] = ((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    rgbs_out = [r if r is not None else np.full((*shapes[k], 3), 128, np.uint8) for k, r in enumerate(rgbs)]
    edges = torch.tensor(list(zip(ii, jj)), dtype=torch.int64, device=dev)
    return PairData(edges=edges, pts1=pts1, pts2=pts2, w1=w1, w2=w2, shapes=shapes, names=names,
                    orig_sizes=orig_sizes, transforms=transforms, rgbs=rgbs_out)
