"""Tests for dust3r_ns.conventions: round trips, known rotations, OpenCV/OpenGL axes and pixel conventions."""

import numpy as np
import pytest

from dust3r_ns import conventions as cv


def random_rotations(rng: np.random.Generator, shape=()) -> np.ndarray:
    q = rng.standard_normal(shape + (4,))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    return cv.qvec_wxyz_to_rotmat(q)


def random_c2w(rng: np.random.Generator, shape=()) -> np.ndarray:
    T = np.zeros(shape + (4, 4))
    T[..., :3, :3] = random_rotations(rng, shape)
    T[..., :3, 3] = rng.uniform(-5, 5, shape + (3,))
    T[..., 3, 3] = 1
    return T


def random_transform(rng: np.random.Generator, shape=()) -> np.ndarray:
    s = rng.uniform(0.1, 3.0, shape + (2,))
    off = rng.uniform(-50, 50, shape + (2,))
    return np.concatenate([s, off], axis=-1)


def random_K(rng: np.random.Generator, shape=()) -> np.ndarray:
    K = np.zeros(shape + (3, 3))
    K[..., 0, 0] = rng.uniform(100, 1000, shape)
    K[..., 1, 1] = rng.uniform(100, 1000, shape)
    K[..., 0, 2] = rng.uniform(100, 500, shape)
    K[..., 1, 2] = rng.uniform(100, 500, shape)
    K[..., 2, 2] = 1
    return K


def test_rotations_are_rotations():
    R = random_rotations(np.random.default_rng(0), (5, 7))
    assert R.shape == (5, 7, 3, 3)
    np.testing.assert_allclose(R @ np.swapaxes(R, -1, -2), np.broadcast_to(np.eye(3), R.shape), atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-14)


def test_opencv_opengl_round_trip_and_batching():
    T = random_c2w(np.random.default_rng(1), (4, 3))
    gl = cv.opencv_to_opengl_c2w(T)
    assert gl.shape == T.shape and gl.dtype == np.float64
    assert not np.allclose(gl, T)
    np.testing.assert_allclose(cv.opengl_to_opencv_c2w(gl), T, rtol=0, atol=1e-12)
    # Camera centres are untouched; only the camera y and z axes flip.
    np.testing.assert_array_equal(gl[..., :3, 3], T[..., :3, 3])
    np.testing.assert_array_equal(gl[..., :3, 0], T[..., :3, 0])
    np.testing.assert_array_equal(gl[..., :3, 1:3], -T[..., :3, 1:3])
    # 3x4 inputs work too.
    np.testing.assert_allclose(cv.opencv_to_opengl_c2w(T[..., :3, :]), gl[..., :3, :], atol=0)


def test_opencv_camera_looking_down_plus_z_becomes_opengl_minus_z():
    # An OpenCV camera at the origin looking down +z world (identity rotation), y down.
    c2w = np.eye(4)
    c2w[:3, 3] = [1.0, 2.0, 3.0]
    gl = cv.opencv_to_opengl_c2w(c2w)
    minus_z_cam_in_world = gl[:3, :3] @ np.array([0.0, 0.0, -1.0])
    np.testing.assert_allclose(minus_z_cam_in_world, [0, 0, 1], atol=1e-15)
    up_in_world = gl[:3, :3] @ np.array([0.0, 1.0, 0.0])  # OpenGL +y = up = OpenCV -y
    np.testing.assert_allclose(up_in_world, [0, -1, 0], atol=1e-15)
    np.testing.assert_allclose(gl[:3, 3], [1, 2, 3])


def test_c2w_w2c_round_trip():
    T = random_c2w(np.random.default_rng(2), (6,))
    W = cv.c2w_to_w2c(T)
    np.testing.assert_allclose(W @ T, np.broadcast_to(np.eye(4), T.shape), atol=1e-12)
    np.testing.assert_allclose(W, np.linalg.inv(T), atol=1e-12)
    np.testing.assert_allclose(cv.w2c_to_c2w(W), T, rtol=0, atol=1e-12)
    # 3x4 variant.
    np.testing.assert_allclose(cv.c2w_to_w2c(T[:, :3]), W[:, :3], atol=1e-12)
    with pytest.raises(ValueError, match="pose"):
        cv.c2w_to_w2c(np.eye(3))


