"""The reconstruction produced by global alignment: per-image cameras, depth maps, confidences, colours.

`Reconstruction` holds, per image, the camera-to-world pose (4x4, OpenCV axes), intrinsics in network pixels, the
depth map (z-depth, network resolution), confidence and colours, plus what is needed to go back to the original
image (name, original size, network resize/crop transform). It extracts a coloured point cloud (confidence
threshold, optional far-background removal, voxel down-sampling to a point cap) and saves/loads one `.npz`
(atomic write, versioned, validated on read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .fileio import write_npz

FORMAT_KIND = "dust3r_ns.Reconstruction"
FORMAT_VERSION = 1


class ReconstructionError(ValueError):
    """Raised for inconsistent reconstruction contents or an unreadable/invalid `.npz` file."""


def _as_list(arrs: Sequence[np.ndarray], dtype: Any, ndim: int, what: str) -> list[np.ndarray]:
    out = []
    for k, a in enumerate(arrs):
        a = np.asarray(a)
        if a.ndim != ndim:
            raise ReconstructionError(f"{what}[{k}] must have {ndim} dims, got shape {a.shape}")
        out.append(np.ascontiguousarray(a.astype(dtype, copy=False)))
    return out


@dataclass
class Reconstruction:
    """Per-image global-alignment result. All lists/arrays are indexed by image (0..N-1).

    names: image names; orig_sizes: (N,2) int (W,H) of the original images; transforms: (N,4) float64
    (sx, sy, x0, y0) with net = (orig + 0.5) * (sx, sy) - 0.5 - (x0, y0); c2w: (N,4,4) float64 OpenCV camera-to-world;
    K: (N,3,3) float64 intrinsics in network pixels; depths/confs: lists of (H,W) float32; rgbs: list of (H,W,3) uint8.
    meta: free-form scalars (solver mode, loss, timings) saved alongside.
    """

    names: list[str]
    orig_sizes: np.ndarray
    transforms: np.ndarray
    c2w: np.ndarray
    K: np.ndarray
    depths: list[np.ndarray]
    confs: list[np.ndarray]
    rgbs: list[np.ndarray]
    meta: dict[str, float | int | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.names)
        self.names = [str(s) for s in self.names]
        self.orig_sizes = np.asarray(self.orig_sizes, dtype=np.int64).reshape(-1, 2)
        self.transforms = np.asarray(self.transforms, dtype=np.float64).reshape(-1, 4)
        self.c2w = np.asarray(self.c2w, dtype=np.float64)
        self.K = np.asarray(self.K, dtype=np.float64)
        self.depths = _as_list(self.depths, np.float32, 2, "depths")
        self.confs = _as_list(self.confs, np.float32, 2, "confs")
        self.rgbs = _as_list(self.rgbs, np.uint8, 3, "rgbs")
        for key, arr, shape in (("orig_sizes", self.orig_sizes, (n, 2)), ("transforms", self.transforms, (n, 4)),
                                ("c2w", self.c2w, (n, 4, 4)), ("K", self.K, (n, 3, 3))):
            if arr.shape != shape:
                raise ReconstructionError(f"Reconstruction.{key} has shape {arr.shape}, expected {shape} for {n} images")
        for key in ("depths", "confs", "rgbs"):
            if len(getattr(self, key)) != n:
                raise ReconstructionError(f"Reconstruction.{key} has {len(getattr(self, key))} entries, expected {n}")
        for k in range(n):
            hw = self.depths[k].shape
            if self.confs[k].shape != hw or self.rgbs[k].shape != (*hw, 3):
                raise ReconstructionError(
                    f"image {k} ({self.names[k]}): depth {hw}, conf {self.confs[k].shape}, rgb {self.rgbs[k].shape} disagree")
        if not (np.isfinite(self.c2w).all() and np.isfinite(self.K).all()):
            raise ReconstructionError("Reconstruction.c2w/K contain non-finite values")

    # ------------------------------------------------------------------ accessors
    def __len__(self) -> int:
        return len(self.names)

    @property
    def shapes(self) -> np.ndarray:
        """(N,2) network (H, W) of each image."""
        return np.array([d.shape for d in self.depths], dtype=np.int64).reshape(-1, 2)

    @property
    def focals(self) -> np.ndarray:
        """(N,) mean of fx, fy in network pixels."""
        return 0.5 * (self.K[:, 0, 0] + self.K[:, 1, 1])

    @property
    def K_orig(self) -> np.ndarray:
        """(N,3,3) intrinsics in original-image pixels (inverse of the network resize/crop)."""
        from dust3r_ns.conventions import K_net_to_orig

        return np.asarray(K_net_to_orig(self.K, self.transforms), dtype=np.float64)

    @property
    def default_conf_thr(self) -> float:
        """The threshold chosen at alignment time (meta 'conf_thr'), else the reference's 3.0."""
        return float(self.meta.get("conf_thr", 3.0))

    def masks(self, conf_thr: float | None = None) -> list[np.ndarray]:
        """Per-image boolean masks of pixels with confidence > conf_thr and a positive finite depth."""
        conf_thr = self.default_conf_thr if conf_thr is None else conf_thr
        return [(c > conf_thr) & np.isfinite(d) & (d > 0) for c, d in zip(self.confs, self.depths)]

    def points_cam(self, k: int) -> np.ndarray:
        """(H,W,3) float64 points of image k in its own camera frame."""
        d = self.depths[k].astype(np.float64)
        h, w = d.shape
        v, u = np.mgrid[0:h, 0:w].astype(np.float64)
        Ki = self.K[k]
        x = (u - Ki[0, 2]) / Ki[0, 0]
        y = (v - Ki[1, 2]) / Ki[1, 1]
        return np.stack([x * d, y * d, d], axis=-1)

    def points_world(self, k: int) -> np.ndarray:
        """(H,W,3) float64 points of image k in the world frame."""
        p = self.points_cam(k)
        return p @ self.c2w[k, :3, :3].T + self.c2w[k, :3, 3]

    # ------------------------------------------------------------------ point cloud
    def pointcloud(self, conf_thr: float | None = None, max_points: int | None = 100_000, voxel: float | None = None,
                   far_clip: float | None = None, sky_masks: Sequence[np.ndarray] | None = None,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Coloured world point cloud for splat seeding.

        conf_thr: keep pixels with confidence > conf_thr (None: `default_conf_thr`). far_clip: drop pixels deeper than far_clip x the image's
        median kept depth (crude background/sky removal). sky_masks: optional per-image boolean (H,W) masks, True =
        sky/background to drop. voxel: voxel size (world units) for down-sampling, keeping the most confident point
        per voxel; None with max_points: the voxel size is searched so that at most max_points remain.
        Returns xyz (M,3) float32, rgb (M,3) uint8, src (M,3) int64 (image, v, u).
        """
        xyzs, rgbs, srcs, confs = [], [], [], []
        masks = self.masks(conf_thr)
        if sky_masks is not None and len(sky_masks) != len(self):
            raise ReconstructionError(f"sky_masks has {len(sky_masks)} entries, expected {len(self)} (one per image)")
        for k, m in enumerate(masks):
            if sky_masks is not None:
                sm = np.asarray(sky_masks[k], dtype=bool)
                if sm.shape != m.shape:
                    raise ReconstructionError(f"sky_masks[{k}] has shape {sm.shape}, expected {m.shape}")
                m = m & ~sm
            if far_clip is not None and m.any():
                m = m & (self.depths[k] <= far_clip * float(np.median(self.depths[k][m])))
            v, u = np.nonzero(m)
            xyzs.append(self.points_world(k)[v, u])
            rgbs.append(self.rgbs[k][v, u])
            confs.append(self.confs[k][v, u])
            srcs.append(np.stack([np.full_like(v, k), v, u], axis=-1))
        xyz = np.concatenate(xyzs) if xyzs else np.zeros((0, 3))
        rgb = np.concatenate(rgbs) if rgbs else np.zeros((0, 3), np.uint8)
        conf = np.concatenate(confs) if confs else np.zeros((0,), np.float32)
        src = np.concatenate(srcs).astype(np.int64) if srcs else np.zeros((0, 3), np.int64)
        if len(xyz) and (voxel is not None or (max_points is not None and len(xyz) > max_points)):
            keep = _voxel_select(xyz, conf, voxel, max_points)
            if max_points is not None and len(keep) > max_points:
                rng = np.random.default_rng(seed)
                keep = np.sort(rng.choice(keep, size=max_points, replace=False))
            xyz, rgb, src = xyz[keep], rgb[keep], src[keep]
        return xyz.astype(np.float32), rgb.astype(np.uint8), src

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one `.npz` atomically (`fileio.write_npz`: temporary file in the same folder, then replaced)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise ReconstructionError(f"{path}: reconstruction files must end in .npz")
        arrays: dict[str, np.ndarray] = {
            "format_kind": np.array(FORMAT_KIND), "format_version": np.array(FORMAT_VERSION),
            "names": np.array(self.names, dtype=np.str_), "orig_sizes": self.orig_sizes,
            "transforms": self.transforms, "c2w": self.c2w, "K": self.K,
            "meta_keys": np.array(list(self.meta.keys()), dtype=np.str_),
            "meta_values": np.array([repr(v) if not isinstance(v, str) else "s:" + v for v in self.meta.values()],
                                    dtype=np.str_),
        }
        for k in range(len(self)):
            arrays[f"depth_{k}"] = self.depths[k]
            arrays[f"conf_{k}"] = self.confs[k]
            arrays[f"rgb_{k}"] = self.rgbs[k]
        return write_npz(path, arrays, "reconstruction file", ReconstructionError)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Reconstruction":
        """Read and validate a file written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise ReconstructionError(f"{path}: no such reconstruction file")
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except Exception as e:  # zip/format errors
            raise ReconstructionError(f"{path}: not a readable .npz reconstruction ({e}); re-run the alignment") from e
        if str(data.get("format_kind", "")) != FORMAT_KIND:
            raise ReconstructionError(f"{path}: not a dust3r_ns reconstruction file (missing format_kind)")
        version = int(data["format_version"])
        if version != FORMAT_VERSION:
            raise ReconstructionError(f"{path}: format version {version} unsupported (this build reads {FORMAT_VERSION})")
        try:
            names = [str(s) for s in data["names"].tolist()]
            n = len(names)
            meta = {}
            for key, val in zip(data["meta_keys"].tolist(), data["meta_values"].tolist()):
                meta[str(key)] = val[2:] if val.startswith("s:") else _parse_scalar(val)
            rec = cls(names=names, orig_sizes=data["orig_sizes"], transforms=data["transforms"], c2w=data["c2w"],
                      K=data["K"], depths=[data[f"depth_{k}"] for k in range(n)],
                      confs=[data[f"conf_{k}"] for k in range(n)], rgbs=[data[f"rgb_{k}"] for k in range(n)], meta=meta)
        except KeyError as e:
            raise ReconstructionError(f"{path}: missing array {e}; the file is truncated or corrupt") from e
        except ReconstructionError as e:
            raise ReconstructionError(f"{path}: {e}") from e
        return rec


def _parse_scalar(s: str) -> float | int | str:
    for typ in (int, float):
        try:
            return typ(s)
        except ValueError:
            pass
    return s


def _voxel_keep(xyz: np.ndarray, conf: np.ndarray, voxel: float) -> np.ndarray:
    """Indices of the most confident point in each occupied voxel."""
    q = np.floor((xyz - xyz.min(0)) / voxel).astype(np.int64)
    dims = q.max(0) + 1
    key = (q[:, 0] * dims[1] + q[:, 1]) * dims[2] + q[:, 2]
    order = np.lexsort((-conf, key))
    _, first = np.unique(key[order], return_index=True)
    return np.sort(order[first])


def _voxel_select(xyz: np.ndarray, conf: np.ndarray, voxel: float | None, max_points: int | None) -> np.ndarray:
    """Voxel down-sampling with a given voxel size, or the smallest size (bisection) leaving <= max_points."""
    if voxel is not None:
        return _voxel_keep(xyz, conf, float(voxel))
    assert max_points is not None
    ext = float(np.max(xyz.max(0) - xyz.min(0))) or 1.0
    lo, hi = 0.0, 2.0 * ext  # one voxel at `hi` always satisfies the cap
    v = ext / max(max_points, 1) ** (1 / 3)
    best = _voxel_keep(xyz, conf, hi)
    for _ in range(30):
        keep = _voxel_keep(xyz, conf, v)
        if len(keep) <= max_points:
            best, hi = keep, v
            if len(keep) >= 0.95 * max_points:
                break
        else:
            lo = v
        v = np.sqrt(lo * hi) if lo > 0 else 0.5 * hi
    return best
