"""Camera placement for synthetic scenes: arcs around the objects and random training pairs.

Cameras are OpenCV camera-to-world (x right, y down, z forward); the world up is +z (see scene.py), so look-at
cameras have no roll: image rows point down in the world. Every camera centre is inside the room (0.3 m from the
walls, floor and ceiling) and at least 0.6 m from every object surface.
"""

from __future__ import annotations

import numpy as np

from dust3r_ns import geometry

from .scene import Box, Cylinder, Scene, Sphere, objects_center

BASELINE_DEG = {"small": 10.0, "moderate": 45.0, "wide": 120.0, "loop": 350.0}
_WORLD_UP = np.array([0.0, 0.0, 1.0])
_WALL_MARGIN = 0.3
_OBJECT_CLEARANCE = 0.6
_AIM_HEIGHT = 0.45


def look_at(C: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV camera-to-world (4,4) at C looking at target: +z forward, +x right, +y down (world up = +z)."""
    return geometry.look_at(C, target, _WORLD_UP)


def intrinsics(f: float, H: int, W: int) -> np.ndarray:
    """K with focal f (pixels) and principal point (W/2, H/2)."""
    return np.array([[f, 0.0, W / 2], [0.0, f, H / 2], [0.0, 0.0, 1.0]])


def object_distance(ob, p: np.ndarray) -> np.ndarray:
    """Distance (M,) from points p (M,3) to the surface of a primitive (<= 0 inside)."""
    p = np.atleast_2d(np.asarray(p, np.float64))
    if isinstance(ob, Sphere):
        return np.linalg.norm(p - ob.center, axis=1) - ob.radius
    if isinstance(ob, Box):
        q = np.abs((p - ob.center) @ np.asarray(ob.R)) - ob.half
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
    if isinstance(ob, Cylinder):
        rel = p - ob.base
        q = np.stack([np.linalg.norm(rel[:, :2], axis=1) - ob.radius,
                      np.abs(rel[:, 2] - ob.height / 2) - ob.height / 2], 1)
        return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)
    raise TypeError(f"object_distance: unknown primitive {type(ob).__name__}")


def camera_ok(scene: Scene, C: np.ndarray) -> np.ndarray:
    """(M,) bool: centres C (M,3) inside the room (with margin) and clear of every object."""
    C = np.atleast_2d(C)
    ok = np.all(C > scene.room_min + _WALL_MARGIN, 1) & np.all(C < scene.room_max - _WALL_MARGIN, 1)
    for ob in scene.objects:
        ok &= object_distance(ob, C) > _OBJECT_CLEARANCE
    return ok


def objects_extent(scene: Scene, target: np.ndarray) -> float:
    """Largest horizontal distance from target to any object's outline (bounding circles), metres."""
    ext = 0.0
    for ob in scene.objects:
        if isinstance(ob, Sphere):
            c, r = ob.center, ob.radius
        elif isinstance(ob, Box):
            c, r = ob.center, float(np.linalg.norm(ob.half[:2]))
        elif isinstance(ob, Cylinder):
            c, r = ob.base, ob.radius
        else:
            raise TypeError(f"objects_extent: unknown primitive {type(ob).__name__}")
        ext = max(ext, float(np.linalg.norm(np.asarray(c)[:2] - target[:2])) + r)
    return ext


def _target(scene: Scene) -> np.ndarray:
    t = objects_center(scene).copy()
    t[2] = _AIM_HEIGHT
    return t


def _ring(target: np.ndarray, angles: np.ndarray, radius: np.ndarray, heights: np.ndarray) -> np.ndarray:
    return np.stack([target[0] + radius * np.cos(angles), target[1] + radius * np.sin(angles),
                     np.broadcast_to(heights, np.shape(angles))], 1)


def camera_path(scene: Scene, n: int, baseline: str = "moderate", seed: int = 0, H: int = 224, W: int = 224,
                focal_range: tuple[float, float] = (0.8, 1.2)) -> tuple[np.ndarray, np.ndarray]:
    """n cameras on a horizontal arc around the objects' centre, looking at it (jittered heights and aim points).

    baseline: total arc 'small' 10 deg, 'moderate' 45 deg, 'wide' 120 deg, 'loop' 350 deg (nearly a full circle);
    radius: the objects' extent around the
    centre + 1.6-2.4 m (shrunk where the room is too small; cameras always keep 0.6 m from every object).
    Each camera gets its own focal f = U(focal_range) * max(H, W); principal point (W/2, H/2).
    Returns (c2w (n,4,4) float64 OpenCV camera-to-world, K (n,3,3) float64). Deterministic per (scene, seed).
    """
    if baseline not in BASELINE_DEG:
        raise ValueError(f"camera_path: baseline must be one of {sorted(BASELINE_DEG)}, got {baseline!r}")
    if n < 1:
        raise ValueError(f"camera_path: n must be >= 1, got {n}")
    rng = np.random.default_rng([int(seed), int(scene.seed), 7])
    target = _target(scene)
    arc = np.radians(BASELINE_DEG[baseline])
    steps = np.linspace(0, arc, n) if n > 1 else np.zeros(1)
    ext = objects_extent(scene, target)
    for attempt in range(200):
        angles = rng.uniform(0, 2 * np.pi) + steps + rng.normal(0, arc * 0.02 / n, n)
        heights = rng.uniform(1.2, 1.6) + rng.normal(0, 0.08, n)
        radius = (ext + rng.uniform(1.6, 2.4)) * 0.97 ** (attempt // 4)
        C = _ring(target, angles, radius, heights)
        if camera_ok(scene, C).all():
            break
    else:
        raise ValueError(f"camera_path: no valid {baseline} arc found in scene {scene.seed} (room too small/cluttered)")
    c2w = np.stack([look_at(C[k], target + rng.normal(0, 0.08, 3)) for k in range(n)])
    f = rng.uniform(*focal_range, n) * max(H, W)
    K = np.stack([intrinsics(fk, H, W) for fk in f])
    return c2w, K


def random_pair(scene: Scene, rng: np.random.Generator, H: int, W: int, baseline_deg: tuple[float, float] = (5, 60),
                focal_range: tuple[float, float] = (0.8, 1.2), baseline_sampling: str = "uniform",
                same_ring: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two cameras looking at the objects, angular separation drawn from baseline_deg around them (training pairs).

    baseline_sampling 'uniform': separation U(lo, hi); 'log': log-uniform, exp(U(ln lo, ln hi)) (lo > 0), which puts
    as many pairs in [lo, 2 lo] as in [hi / 2, hi], i.e. many more short baselines; 'mixed': each draw is uniform or
    log-uniform with probability 1/2 (short baselines without losing the wide ones). Radii (objects' extent + 1-2.4 m),
    heights (0.9-1.8 m), aim points (+-0.25 m) and focals differ per camera; with probability `same_ring` both cameras
    share one radius and height and aim at the centre +-0.08 m instead (neighbours of an orbit or a video, as in
    `camera_path`). The defaults draw exactly the random numbers of the original sampler.
    Returns (c2w (2,4,4), K (2,3,3)).
    """
    lo, hi = float(baseline_deg[0]), float(baseline_deg[1])
    if baseline_sampling not in ("uniform", "log", "mixed"):
        raise ValueError(f"random_pair: baseline_sampling must be 'uniform', 'log' or 'mixed', "
                         f"got {baseline_sampling!r}")
    if not 0.0 <= lo <= hi or (baseline_sampling != "uniform" and lo <= 0.0):
        raise ValueError(f"random_pair: baseline_deg must be 0 <= lo <= hi (lo > 0 for log sampling), "
                         f"got {baseline_deg}")
    ring = bool(rng.random() < same_ring) if same_ring > 0 else False
    target = _target(scene)
    ext = objects_extent(scene, target)
    for attempt in range(200):
        a0 = rng.uniform(0, 2 * np.pi)
        log = baseline_sampling == "log" or (baseline_sampling == "mixed" and rng.random() < 0.5)
        deg = np.exp(rng.uniform(np.log(lo), np.log(hi))) if log else rng.uniform(lo, hi)
        sep = np.radians(deg) * rng.choice([-1.0, 1.0])
        shrink = 0.97 ** (attempt // 4)
        if ring:
            C = _ring(target, np.array([a0, a0 + sep]), (ext + rng.uniform(1.0, 2.4)) * shrink,
                      rng.uniform(0.9, 1.8) + rng.normal(0, 0.02, 2))
        else:
            C = _ring(target, np.array([a0, a0 + sep]), (ext + rng.uniform(1.0, 2.4, 2)) * shrink,
                      rng.uniform(0.9, 1.8, 2))
        if camera_ok(scene, C).all():
            break
    else:
        raise ValueError(f"random_pair: no valid camera pair found in scene {scene.seed}")
    aim = 0.08 if ring else 0.25
    c2w = np.stack([look_at(C[k], target + rng.normal(0, aim, 3)) for k in range(2)])
    K = np.stack([intrinsics(rng.uniform(*focal_range) * max(H, W), H, W) for _ in range(2)])
    return c2w, K