def test_quaternion_round_trip_and_hemisphere():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((200, 4))
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    R = cv.qvec_wxyz_to_rotmat(q)
    q2 = cv.rotmat_to_qvec_wxyz(R)
    assert q2.shape == q.shape
    assert np.all(q2[:, 0] >= 0)
    np.testing.assert_allclose(np.linalg.norm(q2, axis=-1), 1.0, atol=1e-14)
    # Same rotation; q and -q are equivalent, and the output is the w >= 0 one.
    np.testing.assert_allclose(q2, q * np.sign(q[:, :1]), atol=1e-12)
    np.testing.assert_allclose(cv.qvec_wxyz_to_rotmat(q2), R, atol=1e-12)
    # -q gives the same matrix.
    np.testing.assert_allclose(cv.qvec_wxyz_to_rotmat(-q), R, atol=1e-14)
    # Matrix -> quat -> matrix for random matrices, including near-180-degree rotations (w ~ 0).
    R_pi = cv.qvec_wxyz_to_rotmat(np.concatenate([np.full((20, 1), 1e-9), rng.standard_normal((20, 3))], -1))
    for Rs in (R, R_pi):
        np.testing.assert_allclose(cv.qvec_wxyz_to_rotmat(cv.rotmat_to_qvec_wxyz(Rs)), Rs, atol=1e-12)


def test_quaternion_exact_180_degree_is_unique():
    R = np.diag([-1.0, -1.0, 1.0])  # 180 deg about z: q = +-(0, 0, 0, 1)
    np.testing.assert_allclose(cv.rotmat_to_qvec_wxyz(R), [0, 0, 0, 1], atol=1e-15)
    R = np.diag([1.0, -1.0, -1.0])  # 180 deg about x
    np.testing.assert_allclose(cv.rotmat_to_qvec_wxyz(R), [0, 1, 0, 0], atol=1e-15)


def test_known_rotation_90_deg_about_z():
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # x -> y
    q = cv.rotmat_to_qvec_wxyz(R)
    h = np.sqrt(0.5)
    np.testing.assert_allclose(q, [h, 0, 0, h], atol=1e-15)
    np.testing.assert_allclose(cv.qvec_wxyz_to_rotmat([h, 0, 0, h]), R, atol=1e-15)
    # Unnormalised input is normalised.
    np.testing.assert_allclose(cv.qvec_wxyz_to_rotmat([2.0, 0, 0, 2.0]), R, atol=1e-15)
    np.testing.assert_allclose(cv.rotmat_to_qvec_wxyz(np.eye(3)), [1, 0, 0, 0], atol=0)
    with pytest.raises(ValueError, match="zero-norm"):
        cv.qvec_wxyz_to_rotmat(np.zeros(4))


def test_pixel_transform_round_trip_and_formula():
    rng = np.random.default_rng(4)
    t = random_transform(rng, (3, 1))
    uv = rng.uniform(-10, 1000, (3, 50, 2))
    net = cv.pixel_orig_to_net(uv, t)
    sx, sy, x0, y0 = t[..., 0], t[..., 1], t[..., 2], t[..., 3]
    np.testing.assert_allclose(net[..., 0], (uv[..., 0] + 0.5) * sx - 0.5 - x0, atol=1e-12)
    np.testing.assert_allclose(net[..., 1], (uv[..., 1] + 0.5) * sy - 0.5 - y0, atol=1e-12)
    back = cv.pixel_net_to_orig(net, t)
    assert np.max(np.abs(back - uv)) < 1e-12 * 1000


