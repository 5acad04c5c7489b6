"""Frame, pose and pixel conventions: the ONLY place where coordinate conventions are converted.

Package conventions (see the project notes):
- Poses are camera-to-world 4x4 matrices in OpenCV camera axes (x right, y down, z forward).
  OpenGL / nerfstudio / Blender camera axes are x right, y up, z backward (the camera looks down -z).
- Pixels: pixel (u, v) of an image has continuous coordinate (u, v) (u = column, v = row); the centre of the
  top-left pixel is (0, 0). COLMAP (and nerfstudio) put that centre at (0.5, 0.5): `to_colmap_pixel` adds 0.5.
- Network images are resized and cropped from the original ones. A `transform` = (sx, sy, x0, y0) means
  ``net = (orig + 0.5) * (sx, sy) - 0.5 - (x0, y0)`` for pixel coordinates in the package convention
  (scale about pixel corners, then crop offset). Intrinsics transform with the same affine map:
  ``K_net = A @ K_orig`` with ``A = [[sx, 0, 0.5*sx - 0.5 - x0], [0, sy, 0.5*sy - 0.5 - y0], [0, 0, 1]]``.
- Quaternions are (w, x, y, z), unit norm, on the hemisphere w >= 0 (COLMAP's order).
- World frames: the reconstruction's world is OpenCV-like (y down, z forward for an upright first camera).
  `OPENCV_TO_ZUP_WORLD` maps it to the z-up world nerfstudio's COLMAP parser uses, (x, y, z) -> (x, z, -y);
  `OPENCV_TO_GLTF_WORLD` maps it to glTF's y-up world, (x, y, z) -> (x, -y, -z) (180 degrees about x).

Every function takes and returns numpy float64 arrays and is batched over leading dimensions; batched
arguments (e.g. `uv` (..., 2) and `transform` (..., 4)) follow ordinary numpy broadcasting of their leading dims.
The one exception is `opengl_c2w_to_opencv_w2c_torch`, a differentiable torch twin for the splatting model.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "opencv_to_opengl_c2w",
    "opengl_to_opencv_c2w",
    "c2w_to_w2c",
    "w2c_to_c2w",
    "rotmat_to_qvec_wxyz",
    "qvec_wxyz_to_rotmat",
    "net_from_orig_matrix",
    "K_net_to_orig",
    "K_orig_to_net",
    "pixel_net_to_orig",
    "pixel_orig_to_net",
    "to_colmap_pixel",
    "from_colmap_pixel",
    "K_to_colmap",
    "K_from_colmap",
    "opengl_c2w_to_opencv_w2c_torch",
    "OPENCV_TO_ZUP_WORLD",
    "OPENCV_TO_GLTF_WORLD",
]

# World-frame changes (4x4, applied on the left of a camera-to-world pose or to homogeneous world points).
OPENCV_TO_ZUP_WORLD = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1.0]])
"""(x, y, z) -> (x, z, -y): OpenCV-like world (y down) -> z-up world, as nerfstudio's COLMAP parser does."""
OPENCV_TO_GLTF_WORLD = np.diag([1.0, -1.0, -1.0, 1.0])
"""(x, y, z) -> (x, -y, -z): OpenCV-like world (y down) -> y-up glTF world (180 degrees about x; own inverse)."""

_FLIP_YZ = np.array([1.0, -1.0, -1.0])


