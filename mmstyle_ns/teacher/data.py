"""Procedural (image, caption) pairs of the toy world, rendered with the embedded scenes' ray tracer.

Each image shows one to three objects (sphere, cube or cylinder) of one named colour and material on a ground
disc (wooden floor, grass, stone or a plain floor) against a white background, seen from an orbit camera like
the embedded ``object360`` scene's (distance ~3, 36 degree field of view, 15-50 degree elevation), in one of
three styles. Geometry comes from :mod:`mmstyle_ns.data.raytrace` (its analytic primitives and intersection
code); shading (Lambert + soft shadow + Blinn-Phong highlight on shiny objects), the ground textures and the
styles are done here. Rendering is one ray per pixel (~10 ms for 128x128 on one core).

Sample ``i`` of seed ``s`` depends only on ``(s, i)`` (``numpy.random.default_rng([s, i])``), so any slice
of a data set can be regenerated, in any order or process.
"""

from __future__ import annotations

import colorsys
import functools
import math
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, UInt8

from mmstyle_ns.data import cameras as cam
from mmstyle_ns.data import raytrace as rt
from mmstyle_ns.data.textures import load_texture, sample_bilinear
from mmstyle_ns.teacher.styles import apply_style
from mmstyle_ns.teacher.vocab import SceneSpec, caption, sample_spec

BACKGROUND = (1.0, 1.0, 1.0)
"""Colour of the empty space around the ground disc (white, like the embedded scenes)."""

OBJECT_RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.10),
    "orange": (0.95, 0.50, 0.08),
    "yellow": (0.92, 0.82, 0.12),
    "green": (0.16, 0.70, 0.20),
    "blue": (0.12, 0.30, 0.88),
    "purple": (0.55, 0.18, 0.78),
    "white": (0.84, 0.84, 0.82),
    "black": (0.07, 0.07, 0.08),
}
"""Mean albedo of each object colour (jittered per image)."""

GROUND_RGB: dict[str, tuple[float, float, float]] = {
    "wood": (0.56, 0.37, 0.20),
    "grass": (0.30, 0.50, 0.17),
    "stone": (0.50, 0.48, 0.46),
    "plain": (0.46, 0.48, 0.53),
}
"""Mean albedo of each ground (textures vary brightness around it, keeping its hue)."""

FOV_DEG = 36.0
"""Horizontal (and vertical) field of view of the camera."""

_AMBIENT, _DIFFUSE = 0.45, 0.55


@dataclass(frozen=True)
class ViewRange:
    """Where the orbit camera of a generated picture may be (each value drawn uniformly in its range)."""

    elevation_deg: tuple[float, float] = (15.0, 50.0)
    """Elevation above the ground plane, degrees (0 looks at the objects from the side, a frontal view)."""
    distance: tuple[float, float] = (3.1, 3.5)
    """Distance of the camera from the look-at point (the objects are about 0.6 across)."""
    light_spread_deg: float = 70.0
    """The light's azimuth lies within this many degrees of the camera's (70: lit faces are seen and shadows fall
    away from the viewer; 180: any direction, as in a 360-degree capture under one fixed light)."""
    light_elevation_deg: tuple[float, float] = (40.0, 70.0)
    """Elevation of the light above the ground plane, degrees."""


TEACHER_VIEWS = ViewRange()
"""The teacher's training views: an orbit like the embedded ``object360`` scene's."""

WIDE_VIEWS = ViewRange(
    elevation_deg=(0.0, 65.0), distance=(2.6, 4.4), light_spread_deg=180.0, light_elevation_deg=(25.0, 75.0)
)
"""Frontal to high 360-degree views, near and far, lit from any side (the toy CLIP's training views): renders of
the embedded toy scenes at any sensible camera, under their one fixed light, fall inside this range."""


@dataclass(frozen=True)
class ToySample:
    """One generated picture with its description."""

    image: UInt8[np.ndarray, "H W 3"]
    """The picture, 8-bit RGB."""
    spec: SceneSpec
    """What it shows."""
    mask: np.ndarray
    """Where the objects are, boolean ``[H, W]`` (training may weigh these pixels up; the checker never sees it)."""

    @property
    def caption(self) -> str:
        """The caption of :attr:`spec`."""
        return caption(self.spec)


@functools.cache
def _normalised_texture(name: str) -> np.ndarray:
    """A grey texture ``[H, W]`` scaled to mean 1 and its contrast limited to a +-35% band."""
    tex = load_texture(name).mean(axis=-1)
    tex = tex / tex.mean()
    out = np.clip(1.0 + 0.35 * (tex - 1.0) / (2.0 * tex.std()), 0.6, 1.4).astype(np.float32)
    out.setflags(write=False)
    return out


