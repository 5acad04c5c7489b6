"""`PairPredictions`: what pair inference hands to global alignment, typed, stored once per image and per edge.

For each ordered edge e = (i, j) the network gives two point maps in camera i's frame and their confidences:
``pts1[e]`` [H_i, W_i, 3] (image i's pixels) and ``pts2[e]`` [H_j, W_j, 3] (image j's pixels), ``conf1[e]``
[H_i, W_i] and ``conf2[e]`` [H_j, W_j] (confidences are >= 1). Per-image metadata (`ImageInfo`: name, file,
original size, crop transform, colours) is held once in ``images``, not copied into every pair.

When every image has the same network shape the per-edge maps are stacked tensors [E, H, W, ...]; otherwise they
are lists of per-edge tensors (`uniform` tells which). Predictions can be saved to and loaded from one `.npz`
(atomic write, versioned, validated on read), and converted to and from the reference implementation's output
dict (`view1`/`view2`/`pred1`/`pred2`), which survives only as this adapter.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from dust3r_ns.fileio import write_npz
from dust3r_ns.images import ImageInfo, normalize

FORMAT_KIND = "dust3r_ns.PairPredictions"
FORMAT_VERSION = 1

Maps = Union[torch.Tensor, list]   # [E, H, W, ...] stacked, or E tensors [H_e, W_e, ...]


class PredictionsError(ValueError):
    """Malformed pair predictions (shapes, indices, values) or an unreadable/invalid predictions file."""


def _per_edge(x: Maps, e: int) -> torch.Tensor:
    return x[e]


@dataclass(eq=False)
class PairPredictions:
    """Pairwise DUSt3R predictions over a set of images (see the module docstring for the layout)."""

    images: list[ImageInfo]
    edges: np.ndarray   # [E, 2] int64 (i, j): pts1 in camera i for image i, pts2 in camera i for image j
    pts1: Maps          # [E, H, W, 3] float
    pts2: Maps          # [E, H, W, 3] float
    conf1: Maps         # [E, H, W] float, >= 1
    conf2: Maps         # [E, H, W] float, >= 1

    def __post_init__(self) -> None:
        self.edges = np.asarray(self.edges, dtype=np.int64).reshape(-1, 2)
        self.validate()

    # ------------------------------------------------------------------ shape
    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def n_edges(self) -> int:
        return int(self.edges.shape[0])

    def __len__(self) -> int:
        return self.n_edges

    @property
    def uniform(self) -> bool:
        """True when the maps are stacked tensors (all images share one network shape)."""
        return isinstance(self.pts1, torch.Tensor)

    @property
    def shapes(self) -> np.ndarray:
        """[N, 2] int64 (H, W) network shape per image."""
        return np.array([im.shape for im in self.images], dtype=np.int64).reshape(-1, 2)

    @property
    def names(self) -> list[str]:
        return [im.name for im in self.images]

    def validate(self) -> None:
        """Check indices, per-edge shapes against the images' shapes and the values (finite points, conf >= 1)."""
        N, E = self.n_images, self.n_edges
        if N == 0 or E == 0:
            raise PredictionsError(f"pair predictions need at least one image and one pair, got {N} images / {E} "
                                   "pairs; run inference on make_pairs(views, ...)")
        if self.edges.min() < 0 or self.edges.max() >= N:
            raise PredictionsError(f"pair image indices must lie in 0..{N - 1}, got {self.edges.min()}.."
                                   f"{self.edges.max()}")
        seen = np.zeros(N, bool)
        seen[self.edges.ravel()] = True
        if not seen.all():
            raise PredictionsError(f"images {np.nonzero(~seen)[0].tolist()} appear in no pair; add pairs for them "
                                   "(make_pairs over all views)")
        stacked = [isinstance(m, torch.Tensor) for m in (self.pts1, self.pts2, self.conf1, self.conf2)]
        if any(stacked) != all(stacked):
            raise PredictionsError("point maps and confidences must be all stacked tensors or all lists")
        shapes = self.shapes
        for key, maps, side, tail in (("pts1", self.pts1, 0, (3,)), ("pts2", self.pts2, 1, (3,)),
                                      ("conf1", self.conf1, 0, ()), ("conf2", self.conf2, 1, ())):
            if len(maps) != E:
                raise PredictionsError(f"{key} has {len(maps)} entries for {E} pairs")
            if stacked[0]:
                want = {tuple(shapes[k]) + tail for k in self.edges[:, side]}
                got = tuple(maps.shape[1:])
                if len(want) != 1 or got not in want:
                    raise PredictionsError(f"{key} is stacked as {tuple(maps.shape)} but its images have network "
                                           f"shapes {sorted(want)} (stack only equal shapes, else give lists)")
            else:
                for e in range(E):
                    want = tuple(shapes[self.edges[e, side]]) + tail
                    if tuple(maps[e].shape) != want:
                        raise PredictionsError(f"{key} of pair {e} ({self.edges[e, 0]}, {self.edges[e, 1]}) has shape "
                                               f"{tuple(maps[e].shape)}, expected {want} from its image")

    def check_values(self) -> None:
        """Raise when a point map holds NaN/inf or a confidence is non-finite or below 1."""
        for key, maps in (("pts1", self.pts1), ("pts2", self.pts2)):
            for m in ([maps] if self.uniform else maps):
                if not bool(torch.isfinite(m).all()):
                    raise PredictionsError(f"{key} contains NaN/inf values; check the network output (fp16 overflow?)")
        for key, maps in (("conf1", self.conf1), ("conf2", self.conf2)):
            for m in ([maps] if self.uniform else maps):
                if not bool((torch.isfinite(m) & (m > 0)).all()):
                    raise PredictionsError(f"{key} has non-finite or non-positive values; confidences are 1 + exp(x)")

    # ------------------------------------------------------------------ access
    def edge(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pts1 [H_i, W_i, 3], pts2 [H_j, W_j, 3], conf1 [H_i, W_i], conf2 [H_j, W_j]) of edge e."""
        return (_per_edge(self.pts1, e), _per_edge(self.pts2, e), _per_edge(self.conf1, e),
                _per_edge(self.conf2, e))

    def mean_confidence(self) -> float:
        """Mean of conf1 over all pairs and pixels."""
        if self.uniform:
            return float(self.conf1.float().mean())
        total = sum(float(c.float().sum()) for c in self.conf1)
        return total / max(1, sum(c.numel() for c in self.conf1))

    # ------------------------------------------------------------------ reference adapter
    def to_reference(self) -> dict:
        """The reference implementation's output dict: view1/view2 (`img`, `true_shape`, `idx`, `instance`, plus
        `name`), pred1 (`pts3d`, `conf`), pred2 (`pts3d_in_other_view`, `conf`); lists when shapes differ."""
        imgs = [normalize(im.rgb) for im in self.images]

        def views(col: int) -> dict:
            idx = [int(k) for k in self.edges[:, col]]
            img = [imgs[k] for k in idx]
            return dict(img=torch.cat(img) if self.uniform else [t[0] for t in img],
                        true_shape=torch.tensor([list(self.images[k].shape) for k in idx]), idx=idx,
                        instance=[str(k) for k in idx], name=[self.images[k].name for k in idx])

        return dict(view1=views(0), view2=views(1), pred1=dict(pts3d=self.pts1, conf=self.conf1),
                    pred2=dict(pts3d_in_other_view=self.pts2, conf=self.conf2))

    @classmethod
    def from_reference(cls, output: dict, n_images: int | None = None) -> "PairPredictions":
        """Build from the reference output dict. Image metadata comes from the views when they carry it (`name`,
        `path`, `orig_size`, `transform`, `rgb`, else colours from `img`); tensors are kept without copies."""
        if not isinstance(output, dict):
            raise PredictionsError(f"pair predictions must be a PairPredictions or the reference output dict, got "
                                   f"{type(output).__name__}; pass what inference(pairs, model, ...) returns")
        for k in ("view1", "view2", "pred1", "pred2"):
            if k not in output:
                raise PredictionsError(f"pair output lacks '{k}': pass the dict returned by inference(pairs, model, "
                                       "...).to_reference()")
        v1, v2, p1, p2 = output["view1"], output["view2"], output["pred1"], output["pred2"]
        if "pts3d" not in p1 or "pts3d_in_other_view" not in p2 or "conf" not in p1 or "conf" not in p2:
            raise PredictionsError("pair output must hold pred1['pts3d'], pred1['conf'], pred2['pts3d_in_other_view'], "
                                   "pred2['conf']")
        ii, jj = _idx_list(v1.get("idx"), "view1"), _idx_list(v2.get("idx"), "view2")
        if len(ii) != len(jj) or not ii:
            raise PredictionsError(f"view1/view2 idx lengths differ or are empty ({len(ii)} vs {len(jj)})")
        P = len(ii)
        maps = [_maps(x, P, key, what) for x, key, what in ((p1["pts3d"], "pts3d", "pred1"),
                                                             (p2["pts3d_in_other_view"], "pts3d_in_other_view", "pred2"),
                                                             (p1["conf"], "conf", "pred1"), (p2["conf"], "conf", "pred2"))]
        N = max(max(ii), max(jj)) + 1 if n_images is None else int(n_images)
        if min(min(ii), min(jj)) < 0 or max(max(ii), max(jj)) >= N:
            raise PredictionsError(f"image indices must lie in 0..{N - 1}")
        # per-image shape from the maps, checked for consistency
        shapes: list[tuple[int, int] | None] = [None] * N
        for p in range(P):
            for img, pts, conf in ((ii[p], _per_edge(maps[0], p), _per_edge(maps[2], p)),
                                   (jj[p], _per_edge(maps[1], p), _per_edge(maps[3], p))):
                if pts.dim() != 3 or pts.shape[-1] != 3 or tuple(conf.shape) != tuple(pts.shape[:2]):
                    raise PredictionsError(f"pair {p}: point map {tuple(pts.shape)} / confidence "
                                           f"{tuple(conf.shape)} are not (H,W,3)/(H,W)")
                hw = (int(pts.shape[0]), int(pts.shape[1]))
                if shapes[img] is not None and shapes[img] != hw:
                    raise PredictionsError(f"image {img} appears with two shapes {shapes[img]} and {hw}")
                shapes[img] = hw
        missing = [k for k, s in enumerate(shapes) if s is None]
        if missing:
            raise PredictionsError(f"images {missing} appear in no pair; add pairs for them (make_pairs over all views)")
        images = _infos_from_views(shapes, ((v1, ii), (v2, jj)))
        uniform = len(set(shapes)) == 1 and all(isinstance(m, torch.Tensor) for m in maps)
        if not uniform:
            maps = [[_per_edge(m, p) for p in range(P)] for m in maps]
        return cls(images=images, edges=np.array(list(zip(ii, jj)), dtype=np.int64).reshape(-1, 2),
                   pts1=maps[0], pts2=maps[1], conf1=maps[2], conf2=maps[3])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one `.npz` atomically: format tag, edges, per-image metadata and colours, the maps (stacked
        arrays when uniform, else one array per edge and side)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise PredictionsError(f"{path}: pair prediction files must end in .npz")
        arrays: dict[str, np.ndarray] = {
            "format_kind": np.array(FORMAT_KIND), "format_version": np.array(FORMAT_VERSION),
            "edges": self.edges, "names": np.array(self.names, dtype=np.str_),
            "paths": np.array([im.path for im in self.images], dtype=np.str_),
            "orig_sizes": np.array([im.orig_size for im in self.images], dtype=np.int64).reshape(-1, 2),
            "transforms": np.stack([im.transform for im in self.images]).astype(np.float64),
            "uniform": np.array(self.uniform),
        }
        for k, im in enumerate(self.images):
            arrays[f"rgb_{k}"] = im.rgb
        for key in ("pts1", "pts2", "conf1", "conf2"):
            maps = getattr(self, key)
            if self.uniform:
                arrays[key] = maps.detach().cpu().numpy()
            else:
                for e, m in enumerate(maps):
                    arrays[f"{key}_{e}"] = m.detach().cpu().numpy()
        return write_npz(path, arrays, "pair predictions", PredictionsError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairPredictions":
        """Read a file written by `save`; raise PredictionsError naming the file when it is not one or is damaged."""
        path = Path(path)
        if not path.is_file():
            raise PredictionsError(f"{path}: no such file; pass a pair predictions .npz written by `dust3r-ns infer`")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "format_kind" not in z.files or str(z["format_kind"]) != FORMAT_KIND:
                    raise PredictionsError(f"{path}: not a pair predictions file (written by `dust3r-ns infer`)")
                version = int(z["format_version"])
                if version > FORMAT_VERSION:
                    raise PredictionsError(f"{path}: format version {version} is newer than this dust3r_ns reads "
                                           f"({FORMAT_VERSION}); upgrade dust3r_ns")
                edges = z["edges"]
                names, paths = [str(s) for s in z["names"]], [str(s) for s in z["paths"]]
                sizes, transforms = z["orig_sizes"], z["transforms"]
                images = [ImageInfo(name=names[k], path=paths[k], orig_size=(int(sizes[k, 0]), int(sizes[k, 1])),
                                    transform=transforms[k].astype(np.float64), rgb=z[f"rgb_{k}"])
                          for k in range(len(names))]
                if bool(z["uniform"]):
                    maps = [torch.from_numpy(z[key]) for key in ("pts1", "pts2", "conf1", "conf2")]
                else:
                    maps = [[torch.from_numpy(z[f"{key}_{e}"]) for e in range(len(edges))]
                            for key in ("pts1", "pts2", "conf1", "conf2")]
        except PredictionsError:
            raise
        except (OSError, ValueError, KeyError, IndexError, EOFError, zipfile.BadZipFile) as e:
            raise PredictionsError(f"{path}: unreadable or incomplete pair predictions file ({type(e).__name__}: "
                                   f"{str(e)[:80]}); run `dust3r-ns infer` again") from None
        try:
            preds = cls(images=images, edges=edges, pts1=maps[0], pts2=maps[1], conf1=maps[2], conf2=maps[3])
            preds.check_values()
        except PredictionsError as e:
            raise PredictionsError(f"{path}: {e}") from None
        return preds


# ---------------------------------------------------------------------------------------------- reference helpers
def _idx_list(x: Any, what: str) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.reshape(-1).tolist()]
    if isinstance(x, np.ndarray):
        return [int(v) for v in x.reshape(-1)]
    try:
        return [int(v) for v in x]
    except TypeError as e:
        raise PredictionsError(f"output['{what}']['idx'] must be a list of ints or a tensor, got "
                               f"{type(x).__name__}") from e


def _maps(x: Any, n_pairs: int, key: str, what: str) -> Maps:
    """A stacked (P, ...) tensor as it is, or a list of (1, ...)/(...) tensors as a list of per-pair tensors."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(x)
        if x.shape[0] != n_pairs:
            raise PredictionsError(f"output['{what}']['{key}'] has {x.shape[0]} entries, expected {n_pairs} pairs")
        return x
    if isinstance(x, (list, tuple)):
        if len(x) != n_pairs:
            raise PredictionsError(f"output['{what}']['{key}'] has {len(x)} entries, expected {n_pairs} pairs")
        out = []
        for t in x:
            t = torch.as_tensor(t)
            out.append(t[0] if t.dim() == 4 or (key == "conf" and t.dim() == 3 and t.shape[0] == 1) else t)
        return out
    raise PredictionsError(f"output['{what}']['{key}'] must be a tensor or a list of tensors, got {type(x).__name__}")


