"""Vectorised analytic ray tracer used to synthesise ground-truth scenes.

Conventions:
    * World up is ``+z``. Rays are given as origins ``[R, 3]`` and unit directions ``[R, 3]`` (float64).
    * A primitive's ``hit`` returns the ray parameter ``t`` ``[R]`` of the nearest intersection in front of the
      origin (``inf`` on a miss) and an optional integer ``part`` ``[R]`` (e.g. cylinder side or cap).
    * ``surface`` evaluates the outward normal ``[M, 3]``, texture coordinates ``[M, 2]`` and a texture blend
      weight ``[M]`` (1 = texture, 0 = plain material colour) for hit points ``[M, 3]``.
    * Texture coordinates follow image conventions: ``(0, 0)`` is the top-left of the image, ``v`` grows
      downwards, so textures appear upright on vertical surfaces seen from outside.
    * Cameras use the OpenGL / nerfstudio convention: camera ``x`` right, ``y`` up, looking along ``-z``;
      poses are camera-to-world ``[4, 4]`` matrices and intrinsics are pinhole ``(fx, fy, cx, cy)`` in pixels
      with pixel centres at half-integer coordinates.

Shading is Lambertian with an ambient term, hard shadows from one directional light (via shadow rays) and an
optional Blinn-Phong specular lobe on glossy materials, which makes colour view dependent.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from mmstyle_ns.data.cameras import camera_rays
from mmstyle_ns.data.textures import load_portrait, load_texture, sample_bilinear

T_MIN = 1e-6
"""Smallest accepted ray parameter of an intersection."""

SHADOW_OFFSET = 1e-4
"""Distance by which shadow-ray origins are pushed off the surface along the normal."""

_CHUNK = 1 << 16


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot product of ``[R, 3]`` arrays, returns ``[R]``."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def _normalize(v: np.ndarray) -> np.ndarray:
    """Normalises rows of ``[R, 3]``."""
    return v / np.sqrt(_dot(v, v))[:, None]


def _smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Cubic smooth step from 0 at ``lo`` to 1 at ``hi``."""
    s = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    return s * s * (3.0 - 2.0 * s)


def _safe(x: np.ndarray) -> np.ndarray:
    """Replaces values with magnitude below 1e-12 by +-1e-12 so they can be divided by."""
    small = np.abs(x) < 1e-12
    if not small.any():
        return x
    return np.where(small, np.where(x < 0, -1e-12, 1e-12), x)


def _bounding_sphere(prim: Primitive) -> tuple[np.ndarray, float]:
    """Centre ``[3]`` and radius of a sphere enclosing a primitive's bounding box."""
    lo, hi = prim.bounds()
    return (lo + hi) / 2, float(np.linalg.norm(hi - lo) / 2) + 1e-6


def _candidates(prim: Primitive, o: np.ndarray, d: np.ndarray) -> np.ndarray | None:
    """Indices of the rays ``[R, 3]`` that may hit ``prim`` (None: test all of them).

    Rays whose line misses the primitive's bounding sphere, or which start outside it and point away from
    it, cannot hit the primitive and are skipped; this makes small objects cheap.
    """
    c, r = _bounding_sphere(prim)
    oc = o - c
    b = _dot(oc, d)
    cc = _dot(oc, oc) - r * r
    maybe = (b * b >= cc) & ((b < 0) | (cc < 0))
    count = int(maybe.sum())
    return None if count > 0.6 * len(o) else np.flatnonzero(maybe)


