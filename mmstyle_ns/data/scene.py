"""Synthetic scenes with exact ground truth, written as nerfstudio datasets.

Four kinds of scene are available (see :data:`SCENE_KINDS`):

* ``object360``: textured objects on a textured ground disc, cameras on an upper sphere cap looking inwards.
* ``forward``: a textured back wall and objects on a floor, cameras on a small planar grid all facing ``+y``.
* ``unbounded``: an outdoor scene without bounds: a ground that goes on to the horizon, a sky with clouds, objects
  near the middle and landmarks (towers, houses, rocks) out to about 60 units away; cameras orbit low around the
  middle looking at it. Written without alpha (full frames, like a photo capture).
* ``head``: a head whose face carries a public-domain portrait, cameras orbiting at head height.
* ``toy``: the toy teacher's world in 3-D, described by a caption such as ``"two shiny blue cylinders on grass"``
  (grammar in :mod:`mmstyle_ns.teacher.vocab`): one to three plain-coloured spheres, cubes or cylinders on a
  ground disc, cameras orbiting like the teacher world's camera. Only photo captions (no style prefix) apply.

Content lies inside roughly ``[-1, 1]^3`` (except for the ``unbounded`` kind) with world up ``+z``. Everything
is deterministic for a given set of arguments. :func:`generate_scene` writes ``transforms.json`` (nerfstudio
``nerfstudio-data`` format, OpenGL camera-to-world poses), 8-bit RGB PNG images, 16-bit PNG z-depth in millimetres
and ``scene.json`` with metadata. :func:`render_views` renders arbitrary poses of a scene, e.g. for evaluation.
"""

from __future__ import annotations

import colorsys
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmstyle_ns.data import cameras as cam
from mmstyle_ns.data import raytrace as rt
from mmstyle_ns.data.textures import PORTRAIT_NAMES, load_portrait, load_texture
from mmstyle_ns.teacher import vocab

GENERATOR_VERSION = "1.0"
"""Bumped whenever the rendered content of a scene changes."""

SCENE_KINDS = ("object360", "forward", "unbounded", "head", "toy")
"""Supported scene kinds."""

DEPTH_UNIT = 1e-3
"""Scene units per depth PNG count (depth PNGs hold millimetres)."""

_TOY_GROUND_Z = -0.25
"""Height of the toy scene's ground disc (objects up to ~0.6 tall stay centred on ``z = 0``)."""

_TOY_GROUND_TEXTURES: dict[str, tuple[str | None, tuple[float, float]]] = {
    "wood": ("brick", (1.0, 3.0)),
    "grass": ("grass", (3.0, 3.0)),
    "stone": ("gravel", (2.0, 2.0)),
    "plain": (None, (1.0, 1.0)),
}
"""Grey texture and its repetitions standing in for each toy ground (tinted to the teacher's ground colour)."""

_TOY_SCALE = {1: 1.0, 2: 0.85, 3: 0.72}
"""Object size factor per object count, so that two or three objects fit on the disc."""

_PORTRAIT_BASE = {"grace_hopper": (0.62, 0.6, 0.64), "astronaut": (0.42, 0.3, 0.2)}
_SKIN = (0.86, 0.68, 0.58)


@dataclass
class SceneSetup:
    """A scene together with the camera rig it is captured with."""

    kind: str
    """Scene kind."""
    seed: int
    """Seed the layout and camera jitter were drawn from."""
    scene: rt.Scene
    """Geometry, materials and lighting."""
    center: np.ndarray
    """Scene centre ``[3]``; orbit cameras look at it."""
    camera_radius: float
    """Distance of the cameras from ``center`` (from the grid centre for ``forward``)."""
    fov_deg: float
    """Horizontal field of view."""
    objects: list[dict[str, Any]] = field(default_factory=list)
    """Human-readable object list for the metadata."""
    options: dict[str, Any] = field(default_factory=dict)
    """Kind-specific options needed to rebuild the scene."""

    def aabb(self) -> np.ndarray:
        """Axis-aligned bounding box ``[2, 3]`` of the content."""
        lo, hi = self.scene.bounds()
        return np.stack([lo, hi])


