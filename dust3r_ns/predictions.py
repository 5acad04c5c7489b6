"""`PairPredictions`: what pair inference hands to global alignment, typed, stored once per image and per edge.

For each ordered edge e = (i, j) the network gives two point maps in camera i's frame and their confidences:
``pts1[e]`` [H_i, W_i, 3] (image i's pixels) and ``pts2[e]`` [H_j, W_j, 3] (image j's pixels), ``conf1[e]``
[H_i, W_i] and ``conf2[e]`` [H_j, W_j] (confidences are >= 1). Per-image metadata (`ImageInfo`: name, file,
original size, crop transform, colours) is held once in ``images``, not copied into every pair. ``ordered``
records that the images are frames of one sequence in index order (a video), which the aligner's consensus uses.

When every image has the same network shape the per-edge maps are stacked tensors [E, H, W, ...]; otherwise they
are lists of per-edge tensors (`uniform` tells which). Predictions can be saved to and loaded from one `.npz`
(atomic write, versioned, validated on read), and converted to and from the reference implementation's output
dict (`view1`/`view2`/`pred1`/`pred2`), which survives only as this adapter.

Too many pairs for memory: a pair store on disk (`PairStoreWriter`, `open_store`), a folder of one `.npy` file per
map kind ([E, H, W, 3] / [E, H, W], edge-major, float16 or float32) plus `meta.npz` (format tag, edges, image
metadata, `ordered`), written atomically. Its `PairPredictions` hold `DiskMaps`, which read ranges of edges with
explicit `pread`s into fresh buffers (no memory mapping, so resident memory is the working set, not the files).
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from dust3r_ns.fileio import atomic_dir, open_npz, save_npz
from dust3r_ns.images import ImageInfo, normalize

FORMAT_KIND = "dust3r_ns.PairPredictions"
FORMAT_VERSION = 1

Maps = Union[torch.Tensor, list]   # [E, H, W, ...] stacked, or E tensors [H_e, W_e, ...]


STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def to_storage(maps: dict, dtype: torch.dtype) -> dict:
    """Head outputs {key: tensor} in the storage dtype: float16 halves memory and files (points keep ~3 significant
    digits; confidences are clamped to float16's largest finite value, 65504)."""
    if dtype == torch.float32:
        return maps
    top = torch.finfo(dtype).max
    return {k: (v.clamp(max=top) if k == "conf" else v).to(dtype) for k, v in maps.items()}


class PredictionsError(ValueError):
    """Malformed pair predictions (shapes, indices, values) or an unreadable/invalid predictions file."""


def _per_edge(x: Maps, e: int) -> torch.Tensor:
    return x[e]


STORE_KIND = "dust3r_ns.PairStore"
STORE_VERSION = 1
STORE_MAPS = (("pts1", 3), ("pts2", 3), ("conf1", 0), ("conf2", 0))   # file stem, trailing channels (0: none)
_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


class DiskMaps:
    """One map kind of a pair store: an [E, H, W(, 3)] array in a `.npy` file, read by edge ranges.

    Indexing (an int, a slice with step 1, or an integer array / tensor of edges) returns a new CPU tensor in the
    file's dtype, read with `os.preadv` into a fresh buffer (runs of consecutive edges in one read each)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                major, _minor = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, fortran, dt = read(f)
                self.offset = f.tell()
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise PredictionsError(f"{self.path}: not a readable pair-store array ({type(e).__name__}: "
                                   f"{str(e)[:80]}); run `dust3r-ns infer` again") from None
        if fortran or np.dtype(dt) not in (np.float16, np.float32) or len(shape) not in (3, 4):
            raise PredictionsError(f"{self.path}: not a pair-store array (dtype {dt}, shape {shape}); run "
                                   "`dust3r-ns infer` again")
        self.np_dtype = np.dtype(dt)
        self.shape = torch.Size(shape)
        self.edge_bytes = int(np.prod(shape[1:])) * self.np_dtype.itemsize
        if size != self.offset + self.edge_bytes * shape[0]:
            raise PredictionsError(f"{self.path}: {size} bytes where its header promises "
                                   f"{self.offset + self.edge_bytes * shape[0]} (truncated or foreign file); run "
                                   "`dust3r-ns infer` again")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.np_dtype == np.float16 else torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __len__(self) -> int:
        return int(self.shape[0])

    def _read(self, fd: int, a: int, b: int, out: np.ndarray) -> None:
        """Edges [a, b) into `out` (C-contiguous, (b - a) edges)."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        pos, done = self.offset + a * self.edge_bytes, 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise PredictionsError(f"{self.path}: short read at edge {a} (file changed while reading?)")
            done += got

    def __getitem__(self, idx) -> torch.Tensor:
        E = len(self)
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.dim() == 0):
            k = int(idx)
            k = k + E if k < 0 else k
            if not 0 <= k < E:
                raise IndexError(f"edge {k} out of range for {E} edges")
            return self[k:k + 1][0]
        if isinstance(idx, slice):
            a, b, step = idx.indices(E)
            if step != 1:
                raise IndexError("DiskMaps slices take step 1")
            out = np.empty((max(0, b - a),) + tuple(self.shape[1:]), self.np_dtype)
            if b > a:
                with open(self.path, "rb") as f:
                    self._read(f.fileno(), a, b, out)
            return torch.from_numpy(out)
        ks = np.asarray(idx.cpu() if isinstance(idx, torch.Tensor) else idx, dtype=np.int64).reshape(-1)
        ks = np.where(ks < 0, ks + E, ks)
        if ks.size and (ks.min() < 0 or ks.max() >= E):
            raise IndexError(f"edge index out of range for {E} edges")
        uniq, inv = np.unique(ks, return_inverse=True)
        buf = np.empty((len(uniq),) + tuple(self.shape[1:]), self.np_dtype)
        if len(uniq):
            cuts = np.nonzero(np.diff(uniq) != 1)[0] + 1          # runs of consecutive edges
            with open(self.path, "rb") as f:
                for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(uniq)]):
                    self._read(f.fileno(), int(uniq[lo]), int(uniq[lo]) + int(hi - lo), buf[lo:hi])
        out = buf if len(uniq) == len(ks) and (inv == np.arange(len(ks))).all() else buf[inv]
        return torch.from_numpy(np.ascontiguousarray(out))

    def chunks(self, edges_per_chunk: int):
        """(slice, tensor) over all edges, `edges_per_chunk` at a time."""
        for a in range(0, len(self), edges_per_chunk):
            sl = slice(a, min(a + edges_per_chunk, len(self)))
            yield sl, self[sl]