def _wood(uv: np.ndarray, rng_params: np.ndarray) -> np.ndarray:
    """Brightness ``[M]`` of a plank floor at texture coordinates ``[M, 2]``."""
    planks, phase, tone = 7.0, rng_params[0], rng_params[1:]
    v = uv[:, 1] * planks
    index = np.floor(v).astype(np.int64) % len(tone)
    grain = np.sin(2 * np.pi * (uv[:, 0] * 2.0 + phase + 0.35 * np.sin(7.0 * v + uv[:, 0] * 3.0)) * 5.0)
    seam = (v - np.floor(v)) < 0.07
    return np.where(seam, 0.55, tone[index] + 0.1 * grain).astype(np.float32)


def _jitter_colour(rgb: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """``rgb`` with its hue moved by up to +-0.02 of a turn, saturation and value by a few percent."""
    h, s, v = colorsys.rgb_to_hsv(*rgb)
    h = (h + rng.uniform(-0.02, 0.02)) % 1.0
    s = min(1.0, s * rng.uniform(0.88, 1.05))
    v = min(1.0, v * rng.uniform(0.9, 1.05))
    return np.asarray(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def _make_object(shape: str, x: float, y: float, scale: float, rng: np.random.Generator) -> tuple[rt.Primitive, float]:
    """A primitive standing on the ground (``z = 0``) at ``(x, y)`` and the radius of its footprint."""
    if shape == "sphere":
        r = scale * rng.uniform(0.24, 0.32)
        return rt.sphere((x, y, r), r, 1), r
    if shape == "cube":
        h = scale * rng.uniform(0.19, 0.26)
        return rt.Box((x - h, y - h, 0.0), (x + h, y + h, 2 * h), 1), h * math.sqrt(2.0)
    r = scale * rng.uniform(0.15, 0.21)
    return rt.Cylinder((x, y), 0.0, scale * rng.uniform(0.45, 0.65), r, 1), r


def _place_objects(spec: SceneSpec, rng: np.random.Generator) -> list[rt.Primitive]:
    """``spec.count`` non-overlapping objects within 0.45 of the disc centre."""
    scale = {1: 1.0, 2: 0.85, 3: 0.72}[spec.count]
    for _ in range(100):
        if spec.count == 1:
            angles, radii = rng.uniform(0, 2 * np.pi, 1), rng.uniform(0.0, 0.15, 1)
        else:
            start = rng.uniform(0, 2 * np.pi)
            angles = start + 2 * np.pi * np.arange(spec.count) / spec.count + rng.uniform(-0.3, 0.3, spec.count)
            radii = rng.uniform(0.25, 0.4, spec.count)
        made = [
            _make_object(spec.shape, float(r * np.cos(a)), float(r * np.sin(a)), scale, rng)
            for a, r in zip(angles, radii, strict=True)
        ]
        centres = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
        ok = all(
            np.linalg.norm(centres[i] - centres[j]) > made[i][1] + made[j][1] + 0.04
            for i in range(len(made))
            for j in range(i)
        )
        if ok:
            return [prim for prim, _ in made]
    raise RuntimeError("could not place the objects without overlap")  # pragma: no cover - 100 tries suffice


def render_spec(
    spec: SceneSpec, rng: np.random.Generator, resolution: int = 128, views: ViewRange = TEACHER_VIEWS
) -> tuple[Float[np.ndarray, "H W 3"], np.ndarray]:
    """Renders a scene described by ``spec`` (layout, camera, light and colours drawn from ``rng``).

    ``views`` bounds the camera; the random stream is the same for every range (only the bounds change).

    Returns:
        The styled image ``[H, W, 3]`` float32 in [0, 1] and the surface id of each pixel ``[H, W]``
        (-1 background, 0 ground, ``k`` the k-th object).
    """
    ground_radius = float(rng.uniform(0.95, 1.05))
    objects = _place_objects(spec, rng)
    prims: tuple[rt.Primitive, ...] = (rt.Disc((0.0, 0.0, 0.0), ground_radius, 0), *objects)
    scene = rt.Scene(prims, (rt.Material(), rt.Material()))

    azimuth = float(rng.uniform(0, 2 * np.pi))
    elevation = np.radians(rng.uniform(*views.elevation_deg))
    distance = float(rng.uniform(*views.distance))
    eye = distance * np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth), 0.0])
    eye[2] = distance * np.sin(elevation)
    target = np.array([0.0, 0.0, 0.12])
    c2w = cam.look_at(eye + target, target)
    k = cam.intrinsics_from_fov(resolution, resolution, FOV_DEG)
    # The light comes from the camera's side (so lit faces are seen and shadows fall away from the viewer).
    light_az = azimuth + np.radians(rng.uniform(-views.light_spread_deg, views.light_spread_deg))
    light_el = np.radians(rng.uniform(*views.light_elevation_deg))
    light = np.array([np.cos(light_el) * np.cos(light_az), np.cos(light_el) * np.sin(light_az), np.sin(light_el)])

    o, d, _ = cam.camera_rays(c2w, k, resolution, resolution, 1)
    t, index, part = rt.intersect(scene, o, d)
    rgb = np.empty((len(d), 3), dtype=np.float32)
    rgb[:] = BACKGROUND
    hit = np.flatnonzero(np.isfinite(t))
    dh = d[hit]
    p = o[hit] + t[hit, None] * dh
    normal = np.empty_like(p)
    uv = np.zeros((len(hit), 2))
    for i, prim in enumerate(prims):
        sel = np.flatnonzero(index[hit] == i)
        if len(sel):
            normal[sel], uv[sel], _ = prim.surface(p[sel], part[hit][sel])
    normal *= np.where(np.sum(normal * dh, axis=1) > 0, -1.0, 1.0)[:, None]

    on_ground = index[hit] == 0
    albedo = np.empty((len(hit), 3), dtype=np.float32)
    albedo[~on_ground] = _jitter_colour(OBJECT_RGB[spec.colour], rng)
    albedo[on_ground] = _ground_albedo(spec.ground, uv[on_ground], rng)

    ndl = np.maximum(normal @ light, 0.0)
    lit = np.flatnonzero(ndl > 0)
    visible = np.zeros(len(hit))
    visible[lit] = ~rt.occluded(scene, p[lit] + rt.SHADOW_OFFSET * normal[lit], np.broadcast_to(light, (len(lit), 3)))
    colour = albedo * (_AMBIENT + _DIFFUSE * ndl * visible)[:, None]
    if spec.material == "shiny":
        shiny = np.flatnonzero(~on_ground & (visible > 0))
        half = light[None] - dh[shiny]
        half /= np.linalg.norm(half, axis=1, keepdims=True)
        colour[shiny] += (0.6 * np.maximum(np.sum(normal[shiny] * half, axis=1), 0.0) ** 40.0)[:, None]
    rgb[hit] = np.clip(colour, 0.0, 1.0)

    image = rgb.reshape(resolution, resolution, 3)
    ids = index.reshape(resolution, resolution)
    return apply_style(spec.style, image, ids, rng), ids