class _Builder:
    """Collects primitives, materials and metadata while a scene is assembled."""

    def __init__(self) -> None:
        self.primitives: list[rt.Primitive] = []
        self.materials: list[rt.Material] = []
        self.objects: list[dict[str, Any]] = []

    def add(self, name: str, make: Callable[[int], rt.Primitive], material: rt.Material) -> None:
        self.materials.append(material)
        prim = make(len(self.materials) - 1)
        self.primitives.append(prim)
        lo, hi = prim.bounds()
        self.objects.append(
            {
                "name": name,
                "type": type(prim).__name__.lower(),
                "texture": material.texture,
                "specular": material.specular,
                "aabb": [[round(float(x), 6) for x in lo], [round(float(x), 6) for x in hi]],
            }
        )


def _colour(rng: np.random.Generator, hue: float, sat: tuple[float, float] = (0.5, 0.8), val: float = 0.85) -> tuple:
    """Colour ``(r, g, b)`` of the given hue (jittered slightly) with a random saturation."""
    h = (hue + float(rng.uniform(-0.04, 0.04))) % 1.0
    return tuple(round(c, 4) for c in colorsys.hsv_to_rgb(h, float(rng.uniform(*sat)), val))


def _light(rng: np.random.Generator, elevation_deg: float = 55.0, azimuth_deg: float | None = None) -> rt.Light:
    """Directional light from a random (or given) azimuth."""
    az = np.radians(rng.uniform(0, 360) if azimuth_deg is None else azimuth_deg)
    el = np.radians(elevation_deg)
    d = (float(np.cos(el) * np.cos(az)), float(np.cos(el) * np.sin(az)), float(np.sin(el)))
    return rt.Light(direction=d)


def _add_objects(
    b: _Builder, rng: np.random.Generator, spots: list[tuple[float, float]], floor: float, s: float, hue: float
) -> None:
    """Adds a textured box, textured sphere, textured cylinder and glossy sphere at shuffled spots.

    Args:
        b: Scene builder.
        rng: Random generator.
        spots: Four ``(x, y)`` footprint centres.
        floor: Height of the supporting surface.
        s: Size scale (1 gives footprints of radius up to about 0.3).
        hue: Hue of the ground; the plain-coloured objects take hues a third of the colour wheel away.
    """
    pictures = [str(x) for x in rng.permutation(["rocket", "coffee", "astronaut", "chelsea"])]
    order = rng.permutation(4)
    (bx, by), (sx, sy), (cx, cy), (gx, gy) = (spots[i] for i in order)

    half = s * rng.uniform(0.22, 0.28)
    height = s * rng.uniform(0.4, 0.6)
    b.add(
        "textured_box",
        lambda m: rt.Box((bx - half, by - half, floor), (bx + half, by + half, floor + height), m),
        rt.Material(texture=pictures[0]),
    )
    r = s * rng.uniform(0.24, 0.3)
    b.add(
        "textured_sphere",
        lambda m: rt.sphere((sx, sy, floor + r), r, m),
        rt.Material(texture=pictures[1], repeat=(2.0, 1.0), specular=0.15, shininess=24.0),
    )
    cr = s * rng.uniform(0.15, 0.2)
    ch = s * rng.uniform(0.55, 0.75)
    b.add(
        "brick_cylinder",
        lambda m: rt.Cylinder((cx, cy), floor, floor + ch, cr, m),
        rt.Material(texture="brick", tint=_colour(rng, hue + 1 / 3, val=1.0), repeat=(3.0, 2.0)),
    )
    gr = s * rng.uniform(0.18, 0.24)
    b.add(
        "glossy_sphere",
        lambda m: rt.sphere((gx, gy, floor + gr), gr, m),
        rt.Material(color=_colour(rng, hue + 2 / 3, val=0.8), specular=0.6, shininess=60.0),
    )


def _four_spots(rng: np.random.Generator, jitter: float, radii: tuple[float, float]) -> list[tuple[float, float]]:
    """Four object positions on the ground, a quarter turn apart from a random start (each turned by up to
    ``jitter`` radians) at a random distance in ``radii`` from the centre."""
    offset = rng.uniform(0, 2 * np.pi)
    spots = []
    for k in range(4):
        a = offset + k * np.pi / 2 + rng.uniform(-jitter, jitter)
        rad = rng.uniform(*radii)
        spots.append((float(rad * np.cos(a)), float(rad * np.sin(a))))
    return spots


