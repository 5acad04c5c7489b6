"""View processing shared by the training datasets: crop/resize with intrinsics, colour jitter, point maps.

Pixel convention (as the package): pixel (u, v) has continuous coordinate (u, v); resizing by s maps u to
(u + 0.5) * s - 0.5, cropping at x0 maps u to u - x0 (both `conventions` transforms (sx, sy, x0, y0)).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .. import conventions as cv


def rescale_crop(rgb: np.ndarray, depth: np.ndarray, K: np.ndarray, size_wh: tuple[int, int],
                 mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Resize (uniformly) so the image covers `size_wh` = (W, H), then crop a W x H window centred on the principal
    point (clamped inside the image). Colours use Lanczos, depth and mask nearest neighbour (no mixed depths).

    Returns (rgb uint8 (H,W,3), depth float32 (H,W), K (3,3) float64 updated, mask bool (H,W)).
    """
    W, H = int(size_wh[0]), int(size_wh[1])
    h0, w0 = depth.shape
    if rgb.shape[:2] != (h0, w0):
        raise ValueError(f"rescale_crop: image {rgb.shape[:2]} and depth {depth.shape} sizes differ")
    K = np.asarray(K, np.float64)
    s = max(W / w0, H / h0)
    w1, h1 = max(W, int(round(w0 * s))), max(H, int(round(h0 * s)))
    sx, sy = w1 / w0, h1 / h0
    img = np.asarray(Image.fromarray(rgb).resize((w1, h1), Image.LANCZOS)) if (w1, h1) != (w0, h0) else rgb
    resize = (sx, sy, 0.0, 0.0)  # a `conventions` transform: u1 = (u + 0.5) * sx - 0.5
    # nearest neighbour: new pixel u1 samples the old pixel nearest to (u1 + 0.5) / sx - 0.5
    ui = np.arange(w1, dtype=np.float64)
    vi = np.arange(h1, dtype=np.float64)
    ui = cv.pixel_net_to_orig(np.stack([ui, np.zeros_like(ui)], -1), resize)[:, 0]
    vi = cv.pixel_net_to_orig(np.stack([np.zeros_like(vi), vi], -1), resize)[:, 1]
    ui = np.clip(np.round(ui).astype(int), 0, w0 - 1)
    vi = np.clip(np.round(vi).astype(int), 0, h0 - 1)
    dep = depth[vi][:, ui]
    msk = (mask[vi][:, ui] if mask is not None else np.ones_like(dep, bool))
    K = cv.K_orig_to_net(K, resize)
    x0 = int(np.clip(round(K[0, 2] - (W - 1) / 2), 0, w1 - W))
    y0 = int(np.clip(round(K[1, 2] - (H - 1) / 2), 0, h1 - H))
    K = cv.K_orig_to_net(K, (1.0, 1.0, float(x0), float(y0)))  # crop: u -> u - x0
    return (np.ascontiguousarray(img[y0:y0 + H, x0:x0 + W]), np.ascontiguousarray(dep[y0:y0 + H, x0:x0 + W]),
            K, np.ascontiguousarray(msk[y0:y0 + H, x0:x0 + W]))


def depth_to_world(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Back-project a z-depth map: returns (world points (H,W,3) float32, valid (H,W) bool = finite depth > 0)."""
    H, W = depth.shape
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    z = depth.astype(np.float64)
    x = (u - K[0, 2]) * z / K[0, 0]
    y = (v - K[1, 2]) * z / K[1, 1]
    cam = np.stack([x, y, z], -1)
    world = cam @ np.asarray(c2w)[:3, :3].T + np.asarray(c2w)[:3, 3]
    valid = np.isfinite(z) & (z > 0)
    world[~valid] = 0
    return world.astype(np.float32), valid


def color_jitter(rgb: np.ndarray, rng: np.random.Generator, strength: float = 0.5) -> np.ndarray:
    """Random brightness, contrast, saturation (each factor in [1-s, 1+s]) and hue shift (+-s/10 turn)."""
    if strength <= 0:
        return rgb
    x = rgb.astype(np.float32) / 255
    x = x * rng.uniform(1 - strength, 1 + strength)
    m = x.mean()
    x = (x - m) * rng.uniform(1 - strength, 1 + strength) + m
    g = x.mean(-1, keepdims=True)
    x = (x - g) * rng.uniform(1 - strength, 1 + strength) + g
    h = rng.uniform(-strength / 10, strength / 10) * 2 * np.pi
    if h:  # rotate chroma around the grey axis
        c, s = np.cos(h), np.sin(h)
        a = np.ones(3) / np.sqrt(3)
        R = c * np.eye(3) + s * np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]]) + (1 - c) * np.outer(a, a)
        x = x @ R.T
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def make_view(rgb: np.ndarray, depth: np.ndarray, K: np.ndarray, c2w: np.ndarray, size_wh: tuple[int, int], *,
              mask: np.ndarray | None = None, rng: np.random.Generator | None = None, jitter: float = 0.0,
              label: str = "", instance: str = "", dataset: str = "") -> dict:
    """Build a training view dict: img (3,H,W) float32 in [-1,1], true_shape int32 (2,), pts3d (H,W,3) world,
    valid_mask (H,W) bool, depthmap, camera_pose (4,4) float32 c2w, camera_intrinsics (3,3) float32."""
    rgb, depth, K, msk = rescale_crop(rgb, depth, K, size_wh, mask)
    if rng is not None and jitter > 0:
        rgb = color_jitter(rgb, rng, jitter)
    pts, valid = depth_to_world(depth, K, c2w)
    valid &= msk
    H, W = depth.shape
    return dict(img=torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float().div(127.5).sub(1.0),
                true_shape=np.int32([H, W]), pts3d=pts, valid_mask=valid, depthmap=depth.astype(np.float32),
                camera_pose=np.asarray(c2w, np.float32), camera_intrinsics=K.astype(np.float32),
                label=label, instance=instance, dataset=dataset)