def _chunked(maps, elems: int = 1 << 22):
    """The tensors of `maps` in pieces of about `elems` values (a stored stack chunk by chunk)."""
    if isinstance(maps, DiskMaps):
        per = max(1, elems // max(1, int(np.prod(maps.shape[1:]))))
        return (t for _, t in maps.chunks(per))
    return [maps] if isinstance(maps, torch.Tensor) else maps


def check_store_path(path: str | os.PathLike) -> None:
    """Refuse (PredictionsError) a pair store path that writing the store would harm: an existing file or a folder
    that is not a pair store (writing a store replaces its folder whole)."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "meta.npz").is_file())):
        raise PredictionsError(f"{path} exists and is not a pair store, which writing the store would replace whole; "
                               "name a new folder for it")


class PairStoreWriter:
    """Write pair predictions edge range by edge range into a pair store folder (module doc), atomically: the
    folder appears complete at `path` when the `with` block ends without error; on an error (or when not every
    edge was written) no folder is left there (an older store at `path` stays as it was).

    with PairStoreWriter(path, images, edges, H, W, torch.float16) as w:
        w.write(start, {"pts1": ..., "pts2": ..., "conf1": ..., "conf2": ...})   # [b, H, W(, 3)] each
    """

    def __init__(self, path: str | os.PathLike, images: list[ImageInfo], edges, H: int, W: int,
                 dtype: torch.dtype = torch.float16, ordered: bool = False) -> None:
        if dtype not in _NP_DTYPES:
            raise PredictionsError(f"pair store dtype must be float16 or float32, got {dtype}")
        self.path, self.images, self.H, self.W, self.dtype = Path(path), images, int(H), int(W), dtype
        self.ordered = bool(ordered)
        self.edges = np.asarray(edges, dtype=np.int64).reshape(-1, 2)
        self.written = np.zeros(len(self.edges), bool)
        self._ctx = None
        self._files: dict[str, tuple[int, int, int]] = {}    # stem -> (fd, data offset, bytes per edge)

    def nbytes(self) -> int:
        """Bytes of the maps the store will hold (its files are written sparse, so the disk fills as edges come)."""
        per_px = sum(ch or 1 for _, ch in STORE_MAPS) * np.dtype(_NP_DTYPES[self.dtype]).itemsize
        return len(self.edges) * self.H * self.W * per_px

    def _free(self) -> int:
        """Free bytes on the disk that holds (or will hold) the store's folder."""
        folder = self.path.absolute().parent
        while not folder.exists() and folder != folder.parent:    # the folders it would create are on that disk
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def _no_space(self, free: int) -> PredictionsError:
        return PredictionsError(f"{self.path}: the pair store needs {self.nbytes() / 2 ** 30:.2f} GiB and its disk has "
                                f"{free / 2 ** 30:.2f} GiB free; free some space, write it to another disk (--out) or "
                                "keep the predictions in memory (--store float16)")

    def __enter__(self) -> "PairStoreWriter":
        shapes = {im.shape for im in self.images}
        if shapes != {(self.H, self.W)}:
            raise PredictionsError(f"a pair store holds one image shape, got {sorted(shapes)}; resize the images to "
                                   "one size or keep the predictions in memory (--store float16)")
        check_store_path(self.path)
        free = self._free()
        if self.nbytes() > free:
            raise self._no_space(free)
        self._ctx = atomic_dir(self.path, what="pair store", error=PredictionsError, replace=True)
        tmp = self._ctx.__enter__()
        try:
            save_npz(tmp / "meta.npz", _meta_arrays(self.images, self.edges, self.ordered), STORE_KIND,
                     STORE_VERSION, "pair store", PredictionsError)
            E = len(self.edges)
            for stem, ch in STORE_MAPS:
                shape = (E, self.H, self.W) + ((ch,) if ch else ())
                arr = np.lib.format.open_memmap(tmp / f"{stem}.npy", mode="w+", dtype=_NP_DTYPES[self.dtype],
                                                shape=shape)      # header + sparse file of the full size
                offset = int(arr.offset)
                del arr
                fd = os.open(tmp / f"{stem}.npy", os.O_WRONLY)
                self._files[stem] = (fd, offset, int(np.prod(shape[1:])) * np.dtype(_NP_DTYPES[self.dtype]).itemsize)
        except BaseException:
            self._close(*sys.exc_info())
            raise
        return self

    def write(self, start: int, maps: dict) -> None:
        """Store edges [start, start + b) of each map kind (tensors [b, H, W(, 3)], converted by `to_storage`)."""
        b = None
        for stem, ch in STORE_MAPS:
            t = to_storage({"conf" if not ch else "pts3d": maps[stem]}, self.dtype)["conf" if not ch else "pts3d"]
            a = np.ascontiguousarray(t.detach().cpu().numpy().astype(_NP_DTYPES[self.dtype], copy=False))
            if a.shape[1:] != (self.H, self.W) + ((ch,) if ch else ()) or (b is not None and len(a) != b):
                raise PredictionsError(f"pair store: {stem} batch has shape {a.shape}, expected [b, {self.H}, "
                                       f"{self.W}{', 3' if ch else ''}]")
            b = len(a)
            if not (np.isfinite(a).all() and (ch or (a > 0).all())):
                raise PredictionsError(f"{self.path}: {stem} of edges {start}..{start + b - 1} holds NaN/inf "
                                       f"{'' if ch else 'or non-positive '}values; check the network output")
            fd, offset, per = self._files[stem]
            view, done = memoryview(a.reshape(-1).view(np.uint8)), 0
            try:
                while done < len(view):
                    done += os.pwrite(fd, view[done:], offset + start * per + done)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                raise self._no_space(self._free()) from None
        self.written[start:start + b] = True

    def _close(self, *exc) -> None:
        for fd, _, _ in self._files.values():
            os.close(fd)
        self._files = {}
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(*exc)

    def __exit__(self, et, ev, tb) -> None:
        if et is None and not self.written.all():
            missing = np.nonzero(~self.written)[0]
            err = PredictionsError(f"{self.path}: pair store incomplete, {len(missing)} of {len(self.written)} edges "
                                   f"never written (first {int(missing[0])})")
            self._close(PredictionsError, err, None)
            raise err
        self._close(et, ev, tb)


def _meta_arrays(images: list[ImageInfo], edges: np.ndarray, ordered: bool) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {
        "ordered": np.array(bool(ordered)),
        "edges": np.asarray(edges, np.int64).reshape(-1, 2), "names": np.array([im.name for im in images], dtype=np.str_),
        "paths": np.array([im.path for im in images], dtype=np.str_),
        "orig_sizes": np.array([im.orig_size for im in images], dtype=np.int64).reshape(-1, 2),
        "transforms": np.stack([im.transform for im in images]).astype(np.float64),
    }
    for k, im in enumerate(images):
        arrays[f"rgb_{k}"] = im.rgb
    return arrays


def _meta_images(z) -> list[ImageInfo]:
    names, paths = [str(s) for s in z["names"]], [str(s) for s in z["paths"]]
    sizes, transforms = z["orig_sizes"], z["transforms"]
    return [ImageInfo(name=names[k], path=paths[k], orig_size=(int(sizes[k, 0]), int(sizes[k, 1])),
                      transform=transforms[k].astype(np.float64), rgb=z[f"rgb_{k}"]) for k in range(len(names))]


def _meta_ordered(z) -> bool:
    """The `ordered` flag (files written before it existed hold unordered images)."""
    return bool(z["ordered"]) if "ordered" in z.files else False


def open_store(path: str | os.PathLike) -> "PairPredictions":
    """The `PairPredictions` of a pair store folder, its maps as `DiskMaps` (nothing but the metadata is read:
    headers and file sizes are checked here; values when they are read). PredictionsError names the bad file."""
    path = Path(path)
    fix = "run `dust3r-ns infer` again"
    with open_npz(path / "meta.npz", STORE_KIND, STORE_VERSION, "pair store", fix, PredictionsError) as z:
        edges = z["edges"]
        images = _meta_images(z)
        ordered = _meta_ordered(z)
    maps = [DiskMaps(path / f"{stem}.npy") for stem, _ in STORE_MAPS]
    for (stem, _), m in zip(STORE_MAPS, maps):
        if len(m) != len(edges) or m.dtype != maps[0].dtype:
            raise PredictionsError(f"{m.path}: {len(m)} edges of {m.dtype} where meta.npz lists {len(edges)} edges "
                                   f"of {maps[0].dtype}; {fix}")
    try:
        return PairPredictions(images=images, edges=edges, pts1=maps[0], pts2=maps[1], conf1=maps[2], conf2=maps[3],
                               ordered=ordered)
    except PredictionsError as e:
        raise PredictionsError(f"{path}: {e}") from None


@dataclass(eq=False)
class PairPredictions:
    """Pairwise DUSt3R predictions over a set of images (see the module docstring for the layout)."""

    images: list[ImageInfo]
    edges: np.ndarray   # [E, 2] int64 (i, j): pts1 in camera i for image i, pts2 in camera i for image j
    pts1: Maps          # [E, H, W, 3] float
    pts2: Maps          # [E, H, W, 3] float
    conf1: Maps         # [E, H, W] float, >= 1
    conf2: Maps         # [E, H, W] float, >= 1
    ordered: bool = False   # the images are frames of one sequence in index order (a video)

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
        return isinstance(self.pts1, (torch.Tensor, DiskMaps))

    @property
    def on_disk(self) -> bool:
        """True when the maps are read from a pair store (`DiskMaps`)."""
        return isinstance(self.pts1, DiskMaps)

    @property
    def store_path(self) -> Path | None:
        """The pair store folder the maps are read from (None when they are in memory)."""
        return self.pts1.path.parent if isinstance(self.pts1, DiskMaps) else None

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
        stacked = [isinstance(m, (torch.Tensor, DiskMaps)) for m in (self.pts1, self.pts2, self.conf1, self.conf2)]
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
            for m in _chunked(maps):
                if not bool(torch.isfinite(m).all()):
                    raise PredictionsError(f"{key} contains NaN/inf values; check the network output (fp16 overflow?)")
        for key, maps in (("conf1", self.conf1), ("conf2", self.conf2)):
            for m in _chunked(maps):
                if not bool((torch.isfinite(m) & (m > 0)).all()):
                    raise PredictionsError(f"{key} has non-finite or non-positive values; confidences are 1 + exp(x)")

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of the point maps."""
        return (self.pts1 if self.uniform else self.pts1[0]).dtype

    def astype(self, dtype: torch.dtype) -> "PairPredictions":
        """A copy with the maps stored in `dtype` (see `to_storage`); a pair store's maps are read into memory."""
        conv = lambda m, key: to_storage({key: m}, dtype)[key]  # noqa: E731
        maps = {}
        for name, key in (("pts1", "pts3d"), ("pts2", "pts3d"), ("conf1", "conf"), ("conf2", "conf")):
            m = getattr(self, name)
            m = m[:] if isinstance(m, DiskMaps) else m
            maps[name] = conv(m, key) if self.uniform else [conv(t, key) for t in m]
        return PairPredictions(images=self.images, edges=self.edges, ordered=self.ordered, **maps)

    # ------------------------------------------------------------------ access
    def edge(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pts1 [H_i, W_i, 3], pts2 [H_j, W_j, 3], conf1 [H_i, W_i], conf2 [H_j, W_j]) of edge e."""
        return (_per_edge(self.pts1, e), _per_edge(self.pts2, e), _per_edge(self.conf1, e),
                _per_edge(self.conf2, e))

    def mean_confidence(self) -> float:
        """Mean of conf1 over all pairs and pixels."""
        total = sum(float(c.float().sum()) for c in _chunked(self.conf1))
        return total / max(1, self.conf1.shape.numel() if self.uniform else sum(c.numel() for c in self.conf1))

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
        arrays = _meta_arrays(self.images, self.edges, self.ordered)
        arrays["uniform"] = np.array(self.uniform)
        for key in ("pts1", "pts2", "conf1", "conf2"):
            maps = getattr(self, key)
            if self.uniform:
                arrays[key] = (maps[:] if isinstance(maps, DiskMaps) else maps).detach().cpu().numpy()
            else:
                for e, m in enumerate(maps):
                    arrays[f"{key}_{e}"] = m.detach().cpu().numpy()
        return save_npz(path, arrays, FORMAT_KIND, FORMAT_VERSION, "pair predictions", PredictionsError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairPredictions":
        """Read a file written by `save` (or open a pair store folder, `open_store`); raise PredictionsError naming
        the file when it is not one or is damaged."""
        path = Path(path)
        if path.is_dir():
            return open_store(path)
        with open_npz(path, FORMAT_KIND, FORMAT_VERSION, "pair predictions", "run `dust3r-ns infer` again",
                      PredictionsError) as z:
            edges = z["edges"]
            images = _meta_images(z)
            ordered = _meta_ordered(z)
            if bool(z["uniform"]):
                maps = [torch.from_numpy(z[key]) for key in ("pts1", "pts2", "conf1", "conf2")]
            else:
                maps = [[torch.from_numpy(z[f"{key}_{e}"]) for e in range(len(edges))]
                        for key in ("pts1", "pts2", "conf1", "conf2")]
        try:
            preds = cls(images=images, edges=edges, pts1=maps[0], pts2=maps[1], conf1=maps[2], conf2=maps[3],
                        ordered=ordered)
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