def _object360(seed: int) -> SceneSetup:
    rng = np.random.default_rng([seed, 360])
    b = _Builder()
    ground = -0.35
    ground_tex = str(rng.choice(["gravel", "grass", "brick"]))
    hue = float(rng.uniform())
    b.add(
        "ground_disc",
        lambda m: rt.Disc((0.0, 0.0, ground), 1.0, m),
        rt.Material(texture=ground_tex, tint=_colour(rng, hue, sat=(0.15, 0.35), val=1.0), repeat=(3.0, 3.0)),
    )
    spots = _four_spots(rng, jitter=0.2, radii=(0.45, 0.55))
    _add_objects(b, rng, spots, ground, 1.0, hue)
    scene = rt.Scene(tuple(b.primitives), tuple(b.materials), light=_light(rng), background=(1.0, 1.0, 1.0))
    return SceneSetup("object360", seed, scene, np.zeros(3), 3.0, 36.0, b.objects)


def _forward(seed: int) -> SceneSetup:
    rng = np.random.default_rng([seed, 1])
    b = _Builder()
    floor = -0.6
    wall_tex = str(rng.choice(["coffee", "rocket"]))
    b.add("back_wall", lambda m: rt.Box((-1.0, 0.9, floor), (1.0, 1.0, 0.8), m), rt.Material(texture=wall_tex))
    floor_tex = str(rng.choice(["gravel", "brick"]))
    hue = float(rng.uniform())
    b.add(
        "floor",
        lambda m: rt.Box((-1.0, -1.0, floor - 0.05), (1.0, 0.9, floor), m),
        rt.Material(texture=floor_tex, tint=_colour(rng, hue, sat=(0.15, 0.35), val=1.0), repeat=(4.0, 4.0)),
    )
    xs = [-0.42, -0.14, 0.14, 0.42]
    spots = [(x + float(rng.uniform(-0.03, 0.03)), float(rng.uniform(-0.2, 0.4))) for x in xs]
    _add_objects(b, rng, spots, floor, 0.55, hue)
    light = _light(rng, elevation_deg=50.0, azimuth_deg=float(rng.uniform(-150, -30)))
    scene = rt.Scene(tuple(b.primitives), tuple(b.materials), light=light, background=(1.0, 1.0, 1.0))
    cam_center = np.array([0.0, -2.2, 0.1])
    return SceneSetup(
        "forward",
        seed,
        scene,
        np.array([0.0, 0.0, -0.2]),
        float(np.linalg.norm(cam_center - np.array([0.0, 0.0, -0.2]))),
        30.0,
        b.objects,
        {"grid_center": cam_center.tolist(), "grid_half_extent": [0.15, 0.1], "pitch_deg": -6.0},
    )


_UNBOUNDED_GROUND_Z = -0.35
"""Height of the unbounded scene's ground."""


