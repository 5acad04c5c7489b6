"""Procedural scenes: an axis-aligned room seen from inside plus textured spheres, boxes and cylinders.

World frame: metres, world up = +z. The floor is the plane z = 0 (room face 4), the ceiling z = height (face 5);
the room spans x in [-hx, hx], y in [-hy, hy]. Room face ids: 0 -x, 1 +x, 2 -y, 3 +y, 4 floor, 5 ceiling; object k
has primitive id 6 + k. Textures are functions of world coordinates, so all cameras see the same colour at a point.
`make_scene(seed)` is deterministic per seed. Lights are directional: `direction` points TOWARDS the light.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TEX_CHECKER = 0
TEX_STRIPES = 1
TEX_SINES = 2


@dataclass
class Texture:
    """Procedural colour: pattern m in [0,1] mixes colors[0] and colors[1]; a fine detail term blends in colors[2].

    checker: 3D cells of size `period` (shifted by `offset`); stripes: sin(q.dirs[0]*freqs[0] + phases[0]);
    sines: sum_k sin(q.dirs[k]*freqs[k] + phases[k]); freqs in radians per metre.
    """

    kind: int
    colors: np.ndarray        # (3,3) rows in [0,1]
    offset: np.ndarray        # (3,)
    period: float
    dirs: np.ndarray          # (4,3) unit vectors
    freqs: np.ndarray         # (4,)
    phases: np.ndarray        # (4,)
    detail: float             # weight of the detail colour


@dataclass
class Sphere:
    center: np.ndarray
    radius: float
    tex: Texture


@dataclass
class Box:
    """Box with centre, rotation R (columns = local axes in world; identity = axis-aligned) and half sizes."""

    center: np.ndarray
    half: np.ndarray
    tex: Texture
    R: np.ndarray = field(default_factory=lambda: np.eye(3))


@dataclass
class Cylinder:
    """Vertical (+z) capped cylinder standing on `base` (centre of its bottom disc)."""

    base: np.ndarray
    radius: float
    height: float
    tex: Texture


@dataclass
class Light:
    direction: np.ndarray     # unit vector towards the light
    color: np.ndarray         # (3,) intensity


@dataclass
class Scene:
    seed: int
    room_min: np.ndarray
    room_max: np.ndarray
    room_tex: list[Texture]
    objects: list
    lights: list[Light]
    ambient: np.ndarray       # (3,)
    has_ceiling: bool = True

    @property
    def center(self) -> np.ndarray:
        """Mean of the object centres (cameras look at it)."""
        return objects_center(self)

    @property
    def size(self) -> float:
        """Room diagonal (metres)."""
        return float(np.linalg.norm(self.room_max - self.room_min))


def object_center(ob) -> np.ndarray:
    if isinstance(ob, Cylinder):
        return np.asarray(ob.base, np.float64) + np.array([0.0, 0.0, 0.5 * ob.height])
    return np.asarray(ob.center, np.float64)


def objects_center(scene: Scene) -> np.ndarray:
    if not scene.objects:
        return 0.5 * (scene.room_min + scene.room_max)
    return np.mean([object_center(ob) for ob in scene.objects], 0)


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_texture(rng: np.random.Generator, scale: float = 1.0) -> Texture:
    """Random texture; `scale` multiplies the spatial frequencies (smaller patterns on objects)."""
    c0 = rng.uniform(0.05, 0.95, 3)
    for _ in range(100):
        c1 = rng.uniform(0.05, 0.95, 3)
        if np.linalg.norm(c1 - c0) > 0.45:
            break
    c2 = rng.uniform(0.0, 1.0, 3)
    return Texture(kind=int(rng.integers(0, 3)), colors=np.stack([c0, c1, c2]), offset=rng.uniform(-1, 1, 3),
                   period=float(rng.uniform(0.25, 0.7) / scale), dirs=_unit(rng, 4),
                   freqs=rng.uniform(5.0, 22.0, 4) * scale, phases=rng.uniform(0, 2 * np.pi, 4),
                   detail=float(rng.uniform(0.15, 0.35)))


def make_scene(seed: int, n_objects: tuple[int, int] | int = (3, 7), ceiling: bool = True) -> Scene:
    """Deterministic random scene: room 9-12 m wide and 2.6-3.4 m high; n_objects (inclusive range) objects
    (spheres, boxes, cylinders; some boxes rotated about z, some spheres floating) placed without overlap inside a
    1 m disc around the room centre, so `camera_path` cameras at 2-3 m from them stay inside the room.
    ceiling=False leaves the room open: rays through the top are invalid (sky colour, depth 0, valid False)."""
    if isinstance(n_objects, (int, np.integer)):
        n_objects = (int(n_objects), int(n_objects))
    lo, hi = int(n_objects[0]), int(n_objects[1])
    if lo < 1 or hi < lo:
        raise ValueError(f"make_scene: n_objects must be an int >= 1 or (lo, hi) with 1 <= lo <= hi, got {n_objects}")
    rng = np.random.default_rng([int(seed), 20261122])
    hx, hy = rng.uniform(4.5, 6.0, 2)
    height = float(rng.uniform(2.6, 3.4))
    room_min, room_max = np.array([-hx, -hy, 0.0]), np.array([hx, hy, height])
    n = int(rng.integers(lo, hi + 1))
    placed: list[tuple[np.ndarray, float]] = []
    objects = []
    for _ in range(n):
        kind = int(rng.choice(3, p=[0.4, 0.4, 0.2]))          # sphere, box, cylinder
        size = rng.uniform(0.2, 0.5)
        xy = np.zeros(2)
        for _attempt in range(200):
            ang, rad = rng.uniform(0, 2 * np.pi), np.sqrt(rng.uniform())
            xy = np.array([rad * np.cos(ang), rad * np.sin(ang)])
            foot = size * (1.45 if kind == 1 else 1.0)
            if all(np.linalg.norm(xy - c) > foot + f + 0.05 for c, f in placed):
                break
        else:
            size *= 0.35
            foot = size * (1.45 if kind == 1 else 1.0)
        placed.append((xy, foot))
        tex = random_texture(rng, 1.5)
        if kind == 0:
            lift = rng.uniform(0.3, 1.0) if rng.uniform() < 0.3 else 0.0
            objects.append(Sphere(center=np.array([xy[0], xy[1], size + lift]), radius=float(size), tex=tex))
        elif kind == 1:
            h = rng.uniform(0.25, 1.3)
            half = np.array([size * rng.uniform(0.6, 1.0), size * rng.uniform(0.6, 1.0), h / 2])
            a = rng.uniform(0, np.pi / 2) if rng.uniform() < 0.5 else 0.0
            R = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
            objects.append(Box(center=np.array([xy[0], xy[1], h / 2]), half=half, tex=tex, R=R))
        else:
            objects.append(Cylinder(base=np.array([xy[0], xy[1], 0.0]), radius=float(size),
                                    height=float(rng.uniform(0.4, 1.5)), tex=tex))
    room_tex = [random_texture(rng, 0.8) for _ in range(6)]
    nl = int(rng.integers(1, 3))
    lights = []
    for _ in range(nl):
        d = rng.standard_normal(3)
        d[2] = abs(d[2]) + 0.8
        lights.append(Light(direction=d / np.linalg.norm(d), color=np.full(3, rng.uniform(0.5, 0.8) / nl ** 0.5)))
    return Scene(seed=int(seed), room_min=room_min, room_max=room_max, room_tex=room_tex, objects=objects,
                 lights=lights, ambient=np.full(3, rng.uniform(0.3, 0.45)), has_ceiling=bool(ceiling))
