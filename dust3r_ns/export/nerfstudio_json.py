"""nerfstudio `transforms.json` export of a Reconstruction (+ the point cloud as `ply_file_path`).

Conventions written (and inverted by `read_transforms_json`):
- `transform_matrix`: camera-to-world in OpenGL camera axes (x right, y up, z back), as nerfstudio expects;
  the world frame is the reconstruction's, unchanged (the PLY points are in the same world frame).
- Per-frame intrinsics `fl_x, fl_y, cx, cy, w, h` in ORIGINAL-image pixels. nerfstudio casts rays through
  pixel centres at integer + 0.5 (like COLMAP), so cx = cx_package + 0.5 and cy = cy_package + 0.5.
- `camera_model: OPENCV` with zero distortion (k1, k2, p1, p2 = 0).
- `file_path`: `<images_subdir>/<name>`; the original (upright, no EXIF rotation) images must be put there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import conventions as cv
from ..scene import Reconstruction
from ..fileio import atomic_file
from ._common import ExportError, check_images, get_pointcloud, intrinsics_orig, validate_recon
from .ply import write_ply

__all__ = ["write_transforms_json", "read_transforms_json"]


def write_transforms_json(
    recon: Reconstruction,
    out_dir: str | os.PathLike,
    images_subdir: str = "images",
    ply_name: str | None = "sparse_pc.ply",
    conf_thr: float | None = None,
    max_points: int | None = None,
    check_images_exist: bool = False,
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    write_ply_file: bool = True,
    masks_subdir: str | None = None,
) -> Path:
    """Write `out_dir/transforms.json` (and `out_dir/<ply_name>` unless None); returns the JSON path.

    conf_thr, max_points: passed to `recon.pointcloud` when given (max_points=0: no cap); or `points`, a
    precomputed (xyz, rgb, src) from it. write_ply_file=False: only reference `ply_name` (already written).
    check_images_exist: verify that `out_dir/<images_subdir>/<name>` exist with the original sizes.
    masks_subdir: name each frame's mask `<masks_subdir>/<stem>.png` (`mask_path`, nerfstudio's naming).
    """
    n = validate_recon(recon)
    out_dir = Path(out_dir)
    if check_images_exist:
        check_images(recon, out_dir / images_subdir)
    K = cv.K_to_colmap(intrinsics_orig(recon))  # nerfstudio pixel centres at +0.5, like COLMAP
    c2w_gl = cv.opencv_to_opengl_c2w(np.asarray(recon.c2w, dtype=np.float64))
    sizes = np.asarray(recon.orig_sizes).astype(np.int64)
    frames = []
    for i in range(n):
        frames.append(
            {
                "file_path": f"{images_subdir}/{recon.names[i]}" if images_subdir else str(recon.names[i]),
                "transform_matrix": c2w_gl[i].tolist(),
                "fl_x": float(K[i, 0, 0]),
                "fl_y": float(K[i, 1, 1]),
                "cx": float(K[i, 0, 2]),
                "cy": float(K[i, 1, 2]),
                "w": int(sizes[i, 0]),
                "h": int(sizes[i, 1]),
                "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
            }
        )
        if masks_subdir is not None:
            frames[-1]["mask_path"] = f"{masks_subdir}/{Path(recon.names[i]).stem}.png"
    meta: dict[str, Any] = {"camera_model": "OPENCV", "frames": frames}
    if ply_name is not None:
        if write_ply_file:
            xyz, rgb, _ = get_pointcloud(recon, conf_thr, max_points, points)
            write_ply(out_dir / ply_name, xyz, rgb)
        elif not (out_dir / ply_name).is_file():
            raise ExportError(f"{out_dir / ply_name} does not exist; write the PLY first or pass write_ply_file=True")
        meta["ply_file_path"] = ply_name
    path = out_dir / "transforms.json"
    with atomic_file(path, "transforms.json", error=ExportError) as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return path


def read_transforms_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a transforms.json written by `write_transforms_json` back into package conventions.

    Returns dict(file_paths list[str], c2w (N,4,4) OpenCV, K_orig (N,3,3) package pixels, sizes (N,2) (W,H),
    ply_file_path str | None).
    """
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise ExportError(f"{path}: not a transforms.json with a non-empty 'frames' list")
    try:
        c2w_gl = np.array([f["transform_matrix"] for f in meta["frames"]], dtype=np.float64)
        K = np.zeros((len(meta["frames"]), 3, 3))
        for i, f in enumerate(meta["frames"]):
            g = lambda k: float(f[k] if k in f else meta[k])  # noqa: E731 - per-frame or global value
            K[i] = [[g("fl_x"), 0, g("cx")], [0, g("fl_y"), g("cy")], [0, 0, 1]]
        sizes = np.array(
            [[int(f.get("w", meta.get("w"))), int(f.get("h", meta.get("h")))] for f in meta["frames"]], np.int64
        )
        file_paths = [str(f["file_path"]) for f in meta["frames"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{path}: malformed frame entry ({e})") from e
    if c2w_gl.shape[1:] != (4, 4):
        raise ExportError(f"{path}: transform_matrix entries must be 4x4")
    return {
        "file_paths": file_paths,
        "c2w": cv.opengl_to_opencv_c2w(c2w_gl),
        "K_orig": cv.K_from_colmap(K),
        "sizes": sizes,
        "ply_file_path": meta.get("ply_file_path"),
    }