def _unbounded(seed: int) -> SceneSetup:
    rng = np.random.default_rng([seed, 2])
    b = _Builder()
    ground = _UNBOUNDED_GROUND_Z
    hue = float(rng.uniform(0.2, 0.4))  # a green-to-olive ground
    near_tex = str(rng.choice(["gravel", "grass"]))
    b.add(
        "ground_near",
        lambda m: rt.Disc((0.0, 0.0, ground), 1.6, m),
        rt.Material(texture=near_tex, tint=_colour(rng, hue, sat=(0.2, 0.35), val=1.0), repeat=(4.0, 4.0)),
    )
    # The ground beyond goes on to the horizon (a disc far larger than anything the cameras resolve), a little
    # lower so that the near disc covers it; coarser texture, so that the horizon does not alias into noise.
    b.add(
        "ground_far",
        lambda m: rt.Disc((0.0, 0.0, ground - 1e-3), 2000.0, m),
        rt.Material(texture="grass", tint=_colour(rng, hue, sat=(0.3, 0.45), val=0.9), repeat=(400.0, 400.0)),
    )
    spots = _four_spots(rng, jitter=0.25, radii=(0.3, 0.45))
    _add_objects(b, rng, spots, ground, 0.7, hue)
    # Landmarks all around, from just outside the middle to far away: their size grows with the distance.
    count = 12
    azimuths = rng.permutation(count) * 2 * np.pi / count + rng.uniform(-0.2, 0.2, count)
    distances = np.geomspace(3.0, 60.0, count)
    for k, (az, dist) in enumerate(zip(azimuths, distances, strict=True)):
        x, y = float(dist * np.cos(az)), float(dist * np.sin(az))
        size = float(dist * rng.uniform(0.06, 0.1))
        colour = _colour(rng, float(rng.uniform()), sat=(0.35, 0.7), val=0.85)
        kind = k % 3
        if kind == 0:  # a tower
            b.add(
                f"tower_{k}",
                lambda m, x=x, y=y, r=size * 0.35, h=size * 2.5: rt.Cylinder((x, y), ground, ground + h, r, m),
                rt.Material(texture="brick", tint=colour, repeat=(3.0, 3.0)),
            )
        elif kind == 1:  # a house
            b.add(
                f"house_{k}",
                lambda m, x=x, y=y, h=size: rt.Box((x - h, y - 0.7 * h, ground), (x + h, y + 0.7 * h, ground + h), m),
                rt.Material(texture=str(rng.choice(["rocket", "coffee", "chelsea"])), tint=(1.0, 1.0, 1.0)),
            )
        else:  # a rock
            b.add(
                f"rock_{k}",
                lambda m, x=x, y=y, r=size * 0.8: rt.sphere((x, y, ground + 0.5 * r), r, m),
                rt.Material(texture="gravel", tint=colour, repeat=(2.0, 1.0)),
            )
    sky = rt.Sky(cloud_phase=tuple(float(v) for v in rng.uniform(0, 2 * np.pi, 3)))  # type: ignore[arg-type]
    light = _light(rng, elevation_deg=50.0)
    scene = rt.Scene(tuple(b.primitives), tuple(b.materials), light=light, background=sky.horizon, sky=sky)
    return SceneSetup("unbounded", seed, scene, np.array([0.0, 0.0, -0.15]), 2.2, 60.0, b.objects)


def _head(seed: int, portrait: str) -> SceneSetup:
    if portrait not in PORTRAIT_NAMES:
        raise ValueError(f"unknown portrait {portrait!r}; expected one of {', '.join(PORTRAIT_NAMES)}")
    rng = np.random.default_rng([seed, 7])
    b = _Builder()
    hc, hr = (0.0, 0.0, 0.3), (0.40, 0.34, 0.48)
    face = rt.Material(color=_PORTRAIT_BASE[portrait], texture=f"portrait:{portrait}", wrap=False, specular=0.05)
    # The whole crop maps onto the window, undistorted: half height 0.49, half width from the crop's aspect.
    rows, cols = load_portrait(portrait).shape[:2]
    window = (0.0, 0.0, 0.49 * cols / rows, 0.49)
    b.add("head", lambda m: rt.Ellipsoid(hc, hr, m, uv_mode="front", window=window), face)
    skin = rt.Material(color=_SKIN, specular=0.05, shininess=16.0)
    for side, sign in (("left_ear", 1.0), ("right_ear", -1.0)):
        b.add(side, lambda m, sg=sign: rt.Ellipsoid((-0.02, sg * 0.33, 0.27), (0.07, 0.05, 0.11), m), skin)
    b.add("neck", lambda m: rt.Cylinder((0.0, 0.0), -0.42, -0.05, 0.15, m), skin)
    cloth = rt.Material(color=(0.1, 0.12, 0.24), specular=0.2, shininess=20.0)
    b.add("shoulders", lambda m: rt.Ellipsoid((0.0, 0.0, -0.62), (0.3, 0.7, 0.26), m), cloth)
    light = _light(rng, elevation_deg=35.0, azimuth_deg=float(rng.uniform(35.0, 60.0)))
    light = rt.Light(direction=light.direction, intensity=0.75, ambient=0.35)
    scene = rt.Scene(tuple(b.primitives), tuple(b.materials), light=light, background=(1.0, 1.0, 1.0))
    return SceneSetup("head", seed, scene, np.array([0.0, 0.0, 0.25]), 2.5, 32.0, b.objects, {"portrait": portrait})


