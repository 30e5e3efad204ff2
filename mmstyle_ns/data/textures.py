"""Texture images for the analytic scene generator.

All textures come from images shipped inside installed packages (``skimage.data`` and matplotlib's sample
data), so scenes can be generated offline. Each texture is returned as a float32 array ``[H, W, 3]`` in
``[0, 1]`` with row 0 at the top of the image. Textures are resized once (deterministically) to a moderate
size, which keeps lookups fast and limits aliasing at the small render resolutions used for tests.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image

TEXTURE_NAMES = ("astronaut", "rocket", "coffee", "chelsea", "brick", "grass", "gravel", "grace_hopper", "checker")
"""Names accepted by :func:`load_texture`."""

PORTRAIT_NAMES = ("grace_hopper", "astronaut")
"""Names accepted by :func:`load_portrait`."""

# Face crops (left, top, right, bottom) in pixels of the original images, chosen so that the crop holds the
# head (hat/hair to chin) with an aspect ratio close to the head ellipsoid's frontal silhouette.
_PORTRAIT_CROPS = {
    "grace_hopper": (140, 5, 390, 375),
    "astronaut": (150, 12, 300, 190),
}

_MAX_SIDE = 256


def _checker(size: int = 128, tiles: int = 8) -> np.ndarray:
    """Procedural two-tone checkerboard, used as a fallback when an image cannot be loaded.

    Args:
        size: Side length in pixels.
        tiles: Number of tiles along each side.

    Returns:
        Float32 array ``[size, size, 3]``.
    """
    idx = (np.arange(size) * tiles) // size
    mask = (idx[:, None] + idx[None, :]) % 2 == 0
    img = np.where(mask, np.float32(0.85), np.float32(0.25)).astype(np.float32)
    return np.repeat(img[..., None], 3, axis=2)


def _load_raw(name: str) -> np.ndarray:
    """Loads the original uint8 image ``[H, W, 3]`` for a texture name."""
    if name == "grace_hopper":
        from matplotlib import cbook

        path = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    if name == "checker":
        return (_checker() * 255).astype(np.uint8)
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return img[..., :3].astype(np.uint8)


def _to_float(img: np.ndarray, max_side: int) -> np.ndarray:
    """Resizes a uint8 image so its longer side is at most ``max_side`` and converts it to float32 [0, 1]."""
    h, w = img.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    return (img.astype(np.float32) / 255.0).copy()


@functools.cache
def load_texture(name: str) -> np.ndarray:
    """Loads a named texture.

    Grey-scale sources (brick, grass, gravel) are replicated to three channels; tint them through the material
    colour. If an image cannot be loaded, a checkerboard is returned instead so generation never fails.

    Args:
        name: One of :data:`TEXTURE_NAMES`.

    Returns:
        Read-only float32 array ``[H, W, 3]`` in ``[0, 1]``.
    """
    if name not in TEXTURE_NAMES:
        raise ValueError(f"unknown texture {name!r}; expected one of {', '.join(TEXTURE_NAMES)}")
    try:
        tex = _to_float(_load_raw(name), _MAX_SIDE)
    except Exception:  # any loader failure (missing data file, decoder error) falls back to a pattern
        tex = _checker()
    tex.setflags(write=False)
    return tex


@functools.cache
def load_portrait(name: str = "grace_hopper") -> np.ndarray:
    """Loads the face crop of a public-domain portrait.

    Args:
        name: One of :data:`PORTRAIT_NAMES`.

    Returns:
        Read-only float32 array ``[H, W, 3]`` in ``[0, 1]``, upright, face centred.
    """
    if name not in PORTRAIT_NAMES:
        raise ValueError(f"unknown portrait {name!r}; expected one of {', '.join(PORTRAIT_NAMES)}")
    raw = _load_raw(name)
    left, top, right, bottom = _PORTRAIT_CROPS[name]
    tex = _to_float(np.ascontiguousarray(raw[top:bottom, left:right]), 320)
    tex.setflags(write=False)
    return tex


def sample_bilinear(tex: np.ndarray, uv: np.ndarray, wrap: bool = True) -> np.ndarray:
    """Bilinear texture lookup.

    ``uv = (0, 0)`` is the top-left corner of the image and ``(1, 1)`` the bottom-right; ``u`` runs along
    columns, ``v`` along rows.

    Args:
        tex: Texture ``[H, W, C]``.
        uv: Texture coordinates ``[R, 2]``.
        wrap: Repeat the texture outside ``[0, 1]`` if True, clamp to the border otherwise.

    Returns:
        Sampled values ``[R, C]`` (float32).
    """
    h, w = tex.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = uv[:, 1] * h - 0.5
    x0 = np.floor(x)
    y0 = np.floor(y)
    fx = (x - x0).astype(np.float32)[:, None]
    fy = (y - y0).astype(np.float32)[:, None]
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    if wrap:
        x0 %= w
        y0 %= h
        x1 = (x0 + 1) % w
        y1 = (y0 + 1) % h
    else:
        x1 = np.clip(x0 + 1, 0, w - 1)
        y1 = np.clip(y0 + 1, 0, h - 1)
        x0 = np.clip(x0, 0, w - 1)
        y0 = np.clip(y0, 0, h - 1)
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bottom = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)
