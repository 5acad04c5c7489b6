"""Multi-view COLMAP tracks (dust3r_ns.export.tracks) on ray-cast ground truth, their COLMAP export, and the
optional bundle adjustment."""

from __future__ import annotations

import numpy as np
import pycolmap
import pytest

from dust3r_ns import synth
from dust3r_ns.export import write_colmap
from dust3r_ns.export.tracks import build_tracks, project
from dust3r_ns.scene import Reconstruction

H, W = 48, 64
TRANSFORM = np.array([0.5, 0.5, 0.0, 0.0])   # original images 128x96, network images 64x48


@pytest.fixture(scope="module")
def gt():
    """A rendered scene seen by 4 cameras and the reconstruction that is its exact ground truth."""
    scene = synth.make_scene(1)
    c2w, K = synth.camera_path(scene, 4, baseline="moderate", seed=1, H=H, W=W)
    views = synth.render_views(scene, c2w, K, H, W, antialias=False, shadows=False)
    rec = Reconstruction(names=[f"v{k}.png" for k in range(4)], orig_sizes=np.array([[2 * W, 2 * H]] * 4),
                         transforms=np.tile(TRANSFORM, (4, 1)), c2w=c2w, K=K,
                         depths=[v["depth"] for v in views],
                         confs=[np.where(v["valid"], 5.0, 0.0).astype(np.float32) for v in views],
                         rgbs=[v["rgb"] for v in views], meta={"conf_thr": 1.0})
    return scene, rec


def visible_gt(scene, rec: Reconstruction, xyz: np.ndarray, b: int) -> np.ndarray:
    """Ground-truth visibility of world points in camera b: inside the image and the first surface hit by the
    ray from b's centre towards the point is the point itself (ray casting, independent of depth maps)."""
    uv, z = project(rec, np.full(len(xyz), b), xyz)
    inside = (z > 0) & (uv[:, 0] >= -0.5) & (uv[:, 0] < W - 0.5) & (uv[:, 1] >= -0.5) & (uv[:, 1] < H - 0.5)
    C = rec.c2w[b, :3, 3]
    dist = np.linalg.norm(xyz - C, axis=1)
    t, _ = synth.cast(scene, C, (xyz - C) / dist[:, None])
    return inside & (t > dist * (1 - 1e-3))


def test_tracks_follow_ground_truth_visibility(gt):
    scene, rec = gt
    pts = rec.pointcloud(conf_thr=1.0, max_points=2000)
    tr = build_tracks(rec, pts, conf_thr=1.0, depth_tol=0.02)
    xyz, _, src = pts
    lengths = tr.lengths
    assert len(tr.xyz) == len(xyz) and lengths.min() >= 1
    # expected track length: 1 (own image) + other cameras that see the point by ray casting
    vis = np.stack([visible_gt(scene, rec, xyz.astype(np.float64), b) | (src[:, 0] == b) for b in range(4)], 1)
    want = vis.sum(1)
    assert want.max() >= 3 and (want > 1).mean() > 0.5          # the scene really is seen by several views
    agree = (lengths == want).mean()
    assert agree > 0.9, f"track lengths match ground-truth visibility for only {agree:.1%} of the points"
    # a point seen by k cameras gets exactly those k images
    member = np.zeros((len(xyz), 4), bool)
    member[tr.point, tr.image] = True
    assert (member == vis).all(1).mean() > 0.9
    # each point's source observation comes first, at its source pixel
    first = np.searchsorted(tr.point, np.arange(len(xyz)))
    np.testing.assert_array_equal(tr.image[first], src[:, 0])
    np.testing.assert_array_equal(tr.vu[first], src[:, 1:])
    # exact geometry: the fused point lies on the surface and reprojects within the pixel grid's rounding
    # (network pixel = 2 original pixels: ~sqrt(2)/2 * 2 original pixels; more on grazing surfaces, where
    # neighbouring pixels' points lie far apart)
    assert np.quantile(tr.error, 0.99) < 1.5 and tr.error.mean() < 0.6 and tr.error.max() < 4
    s = tr.summary()
    assert s["mean_track_length"] == pytest.approx(lengths.mean()) and s["mean_track_length"] > 1.5


def test_occluded_and_inconsistent_depths_are_not_observations(gt):
    _, rec = gt
    pts = rec.pointcloud(conf_thr=1.0, max_points=500)
    base = build_tracks(rec, pts, conf_thr=1.0)
    # push image 2's depths 10% away: its observations of other images' points fail the depth test
    far = Reconstruction(names=rec.names, orig_sizes=rec.orig_sizes, transforms=rec.transforms, c2w=rec.c2w, K=rec.K,
                         depths=[d * (1.1 if k == 2 else 1.0) for k, d in enumerate(rec.depths)], confs=rec.confs,
                         rgbs=rec.rgbs, meta=rec.meta)
    tr = build_tracks(far, pts, conf_thr=1.0)
    own = pts[2][:, 0] == 2
    before = ((base.image == 2) & ~own[base.point]).sum()
    after = ((tr.image == 2) & ~own[tr.point]).sum()
    assert before > 50 and after < 0.1 * before   # (a few remain: points hidden ~10% behind a surface of image 2)
    assert ((tr.image == 2) & own[tr.point]).sum() == own.sum()   # its own points keep their source observation
    # single-image tracks: depth_tol = 0 keeps the point cloud's coordinates and zero error
    single = build_tracks(rec, pts, depth_tol=0)
    assert (single.lengths == 1).all()
    np.testing.assert_allclose(single.xyz, pts[0], atol=0)
    assert single.error.max() < 1e-3
    with pytest.raises(ValueError, match="depth_tol"):
        build_tracks(rec, pts, depth_tol=-1)


def test_colmap_export_holds_the_tracks_and_their_errors(gt, tmp_path):
    _, rec = gt
    pts = rec.pointcloud(conf_thr=1.0, max_points=800)
    tr = build_tracks(rec, pts, conf_thr=1.0)
    write_colmap(rec, tmp_path / "m", points=pts, depth_tol=0.02)
    model = pycolmap.Reconstruction(str(tmp_path / "m"))
    assert model.num_points3D() == len(tr.xyz)
    assert model.compute_num_observations() == len(tr.point)
    assert model.compute_mean_track_length() == pytest.approx(tr.lengths.mean())
    stored = {pid: p.error for pid, p in model.points3D.items()}
    model.update_point_3d_errors()                      # COLMAP's own reprojection errors of the written model
    recomputed = np.array([model.point3D(pid).error for pid in stored])
    np.testing.assert_allclose(np.array(list(stored.values())), recomputed, atol=1e-4)
    assert model.compute_mean_reprojection_error() == pytest.approx(tr.point_errors.mean(), abs=1e-4)
    # every 2D point belongs to exactly one 3D point
    for im in model.images.values():
        assert all(p.has_point3D() for p in im.points2D)