def _meta(view: dict, key: str, p: int) -> Any:
    v = view.get(key)
    if v is None:
        return None
    try:
        return v[p]
    except (IndexError, TypeError, KeyError):
        return None


def _infos_from_views(shapes: list[tuple[int, int]], sides: Sequence[tuple[dict, list[int]]]) -> list[ImageInfo]:
    """Per-image metadata from the pair slots that name each image, in one pass over the pairs (defaults: the
    network image itself, identity crop, name image_NNNN, grey colours)."""
    N = len(shapes)
    fields: list[dict[str, Any]] = [{} for _ in range(N)]
    for view, idxs in sides:
        for p, k in enumerate(idxs):
            f = fields[k]
            for key in ("name", "path", "orig_size", "transform"):
                v = _meta(view, key, p)
                if v is not None:
                    f[key] = v
            if "rgb" not in f:
                c = _meta(view, "rgb", p)
                if c is not None:
                    f["rgb"] = np.asarray(torch.as_tensor(c).cpu()).astype(np.uint8).reshape(*shapes[k], 3)
                else:
                    im = _meta(view, "img", p)
                    if im is not None:
                        im = torch.as_tensor(im).detach().float().cpu()
                        im = im[0] if im.dim() == 4 else im
                        f["rgb"] = ((im.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    out = []
    for k, (f, shape) in enumerate(zip(fields, shapes)):
        osz = f.get("orig_size")
        if osz is not None:
            o = np.asarray(torch.as_tensor(osz).cpu(), dtype=np.int64).reshape(-1)[:2]
            osz = (int(o[0]), int(o[1]))
        tr = f.get("transform")
        out.append(ImageInfo(name=str(f.get("name", f"image_{k:04d}")), path=str(f.get("path", "")),
                             orig_size=(shape[1], shape[0]) if osz is None else osz,
                             transform=np.array([1.0, 1.0, 0.0, 0.0]) if tr is None
                             else np.asarray(torch.as_tensor(tr).cpu(), dtype=np.float64).reshape(-1)[:4],
                             rgb=f.get("rgb", np.full((*shape, 3), 128, np.uint8))))
    return out
