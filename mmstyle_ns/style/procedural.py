"""Procedural high-texture style images (bold stripes, stained-glass cells) for checking that stylization
transfers texture, not only a tint. Seeded and made with numpy only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from jaxtyping import Float

PatternKind = Literal["stripes", "cells"]
"""The procedural patterns."""


def stripes(size: int = 256, period: int = 24, seed: int = 0) -> Float[np.ndarray, "H W 3"]:
    """Diagonal bands alternating deep blue and orange with a slight swirl, RGB in ``[0, 1]``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    swirl = 6.0 * np.sin(2 * np.pi * y / (size / 1.5)) + 6.0 * np.cos(2 * np.pi * x / (size / 2.0))
    phase = (x * np.cos(angle) + y * np.sin(angle) + swirl) / period
    band = (np.floor(phase) % 2).astype(bool)
    blue, orange = np.array([0.05, 0.15, 0.65]), np.array([0.98, 0.55, 0.05])
    return np.where(band[..., None], blue, orange)


def cells(size: int = 256, count: int = 40, border: float = 2.5, seed: int = 0) -> Float[np.ndarray, "H W 3"]:
    """Saturated Voronoi cells with black borders ("stained glass"), RGB in ``[0, 1]``."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, size, (count, 2))
    hues = rng.uniform(0, 1, count)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    d = np.hypot(x[..., None] - centres[:, 0], y[..., None] - centres[:, 1])  # [H, W, count]
    order = np.sort(d, axis=-1)
    nearest = d.argmin(-1)
    edge = (order[..., 1] - order[..., 0]) < border  # near the bisector of the two nearest centres
    h = hues[nearest] * 6.0
    k = np.stack([(5 + h) % 6, (3 + h) % 6, (1 + h) % 6], axis=-1)
    rgb = 1.0 - np.clip(np.minimum(k, 4 - k), 0, 1)  # HSV with S = V = 1
    return np.where(edge[..., None], 0.0, rgb)


def make_pattern(kind: PatternKind, size: int = 256, seed: int = 0) -> Float[np.ndarray, "H W 3"]:
    """One of the patterns by name."""
    if kind == "stripes":
        return stripes(size, seed=seed)
    if kind == "cells":
        return cells(size, seed=seed)
    raise ValueError(f"unknown pattern {kind!r}; one of stripes, cells")


def write_pattern(path: Path, kind: PatternKind, size: int = 256, seed: int = 0) -> Path:
    """Writes a pattern as PNG; returns the path."""
    from PIL import Image

    image = np.round(make_pattern(kind, size, seed) * 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path