def test_pixel_transform_pixel_corners():
    # Halving an image 8 px wide: the original's outer corner -0.5 stays at -0.5, 7.5 maps to 3.5; crop by 1.
    t = np.array([0.5, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(cv.pixel_orig_to_net([[-0.5, -0.5], [7.5, 7.5]], t), [[-1.5, -0.5], [2.5, 3.5]])


def test_K_conversions_match_pixel_mapping():
    rng = np.random.default_rng(5)
    K = random_K(rng, (4,))
    t = random_transform(rng, (4,))
    K_net = cv.K_orig_to_net(K, t)
    sx, sy, x0, y0 = t.T
    np.testing.assert_allclose(K_net[:, 0, 0], K[:, 0, 0] * sx, rtol=1e-15)
    np.testing.assert_allclose(K_net[:, 1, 1], K[:, 1, 1] * sy, rtol=1e-15)
    np.testing.assert_allclose(K_net[:, 0, 2], (K[:, 0, 2] + 0.5) * sx - 0.5 - x0, atol=1e-12)
    np.testing.assert_allclose(K_net[:, 1, 2], (K[:, 1, 2] + 0.5) * sy - 0.5 - y0, atol=1e-12)
    # Project 3-D points with K_orig, map the pixels to the network image: equals projecting with K_net.
    X = rng.uniform(-1, 1, (4, 30, 3)) + np.array([0, 0, 3.0])
    p_orig = np.einsum("nij,nmj->nmi", K, X)
    uv_orig = p_orig[..., :2] / p_orig[..., 2:]
    p_net = np.einsum("nij,nmj->nmi", K_net, X)
    uv_net = p_net[..., :2] / p_net[..., 2:]
    np.testing.assert_allclose(cv.pixel_orig_to_net(uv_orig, t[:, None]), uv_net, atol=1e-9)
    # Round trip.
    np.testing.assert_allclose(cv.K_net_to_orig(K_net, t), K, rtol=0, atol=1e-12 * 1000)
    with pytest.raises(ValueError, match="positive"):
        cv.K_orig_to_net(K[0], [0.0, 1.0, 0.0, 0.0])


def test_colmap_pixel_shift():
    rng = np.random.default_rng(6)
    uv = rng.uniform(0, 100, (5, 2))
    np.testing.assert_allclose(cv.to_colmap_pixel(uv), uv + 0.5)
    np.testing.assert_allclose(cv.from_colmap_pixel(cv.to_colmap_pixel(uv)), uv, atol=1e-12)
    np.testing.assert_allclose(cv.to_colmap_pixel([0.0, 0.0]), [0.5, 0.5])
    K = random_K(rng, (2,))
    Kc = cv.K_to_colmap(K)
    X = rng.uniform(-1, 1, (2, 10, 3)) + np.array([0, 0, 3.0])
    proj = lambda K_: (lambda p: p[..., :2] / p[..., 2:])(np.einsum("nij,nmj->nmi", K_, X))  # noqa: E731
    np.testing.assert_allclose(proj(Kc), cv.to_colmap_pixel(proj(K)), atol=1e-10)
    np.testing.assert_allclose(cv.K_from_colmap(Kc), K, atol=1e-12)


# ---------------------------------------------------------------------------------------------- moved conversions

@pytest.mark.parametrize("name, image_of_xyz", [
    ("OPENCV_TO_ZUP_WORLD", lambda x, y, z: (x, z, -y)),
    ("OPENCV_TO_GLTF_WORLD", lambda x, y, z: (x, -y, -z)),
])
def test_world_frame_changes_are_rotations_and_round_trip(name, image_of_xyz):
    M = getattr(cv, name)
    assert M.shape == (4, 4) and M.dtype == np.float64
    np.testing.assert_array_equal(M[:3, :3] @ M[:3, :3].T, np.eye(3))
    assert np.linalg.det(M[:3, :3]) == 1.0 and np.array_equal(M[3], [0, 0, 0, 1]) and not M[:3, 3].any()
    pts = np.random.default_rng(10).uniform(-5, 5, (50, 3))
    np.testing.assert_array_equal(pts @ M[:3, :3].T, np.stack(image_of_xyz(*pts.T), -1))
    T = random_c2w(np.random.default_rng(11), (7,))
    np.testing.assert_allclose(M.T @ (M @ T), T, rtol=0, atol=1e-15)  # float64 round trip (inverse = transpose)
    # OpenCV "down" (+y) becomes the target world's down: -z for z-up, -y for y-up glTF
    down = M[:3, :3] @ [0.0, 1.0, 0.0]
    np.testing.assert_array_equal(down, [0, 0, -1] if name == "OPENCV_TO_ZUP_WORLD" else [0, -1, 0])


def test_glb_world_flip_is_the_conventions_one():
    from dust3r_ns.export.glb import GLB_WORLD_FLIP

    assert GLB_WORLD_FLIP is cv.OPENCV_TO_GLTF_WORLD
    np.testing.assert_array_equal(GLB_WORLD_FLIP @ GLB_WORLD_FLIP, np.eye(4))  # its own inverse


@pytest.mark.parametrize("rows", [3, 4])
def test_torch_viewmat_agrees_with_numpy_conversions(rows):
    import torch

    T = random_c2w(np.random.default_rng(12), (5,))
    gl = cv.opencv_to_opengl_c2w(T)
    c2w = torch.tensor(gl[:, :rows], dtype=torch.float64, requires_grad=True)
    w2c = cv.opengl_c2w_to_opencv_w2c_torch(c2w)
    assert w2c.shape == (5, 4, 4) and w2c.dtype == torch.float64
    np.testing.assert_allclose(w2c.detach().numpy(), cv.c2w_to_w2c(cv.opengl_to_opencv_c2w(gl)), rtol=0, atol=1e-14)
    np.testing.assert_allclose(cv.w2c_to_c2w(w2c.detach().numpy()), T, rtol=0, atol=1e-13)  # round trip
    w2c.sum().backward()
    assert c2w.grad is not None and torch.isfinite(c2w.grad).all()


def test_training_crop_intrinsics_agree_with_pixel_transform():
    from dust3r_ns.train.views import rescale_crop

    rng = np.random.default_rng(13)
    for _ in range(20):
        h0, w0 = (int(v) for v in rng.integers(20, 80, 2))
        W, H = (int(v) for v in rng.integers(8, 40, 2))
        K = np.array([[rng.uniform(30, 90), 0, rng.uniform(0, w0 - 1)], [0, rng.uniform(30, 90), rng.uniform(0, h0 - 1)],
                      [0, 0, 1.0]])
        _, dep, K2, _ = rescale_crop(np.zeros((h0, w0, 3), np.uint8), np.ones((h0, w0), np.float32), K, (W, H))
        assert dep.shape == (H, W)
        s = max(W / w0, H / h0)
        sx, sy = max(W, int(round(w0 * s))) / w0, max(H, int(round(h0 * s))) / h0
        # the crop offset is an integer: K2 = K_orig_to_net(K, (sx, sy, x0, y0)) for that (x0, y0)
        resized = cv.K_orig_to_net(K, (sx, sy, 0, 0))
        x0, y0 = resized[0, 2] - K2[0, 2], resized[1, 2] - K2[1, 2]
        assert abs(x0 - round(x0)) < 1e-9 and abs(y0 - round(y0)) < 1e-9
        t = np.array([sx, sy, round(x0), round(y0)])
        np.testing.assert_allclose(K2, cv.K_orig_to_net(K, t), rtol=0, atol=1e-12)
        # agreement: a camera point projects to the transformed original pixel; round trip back to the original
        p = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(1, 3)])
        uv_orig = (K @ p)[:2] / p[2]
        uv_net = (K2 @ p)[:2] / p[2]
        np.testing.assert_allclose(uv_net, cv.pixel_orig_to_net(uv_orig, t), rtol=0, atol=1e-10)
        np.testing.assert_allclose(cv.pixel_net_to_orig(uv_net, t), uv_orig, rtol=0, atol=1e-10)
