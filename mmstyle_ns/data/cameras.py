"""Camera helpers for the scene generator (OpenGL / nerfstudio convention, world up ``+z``).

A camera-to-world matrix ``c2w`` ``[4, 4]`` has the camera's right, up and backward axes as the first three
columns of its rotation and the camera centre as its last column; the camera looks along its ``-z`` axis.
"""

from __future__ import annotations

import math

import numpy as np

WORLD_UP = np.array([0.0, 0.0, 1.0])
"""World up direction."""


def look_at(eye: np.ndarray, target: np.ndarray, up: np.ndarray = WORLD_UP) -> np.ndarray:
    """Camera-to-world pose of a camera at ``eye`` looking at ``target``.

    Args:
        eye: Camera centre ``[3]``.
        target: Point the camera looks at ``[3]``.
        up: Approximate up direction ``[3]``; must not be parallel to the viewing direction.

    Returns:
        ``c2w`` ``[4, 4]`` (float64).
    """
    eye = np.asarray(eye, dtype=float)
    return look_along(eye, np.asarray(target, dtype=float) - eye, up)


def look_along(eye: np.ndarray, forward: np.ndarray, up: np.ndarray = WORLD_UP) -> np.ndarray:
    """Camera-to-world pose of a camera at ``eye`` looking along ``forward``.

    Args:
        eye: Camera centre ``[3]``.
        forward: Viewing direction ``[3]`` (need not be normalised).
        up: Approximate up direction ``[3]``.

    Returns:
        ``c2w`` ``[4, 4]`` (float64) whose rotation columns are ``(right, up, -forward)``.
    """
    f = np.asarray(forward, dtype=float)
    f = f / np.linalg.norm(f)
    right = np.cross(f, np.asarray(up, dtype=float))
    norm = np.linalg.norm(right)
    if norm < 1e-9:
        raise ValueError("viewing direction is parallel to the up vector")
    right /= norm
    cam_up = np.cross(right, f)
    c2w = np.eye(4)
    c2w[:3, 0] = right
    c2w[:3, 1] = cam_up
    c2w[:3, 2] = -f
    c2w[:3, 3] = eye
    return c2w


def intrinsics_from_fov(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole intrinsics with square pixels and the principal point at the image centre.

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        fov_deg: Field of view across the image width, in degrees.

    Returns:
        ``[4]`` = ``(fx, fy, cx, cy)`` (float64).
    """
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return np.array([f, f, width / 2.0, height / 2.0])


def as_intrinsics(intrinsics: np.ndarray | tuple | list, num: int) -> np.ndarray:
    """Normalises intrinsics to ``[N, 4]`` rows of ``(fx, fy, cx, cy)``.

    Args:
        intrinsics: ``[4]``, ``[N, 4]``, a matrix ``K`` ``[3, 3]`` or ``[N, 3, 3]``.
        num: Number of cameras ``N``.

    Returns:
        ``[N, 4]`` (float64).
    """
    k = np.asarray(intrinsics, dtype=float)
    if k.shape[-2:] == (3, 3):
        k = np.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], axis=-1)
    if k.shape == (4,):
        k = np.broadcast_to(k, (num, 4))
    if k.shape != (num, 4):
        raise ValueError(f"intrinsics must be [4], [N, 4], [3, 3] or [N, 3, 3] with N={num}; got {k.shape}")
    return np.ascontiguousarray(k)


def orbit_poses(
    num: int,
    radius: float,
    center: np.ndarray,
    elevation_deg: tuple[float, float],
    rng: np.random.Generator,
    azimuth_jitter: float = 0.3,
    stratify_elevation: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inward-facing cameras on a sphere around ``center``.

    View ``i`` has azimuth ``360 * i / num`` degrees plus a jitter of up to ``azimuth_jitter`` of the spacing
    (azimuth 0 is the ``+x`` side). Elevations follow a golden-ratio sequence over ``elevation_deg`` (or are
    uniform random when ``stratify_elevation`` is False) plus a small jitter, so views cover the cap evenly.

    Args:
        num: Number of cameras ``N``.
        radius: Distance from ``center`` to every camera.
        center: Look-at point ``[3]``.
        elevation_deg: ``(min, max)`` elevation above the horizontal plane through ``center``.
        rng: Random generator (the only source of randomness).
        azimuth_jitter: Azimuth jitter as a fraction of the azimuth spacing.
        stratify_elevation: Use the golden-ratio sequence for elevations.

    Returns:
        ``c2w`` ``[N, 4, 4]``, azimuths ``[N]`` and elevations ``[N]`` in degrees.
    """
    lo, hi = elevation_deg
    step = 360.0 / num
    azimuth = np.arange(num) * step + rng.uniform(-azimuth_jitter, azimuth_jitter, num) * step
    if stratify_elevation:
        golden = (np.sqrt(5.0) - 1.0) / 2.0
        frac = (np.arange(num) * golden + rng.uniform(0.0, 1.0)) % 1.0
        frac = np.clip(frac + rng.uniform(-0.05, 0.05, num), 0.0, 1.0)
    else:
        frac = rng.uniform(0.0, 1.0, num)
    elevation = lo + (hi - lo) * frac
    center = np.asarray(center, dtype=float)
    az, el = np.radians(azimuth), np.radians(elevation)
    offsets = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=1) * radius
    poses = np.stack([look_at(center + off, center) for off in offsets])
    return poses, azimuth, elevation