def _as_pose(m: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    if m.ndim < 2 or m.shape[-1] != 4 or m.shape[-2] not in (3, 4):
        raise ValueError(f"{name}: expected a (..., 4, 4) or (..., 3, 4) pose matrix, got shape {m.shape}")
    return m


def _flip_camera_axes(c2w: np.ndarray, name: str) -> np.ndarray:
    out = _as_pose(c2w, name).copy()
    out[..., :3, :3] *= _FLIP_YZ  # negate the camera y and z axes (columns 1 and 2 of the rotation)
    return out


def opencv_to_opengl_c2w(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world in OpenCV axes (x right, y down, z fwd) -> OpenGL axes (x right, y up, z back)."""
    return _flip_camera_axes(c2w, "opencv_to_opengl_c2w")


def opengl_to_opencv_c2w(c2w: np.ndarray) -> np.ndarray:
    """Camera-to-world in OpenGL axes -> OpenCV axes (the flip is its own inverse)."""
    return _flip_camera_axes(c2w, "opengl_to_opencv_c2w")


def _rigid_inverse(m: np.ndarray, name: str) -> np.ndarray:
    m = _as_pose(m, name)
    R = m[..., :3, :3]
    t = m[..., :3, 3]
    Rt = np.swapaxes(R, -1, -2)
    out = np.zeros_like(m)
    out[..., :3, :3] = Rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", Rt, t)
    if m.shape[-2] == 4:
        out[..., 3, 3] = 1.0
    return out


def c2w_to_w2c(c2w: np.ndarray) -> np.ndarray:
    """Invert a rigid camera-to-world pose (rotation transposed); keeps the (…,4,4) or (…,3,4) shape."""
    return _rigid_inverse(c2w, "c2w_to_w2c")


def w2c_to_c2w(w2c: np.ndarray) -> np.ndarray:
    """Invert a rigid world-to-camera pose; keeps the (…,4,4) or (…,3,4) shape."""
    return _rigid_inverse(w2c, "w2c_to_c2w")


def rotmat_to_qvec_wxyz(R: np.ndarray) -> np.ndarray:
    """Rotation matrices (..., 3, 3) -> unit quaternions (..., 4) as (w, x, y, z) with w >= 0.

    Uses the numerically stable branch (largest of w, x, y, z) per matrix. When w == 0 the sign is fixed so the
    first non-zero of (x, y, z) is positive, making the output unique.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.ndim < 2 or R.shape[-2:] != (3, 3):
        raise ValueError(f"rotmat_to_qvec_wxyz: expected (..., 3, 3) rotation matrices, got shape {R.shape}")
    lead = R.shape[:-2]
    m = R.reshape(-1, 3, 3)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    # 4*q_k^2 for each component k (w, x, y, z).
    diag = np.stack(
        [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], axis=-1
    )
    k = np.argmax(diag, axis=-1)
    # Candidate quaternions (unnormalised, each scaled by 4*q_k) for each branch.
    cand = np.stack(
        [
            np.stack([diag[:, 0], m21 - m12, m02 - m20, m10 - m01], axis=-1),
            np.stack([m21 - m12, diag[:, 1], m01 + m10, m02 + m20], axis=-1),
            np.stack([m02 - m20, m01 + m10, diag[:, 2], m12 + m21], axis=-1),
            np.stack([m10 - m01, m02 + m20, m12 + m21, diag[:, 3]], axis=-1),
        ],
        axis=1,
    )
    q = cand[np.arange(m.shape[0]), k]
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    # Canonical hemisphere: w > 0, or w == 0 and the first non-zero vector component positive.
    sign = np.sign(q[:, 0])
    for j in (1, 2, 3):
        sign = np.where(sign == 0, np.sign(q[:, j]), sign)
    q *= np.where(sign == 0, 1.0, sign)[:, None]
    return q.reshape(*lead, 4)


def qvec_wxyz_to_rotmat(q: np.ndarray) -> np.ndarray:
    """Quaternions (..., 4) as (w, x, y, z) (normalised here) -> rotation matrices (..., 3, 3)."""
    q = np.asarray(q, dtype=np.float64)
    if q.ndim < 1 or q.shape[-1] != 4:
        raise ValueError(f"qvec_wxyz_to_rotmat: expected (..., 4) quaternions (w, x, y, z), got shape {q.shape}")
    n = np.linalg.norm(q, axis=-1, keepdims=True)
    if np.any(n == 0) or not np.all(np.isfinite(n)):
        raise ValueError("qvec_wxyz_to_rotmat: zero-norm or non-finite quaternion")
    w, x, y, z = np.moveaxis(q / n, -1, 0)
    R = np.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        axis=-1,
    )
    return R.reshape(*q.shape[:-1], 3, 3)


def _as_transform(transform: np.ndarray) -> np.ndarray:
    t = np.asarray(transform, dtype=np.float64)
    if t.ndim < 1 or t.shape[-1] != 4:
        raise ValueError(f"transform must be (..., 4) = (sx, sy, x0, y0), got shape {t.shape}")
    if np.any(t[..., :2] <= 0):
        raise ValueError("transform scales (sx, sy) must be positive")
    return t


def net_from_orig_matrix(transform: np.ndarray) -> np.ndarray:
    """The 3x3 affine map A (..., 3, 3) taking homogeneous original pixels to network pixels."""
    t = _as_transform(transform)
    sx, sy, x0, y0 = np.moveaxis(t, -1, 0)
    A = np.zeros(t.shape[:-1] + (3, 3))
    A[..., 0, 0] = sx
    A[..., 0, 2] = 0.5 * sx - 0.5 - x0
    A[..., 1, 1] = sy
    A[..., 1, 2] = 0.5 * sy - 0.5 - y0
    A[..., 2, 2] = 1.0
    return A


def _as_K(K: np.ndarray, name: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.ndim < 2 or K.shape[-2:] != (3, 3):
        raise ValueError(f"{name}: expected (..., 3, 3) intrinsics, got shape {K.shape}")
    return K


def K_orig_to_net(K: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Intrinsics in original-image pixels -> network-image pixels: K_net = A @ K_orig."""
    return net_from_orig_matrix(transform) @ _as_K(K, "K_orig_to_net")


def K_net_to_orig(K: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Intrinsics in network-image pixels -> original-image pixels: K_orig = A^-1 @ K_net."""
    t = _as_transform(transform)
    sx, sy, x0, y0 = np.moveaxis(t, -1, 0)
    Ainv = np.zeros(t.shape[:-1] + (3, 3))
    Ainv[..., 0, 0] = 1.0 / sx
    Ainv[..., 0, 2] = (0.5 + x0) / sx - 0.5
    Ainv[..., 1, 1] = 1.0 / sy
    Ainv[..., 1, 2] = (0.5 + y0) / sy - 0.5
    Ainv[..., 2, 2] = 1.0
    return Ainv @ _as_K(K, "K_net_to_orig")


def _as_uv(uv: np.ndarray, name: str) -> np.ndarray:
    uv = np.asarray(uv, dtype=np.float64)
    if uv.ndim < 1 or uv.shape[-1] != 2:
        raise ValueError(f"{name}: expected (..., 2) pixel coordinates (u, v), got shape {uv.shape}")
    return uv


def pixel_orig_to_net(uv: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Original-image pixel coords (..., 2) -> network-image pixel coords: (uv + 0.5) * s - 0.5 - offset."""
    uv = _as_uv(uv, "pixel_orig_to_net")
    t = _as_transform(transform)
    return (uv + 0.5) * t[..., :2] - 0.5 - t[..., 2:4]


def pixel_net_to_orig(uv: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Network-image pixel coords (..., 2) -> original-image pixel coords: (uv + 0.5 + offset) / s - 0.5."""
    uv = _as_uv(uv, "pixel_net_to_orig")
    t = _as_transform(transform)
    return (uv + 0.5 + t[..., 2:4]) / t[..., :2] - 0.5


def to_colmap_pixel(uv: np.ndarray) -> np.ndarray:
    """Package pixel coords (top-left pixel centre at 0,0) -> COLMAP/nerfstudio coords (centre at 0.5,0.5)."""
    return _as_uv(uv, "to_colmap_pixel") + 0.5


def from_colmap_pixel(uv: np.ndarray) -> np.ndarray:
    """COLMAP/nerfstudio pixel coords (top-left pixel centre at 0.5,0.5) -> package coords (centre at 0,0)."""
    return _as_uv(uv, "from_colmap_pixel") - 0.5


def K_to_colmap(K: np.ndarray) -> np.ndarray:
    """Intrinsics mapping to package pixels -> intrinsics mapping to COLMAP pixels (principal point + 0.5)."""
    K = _as_K(K, "K_to_colmap").copy()
    K[..., :2, 2] += 0.5 * K[..., 2:3, 2]
    return K


def K_from_colmap(K: np.ndarray) -> np.ndarray:
    """Intrinsics mapping to COLMAP pixels -> intrinsics mapping to package pixels (principal point - 0.5)."""
    K = _as_K(K, "K_from_colmap").copy()
    K[..., :2, 2] -= 0.5 * K[..., 2:3, 2]
    return K


def opengl_c2w_to_opencv_w2c_torch(c2w):
    """(C, 3|4, 4) torch OpenGL camera-to-world -> (C, 4, 4) OpenCV world-to-camera (the `viewmats` of splatting).

    Torch twin of `c2w_to_w2c(opengl_to_opencv_c2w(c2w))`, differentiable (camera-optimizer gradients):
    R_cv = R_gl diag(1, -1, -1), then w2c = [R_cv^T, -R_cv^T t; 0 0 0 1].
    """
    import torch

    R = c2w[:, :3, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=c2w.dtype, device=c2w.device)
    t = c2w[:, :3, 3:4]
    Rt = R.transpose(1, 2)
    bottom = torch.tensor([[0.0, 0.0, 0.0, 1.0]], dtype=c2w.dtype, device=c2w.device).expand(c2w.shape[0], 1, 4)
    return torch.cat([torch.cat([Rt, -Rt @ t], 2), bottom], 1)
