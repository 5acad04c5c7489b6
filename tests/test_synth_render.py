"""Ray-caster tests (dust3r_ns.synth.render) against analytic geometry: walls, floor, sphere, box, cylinder."""

import importlib
import math

import numpy as np
import pytest

from dust3r_ns.synth.scene import Box, Cylinder, Light, Scene, Sphere, make_scene, random_texture

R = importlib.import_module("dust3r_ns.synth.render")   # the module (the package re-exports `render` the function)


def _scene(objects=(), ceiling=True) -> Scene:
    g = np.random.default_rng(0)
    return Scene(seed=0, room_min=np.array([-4.0, -3.0, 0.0]), room_max=np.array([5.0, 3.0, 3.0]),
                 room_tex=[random_texture(g) for _ in range(6)], objects=list(objects),
                 lights=[Light(direction=np.array([0.3, 0.2, 0.93]) / np.linalg.norm([0.3, 0.2, 0.93]),
                               color=np.full(3, 0.6))], ambient=np.full(3, 0.3), has_ceiling=ceiling)


def _look(C, fwd, down=(0.0, 0.0, -1.0)) -> np.ndarray:
    """c2w with optical axis fwd and image-down axis `down` (orthogonalised)."""
    z = np.asarray(fwd, float) / np.linalg.norm(fwd)
    y = np.asarray(down, float) - np.dot(down, z) * z
    y /= np.linalg.norm(y)
    M = np.eye(4)
    M[:3, :3] = np.stack([np.cross(y, z), y, z], 1)
    M[:3, 3] = C
    return M


def _K(f, H, W):
    return np.array([[f, 0, W / 2], [0, f, H / 2], [0, 0, 1.0]])


