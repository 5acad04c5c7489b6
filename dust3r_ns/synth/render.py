"""Vectorised numpy ray casting of a `Scene`: colour, exact z-depth, validity (and world points) per pixel.

Pixel (u, v) (integer grid, u = column) has the camera ray d_cam = K^-1 [u, v, 1]; since d_cam has z = 1, the
ray parameter t of the world ray o + t * R d_cam IS the camera z-depth, so depth is exact up to float64 rounding.
Cameras are camera-to-world 4x4 in OpenCV axes and must be inside the room. Rays that leave the room (only
possible without a ceiling) are invalid: depth 0, prim -1, a sky colour, valid False.

Public: `render` (one camera), `render_views` (several), `cast` (nearest hit of arbitrary rays), `render_uv`
(z-depth at sub-pixel coordinates), `camera_rays`, `shade`, `texture_color`, `benchmark` (images/s).
Objects are culled by bounding spheres before the exact tests. Shading: procedural textures pre-filtered by the
pixel footprint (no moire), Lambert with directional lights, hard shadows cast by the objects.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .scene import TEX_CHECKER, TEX_STRIPES, Box, Cylinder, Scene, Sphere, Texture

_EPS = 1e-6
_SKY = np.array([0.55, 0.7, 0.9])


def _check_camera(c2w: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c2w = np.asarray(c2w, np.float64)
    K = np.asarray(K, np.float64)
    if c2w.shape != (4, 4) or K.shape != (3, 3):
        raise ValueError(f"render: expected c2w (4,4) and K (3,3), got {c2w.shape} and {K.shape}; "
                         "pass one camera (use render_views for several)")
    if not (np.isfinite(c2w).all() and np.isfinite(K).all()) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError("render: camera has non-finite entries or non-positive focal length")
    return c2w, K


def camera_rays(c2w: np.ndarray, K: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World rays for pixel coordinates uv (N,2): origin (3,), directions (N,3) with camera-z component 1."""
    c2w, K = _check_camera(c2w, K)
    uv = np.asarray(uv, np.float64).reshape(-1, 2)
    x = (uv[:, 0] - K[0, 2] - K[0, 1] / K[1, 1] * (uv[:, 1] - K[1, 2])) / K[0, 0]
    y = (uv[:, 1] - K[1, 2]) / K[1, 1]
    R = c2w[:3, :3]
    d = x[:, None] * R[:, 0] + y[:, None] * R[:, 1] + R[:, 2]
    return c2w[:3, 3].copy(), d