def toy_spec(text: str | None) -> vocab.SceneSpec:
    """Reads the caption of a ``toy`` scene.

    Args:
        text: A toy-world photo caption, e.g. ``"a red cube on a wooden floor"``.

    Returns:
        The scene it describes.

    Raises:
        ValueError: The caption is missing, does not follow the toy world's grammar or asks for a painting or
            cartoon (only photos can be built as 3-D scenes).
    """
    example = "e.g. 'a red cube on a wooden floor' or 'two shiny blue cylinders on grass'"
    if text is None or not text.strip():
        raise ValueError(f"the toy scene kind needs a caption, {example}")
    try:
        spec = vocab.parse_caption(text)
    except ValueError as err:
        raise ValueError(f"unreadable toy caption: {err}; {example}") from None
    if spec.style != "photo":
        raise ValueError(
            f"only photo captions are supported for scenes, but {text.strip()!r} asks for a {spec.style}; "
            f"drop the prefix {vocab.STYLE_PREFIXES[spec.style].strip()!r}"
        )
    return spec


def _toy_shape(
    shape: str, x: float, y: float, floor: float, scale: float, rng: np.random.Generator
) -> tuple[Callable[[int], rt.Primitive], float]:
    """A toy object standing on ``floor`` at ``(x, y)``: its constructor (given a material) and footprint radius."""
    if shape == "sphere":
        r = scale * float(rng.uniform(0.25, 0.31))
        return (lambda m: rt.sphere((x, y, floor + r), r, m)), r
    if shape == "cube":
        h = scale * float(rng.uniform(0.2, 0.24))
        return (lambda m: rt.Box((x - h, y - h, floor), (x + h, y + h, floor + 2.0 * h), m)), h * float(np.sqrt(2.0))
    r = scale * float(rng.uniform(0.16, 0.2))
    top = floor + scale * float(rng.uniform(0.5, 0.6))
    return (lambda m: rt.Cylinder((x, y), floor, top, r, m)), r


def _toy_layout(
    spec: vocab.SceneSpec, rng: np.random.Generator, floor: float
) -> list[tuple[Callable[[int], rt.Primitive], float]]:
    """Draws ``spec.count`` non-overlapping objects (constructors and footprint radii) near the disc centre."""
    scale = _TOY_SCALE[spec.count]
    for _ in range(200):
        if spec.count == 1:
            angles = rng.uniform(0.0, 2.0 * np.pi, 1)
            dists = rng.uniform(0.0, 0.12, 1)
        else:
            spacing = 2.0 * np.pi / spec.count
            angles = rng.uniform(0.0, 2.0 * np.pi) + spacing * np.arange(spec.count)
            angles = angles + rng.uniform(-0.25, 0.25, spec.count)
            dists = rng.uniform(0.3, 0.42, spec.count)
        xy = np.stack([dists * np.cos(angles), dists * np.sin(angles)], axis=1)
        made = [_toy_shape(spec.shape, float(px), float(py), floor, scale, rng) for px, py in xy]
        gaps = [
            float(np.linalg.norm(xy[i] - xy[j])) - made[i][1] - made[j][1]
            for i in range(len(made))
            for j in range(i + 1, len(made))
        ]
        if min(gaps, default=1.0) > 0.05:
            return made
    raise RuntimeError(f"could not place {spec.count} {spec.shape}s without overlap")  # pragma: no cover


def _toy(seed: int, text: str | None) -> SceneSetup:
    spec = toy_spec(text)
    # The teacher world's colour tables (imported here: the module pulls in the style filters and scipy).
    from mmstyle_ns.teacher.data import GROUND_RGB, OBJECT_RGB

    rng = np.random.default_rng([seed, 42])
    b = _Builder()
    floor = _TOY_GROUND_Z
    texture, repeat = _TOY_GROUND_TEXTURES[spec.ground]
    if texture is None:
        ground = rt.Material(color=GROUND_RGB[spec.ground])
    else:
        # Tinted so that the textured ground's mean albedo is the teacher's ground colour.
        mean = np.asarray(load_texture(texture), dtype=np.float64).mean(axis=(0, 1))
        red, green, blue = (round(float(c / m), 4) for c, m in zip(GROUND_RGB[spec.ground], mean, strict=True))
        ground = rt.Material(texture=texture, tint=(red, green, blue), repeat=repeat)
    b.add("ground_disc", lambda m: rt.Disc((0.0, 0.0, floor), 1.0, m), ground)
    shiny = spec.material == "shiny"
    look = rt.Material(color=OBJECT_RGB[spec.colour], specular=0.6 if shiny else 0.0, shininess=40.0)
    for i, (make, _) in enumerate(_toy_layout(spec, rng, floor)):
        b.add(f"{spec.colour}_{spec.shape}_{i + 1}", make, look)
        b.objects[-1]["color"] = list(look.color)
    # Soft lighting like the teacher world's (ambient 0.45, diffuse 0.55), from a seeded direction.
    sun = _light(rng, elevation_deg=float(rng.uniform(45.0, 65.0)))
    scene = rt.Scene(
        tuple(b.primitives),
        tuple(b.materials),
        light=rt.Light(direction=sun.direction, intensity=0.55, ambient=0.45),
        background=(1.0, 1.0, 1.0),
    )
    lo = np.min([p.bounds()[0] for p in b.primitives[1:]], axis=0)
    hi = np.max([p.bounds()[1] for p in b.primitives[1:]], axis=0)
    return SceneSetup("toy", seed, scene, (lo + hi) / 2, 3.2, 36.0, b.objects, {"caption": vocab.caption(spec)})