def test_fronto_parallel_wall_and_floor_depth_are_exact():
    sc = _scene()
    H, W, f = 24, 32, 20.0
    C = np.array([1.0, 0.5, 1.5])
    out = R.render(sc, _look(C, (1, 0, 0)), _K(f, H, W), H, W, points=True)
    assert out["rgb"].shape == (H, W, 3) and out["rgb"].dtype == np.uint8
    assert out["depth"].dtype == np.float32 and out["valid"].all()
    v, u = np.mgrid[0:H, 0:W].astype(float)
    # world: x forward (wall at x = 5, distance 4); image down = world -z, camera at z = 1.5 above the floor
    y = (v - H / 2) / f
    expect = np.full((H, W), 4.0)
    floor = y > 0
    expect[floor] = np.minimum(4.0, 1.5 / y[floor])   # floor hit z-depth h / y where closer than the wall
    x = (u - W / 2) / f
    # image right = world -y: side walls at y = -3 (3.5 away) and y = +3 (2.5 away)
    side = np.where(x > 0, 3.5 / np.maximum(x, 1e-12), np.where(x < 0, 2.5 / np.maximum(-x, 1e-12), np.inf))
    expect = np.minimum(expect, side)
    expect = np.minimum(expect, np.where(y < 0, 1.5 / np.maximum(-y, 1e-12), np.inf))   # ceiling at z = 3
    np.testing.assert_allclose(out["depth"], expect, rtol=1e-6)
    assert (out["prim"][H // 2 - 1, W // 2] == 1) and (out["prim"][H - 1, W // 2] == 4)
    # world points are the back-projected depth
    pc = np.stack([x * out["depth"], y * out["depth"], out["depth"]], -1)
    M = _look(C, (1, 0, 0))
    np.testing.assert_allclose(out["pts3d"], pc @ M[:3, :3].T + C, atol=1e-5)


def test_sphere_depth_silhouette_and_surface():
    c, r = np.array([2.0, 0.0, 1.0]), 0.5
    sc = _scene([Sphere(center=c, radius=r, tex=random_texture(np.random.default_rng(1)))])
    H, W, f = 40, 40, 30.0
    C = np.array([-1.0, 0.0, 1.0])
    out = R.render(sc, _look(C, c - C), _K(f, H, W), H, W, points=True)
    assert out["depth"][H // 2, W // 2] == pytest.approx(3.0 - r, rel=1e-6)   # principal point sees the pole
    v, u = np.mgrid[0:H, 0:W].astype(float)
    d = np.stack([(u - W / 2) / f, (v - H / 2) / f, np.ones_like(u)], -1)
    dn = d / np.linalg.norm(d, axis=-1, keepdims=True)
    # perpendicular distance of each ray to the centre (camera frame: centre on the axis at distance 3)
    dist = np.linalg.norm(np.cross(dn, np.array([0, 0, 3.0])), axis=-1)
    on = out["prim"] == 6
    clear = np.abs(dist - r) > 1e-3
    assert np.array_equal(on[clear], (dist < r)[clear]) and on.sum() > 20
    np.testing.assert_allclose(np.linalg.norm(out["pts3d"][on] - c, axis=-1), r, atol=1e-5)


def test_box_and_cylinder_hits_are_on_their_surfaces():
    g = np.random.default_rng(2)
    a = 0.6
    Rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])
    box = Box(center=np.array([2.0, -0.8, 0.4]), half=np.array([0.3, 0.2, 0.4]), tex=random_texture(g), R=Rz)
    cyl = Cylinder(base=np.array([2.2, 0.8, 0.0]), radius=0.3, height=0.9, tex=random_texture(g))
    sc = _scene([box, cyl])
    H, W, f = 60, 80, 50.0
    C = np.array([-1.0, 0.0, 1.6])
    out = R.render(sc, _look(C, np.array([2.1, 0.0, 0.4]) - C), _K(f, H, W), H, W, points=True)
    pb, pc = out["pts3d"][out["prim"] == 6].astype(float), out["pts3d"][out["prim"] == 7].astype(float)
    assert len(pb) > 50 and len(pc) > 50
    ql = np.abs((pb - box.center) @ Rz) / box.half
    assert np.all(ql <= 1 + 1e-4) and np.all(np.abs(ql.max(1) - 1) < 1e-4)   # inside the box, on a face
    rel = pc - cyl.base
    rad = np.hypot(rel[:, 0], rel[:, 1])
    on_side = np.abs(rad - cyl.radius) < 1e-4
    on_cap = np.abs(rel[:, 2] - cyl.height) < 1e-4
    assert np.all(on_side | on_cap) and on_cap.any() and on_side.any()   # camera above the top: sees the cap
    assert np.all(rad <= cyl.radius + 1e-4) and np.all((rel[:, 2] >= -1e-4) & (rel[:, 2] <= cyl.height + 1e-4))


def test_culled_cast_equals_brute_force():
    sc = make_scene(11, n_objects=7)
    g = np.random.default_rng(3)
    o = 0.5 * (sc.room_min + sc.room_max) + np.array([2.5, 0.3, 0.0])
    d = g.standard_normal((4000, 3))
    t, pid = R.cast(sc, o, d)
    tb, pb = R._room_hit(sc, o, d)
    a = np.einsum("ij,ij->i", d, d)
    for k, ob in enumerate(sc.objects):
        tk = (R._sphere_t(ob, o, d, a) if isinstance(ob, Sphere) else R._box_t(ob, o, d) if isinstance(ob, Box)
              else R._cyl_t(ob, o, d))
        pb = np.where(tk < tb, 6 + k, pb)
        tb = np.minimum(tk, tb)
    assert np.array_equal(t, tb) and np.array_equal(pid, pb)
    assert len(set(pid.tolist())) > 6


def test_render_uv_matches_grid_and_depth_is_z():
    sc = make_scene(4)
    H, W = 20, 28
    c2w = _look(np.array([0.3, -2.0, 1.2]), (0.1, 1.0, -0.3))
    K = _K(25.0, H, W)
    out = R.render(sc, c2w, K, H, W)
    v, u = np.mgrid[0:H, 0:W]
    t, pid = R.render_uv(sc, c2w, K, np.stack([u.ravel(), v.ravel()], 1))
    np.testing.assert_allclose(out["depth"].ravel(), t, rtol=1e-7)
    assert np.array_equal(out["prim"].ravel(), pid)
    # the ray through the principal point is the optical axis with unit camera-z: t is the z-depth
    o, dd = R.camera_rays(c2w, K, np.array([[W / 2, H / 2], [0.0, 0.0]]))
    np.testing.assert_allclose(o, c2w[:3, 3])
    np.testing.assert_allclose(dd[0], c2w[:3, 2])
    np.testing.assert_allclose(dd[1] @ c2w[:3, 2], 1.0)


def test_no_ceiling_rays_are_invalid_and_antialias_keeps_geometry():
    H, W = 24, 32
    c2w = _look(np.array([0.0, 0.0, 1.5]), (1.0, 0.0, 0.9))   # looking upwards
    K = _K(20.0, H, W)
    closed = R.render(_scene(ceiling=True), c2w, K, H, W)
    open_ = R.render(_scene(ceiling=False), c2w, K, H, W)
    assert closed["valid"].all() and not open_["valid"].all() and open_["valid"].any()
    assert np.all(open_["depth"][~open_["valid"]] == 0) and np.all(open_["prim"][~open_["valid"]] == -1)
    np.testing.assert_array_equal(open_["depth"][open_["valid"]], closed["depth"][open_["valid"]])
    sc = make_scene(5)
    a, b = R.render(sc, c2w, K, H, W, antialias=False), R.render(sc, c2w, K, H, W, antialias=True)
    assert np.array_equal(a["depth"], b["depth"]) and np.array_equal(a["valid"], b["valid"])
    diff = np.abs(a["rgb"].astype(int) - b["rgb"].astype(int))
    assert diff.mean() < 20


def test_bad_inputs():
    sc = _scene()
    K = _K(20.0, 8, 8)
    with pytest.raises(ValueError, match="outside the room"):
        R.render(sc, _look(np.array([10.0, 0, 1]), (1, 0, 0)), K, 8, 8)
    with pytest.raises(ValueError, match="c2w"):
        R.render(sc, np.eye(3), K, 8, 8)
    with pytest.raises(ValueError, match="positive"):
        R.render(sc, _look(np.array([0.0, 0, 1]), (1, 0, 0)), K, 0, 8)
    with pytest.raises(ValueError, match="focal"):
        R.render(sc, _look(np.array([0.0, 0, 1]), (1, 0, 0)), np.zeros((3, 3)), 8, 8)


def test_shadows_darken_exactly_the_occluded_floor():
    c = np.array([2.0, 0.0, 1.2])
    sc = _scene([Sphere(center=c, radius=0.4, tex=random_texture(np.random.default_rng(5)))])
    sc.lights = [Light(direction=np.array([0.0, 0.0, 1.0]), color=np.full(3, 0.6))]   # straight above
    H, W = 48, 64
    c2w, K = _look(np.array([-0.5, 0.0, 2.5]), (2.5, 0.0, -2.3)), _K(40.0, H, W)
    lit = R.render(sc, c2w, K, H, W, shadows=False, points=True)
    sh = R.render(sc, c2w, K, H, W, shadows=True)
    floor = lit["prim"] == 4
    r_xy = np.linalg.norm(lit["pts3d"][..., :2] - c[:2], axis=-1)
    a, b = lit["rgb"].astype(int), sh["rgb"].astype(int)
    inside, outside = floor & (r_xy < 0.38), floor & (r_xy > 0.42)
    assert inside.sum() > 10 and outside.sum() > 100
    assert np.all(b[inside].sum(-1) < a[inside].sum(-1))        # the disc under the sphere is darker
    assert np.array_equal(b[outside], a[outside])               # the rest of the floor is unchanged
    assert np.array_equal(b[lit["prim"] == 6], a[lit["prim"] == 6])   # convex objects do not self-shadow
    assert np.array_equal(sh["depth"], lit["depth"])


def test_skewed_intrinsics_and_benchmark_smoke():
    sc = make_scene(6)
    H, W = 12, 16
    c2w = _look(np.array([0.2, -1.5, 1.3]), (0.0, 1.0, -0.2))
    K = np.array([[14.0, 2.0, 7.5], [0.0, 15.0, 6.0], [0.0, 0.0, 1.0]])
    out = R.render(sc, c2w, K, H, W, points=True)
    v, u = np.mgrid[0:H, 0:W]
    t, _ = R.render_uv(sc, c2w, K, np.stack([u.ravel(), v.ravel()], 1))
    np.testing.assert_allclose(out["depth"].ravel(), t, rtol=1e-7)
    # world points project back onto their pixels through K (skew included)
    w2c = np.linalg.inv(c2w)
    pc = out["pts3d"].reshape(-1, 3).astype(float) @ w2c[:3, :3].T + w2c[:3, 3]
    uvp = pc @ K.T
    np.testing.assert_allclose(uvp[:, :2] / uvp[:, 2:], np.stack([u.ravel(), v.ravel()], 1), atol=1e-4)
    speed = R.benchmark(sizes=((8, 8),), n_scenes=1, views=1)
    assert set(speed) == {"8x8"} and speed["8x8"] > 0
