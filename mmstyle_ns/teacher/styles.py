"""Picture styles of the toy world, applied to a rendered image with numpy/scipy.

* ``photo``: the render as it is.
* ``painting``: brush-like smoothing (a median filter flattens texture into patches), oriented brush-stroke
  relief (noise smeared along one random direction modulates brightness) and slightly stronger colours.
* ``cartoon``: flat colours (ground texture blurred away, brightness posterised into a few bands with hue and
  saturation kept), stronger saturation and dark outlines along object and ground silhouettes.

Every style keeps each object's hue, so the colour named in the caption stays the colour in the picture.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from mmstyle_ns.teacher.vocab import STYLES

_STROKE_LENGTH = 9
_OUTLINE = np.float32(0.06)


def _saturate(img: np.ndarray, gain: float) -> np.ndarray:
    """Scales each pixel's chroma (distance from its grey level) by ``gain``, clipped to [0, 1]."""
    grey = img.mean(axis=-1, keepdims=True)
    return np.clip(grey + gain * (img - grey), 0.0, 1.0)


def _line_kernel(angle: float, length: int) -> np.ndarray:
    """A normalised ``length x length`` kernel that averages along a line at ``angle`` (radians)."""
    kernel = np.zeros((length, length), dtype=np.float32)
    c = (length - 1) / 2
    for s in np.linspace(-c, c, 2 * length):
        kernel[int(round(c - s * np.sin(angle))), int(round(c + s * np.cos(angle)))] = 1.0
    return kernel / kernel.sum()


def painting(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brush-like smoothing, stroke relief and stronger colours of an image ``[H, W, 3]`` in [0, 1]."""
    smooth = ndimage.median_filter(img, size=(5, 5, 1), mode="nearest")
    noise = rng.standard_normal(img.shape[:2]).astype(np.float32)
    strokes = ndimage.convolve(noise, _line_kernel(float(rng.uniform(0, np.pi)), _STROKE_LENGTH), mode="wrap")
    strokes /= max(float(strokes.std()), 1e-6)
    out = smooth * (1.0 + 0.06 * np.clip(strokes, -2.5, 2.5))[..., None]
    return _saturate(out, 1.15).astype(np.float32)


def cartoon(img: np.ndarray, ids: np.ndarray, levels: int = 4) -> np.ndarray:
    """Flat, posterised colours with outlines of an image ``[H, W, 3]`` given its surface ids ``[H, W]``.

    Args:
        img: the render in [0, 1].
        ids: which surface each pixel shows (any integers; outlines are drawn where neighbours differ).
        levels: brightness bands.
    """
    smooth = ndimage.median_filter(img, size=(5, 5, 1), mode="nearest")
    # The ground (id 0) is flattened further: a masked (normalised) blur keeps its colour but drops its texture.
    ground = (ids == 0).astype(np.float32)
    weight = ndimage.gaussian_filter(ground, 4.0)
    blurred = ndimage.gaussian_filter(img * ground[..., None], (4.0, 4.0, 0.0)) / np.maximum(weight, 1e-4)[..., None]
    smooth = np.where(ground[..., None] > 0, blurred, smooth)
    value = smooth.max(axis=-1, keepdims=True)
    banded = np.minimum(np.ceil(value * levels - 0.25) / levels, 1.0)
    flat = smooth * (banded / np.maximum(value, 1e-4))
    flat = _saturate(flat, 1.25)
    edges = np.zeros(ids.shape, dtype=bool)
    edges[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edges[1:, :] |= ids[1:, :] != ids[:-1, :]
    flat[edges] = _OUTLINE
    return flat.astype(np.float32)


def apply_style(style: str, img: np.ndarray, ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Applies one of :data:`~mmstyle_ns.teacher.vocab.STYLES` to a render ``[H, W, 3]`` with surface ids."""
    if style == "photo":
        return img
    if style == "painting":
        return painting(img, rng)
    if style == "cartoon":
        return cartoon(img, ids)
    raise ValueError(f"unknown style {style!r}; expected one of {', '.join(STYLES)}")