def build_scene(
    kind: str = "object360", seed: int = 0, portrait: str = "grace_hopper", caption: str | None = None
) -> SceneSetup:
    """Builds a scene and its camera rig parameters.

    Args:
        kind: One of :data:`SCENE_KINDS`.
        seed: Non-negative seed for the layout, colours, light and camera jitter.
        portrait: Portrait shown on the ``head`` kind (one of ``textures.PORTRAIT_NAMES``).
        caption: Toy-world photo caption of the ``toy`` kind (required there, e.g. ``"a red cube on grass"``);
            must be None for the other kinds.

    Returns:
        The scene setup.
    """
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(SCENE_KINDS)}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if caption is not None and kind != "toy":
        raise ValueError(f"a caption only applies to the toy scene kind, not to {kind!r}")
    if kind == "object360":
        return _object360(seed)
    if kind == "unbounded":
        return _unbounded(seed)
    if kind == "forward":
        return _forward(seed)
    if kind == "toy":
        return _toy(seed, caption)
    return _head(seed, portrait)


def make_cameras(setup: SceneSetup, num_views: int) -> np.ndarray:
    """Camera-to-world poses ``[N, 4, 4]`` (OpenGL convention) of the scene's capture rig."""
    rng = np.random.default_rng([setup.seed, 99, num_views])
    if setup.kind == "object360":
        poses, _, _ = cam.orbit_poses(num_views, setup.camera_radius, setup.center, (15.0, 60.0), rng)
    elif setup.kind == "unbounded":
        # Low orbits: the horizon and the sky are in every view.
        poses, _, _ = cam.orbit_poses(num_views, setup.camera_radius, setup.center, (4.0, 25.0), rng)
    elif setup.kind == "toy":
        # The toy teacher world's camera: 15-50 degrees above the objects, all the way round.
        poses, _, _ = cam.orbit_poses(num_views, setup.camera_radius, setup.center, (15.0, 50.0), rng)
    elif setup.kind == "head":
        poses, _, _ = cam.orbit_poses(
            num_views, setup.camera_radius, setup.center, (0.0, 10.0), rng, stratify_elevation=False
        )
    else:
        pitch = np.radians(setup.options["pitch_deg"])
        forward = np.array([0.0, np.cos(pitch), np.sin(pitch)])
        poses = cam.grid_poses(
            num_views, np.asarray(setup.options["grid_center"]), tuple(setup.options["grid_half_extent"]), forward, rng
        )
    return poses