def grid_poses(
    num: int,
    center: np.ndarray,
    half_extent: tuple[float, float],
    forward: np.ndarray,
    rng: np.random.Generator,
    jitter: float = 0.25,
) -> np.ndarray:
    """Forward-facing cameras on a jittered planar grid, all with the same orientation.

    The grid lies in the plane spanned by the camera's right and up axes, centred on ``center``; cameras are
    ordered row by row (top row first, left to right).

    Args:
        num: Number of cameras ``N``.
        center: Grid centre ``[3]``.
        half_extent: Half size of the grid along the camera's right and up axes.
        forward: Common viewing direction ``[3]``.
        rng: Random generator.
        jitter: Position jitter as a fraction of the grid spacing.

    Returns:
        ``c2w`` ``[N, 4, 4]``.
    """
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    base = look_along(np.asarray(center, dtype=float), forward)
    right, up = base[:3, 0], base[:3, 1]
    xs = np.linspace(-1.0, 1.0, cols) if cols > 1 else np.zeros(1)
    ys = np.linspace(1.0, -1.0, rows) if rows > 1 else np.zeros(1)
    gx, gy = np.meshgrid(xs, ys)
    gx, gy = gx.ravel()[:num], gy.ravel()[:num]
    gx = gx + rng.uniform(-jitter, jitter, num) * (2.0 / max(cols - 1, 1))
    gy = gy + rng.uniform(-jitter, jitter, num) * (2.0 / max(rows - 1, 1))
    poses = np.repeat(base[None], num, axis=0)
    poses[:, :3, 3] += gx[:, None] * half_extent[0] * right + gy[:, None] * half_extent[1] * up
    return poses


def camera_rays(
    c2w: np.ndarray, intrinsics: np.ndarray, width: int, height: int, supersample: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generates the rays of a pinhole camera.

    Args:
        c2w: Camera-to-world ``[4, 4]`` (or ``[3, 4]``), OpenGL convention (x right, y up, looking along -z).
        intrinsics: ``[4]`` = ``(fx, fy, cx, cy)`` in pixels.
        width: Image width in pixels.
        height: Image height in pixels.
        supersample: Rays per pixel along each axis; sub-pixel samples sit at ``(i + 0.5) / s`` offsets.

    Returns:
        Origins ``[H*s * W*s, 3]``, unit directions ``[H*s * W*s, 3]`` (row-major over the super-sampled image)
        and ``z_per_t`` ``[H*s * W*s]``: the z-depth per unit of ray parameter (``depth = t * z_per_t``).
    """
    fx, fy, cx, cy = (float(x) for x in intrinsics)
    s = supersample
    xs = (np.arange(width * s) + 0.5) / s
    ys = (np.arange(height * s) + 0.5) / s
    px, py = np.meshgrid(xs, ys)
    dirs_cam = np.stack([(px - cx) / fx, -(py - cy) / fy, -np.ones_like(px)], axis=-1).reshape(-1, 3)
    norm = np.sqrt(dirs_cam[:, 0] * dirs_cam[:, 0] + dirs_cam[:, 1] * dirs_cam[:, 1] + dirs_cam[:, 2] * dirs_cam[:, 2])
    rot = np.asarray(c2w, dtype=float)[:3, :3]
    dirs = (dirs_cam / norm[:, None]) @ rot.T
    origins = np.broadcast_to(np.asarray(c2w, dtype=float)[:3, 3], dirs.shape)
    return origins, dirs, 1.0 / norm
