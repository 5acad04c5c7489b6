"""COLMAP sparse-model export of a Reconstruction with pycolmap (4.x API).

Output (binary by default, or text): cameras, images, points3D (+ rigs, frames written by pycolmap 4.x).
- Cameras: PINHOLE, in ORIGINAL-image pixels and COLMAP's pixel convention (top-left pixel centre at
  (0.5, 0.5), i.e. cx_colmap = cx_package + 0.5); one camera per image, or one shared camera.
- Images: poses world-to-camera (cam_from_world), OpenCV axes (= COLMAP's), world frame unchanged.
- Points3D: multi-view tracks (`tracks.build_tracks`): a point is observed by its source pixel and by the pixel of
  every other image whose depth agrees with it (`depth_tol`); the point is the confidence-weighted mean of its
  observations' back-projected pixels, keypoints are those pixel centres mapped to original-image COLMAP
  coordinates, and each point's `error` is its mean reprojection error. depth_tol=0: one observation per point
  (its source pixel) and the point cloud's own coordinates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .. import conventions as cv
from ..scene import Reconstruction
from ..fileio import atomic_dir
from ._common import ExportError, check_images, get_pointcloud, intrinsics_orig, validate_recon
from .tracks import Tracks, build_tracks

__all__ = ["write_colmap", "read_colmap", "colmap_model", "COLMAP_FILES"]

COLMAP_FILES = tuple(
    f"{stem}.{ext}" for stem in ("cameras", "images", "points3D", "rigs", "frames") for ext in ("bin", "txt")
)


def _pycolmap():
    try:
        import pycolmap
    except ImportError as e:  # pragma: no cover - pycolmap is a hard dependency
        raise ExportError("COLMAP export needs pycolmap (pip install pycolmap)") from e
    return pycolmap


def colmap_keypoints(recon: Reconstruction, src: np.ndarray) -> np.ndarray:
    """Network pixels (image, v, u) -> (M, 2) keypoints in original-image COLMAP pixel coordinates."""
    transforms = np.asarray(recon.transforms, dtype=np.float64)
    uv_net = np.stack([src[:, 2], src[:, 1]], axis=-1).astype(np.float64)
    return cv.to_colmap_pixel(cv.pixel_net_to_orig(uv_net, transforms[src[:, 0]]))


def colmap_model(recon: Reconstruction, tracks: Tracks, shared_camera: bool = False):
    """The pycolmap.Reconstruction of `recon` with the points and observations of `tracks` (see the module
    docstring): PINHOLE cameras in original-image COLMAP pixels, one per image or one shared (intrinsics averaged)."""
    pycolmap = _pycolmap()
    n = validate_recon(recon)
    sizes = np.asarray(recon.orig_sizes).astype(np.int64)
    K = cv.K_to_colmap(intrinsics_orig(recon))
    if np.any(np.abs(K[:, 0, 1]) > 1e-9 * np.abs(K[:, 0, 0])):
        raise ExportError("write_colmap: intrinsics with skew cannot be written as a PINHOLE camera")
    params = np.stack([K[:, 0, 0], K[:, 1, 1], K[:, 0, 2], K[:, 1, 2]], axis=-1)
    if np.any(params[:, :2] <= 0):
        raise ExportError("write_colmap: focal lengths must be positive")
    w2c = cv.c2w_to_w2c(np.asarray(recon.c2w, dtype=np.float64))
    obs_img = tracks.image
    kps = colmap_keypoints(recon, np.concatenate([obs_img[:, None], tracks.vu], -1))
    rgb = np.asarray(tracks.rgb).astype(np.uint8)
    xyz = np.asarray(tracks.xyz, dtype=np.float64)
    point_errors = tracks.point_errors

    rec = pycolmap.Reconstruction()
    if shared_camera:
        if np.any(sizes != sizes[0]):
            raise ExportError("write_colmap: shared_camera=True needs all images to have the same original size")
        cam = pycolmap.Camera(
            model="PINHOLE", width=int(sizes[0, 0]), height=int(sizes[0, 1]),
            params=params.mean(axis=0).tolist(), camera_id=1,
        )
        rec.add_camera_with_trivial_rig(cam)
    # Per image: keypoints in observation order; point2D index within the image = rank among its observations.
    order = np.argsort(obs_img, kind="stable")
    counts = np.bincount(obs_img, minlength=n)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    point2d_idx = np.empty(len(obs_img), np.int64)
    point2d_idx[order] = np.arange(len(obs_img)) - np.repeat(starts, counts)
    for i in range(n):
        cam_id = 1 if shared_camera else i + 1
        if not shared_camera:
            cam = pycolmap.Camera(
                model="PINHOLE", width=int(sizes[i, 0]), height=int(sizes[i, 1]),
                params=params[i].tolist(), camera_id=cam_id,
            )
            rec.add_camera_with_trivial_rig(cam)
        sel = order[starts[i]:starts[i] + counts[i]]
        img = pycolmap.Image(
            name=str(recon.names[i]), keypoints=np.ascontiguousarray(kps[sel]).reshape(-1, 2),
            camera_id=cam_id, image_id=i + 1,
        )
        rec.add_image_with_trivial_frame(img, pycolmap.Rigid3d(np.ascontiguousarray(w2c[i, :3, :4])))
    bounds = np.searchsorted(tracks.point, np.arange(len(xyz) + 1))   # observations are sorted by point
    for k in range(len(xyz)):
        a, b = bounds[k], bounds[k + 1]
        track = pycolmap.Track([pycolmap.TrackElement(int(obs_img[o]) + 1, int(point2d_idx[o])) for o in range(a, b)])
        pid = rec.add_point3D(xyz[k], track, rgb[k])
        rec.point3D(pid).error = float(point_errors[k])

    return rec


def write_colmap(
    recon: Reconstruction,
    out_dir: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    text: bool = False,
    shared_camera: bool = False,
    conf_thr: float | None = None,
    max_points: int | None = None,
    points: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    depth_tol: float = 0.02,
    tracks: Tracks | None = None,
) -> Path:
    """Write `recon` as a COLMAP sparse model into `out_dir` (e.g. `<dataset>/sparse/0`); returns `out_dir`.

    images_dir: optional folder with the original images; each `recon.names[i]` must be there with size
      `recon.orig_sizes[i]` as stored (COLMAP ignores EXIF orientation), checked before writing.
    text: write `.txt` files instead of `.bin`.
    shared_camera: one camera for all images (intrinsics averaged; needs equal image sizes).
    conf_thr, max_points: passed to `recon.pointcloud` when given (otherwise its defaults; max_points=0: no cap).
    points: a precomputed `recon.pointcloud(...)` result (xyz, rgb, src) to use instead.
    depth_tol: relative depth agreement of a track's observations (`tracks.build_tracks`); 0: single-image tracks.
    tracks: precomputed `build_tracks` result to write instead (then conf_thr/max_points/points/depth_tol unused).
    The write is atomic per file (a fresh `out_dir` appears in one step); stale COLMAP files are removed.
    """
    n = validate_recon(recon)
    if text and any(" " in str(name) for name in recon.names):
        raise ExportError("write_colmap: COLMAP's text format cannot hold image names with spaces; use text=False")
    if images_dir is not None:
        check_images(recon, images_dir)
    if tracks is None:
        xyz, rgb, src = get_pointcloud(recon, conf_thr, max_points, points)
        src = np.asarray(src).astype(np.int64)
        if src.size and (src[:, 0].min() < 0 or src[:, 0].max() >= n):
            raise ExportError("write_colmap: pointcloud() returned image indices out of range")
        try:
            tracks = build_tracks(recon, (xyz, rgb, src), conf_thr=conf_thr, depth_tol=depth_tol)
        except ValueError as e:
            raise ExportError(f"write_colmap: {e}") from None
    rec = colmap_model(recon, tracks, shared_camera)
    with atomic_dir(out_dir, COLMAP_FILES, "COLMAP model", error=ExportError) as tmp:
        if text:
            rec.write_text(str(tmp))
        else:
            rec.write(str(tmp))
        _check_written(tmp, rec, _pycolmap(), Path(out_dir))
    return Path(out_dir)


def _check_written(folder: Path, rec: Any, pycolmap: Any, out_dir: Path) -> None:
    """Read the model just written back; pycolmap does not report failed writes (e.g. a full disk)."""
    try:
        back = pycolmap.Reconstruction(str(folder))
        ok = (back.num_cameras(), back.num_images(), back.num_points3D()) == (
            rec.num_cameras(), rec.num_images(), rec.num_points3D())
    except Exception as e:  # pycolmap raises its own error types on truncated files
        ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    else:
        why = "counts of cameras/images/points differ"
    if not ok:
        raise ExportError(f"the COLMAP model written for {out_dir} does not read back ({why}); the disk may be full: "
                          "free disk space or choose another output folder")


def read_colmap(model_dir: str | os.PathLike, ignore_distortion: bool = False) -> dict[str, Any]:
    """Read a COLMAP model (binary or text) into package conventions, images sorted by name.

    Returns dict(names list[str], c2w (N,4,4) OpenCV camera-to-world, K_orig (N,3,3) in package pixels (top-left
    pixel centre at 0,0), sizes (N,2) (W,H), model_names list[str]). Camera models with distortion raise unless
    ignore_distortion=True (then only focal lengths and principal point are kept).
    """
    pycolmap = _pycolmap()
    model_dir = Path(model_dir)
    if not (model_dir / "cameras.bin").is_file() and not (model_dir / "cameras.txt").is_file():
        raise ExportError(f"{model_dir} holds no COLMAP model (cameras.bin/.txt missing)")
    try:
        rec = pycolmap.Reconstruction(str(model_dir))
    except Exception as e:  # pycolmap raises its own error types
        raise ExportError(f"cannot read the COLMAP model in {model_dir}: {e}") from e
    images = sorted((im for im in rec.images.values() if im.has_pose), key=lambda im: im.name)
    if not images:
        raise ExportError(f"the COLMAP model in {model_dir} has no registered images")
    names, w2c, K, sizes, models = [], [], [], [], []
    for im in images:
        cam = rec.camera(im.camera_id)
        model = cam.model.name
        if model not in ("PINHOLE", "SIMPLE_PINHOLE") and not ignore_distortion:
            raise ExportError(f"{model_dir}: camera {im.camera_id} is {model} (with distortion); undistort the "
                              "images first or pass ignore_distortion=True")
        names.append(im.name)
        w2c.append(np.vstack([im.cam_from_world().matrix(), [0.0, 0.0, 0.0, 1.0]]))
        K.append(cam.calibration_matrix())
        sizes.append([cam.width, cam.height])
        models.append(model)
    return {
        "names": names,
        "c2w": cv.w2c_to_c2w(np.array(w2c)),
        "K_orig": cv.K_from_colmap(np.array(K, dtype=np.float64)),
        "sizes": np.array(sizes, dtype=np.int64),
        "model_names": models,
    }