def _room_hit(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exit distance of rays from inside the room box and the face id (0..5: -x,+x,-y,+y,floor,ceiling)."""
    lo, hi = np.asarray(scene.room_min, np.float64), np.asarray(scene.room_max, np.float64)
    t = np.full(len(d), np.inf)
    face = np.zeros(len(d), np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for ax in range(3):
            da = d[:, ax]
            pos = da > 0
            ta = (np.where(pos, hi[ax] - o[ax], lo[ax] - o[ax])) / da   # -inf where da == 0 (lo - o < 0)
            closer = (ta < t) & (da != 0)
            t = np.where(closer, ta, t)
            face = np.where(closer, 2 * ax + pos, face)
    if not scene.has_ceiling:
        t = np.where(face == 5, np.inf, t)
    t = np.where(t > _EPS, t, np.inf)
    return t, face


def _sphere_t(s: Sphere, o: np.ndarray, d: np.ndarray, a: np.ndarray) -> np.ndarray:
    oc = o - s.center
    b = d @ oc
    c = float(oc @ oc) - s.radius ** 2
    disc = b * b - a * c
    hit = disc >= 0
    sq = np.sqrt(np.where(hit, disc, 0.0))
    t0 = (-b - sq) / a
    t1 = (-b + sq) / a
    t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
    return np.where(hit, t, np.inf)


def _box_t(bx: Box, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    ol = bx.R.T @ (o - bx.center)
    dl = d @ bx.R
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dl
        t1 = (-bx.half - ol) * inv
        t2 = (bx.half - ol) * inv
    tn = np.nanmax(np.minimum(t1, t2), axis=1)
    tf = np.nanmin(np.maximum(t1, t2), axis=1)
    ok = (tn <= tf) & (tf > _EPS)
    t = np.where(tn > _EPS, tn, tf)
    return np.where(ok, t, np.inf)


def _cyl_t(cy: Cylinder, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    ox, oy = o[0] - cy.base[0], o[1] - cy.base[1]
    dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
    a = dx * dx + dy * dy
    b = dx * ox + dy * oy
    c = ox * ox + oy * oy - cy.radius ** 2
    disc = b * b - a * c
    hit = (disc >= 0) & (a > 1e-300)
    sq = np.sqrt(np.where(hit, disc, 0.0))
    z0, z1 = cy.base[2], cy.base[2] + cy.height
    best = np.full(len(d), np.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        for sgn in (-1.0, 1.0):
            t = (-b + sgn * sq) / a
            z = o[2] + t * dz
            ok = hit & (t > _EPS) & (z >= z0) & (z <= z1)
            best = np.where(ok & (t < best), t, best)
        for zc in (z0, z1):
            t = (zc - o[2]) / dz
            px, py = ox + t * dx, oy + t * dy
            ok = (t > _EPS) & (px * px + py * py <= cy.radius ** 2)
            best = np.where(ok & (t < best), t, best)
    return best


def bounding_sphere(ob) -> tuple[np.ndarray, float]:
    """Centre and radius of a sphere enclosing primitive `ob` (used to cull rays before the exact test)."""
    if isinstance(ob, Sphere):
        return np.asarray(ob.center, np.float64), float(ob.radius)
    if isinstance(ob, Box):
        return np.asarray(ob.center, np.float64), float(np.linalg.norm(ob.half)) * (1 + 1e-9)
    if isinstance(ob, Cylinder):
        c = np.asarray(ob.base, np.float64) + np.array([0.0, 0.0, 0.5 * ob.height])
        return c, float(np.hypot(ob.radius, 0.5 * ob.height)) * (1 + 1e-9)
    raise TypeError(f"unknown primitive {type(ob).__name__} in scene.objects (expected Sphere, Box or Cylinder)")


def cast(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest hit of rays o + t d (o (3,), d (N,3)): t (N,) (inf = no hit) and primitive id (N,) int.

    Ids 0..5 are the room faces (-x, +x, -y, +y, floor, ceiling), 6 + k the k-th object. Each object is first
    culled with its bounding sphere, then intersected exactly on the remaining rays only.
    """
    o = np.asarray(o, np.float64).reshape(3)
    d = np.asarray(d, np.float64).reshape(-1, 3)
    if np.any(o <= scene.room_min) or np.any(o >= scene.room_max):
        raise ValueError(f"cast: ray origin {np.round(o, 3).tolist()} is outside the room "
                         f"{np.round(scene.room_min, 3).tolist()}..{np.round(scene.room_max, 3).tolist()}; "
                         "place cameras inside the room")
    t, pid = _room_hit(scene, o, d)
    a = np.einsum("ij,ij->i", d, d)
    for k, ob in enumerate(scene.objects):
        c, r = bounding_sphere(ob)
        oc = o - c
        b = d @ oc
        cc = float(oc @ oc) - r * r
        cand = b * b - a * cc >= 0
        if cc > 0:   # camera outside the bounding sphere: it must lie ahead
            cand &= b < 0
        idx = np.flatnonzero(cand)
        if idx.size == 0:
            continue
        dk = d[idx]
        if isinstance(ob, Sphere):
            tk = _sphere_t(ob, o, dk, a[idx])
        elif isinstance(ob, Box):
            tk = _box_t(ob, o, dk)
        else:
            tk = _cyl_t(ob, o, dk)
        closer = tk < t[idx]
        sel = idx[closer]
        t[sel] = tk[closer]
        pid[sel] = 6 + k
    return t, pid


def texture_color(tex: Texture, p: np.ndarray, sigma: np.ndarray | None = None) -> np.ndarray:
    """Colour (M,3) in [0,1] (float32) of texture `tex` at world points p (M,3).

    sigma (M,) optional: std (world units) of a Gaussian pre-filter, about half the pixel footprint on the
    surface. Each periodic component of angular frequency w is attenuated by exp(-(w sigma)^2 / 2) (exact for a
    sinusoid), which removes the aliasing (moire) of fine patterns far away or at grazing angles.
    """
    q = np.asarray(p, np.float32) + tex.offset.astype(np.float32)
    f32 = np.float32
    s2 = None if sigma is None else (np.asarray(sigma, np.float32) ** 2) * f32(-0.5)

    def att(w: float) -> np.ndarray | np.float32:
        return f32(1.0) if s2 is None else np.exp(s2 * f32(w * w))

    if tex.kind == TEX_CHECKER:
        cell = np.floor(q * f32(1.0 / tex.period)).astype(np.int32).sum(1)
        m = (cell & 1).astype(np.float32) - f32(0.5)
        m *= att(np.pi / tex.period)   # fundamental of the square wave
        m += f32(0.5)
    elif tex.kind == TEX_STRIPES:
        arg = q @ (tex.dirs[0] * tex.freqs[0]).astype(np.float32) + f32(tex.phases[0])
        m = np.tanh(f32(3.0) * np.sin(arg) * att(3.0 * tex.freqs[0])) * f32(0.5) + f32(0.5)
    else:
        arg = q @ (tex.dirs * tex.freqs[:, None]).T.astype(np.float32) + tex.phases.astype(np.float32)
        w = np.sin(arg)
        if s2 is not None:
            w *= np.exp(s2[:, None] * (tex.freqs.astype(np.float32) ** 2))
        m = np.tanh(f32(0.9) * w.sum(1)) * f32(0.5) + f32(0.5)
    c0 = tex.colors[0].astype(np.float32)
    c = c0 + m[:, None] * (tex.colors[1] - tex.colors[0]).astype(np.float32)
    fd = 3.0 * tex.freqs[1:3]
    det = np.sin(q @ (tex.dirs[1] * fd[0]).astype(np.float32) + f32(tex.phases[2]))
    det *= np.sin(q @ (tex.dirs[2] * fd[1]).astype(np.float32) + f32(tex.phases[3]))
    det *= att(float(np.hypot(fd[0], fd[1])))
    wd = (f32(tex.detail) * np.maximum(det, f32(0)))[:, None]
    return c + wd * (tex.colors[2].astype(np.float32) - c)


def object_normals(ob, q: np.ndarray) -> np.ndarray:
    """Outward unit normals (M,3) of object `ob` at surface points q (M,3)."""
    if isinstance(ob, Sphere):
        return (q - ob.center) / ob.radius
    if isinstance(ob, Box):
        ql = (q - ob.center) @ ob.R / ob.half
        r = np.arange(len(ql))
        ax = np.argmax(np.abs(ql), 1)
        nl = np.zeros_like(ql)
        nl[r, ax] = np.sign(ql[r, ax])
        return nl @ ob.R.T
    if isinstance(ob, Cylinder):
        rel = q - ob.base
        nk = np.zeros_like(q)
        nk[:, :2] = rel[:, :2] / ob.radius
        # caps: points on the top/bottom planes (side points there lie on the rim, where either normal is fine)
        tol = 1e-5 * max(ob.height, ob.radius)
        cap = (rel[:, 2] <= tol) | (rel[:, 2] >= ob.height - tol)
        nk[cap] = 0.0
        nk[cap, 2] = np.where(rel[cap, 2] > 0.5 * ob.height, 1.0, -1.0)
        return nk
    raise TypeError(f"unknown primitive {type(ob).__name__} in scene.objects (expected Sphere, Box or Cylinder)")


_ROOM_NORMALS = np.array([[1.0, 0, 0], [-1.0, 0, 0], [0, 1.0, 0], [0, -1.0, 0], [0, 0, 1.0], [0, 0, -1.0]])


def _occluded(ob, P: np.ndarray, L: np.ndarray) -> np.ndarray:
    """(M,) bool: the rays P + t L (t > 0; origins P (M,3), one direction L (3,)) hit object `ob`."""
    c, r = bounding_sphere(ob)
    oc = P - c
    b = oc @ L
    disc = b * b - (np.einsum("ij,ij->i", oc, oc) - r * r)
    cand = np.flatnonzero((disc >= 0) & (b < np.sqrt(np.maximum(disc, 0))))   # far root > 0
    hit = np.zeros(len(P), bool)
    if cand.size == 0 or isinstance(ob, Sphere):   # the bounding sphere of a sphere is exact
        hit[cand] = True
        return hit
    q = P[cand]
    if isinstance(ob, Box):
        ol = (q - ob.center) @ ob.R
        dl = ob.R.T @ L
        with np.errstate(divide="ignore", invalid="ignore"):
            t1 = (-ob.half - ol) / dl
            t2 = (ob.half - ol) / dl
        tn = np.nanmax(np.minimum(t1, t2), axis=1)
        tf = np.nanmin(np.maximum(t1, t2), axis=1)
        hit[cand] = (tn <= tf) & (tf > 0)
        return hit
    # vertical cylinder: side (quadratic in xy) or caps
    rel = q - ob.base
    a = L[0] ** 2 + L[1] ** 2
    bb = rel[:, 0] * L[0] + rel[:, 1] * L[1]
    cc = rel[:, 0] ** 2 + rel[:, 1] ** 2 - ob.radius ** 2
    h = np.zeros(len(q), bool)
    if a > 1e-300:
        dd = bb * bb - a * cc
        sq = np.sqrt(np.maximum(dd, 0))
        for sgn in (-1.0, 1.0):
            t = (-bb + sgn * sq) / a
            z = rel[:, 2] + t * L[2]
            h |= (dd >= 0) & (t > 0) & (z >= 0) & (z <= ob.height)
    if abs(L[2]) > 1e-300:
        for zc in (0.0, ob.height):
            t = (zc - rel[:, 2]) / L[2]
            h |= (t > 0) & ((rel[:, 0] + t * L[0]) ** 2 + (rel[:, 1] + t * L[1]) ** 2 <= ob.radius ** 2)
    hit[cand] = h
    return hit


def _lighting(scene: Scene, n: np.ndarray, p: np.ndarray | None = None, pid: np.ndarray | None = None) -> np.ndarray:
    """Irradiance (M,3) for unit normals n (M,3): ambient + sum over lights of clamped Lambert terms.

    With surface points p (M,3) and their primitive ids pid (M,), a light is blocked where a shadow ray towards it
    hits an object. The room is convex (its faces never shadow its inside) and so is every object (it cannot
    shadow its own lit side), so only other objects are tested. Objects are culled per light by the bounding
    sphere's shadow cylinder in the plane orthogonal to the light, then tested exactly.
    """
    m = len(n)
    light = np.tile(np.asarray(scene.ambient, np.float32), (m, 1))
    shadows = p is not None and pid is not None and len(scene.objects) > 0
    for L in scene.lights:
        Ld = np.asarray(L.direction, np.float64)
        lam = np.maximum(n @ Ld.astype(np.float32), np.float32(0))
        if shadows:
            lit = np.flatnonzero(lam > 0)
            if lit.size:
                P = np.asarray(p[lit], np.float64) + 1e-4 * n[lit]   # step off the surface
                e1 = np.cross(Ld, [1.0, 0.0, 0.0] if abs(Ld[0]) < 0.9 else [0.0, 1.0, 0.0])
                e1 /= np.linalg.norm(e1)
                E = np.stack([e1, np.cross(Ld, e1), Ld], 1)   # columns: plane axes, light direction
                uvh = P @ E
                pl = pid[lit]
                blocked = np.zeros(lit.size, bool)
                for k, ob in enumerate(scene.objects):
                    c, r = bounding_sphere(ob)
                    cu, cv, ch = c @ E
                    cand = np.flatnonzero((np.abs(uvh[:, 0] - cu) < r) & (np.abs(uvh[:, 1] - cv) < r)
                                          & (uvh[:, 2] < ch + r) & (pl != 6 + k) & ~blocked)
                    if cand.size:
                        blocked[cand[_occluded(ob, P[cand], Ld)]] = True
                lam[lit[blocked]] = 0.0
        light += lam[:, None] * np.asarray(L.color, np.float32)
    return light


def shade(scene: Scene, p: np.ndarray, pid: np.ndarray, rays: np.ndarray | None = None,
          footprint: np.ndarray | None = None, shadows: bool = True) -> np.ndarray:
    """Lambertian colour (M,3) in [0,1] (float32) of hit points p (M,3) on primitives pid (M,) (ids as in cast).

    rays (M,3) and footprint (M,) optional: ray directions and the width of a pixel (world units) perpendicular to
    the ray at the hit; with both, textures are pre-filtered by the footprint on the surface (anti-aliasing).
    shadows: objects cast hard shadows (directional lights; no light reaches a blocked point but the ambient).
    """
    pid = np.asarray(pid)
    order = np.argsort(pid, kind="stable")
    counts = np.bincount(pid, minlength=6 + len(scene.objects))
    ps = np.asarray(p, np.float32)[order]   # shading needs no more than float32
    filt = rays is not None and footprint is not None
    if filt:
        r32 = np.asarray(rays, np.float32)
        r32 = r32 / np.sqrt(np.einsum("ij,ij->i", r32, r32))[:, None]
        rs = r32[order]
        fs = np.asarray(footprint, np.float32)[order]
    col = np.empty(p.shape, np.float32)
    nrm = np.empty(p.shape, np.float32)   # in sorted order
    start = 0
    for prim, cnt in enumerate(counts):
        if cnt == 0:
            continue
        sl = slice(start, start + cnt)
        start += cnt
        q = ps[sl]
        if prim < 6:
            n = _ROOM_NORMALS[prim].astype(np.float32)
            tex = scene.room_tex[prim]
        else:
            ob = scene.objects[prim - 6]
            n = object_normals(ob, q).astype(np.float32)
            tex = ob.tex
        nrm[sl] = n
        sigma = None
        if filt:   # footprint on the surface grows as 1/|cos| of the incidence angle (clamped)
            r = rs[sl]
            cos = np.abs(r @ n if n.ndim == 1 else np.einsum("ij,ij->i", r, n))
            sigma = np.float32(0.5) * fs[sl] / np.maximum(cos, np.float32(0.2))
        col[sl] = texture_color(tex, q, sigma)
    col *= _lighting(scene, nrm, ps if shadows else None, pid[order] if shadows else None)
    np.clip(col, 0.0, 1.0, out=col)
    out = np.empty_like(col)
    out[order] = col
    return out


def render_uv(scene: Scene, c2w: np.ndarray, K: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-depth (N,) float64 (inf where no hit) and primitive id at arbitrary (sub-)pixel coordinates uv (N,2)."""
    o, d = camera_rays(c2w, K, uv)
    return cast(scene, o, d)


@lru_cache(maxsize=16)
def _grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """Read-only pixel coordinate vectors u (W,) and v (H,) (integer grid, float64)."""
    u = np.arange(W, dtype=np.float64)
    v = np.arange(H, dtype=np.float64)
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


def _grid_rays(c2w: np.ndarray, K: np.ndarray, H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    """World rays of all pixels, row-major (H*W, 3), camera-z component 1."""
    c2w, K = _check_camera(c2w, K)
    if K[0, 1] != 0:   # skewed intrinsics: generic path
        v, u = np.mgrid[0:H, 0:W]
        return camera_rays(c2w, K, np.stack([u.ravel(), v.ravel()], 1))
    u, v = _grid(H, W)
    x = (u - K[0, 2]) / K[0, 0]
    y = (v - K[1, 2]) / K[1, 1]
    R = c2w[:3, :3]
    d = (x[None, :, None] * R[:, 0] + y[:, None, None] * R[:, 1]) + R[:, 2]
    return c2w[:3, 3].copy(), d.reshape(-1, 3)


def render(scene: Scene, c2w: np.ndarray, K: np.ndarray, H: int, W: int, points: bool = False,
           antialias: bool = True, shadows: bool = True) -> dict:
    """Render one camera: dict(rgb uint8 (H,W,3), depth float32 (H,W) z-depth (0 where invalid), valid bool (H,W),
    prim int16 (H,W) primitive id (-1 invalid)) and, with `points`, pts3d float32 (H,W,3) world points (0 invalid).

    Depth is the exact z-depth of the first surface along the ray through the pixel centre (u, v) (float64
    intersection, rounded to float32), so back-projecting it with K and c2w gives points on the surfaces.
    antialias: pre-filter textures by the pixel footprint; shadows: objects cast shadows (colours only; the
    geometry outputs do not depend on either).
    """
    H, W = int(H), int(W)
    if H <= 0 or W <= 0:
        raise ValueError(f"render: image size must be positive, got H={H}, W={W}")
    o, d = _grid_rays(c2w, K, H, W)
    t, pid = cast(scene, o, d)
    valid = np.isfinite(t)
    all_valid = bool(valid.all())
    K = np.asarray(K, np.float64)
    px = 1.0 / np.sqrt(K[0, 0] * K[1, 1])   # pixel size at unit distance along the axis
    if all_valid:
        p = d * t[:, None]
        p += o
        fp = t * px if antialias else None
        rgb = shade(scene, p, pid, d if antialias else None, fp, shadows)
    else:
        rgb = np.broadcast_to(_SKY, (H * W, 3)).astype(np.float32)
        dv, tv = d[valid], t[valid]
        p = o + dv * tv[:, None]
        rgb[valid] = shade(scene, p, pid[valid], dv if antialias else None, tv * px if antialias else None, shadows)
    rgb *= 255
    rgb += 0.5
    depth = (t if all_valid else np.where(valid, t, 0.0)).astype(np.float32)
    out = dict(rgb=rgb.astype(np.uint8).reshape(H, W, 3), depth=depth.reshape(H, W),
               valid=valid.reshape(H, W), prim=np.where(valid, pid, -1).astype(np.int16).reshape(H, W))
    if points:
        if all_valid:
            pts = p.astype(np.float32)
        else:
            pts = np.zeros((H * W, 3), np.float32)
            pts[valid] = p
        out["pts3d"] = pts.reshape(H, W, 3)
    return out


def render_views(scene: Scene, c2w: np.ndarray, K: np.ndarray, H: int, W: int, points: bool = False,
                 antialias: bool = True, shadows: bool = True) -> list[dict]:
    """Render N cameras (c2w (N,4,4), K (N,3,3)): list of render() dicts plus `c2w`, `K` (float64) and `idx`."""
    c2w = np.asarray(c2w, np.float64)
    K = np.asarray(K, np.float64)
    if c2w.ndim != 3 or K.ndim != 3 or len(c2w) != len(K):
        raise ValueError(f"render_views: expected c2w (N,4,4) and K (N,3,3), got {c2w.shape} and {K.shape}")
    return [dict(render(scene, c2w[k], K[k], H, W, points=points, antialias=antialias, shadows=shadows),
                 c2w=c2w[k].copy(), K=K[k].copy(), idx=k) for k in range(len(c2w))]


def benchmark(sizes: tuple[tuple[int, int], ...] = ((96, 128), (224, 224), (384, 512)), n_scenes: int = 4,
              views: int = 3) -> dict[str, float]:
    """Rendering speed: images/s per size "HxW" (median over `n_scenes` random scenes x `views` cameras).

    Measured in process CPU time (numpy runs this single-threaded), so the numbers hold on a loaded machine.
    """
    import time

    from .cameras import camera_path
    from .scene import make_scene

    res = {}
    for H, W in sizes:
        times = []
        for s in range(n_scenes):
            sc = make_scene(1000 + s)
            c2w, K = camera_path(sc, views, baseline="moderate", seed=s, H=H, W=W)
            for k in range(views):
                t0 = time.process_time()
                render(sc, c2w[k], K[k], H, W)
                times.append(time.process_time() - t0)
        res[f"{H}x{W}"] = 1.0 / max(float(np.median(times)), 1e-9)
    return res