def _ground_albedo(ground: str, uv: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Albedo ``[M, 3]`` of the ground at disc texture coordinates ``[M, 2]`` (random rotation, scale, shift)."""
    base = _jitter_colour(GROUND_RGB[ground], rng)
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    coords = (uv - 0.5) @ rot.T * rng.uniform(1.5, 2.5) + rng.uniform(0, 1, 2)
    if ground == "wood":
        params = np.concatenate([rng.uniform(0, 1, 1), rng.uniform(0.85, 1.1, 5)])
        shade = _wood(coords, params)
    elif ground in ("grass", "stone"):
        tex = _normalised_texture("grass" if ground == "grass" else "gravel")
        shade = sample_bilinear(tex[..., None], coords * (2.0 if ground == "grass" else 1.0))[:, 0]
    else:
        shade = np.ones(len(uv), dtype=np.float32)
    return np.clip(base[None] * shade[:, None], 0.0, 1.0)


def generate_sample(
    seed: int, index: int, resolution: int = 128, spec: SceneSpec | None = None, views: ViewRange = TEACHER_VIEWS
) -> ToySample:
    """Sample ``index`` of the data set with ``seed`` (deterministic; independent of every other sample).

    Args:
        seed: data-set seed (non-negative).
        index: sample number (non-negative).
        resolution: width and height in pixels.
        spec: force the scene description (the layout, camera and colours still come from ``(seed, index)``).
        views: the range the camera is drawn from.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got {seed}, {index}")
    if resolution < 16:
        raise ValueError(f"resolution must be at least 16 pixels, got {resolution}")
    rng = np.random.default_rng([seed, index])
    drawn = sample_spec(rng)
    spec = drawn if spec is None else spec
    image, ids = render_spec(spec, rng, resolution, views)
    return ToySample((image * 255.0 + 0.5).astype(np.uint8), spec, ids > 0)


@dataclass(frozen=True)
class ToyBatch:
    """Consecutive samples of a data set, stacked."""

    images: UInt8[np.ndarray, "N H W 3"]
    """The pictures."""
    masks: np.ndarray
    """Object masks, boolean ``[N, H, W]``."""
    specs: list[SceneSpec]
    """What each picture shows (captions via :func:`~mmstyle_ns.teacher.vocab.caption`)."""


def generate_batch(
    seed: int, start: int, count: int, resolution: int = 128, views: ViewRange = TEACHER_VIEWS
) -> ToyBatch:
    """Samples ``start .. start + count - 1`` of the data set with ``seed``, with their object masks."""
    images = np.empty((count, resolution, resolution, 3), dtype=np.uint8)
    masks = np.empty((count, resolution, resolution), dtype=bool)
    specs = []
    for i in range(count):
        sample = generate_sample(seed, start + i, resolution, views=views)
        images[i], masks[i] = sample.image, sample.mask
        specs.append(sample.spec)
    return ToyBatch(images, masks, specs)


def generate_images(
    seed: int, start: int, count: int, resolution: int = 128, views: ViewRange = TEACHER_VIEWS
) -> tuple[UInt8[np.ndarray, "N H W 3"], list[SceneSpec]]:
    """Samples ``start .. start + count - 1`` of the data set with ``seed``: pictures ``[N, H, W, 3]`` and specs."""
    batch = generate_batch(seed, start, count, resolution, views)
    return batch.images, batch.specs
