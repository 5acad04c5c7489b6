"""Optional bundle adjustment of a Reconstruction's cameras on its multi-view tracks (pycolmap / Ceres).

The reconstruction and its multi-view tracks (`tracks.build_tracks`, points seen by >= 2 images) become a COLMAP model (`colmap.colmap_model`); pycolmap's
`bundle_adjustment` minimises the robustified reprojection errors over poses, points and (optionally) focal
lengths, principal points fixed, the gauge fixed by pycolmap; the refined poses and intrinsics are written back (in
package conventions, through `conventions`) into a copy of the reconstruction. Depth maps, confidences and colours
are kept as they are, so the returned reconstruction's point maps use the refined cameras with the old depths.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from .. import conventions as cv
from ..scene import Reconstruction
from ._common import ExportError
from .colmap import _pycolmap, colmap_model
from .tracks import Tracks

__all__ = ["bundle_adjust"]

LOSSES = ("trivial", "soft_l1", "cauchy", "huber")


def bundle_adjust(rec: Reconstruction, tracks: Tracks, refine_focal: bool = True, shared_camera: bool = False,
                  loss: Literal["trivial", "soft_l1", "cauchy", "huber"] = "cauchy", loss_scale: float = 1.0,
                  max_iterations: int = 50) -> tuple[Reconstruction, dict[str, float]]:
    """Refine `rec`'s poses (and focals) on `tracks`; returns (refined copy, report).

    loss / loss_scale: Ceres robust loss on the reprojection residuals (scale in original-image pixels).
    shared_camera: one camera for all images (one focal refined). Report: mean reprojection error (COLMAP's, per
    point) before and after, number of points and observations, mean camera-centre displacement relative to the
    camera spread, and focal change (%).
    """
    pycolmap = _pycolmap()
    if loss not in LOSSES:
        raise ExportError(f"bundle adjustment loss must be one of {LOSSES}, got {loss!r}")
    if len(rec) < 2 or not (tracks.lengths > 1).any():
        raise ExportError("bundle adjustment needs at least 2 images and points seen by more than one image "
                          "(multi-view tracks); check depth_tol and the confidence threshold")
    # Ceres' bundle adjuster takes points seen by >= 2 images only
    model = colmap_model(rec, tracks.select(tracks.lengths > 1), shared_camera=shared_camera)
    before = float(model.compute_mean_reprojection_error())
    opts = pycolmap.BundleAdjustmentOptions()
    opts.refine_focal_length = bool(refine_focal)
    opts.refine_principal_point = False
    opts.refine_extra_params = False
    opts.print_summary = False
    opts.ceres.loss_function_type = getattr(pycolmap.LossFunctionType, loss.upper())
    opts.ceres.loss_function_scale = float(loss_scale)
    opts.ceres.solver_options.max_num_iterations = int(max_iterations)
    try:
        pycolmap.bundle_adjustment(model, opts)
    except Exception as e:  # pycolmap raises its own error types
        raise ExportError(f"bundle adjustment failed: {e}") from e
    model.update_point_3d_errors()
    after = float(model.compute_mean_reprojection_error())
    n = len(rec)
    w2c = np.zeros((n, 4, 4))
    K_colmap = np.zeros((n, 3, 3))
    for i in range(n):
        im = model.image(i + 1)
        w2c[i, :3] = im.cam_from_world().matrix()
        w2c[i, 3, 3] = 1.0
        K_colmap[i] = model.camera(im.camera_id).calibration_matrix()
    c2w = cv.w2c_to_c2w(w2c)
    K = cv.K_orig_to_net(cv.K_from_colmap(K_colmap), np.asarray(rec.transforms, dtype=np.float64))
    C0, C1 = rec.c2w[:, :3, 3], c2w[:, :3, 3]
    spread = float(np.sqrt(((C0 - C0.mean(0)) ** 2).sum(-1).mean())) or 1.0
    report = dict(error_before_px=before, error_after_px=after, points=float(model.num_points3D()),
                  observations=float(model.compute_num_observations()),
                  center_shift_pct=float(100 * np.linalg.norm(C1 - C0, axis=-1).mean() / spread),
                  focal_change_pct=float(100 * np.abs(K[:, 0, 0] / rec.K[:, 0, 0] - 1).mean()))
    meta = dict(rec.meta, ba_error_before_px=before, ba_error_after_px=after)
    return dataclasses.replace(rec, c2w=c2w, K=K, meta=meta), report