def render_views(
    scene: rt.Scene | SceneSetup,
    c2w: np.ndarray,
    intrinsics: np.ndarray | tuple | list,
    width: int,
    height: int,
    supersample: int = 2,
    specular: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Renders arbitrary camera poses of a scene.

    Poses must be in the scene's own world frame (as written to ``transforms.json``), not in a frame that a
    dataparser has re-centred or re-scaled.

    Args:
        scene: A scene or scene setup.
        c2w: Camera-to-world poses ``[N, 4, 4]`` (or one ``[4, 4]``), OpenGL convention.
        intrinsics: ``(fx, fy, cx, cy)`` as ``[4]`` or ``[N, 4]``, or matrices ``[3, 3]`` / ``[N, 3, 3]``.
        width: Image width in pixels.
        height: Image height in pixels.
        supersample: Colour samples per pixel along each axis.
        specular: Include specular highlights (False renders everything diffuse).

    Returns:
        Colour ``[N, H, W, 3]`` float32 in ``[0, 1]`` and z-depth ``[N, H, W]`` float32 (0 for background).
    """
    if isinstance(scene, SceneSetup):
        scene = scene.scene
    c2w = np.asarray(c2w, dtype=float)
    if c2w.ndim == 2:
        c2w = c2w[None]
    k = cam.as_intrinsics(intrinsics, len(c2w))
    rgb = np.empty((len(c2w), height, width, 3), dtype=np.float32)
    depth = np.empty((len(c2w), height, width), dtype=np.float32)
    for i in range(len(c2w)):
        rgb[i], depth[i] = rt.render(scene, c2w[i], k[i], width, height, supersample, specular)
    return rgb, depth


def split_indices(num_views: int, eval_every: int) -> tuple[list[int], list[int]]:
    """Train / eval split: every ``eval_every``-th view (starting with view 0) is held out."""
    held_out = [i for i in range(num_views) if i % eval_every == 0]
    train = [i for i in range(num_views) if i % eval_every != 0]
    return train, held_out


def _validate(kind: str, num_views: int, resolution: int, eval_every: int, supersample: int, seed: int) -> None:
    if kind not in SCENE_KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(SCENE_KINDS)}")
    if resolution < 8 or resolution > 4096:
        raise ValueError(f"resolution must be between 8 and 4096 pixels, got {resolution}")
    if eval_every < 2:
        raise ValueError(f"eval_every must be at least 2 so that training views remain, got {eval_every}")
    if num_views < 2:
        raise ValueError(f"num_views must be at least 2 (one train and one eval view), got {num_views}")
    if not 1 <= supersample <= 8:
        raise ValueError(f"supersample must be between 1 and 8, got {supersample}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def _prepare_dir(out_dir: Path) -> None:
    """Creates the dataset folders and removes frames left over from an earlier dataset there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output path {out_dir} exists and is not a directory")
    for sub in ("images", "depths", "masks"):
        folder = out_dir / sub
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a directory")
        if sub != "masks":
            folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("frame_*.png"):
            old.unlink()


def generate_scene(
    kind: str = "object360",
    out_dir: str | Path = Path("data/object360"),
    num_views: int = 100,
    resolution: int = 128,
    seed: int = 0,
    eval_every: int = 8,
    supersample: int = 2,
    specular: bool = True,
    portrait: str = "grace_hopper",
    caption: str | None = None,
    masks: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Renders a scene and writes it as a nerfstudio dataset.

    Layout of ``out_dir``: ``transforms.json``, ``scene.json``, ``images/frame_00001.png`` ... (8-bit RGB) and
    ``depths/frame_00001.png`` ... (16-bit z-depth in millimetres, 0 = background). Views with index divisible
    by ``eval_every`` form both the val and test split. An existing dataset in ``out_dir`` is replaced.

    Args:
        kind: One of :data:`SCENE_KINDS`.
        out_dir: Output folder (created if missing).
        num_views: Number of views.
        resolution: Width and height of the square images in pixels (at least 8).
        seed: Non-negative seed for the layout and the camera jitter.
        eval_every: Hold out every ``eval_every``-th view.
        supersample: Colour samples per pixel along each axis.
        specular: Render specular highlights.
        portrait: Portrait of the ``head`` kind.
        caption: Toy-world photo caption of the ``toy`` kind (required there, None for the other kinds), e.g.
            ``"a red cube on a wooden floor"``; recorded in ``scene.json``.
        masks: Also write the objects' masks (every primitive but the first, the ground or wall) as nerfstudio's
            per-frame ``mask_path`` (``masks/frame_XXXXX.png``, 255 on the objects): the region an editing method
            (ed-nerf) may change. nerfstudio's ray-based methods train only on masked pixels, so leave it off for
            reconstruction-only datasets.
        log: Optional callback for progress messages.

    Returns:
        ``out_dir`` as a Path.
    """
    _validate(kind, num_views, resolution, eval_every, supersample, seed)
    out_dir = Path(out_dir)
    setup = build_scene(kind, seed, portrait, caption)
    _prepare_dir(out_dir)
    poses = make_cameras(setup, num_views)
    k = cam.intrinsics_from_fov(resolution, resolution, setup.fov_deg)
    start = time.perf_counter()
    frames = []
    for i, c2w in enumerate(poses):
        rgb, alpha, depth = rt.render_rgba(setup.scene, c2w, k, resolution, resolution, supersample, specular)
        name = f"frame_{i + 1:05d}.png"
        # RGBA: the alpha channel lets trainers composite over random backgrounds, which teaches empty space.
        if setup.scene.sky is not None:  # full frames: there is no empty space to mark
            Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8), mode="RGB").save(out_dir / "images" / name)
        else:
            rgba = np.concatenate([rt.unpremultiply(rgb, alpha, setup.scene.background), alpha[..., None]], axis=-1)
            Image.fromarray((rgba * 255.0 + 0.5).astype(np.uint8), mode="RGBA").save(out_dir / "images" / name)
        depth_mm = np.clip(np.round(depth.astype(np.float64) / DEPTH_UNIT), 0, 65535).astype(np.uint16)
        Image.fromarray(depth_mm).save(out_dir / "depths" / name)
        frame = {
            "file_path": f"images/{name}",
            "transform_matrix": [[float(x) for x in row] for row in c2w],
            "depth_file_path": f"depths/{name}",
        }
        if masks:
            origins, directions, _ = cam.camera_rays(c2w, k, resolution, resolution, 1)
            _, index, _ = rt.intersect(setup.scene, origins, directions)
            (out_dir / "masks").mkdir(exist_ok=True)
            object_mask = (index.reshape(resolution, resolution) > 0).astype(np.uint8) * 255
            Image.fromarray(object_mask).save(out_dir / "masks" / name)
            frame["mask_path"] = f"masks/{name}"
        frames.append(frame)
        if log is not None and (i + 1) % 25 == 0:
            log(f"rendered {i + 1}/{num_views} views ({time.perf_counter() - start:.1f} s)")
    train, held_out = split_indices(num_views, eval_every)
    transforms = {
        "camera_model": "OPENCV",
        "fl_x": float(k[0]),
        "fl_y": float(k[1]),
        "cx": float(k[2]),
        "cy": float(k[3]),
        "w": resolution,
        "h": resolution,
        "k1": 0.0,
        "k2": 0.0,
        "p1": 0.0,
        "p2": 0.0,
        "frames": frames,
        "train_filenames": [frames[i]["file_path"] for i in train],
        "val_filenames": [frames[i]["file_path"] for i in held_out],
        "test_filenames": [frames[i]["file_path"] for i in held_out],
    }
    (out_dir / "transforms.json").write_text(json.dumps(transforms, indent=2) + "\n")
    meta: dict[str, Any] = {"generator": "mmstyle_ns.data.scene", "generator_version": GENERATOR_VERSION, "kind": kind}
    options: dict[str, Any] = {}
    if kind == "head":
        options = {"portrait": portrait}
    elif kind == "toy":
        options = {"caption": setup.options["caption"]}
        meta["caption"] = setup.options["caption"]
    meta |= {
        "seed": seed,
        "resolution": resolution,
        "num_views": num_views,
        "eval_every": eval_every,
        "supersample": supersample,
        "specular": specular,
        "options": options,
        "background": list(setup.scene.background),
        "aabb": [[round(float(x), 6) for x in row] for row in setup.aabb()],
        "center": [float(x) for x in setup.center],
        "camera_radius": setup.camera_radius,
        "fov_deg": setup.fov_deg,
        "world_up": [0.0, 0.0, 1.0],
        "camera_convention": "opengl",
        "depth_unit_scale_factor": DEPTH_UNIT,
        "depth_type": "z",
        "objects": setup.objects,
    }
    (out_dir / "scene.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def load_scene(data_dir: str | Path) -> SceneSetup:
    """Rebuilds the scene of a generated dataset from its ``scene.json``.

    Args:
        data_dir: Dataset folder written by :func:`generate_scene`.

    Returns:
        The scene setup, e.g. to pass to :func:`render_views`.
    """
    meta = json.loads((Path(data_dir) / "scene.json").read_text())
    if meta.get("generator_version") != GENERATOR_VERSION:
        raise ValueError(
            f"{data_dir} was written by scene generator version {meta.get('generator_version')!r}; "
            f"this is version {GENERATOR_VERSION}; regenerate the dataset"
        )
    options = meta.get("options", {})
    return build_scene(
        meta["kind"], int(meta["seed"]), options.get("portrait", "grace_hopper"), caption=options.get("caption")
    )