@dataclass(frozen=True)
class Material:
    """Surface appearance."""

    color: tuple[float, float, float] = (0.8, 0.8, 0.8)
    """Albedo where there is no texture (and where the texture blend weight is 0)."""
    texture: str | None = None
    """Texture name from ``textures.TEXTURE_NAMES``, ``"portrait:<name>"`` for a face crop, or None."""
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Multiplied onto texture colours (useful for grey-scale textures)."""
    repeat: tuple[float, float] = (1.0, 1.0)
    """Texture repetitions along u and v."""
    wrap: bool = True
    """Repeat the texture outside [0, 1] (True) or clamp to its border (False)."""
    specular: float = 0.0
    """Blinn-Phong specular strength; 0 for a purely diffuse material."""
    shininess: float = 32.0
    """Blinn-Phong exponent."""


@functools.cache
def _texture_array(name: str) -> np.ndarray:
    """Resolves a material texture name to an array ``[H, W, 3]``."""
    if name.startswith("portrait:"):
        return load_portrait(name.split(":", 1)[1])
    return load_texture(name)


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid; a sphere when all radii are equal.

    ``uv_mode="spherical"`` wraps the texture in longitude/latitude. ``uv_mode="front"`` projects it along
    ``+x`` (the facing axis) onto the front: ``window`` = ``(y0, z0, half_width, half_height)`` relative to the
    centre is the rectangle of the ``y``-``z`` plane that receives the whole image (image right = ``+y``, image
    up = ``+z``, as seen by a viewer on the ``+x`` side). The blend weight fades to the plain colour towards
    the sides and back of the ellipsoid and outside the ellipse inscribed in the window.
    """

    center: tuple[float, float, float]
    """Centre in world coordinates."""
    radii: tuple[float, float, float]
    """Semi-axes along x, y, z."""
    material: int
    """Index into ``Scene.materials``."""
    uv_mode: str = "spherical"
    """``"spherical"`` or ``"front"``."""
    window: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    """Projection window for ``uv_mode="front"``: ``(y0, z0, half_width, half_height)``."""

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Intersects rays ``[R, 3]``; returns ``t`` ``[R]`` and no part ids."""
        c = np.asarray(self.center)
        r = np.asarray(self.radii)
        q = (o - c) / r
        e = d / r
        a = _dot(e, e)
        b = _dot(q, e)
        cc = _dot(q, q) - 1.0
        disc = b * b - a * cc
        sq = np.sqrt(np.maximum(disc, 0.0))
        t0 = (-b - sq) / a
        t1 = (-b + sq) / a
        t = np.where(t0 > T_MIN, t0, np.where(t1 > T_MIN, t1, np.inf))
        t[disc < 0] = np.inf
        return t, None

    def surface(self, p: np.ndarray, part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normal ``[M, 3]``, uv ``[M, 2]`` and blend weight ``[M]`` (or None) at points ``[M, 3]``."""
        c = np.asarray(self.center)
        r = np.asarray(self.radii)
        local = (p - c) / r
        n = _normalize(local / r)
        if self.uv_mode == "spherical":
            u = 0.5 + np.arctan2(local[:, 1], local[:, 0]) / (2 * np.pi)
            v = np.arccos(np.clip(local[:, 2], -1.0, 1.0)) / np.pi
            return n, np.stack([u, v], axis=1), None
        y0, z0, hw, hh = self.window
        u = 0.5 + (p[:, 1] - c[1] - y0) / (2 * hw)
        v = 0.5 - (p[:, 2] - c[2] - z0) / (2 * hh)
        # Fade out towards the border of the ellipse inscribed in the window and towards the sides.
        rim = 1.0 - np.sqrt((2 * u - 1) ** 2 + (2 * v - 1) ** 2)
        w = _smoothstep(local[:, 0], 0.1, 0.45) * _smoothstep(rim, 0.0, 0.15)
        return n, np.stack([u, v], axis=1), w

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``([3], [3])``."""
        c, r = np.asarray(self.center), np.asarray(self.radii)
        return c - r, c + r


def sphere(center: tuple[float, float, float], radius: float, material: int) -> Ellipsoid:
    """A sphere with longitude/latitude texture coordinates."""
    return Ellipsoid(center=center, radii=(radius, radius, radius), material=material)


@dataclass(frozen=True)
class Box:
    """Axis-aligned box; every face shows the whole texture, upright when seen from outside."""

    lo: tuple[float, float, float]
    """Minimum corner."""
    hi: tuple[float, float, float]
    """Maximum corner."""
    material: int
    """Index into ``Scene.materials``."""

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Slab test for rays ``[R, 3]``; returns ``t`` ``[R]`` and no part ids."""
        t_near = np.full(len(o), -np.inf)
        t_far = np.full(len(o), np.inf)
        for axis in range(3):
            inv = 1.0 / _safe(d[:, axis])
            t1 = (self.lo[axis] - o[:, axis]) * inv
            t2 = (self.hi[axis] - o[:, axis]) * inv
            t_near = np.maximum(t_near, np.minimum(t1, t2))
            t_far = np.minimum(t_far, np.maximum(t1, t2))
        t = np.where(t_near > T_MIN, t_near, t_far)
        t[t_far < np.maximum(t_near, T_MIN)] = np.inf
        return t, None

    def surface(self, p: np.ndarray, part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normal ``[M, 3]`` and per-face uv ``[M, 2]`` at points ``[M, 3]``."""
        lo, hi = np.asarray(self.lo), np.asarray(self.hi)
        s = (p - lo) / (hi - lo)
        axis = np.argmax(np.abs(s - 0.5), axis=1)
        positive = s[np.arange(len(p)), axis] > 0.5
        sign = np.where(positive, 1.0, -1.0)
        n = np.zeros_like(p)
        n[np.arange(len(p)), axis] = sign
        sx, sy, sz = s[:, 0], s[:, 1], s[:, 2]
        u = np.where(axis == 0, np.where(positive, sy, 1 - sy), np.where(positive, 1 - sx, sx))
        v = 1 - sz
        top = axis == 2
        u = np.where(top, sx, u)
        v = np.where(top, np.where(positive, 1 - sy, sy), v)
        return n, np.stack([u, v], axis=1), None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``([3], [3])``."""
        return np.asarray(self.lo, dtype=float), np.asarray(self.hi, dtype=float)


@dataclass(frozen=True)
class Cylinder:
    """Vertical capped cylinder; the side wraps the texture once around, caps use a planar projection."""

    center: tuple[float, float]
    """Axis position ``(x, y)``."""
    z0: float
    """Bottom cap height."""
    z1: float
    """Top cap height."""
    radius: float
    """Radius."""
    material: int
    """Index into ``Scene.materials``."""

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Intersects rays ``[R, 3]``; returns ``t`` ``[R]`` and part ids (0 side, 1 top, 2 bottom)."""
        cx, cy = self.center
        ox, oy, oz = o[:, 0] - cx, o[:, 1] - cy, o[:, 2]
        dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
        a = np.maximum(dx * dx + dy * dy, 1e-12)
        b = ox * dx + oy * dy
        c = ox * ox + oy * oy - self.radius**2
        disc = b * b - a * c
        sq = np.sqrt(np.maximum(disc, 0.0))
        cands = []
        for ts in ((-b - sq) / a, (-b + sq) / a):
            z = oz + ts * dz
            ok = (disc >= 0) & (ts > T_MIN) & (z >= self.z0) & (z <= self.z1)
            cands.append(np.where(ok, ts, np.inf))
        dz_safe = _safe(dz)
        for zc in (self.z1, self.z0):
            tc = (zc - oz) / dz_safe
            px, py = ox + tc * dx, oy + tc * dy
            ok = (tc > T_MIN) & (px * px + py * py <= self.radius**2)
            cands.append(np.where(ok, tc, np.inf))
        stack = np.stack(cands, axis=1)
        k = np.argmin(stack, axis=1)
        t = stack[np.arange(len(o)), k]
        part = np.array([0, 0, 1, 2], dtype=np.int8)[k]
        return t, part

    def surface(self, p: np.ndarray, part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normal ``[M, 3]`` and uv ``[M, 2]`` at points ``[M, 3]`` with part ids ``[M]``."""
        assert part is not None
        cx, cy = self.center
        x, y = (p[:, 0] - cx) / self.radius, (p[:, 1] - cy) / self.radius
        side = part == 0
        n = np.zeros_like(p)
        n[:, 0] = np.where(side, x, 0.0)
        n[:, 1] = np.where(side, y, 0.0)
        n[:, 2] = np.where(side, 0.0, np.where(part == 1, 1.0, -1.0))
        n = _normalize(n)
        u = np.where(side, 0.5 + np.arctan2(y, x) / (2 * np.pi), 0.5 + 0.5 * x)
        v = np.where(side, (self.z1 - p[:, 2]) / (self.z1 - self.z0), 0.5 - 0.5 * y)
        return n, np.stack([u, v], axis=1), None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``([3], [3])``."""
        cx, cy = self.center
        r = self.radius
        return np.array([cx - r, cy - r, self.z0]), np.array([cx + r, cy + r, self.z1])


@dataclass(frozen=True)
class Disc:
    """Finite horizontal disc (a ground plane of limited extent), normal ``+z``."""

    center: tuple[float, float, float]
    """Centre; the disc lies in the plane ``z = center[2]``."""
    radius: float
    """Radius."""
    material: int
    """Index into ``Scene.materials``."""

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Intersects rays ``[R, 3]``; returns ``t`` ``[R]`` and no part ids."""
        cx, cy, cz = self.center
        t = (cz - o[:, 2]) / _safe(d[:, 2])
        px, py = o[:, 0] + t * d[:, 0] - cx, o[:, 1] + t * d[:, 1] - cy
        ok = (t > T_MIN) & (px * px + py * py <= self.radius**2)
        return np.where(ok, t, np.inf), None

    def surface(self, p: np.ndarray, part: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Normal ``[M, 3]`` and planar uv ``[M, 2]`` (disc mapped to the unit square)."""
        cx, cy, _ = self.center
        n = np.zeros_like(p)
        n[:, 2] = 1.0
        u = 0.5 + (p[:, 0] - cx) / (2 * self.radius)
        v = 0.5 - (p[:, 1] - cy) / (2 * self.radius)
        return n, np.stack([u, v], axis=1), None

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounds ``([3], [3])`` (zero thickness)."""
        c = np.asarray(self.center, dtype=float)
        r = np.array([self.radius, self.radius, 0.0])
        return c - r, c + r


Primitive = Ellipsoid | Box | Cylinder | Disc


@dataclass(frozen=True)
class Light:
    """One directional light plus ambient illumination."""

    direction: tuple[float, float, float] = (0.4, -0.3, 0.85)
    """Direction towards the light (normalised on use)."""
    intensity: float = 0.8
    """Diffuse strength."""
    ambient: float = 0.3
    """Ambient strength (not shadowed)."""


@dataclass(frozen=True)
class Sky:
    """A sky for rays that hit nothing: a gradient from the horizon to the zenith with soft procedural clouds."""

    zenith: tuple[float, float, float] = (0.25, 0.45, 0.85)
    """Colour straight up."""
    horizon: tuple[float, float, float] = (0.78, 0.86, 0.95)
    """Colour at (and below) the horizon."""
    cloud_phase: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Phases of the cloud pattern (different seeds give different clouds)."""
    cloud_cover: float = 0.45
    """Share of the sky covered by clouds, roughly."""

    def color(self, d: np.ndarray) -> np.ndarray:
        """Colour ``[R, 3]`` seen along unit directions ``d`` ``[R, 3]`` (world up ``+z``)."""
        up = np.clip(d[:, 2], 0.0, 1.0)
        t = np.sqrt(up)[:, None]
        base = (1.0 - t) * np.asarray(self.horizon) + t * np.asarray(self.zenith)
        azimuth = np.arctan2(d[:, 1], d[:, 0])
        elevation = np.arcsin(np.clip(d[:, 2], -1.0, 1.0))
        a, b, c = self.cloud_phase
        pattern = (
            np.sin(3.0 * azimuth + a) * np.cos(7.0 * elevation + b)
            + 0.6 * np.sin(7.0 * azimuth - 4.0 * elevation + c)
            + 0.35 * np.sin(13.0 * azimuth + 11.0 * elevation + a + c)
        )
        cloud = _smoothstep(pattern, 1.0 - 2.0 * self.cloud_cover, 1.6 - 2.0 * self.cloud_cover)
        cloud *= _smoothstep(up, 0.02, 0.15)  # clouds thin out towards the horizon
        white = np.array([0.97, 0.97, 0.98])
        return ((1.0 - cloud)[:, None] * base + cloud[:, None] * white).astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """Primitives, their materials, lighting and the background colour."""

    primitives: tuple[Primitive, ...]
    """Scene geometry."""
    materials: tuple[Material, ...]
    """Materials referenced by index from the primitives."""
    light: Light = field(default_factory=Light)
    """Lighting."""
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Colour of rays that hit nothing (when there is no sky)."""
    sky: Sky | None = None
    """Colour of rays that hit nothing, by direction (replaces ``background``)."""

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box ``([3], [3])`` of all primitives."""
        los, his = zip(*(p.bounds() for p in self.primitives), strict=True)
        return np.min(np.stack(los), axis=0), np.max(np.stack(his), axis=0)


def intersect(scene: Scene, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Finds the nearest hit of each ray.

    Args:
        scene: The scene.
        o: Ray origins ``[R, 3]``.
        d: Unit ray directions ``[R, 3]``.

    Returns:
        ``t`` ``[R]`` (``inf`` on a miss), primitive index ``[R]`` (-1 on a miss) and part id ``[R]``.
    """
    t_best = np.full(len(o), np.inf)
    index = np.full(len(o), -1, dtype=np.int64)
    part = np.zeros(len(o), dtype=np.int8)
    for k, prim in enumerate(scene.primitives):
        sel = _candidates(prim, o, d)
        if sel is None:
            t, p = prim.hit(o, d)
            closer = t < t_best
            t_best[closer] = t[closer]
            index[closer] = k
            if p is not None:
                part[closer] = p[closer]
        elif len(sel):
            t, p = prim.hit(o[sel], d[sel])
            closer = t < t_best[sel]
            rows = sel[closer]
            t_best[rows] = t[closer]
            index[rows] = k
            if p is not None:
                part[rows] = p[closer]
    return t_best, index, part


def occluded(scene: Scene, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Returns a boolean ``[R]``: True where the ray ``o + t d`` (``t > 0``) hits anything."""
    blocked = np.zeros(len(o), dtype=bool)
    for prim in scene.primitives:
        sel = _candidates(prim, o, d)
        if sel is None:
            blocked |= np.isfinite(prim.hit(o, d)[0])
        elif len(sel):
            blocked[sel] |= np.isfinite(prim.hit(o[sel], d[sel])[0])
    return blocked


def shade(scene: Scene, o: np.ndarray, d: np.ndarray, specular: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Traces and shades rays.

    Args:
        scene: The scene.
        o: Ray origins ``[R, 3]``.
        d: Unit ray directions ``[R, 3]``.
        specular: Add the Blinn-Phong term of glossy materials; False renders every material diffuse.

    Returns:
        Colour ``[R, 3]`` float32 in ``[0, 1]`` and hit distance ``t`` ``[R]`` (``inf`` on a miss).
    """
    t, index, part = intersect(scene, o, d)
    rgb = np.empty((len(o), 3), dtype=np.float32)
    if scene.sky is not None:
        rgb[:] = scene.sky.color(d)
    else:
        rgb[:] = np.asarray(scene.background, dtype=np.float32)
    hit = np.flatnonzero(np.isfinite(t))
    if len(hit) == 0:
        return rgb, t
    dh = d[hit]
    p = o[hit] + t[hit, None] * dh
    n = np.empty_like(p)
    uv = np.zeros((len(hit), 2))
    blend = np.ones(len(hit))
    mat = np.empty(len(hit), dtype=np.int64)
    for k, prim in enumerate(scene.primitives):
        sel = np.flatnonzero(index[hit] == k)
        if len(sel) == 0:
            continue
        n_k, uv_k, w_k = prim.surface(p[sel], part[hit][sel])
        n[sel], uv[sel] = n_k, uv_k
        if w_k is not None:
            blend[sel] = w_k
        mat[sel] = prim.material
    # Two-sided surfaces: make normals face the viewer.
    n *= np.where(_dot(n, dh) > 0, -1.0, 1.0)[:, None]

    albedo = np.empty((len(hit), 3), dtype=np.float32)
    ks = np.zeros(len(hit))
    shin = np.ones(len(hit))
    for m, material in enumerate(scene.materials):
        sel = np.flatnonzero(mat == m)
        if len(sel) == 0:
            continue
        base = np.asarray(material.color, dtype=np.float32)
        if material.texture is None:
            albedo[sel] = base
        else:
            tex = _texture_array(material.texture)
            texel = sample_bilinear(tex, uv[sel] * np.asarray(material.repeat), wrap=material.wrap)
            texel *= np.asarray(material.tint, dtype=np.float32)
            w = blend[sel, None].astype(np.float32)
            albedo[sel] = w * texel + (1 - w) * base
        ks[sel] = material.specular
        shin[sel] = material.shininess

    light = scene.light
    ldir = np.asarray(light.direction, dtype=float)
    ldir = ldir / np.linalg.norm(ldir)
    ndl = np.maximum(n @ ldir, 0.0)
    lit = np.flatnonzero(ndl > 0)
    visible = np.zeros(len(hit))
    if len(lit):
        shadow_o = p[lit] + SHADOW_OFFSET * n[lit]
        shadow_d = np.broadcast_to(ldir, shadow_o.shape)
        visible[lit] = ~occluded(scene, shadow_o, shadow_d)
    col = albedo * (light.ambient + light.intensity * ndl * visible)[:, None]
    if specular:
        glossy = np.flatnonzero((ks > 0) & (visible > 0))
        if len(glossy):
            half = _normalize(ldir - dh[glossy])
            ndh = np.maximum(_dot(n[glossy], half), 0.0)
            col[glossy] += (ks[glossy] * ndh ** shin[glossy])[:, None]
    rgb[hit] = np.clip(col, 0.0, 1.0)
    return rgb, t


def render_rgba(
    scene: Scene,
    c2w: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    supersample: int = 2,
    specular: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders one view.

    Args:
        scene: The scene.
        c2w: Camera-to-world ``[4, 4]``, OpenGL convention.
        intrinsics: ``[4]`` = ``(fx, fy, cx, cy)``.
        width: Image width.
        height: Image height.
        supersample: Colour samples per pixel along each axis (2 gives 2x2 super-sampling).
        specular: Include specular highlights.

    Returns:
        Colour ``[H, W, 3]`` float32 in ``[0, 1]`` composited over the background (box-filtered over the
        sub-pixel samples), coverage ``[H, W]`` (fraction of sub-pixel samples that hit a surface) and z-depth
        ``[H, W]`` float32 from the pixel-centre ray, 0 where the ray hits nothing.
    """
    s = supersample
    o, d, _ = camera_rays(c2w, intrinsics, width, height, s)
    rgb = np.empty((len(d), 3), dtype=np.float32)
    covered = np.empty(len(d), dtype=np.float32)
    for i in range(0, len(d), _CHUNK):
        rgb[i : i + _CHUNK], t_hit = shade(scene, o[i : i + _CHUNK], d[i : i + _CHUNK], specular=specular)
        covered[i : i + _CHUNK] = np.isfinite(t_hit)
    rgb = rgb.reshape(height, s, width, s, 3).mean(axis=(1, 3), dtype=np.float32)
    alpha = covered.reshape(height, s, width, s).mean(axis=(1, 3), dtype=np.float32)

    o, d, z_per_t = camera_rays(c2w, intrinsics, width, height, 1)
    depth = np.empty(len(d), dtype=np.float64)
    for i in range(0, len(d), _CHUNK):
        t, _, _ = intersect(scene, o[i : i + _CHUNK], d[i : i + _CHUNK])
        depth[i : i + _CHUNK] = t
    depth = np.where(np.isfinite(depth), depth * z_per_t, 0.0)
    return rgb, alpha, depth.reshape(height, width).astype(np.float32)


def render(
    scene: Scene,
    c2w: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    supersample: int = 2,
    specular: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders one view composited over the background: colour ``[H, W, 3]`` and z-depth ``[H, W]``.

    See :func:`render_rgba` for the arguments.
    """
    rgb, _, depth = render_rgba(scene, c2w, intrinsics, width, height, supersample, specular)
    return rgb, depth


def unpremultiply(rgb: np.ndarray, alpha: np.ndarray, background: tuple[float, float, float]) -> np.ndarray:
    """Foreground colour ``[H, W, 3]`` of a pixel composited as ``alpha * fg + (1 - alpha) * background``."""
    bg = np.asarray(background, dtype=np.float32)
    a = alpha[..., None]
    fg = (rgb - (1.0 - a) * bg) / np.maximum(a, 1e-6)
    return np.where(a > 0, np.clip(fg, 0.0, 1.0), bg).astype(np.float32)
