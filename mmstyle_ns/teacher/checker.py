"""An independent colour checker: which vocabulary colour do the objects in a toy-world picture have?

It knows nothing of how a picture was made (no masks, ids or captions), only the world's layout: objects
stand on a ground disc that covers more of the picture than they do, seen against a bright, flat background.
Steps (on a 3x3 median-filtered picture):

1. Background: pixels within ``BACKGROUND_TOLERANCE`` of the median colour of the picture's border; the scene is
   the largest remaining blob (stray specks such as brush strokes are dropped).
2. Ground model: the most common chromaticity ``rgb / (r + g + b)`` in the scene (a smoothed 2-D histogram peak),
   the median brightness ``r + g + b`` of the pixels near it and the spread of their log-brightness.
3. Object pixels: scene pixels whose chromaticity is far from the ground's (``CHROMA_MIN`` or 4x the ground's
   own deviation), or whose brightness is outside the ground's range (``BRIGHT_MIN`` above, ``DARK_MIN`` below —
   shadows — in log units, or 3x the ground's spread). Specks are removed (binary opening) and the mask is eroded
   by one pixel, which drops anti-aliased and outlined borders.
4. Each object pixel votes for a colour in HSV: ``black`` when dark, ``white`` when bright and unsaturated,
   a hue sector otherwise (grey pixels abstain). The colour with most votes wins.

:func:`checker_accuracy` measures it against generated ground truth; it is meant to be >= 95% there, or
the teacher's colour figures mean nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import numpy as np
from jaxtyping import Float
from scipy import ndimage

from mmstyle_ns.teacher.vocab import COLOURS

HUE_SECTORS: dict[str, tuple[float, float]] = {
    "red": (345.0, 15.0),
    "orange": (15.0, 41.0),
    "yellow": (41.0, 75.0),
    "green": (75.0, 170.0),
    "blue": (170.0, 258.0),
    "purple": (258.0, 345.0),
}
"""Hue range ``[start, end)`` in degrees of each chromatic colour (red wraps around 0)."""

BACKGROUND_TOLERANCE = 0.12
"""Largest per-channel difference from the border colour of a background pixel."""

CHROMA_MIN = 0.045
"""Least chromaticity difference (largest over r, g, b) from the ground that makes a pixel an object pixel."""

BRIGHT_MIN = 0.25
"""Least log-brightness above the ground's that makes a pixel an object pixel (x1.28)."""

DARK_MIN = 0.95
"""Least log-brightness below the ground's that makes a pixel an object pixel (x0.39; shadows are above it)."""

ACHROMATIC: tuple[str, ...] = ("white", "black")
"""Colours decided by brightness and saturation instead of hue."""

BLACK_MAX_VALUE = 0.2
"""Pixels with HSV value below this vote ``black``."""

GREY_MAX_SATURATION = 0.22
"""Pixels with less HSV saturation are achromatic: ``white`` if bright, ``black`` if dark, else no vote."""

WHITE_MIN_VALUE = 0.55
"""Achromatic pixels at least this bright vote ``white``."""

if set(HUE_SECTORS) | set(ACHROMATIC) != set(COLOURS):  # pragma: no cover - guards edits of the vocabulary
    raise RuntimeError("the checker's colour rules do not cover the vocabulary's colours")


@dataclass(frozen=True)
class ColourReading:
    """What the checker saw in one picture."""

    colour: str | None
    """The winning colour, or None when no object pixels (or no votes) were found."""
    confidence: float
    """Share of the object pixels' votes the winner got (0 when ``colour`` is None)."""
    object_fraction: float
    """Share of the picture's pixels taken as object."""
    votes: dict[str, int] = field(default_factory=dict)
    """Votes per colour."""


def _as_float(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def object_mask(image: np.ndarray | Float[np.ndarray, "H W 3"]) -> np.ndarray:
    """Boolean ``[H, W]`` mask of the pixels taken as object (uint8 or float [0, 1] RGB input)."""
    img = ndimage.median_filter(_as_float(image), size=(3, 3, 1), mode="nearest")
    h, w = img.shape[:2]
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3), img[:, :2].reshape(-1, 3)])
    background_ref = np.median(np.concatenate([border, img[:, -2:].reshape(-1, 3)]), axis=0)
    background = np.abs(img - background_ref).max(axis=-1) < BACKGROUND_TOLERANCE
    # The scene is one blob (objects stand on the disc); stray specks (brush strokes, noise) are not part of it.
    labels, count = cast(tuple[np.ndarray, int], ndimage.label(ndimage.binary_opening(~background)))
    if count == 0:
        return np.zeros((h, w), dtype=bool)
    foreground = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))

    # Ground model: the most common chromaticity among foreground pixels (the disc covers more of the picture than
    # the objects), the median brightness of the pixels near it and their spread.
    brightness = img.sum(axis=-1) + 1e-3
    chroma = img / brightness[..., None]
    lit = foreground & (brightness > 0.25)
    if lit.sum() < 16:
        return np.zeros((h, w), dtype=bool)
    bins = 50
    hist, _, _ = np.histogram2d(chroma[lit][:, 0], chroma[lit][:, 1], bins=bins, range=((0, 1), (0, 1)))
    peak = np.unravel_index(int(np.argmax(ndimage.gaussian_filter(hist, 1.0))), hist.shape)
    ground_rg = (np.asarray(peak, dtype=np.float64) + 0.5) / bins
    ground_chroma = np.array([ground_rg[0], ground_rg[1], 1.0 - ground_rg.sum()])
    distance = np.abs(chroma - ground_chroma).max(axis=-1)
    near = lit & (distance < 0.04)
    if near.sum() < 8:  # the smoothed peak fell between colour clusters: no ground model
        return np.zeros((h, w), dtype=bool)
    ground_chroma = np.median(chroma[near], axis=0)
    distance = np.abs(chroma - ground_chroma).max(axis=-1)
    log_ratio = np.log(brightness / float(np.median(brightness[near])))
    spread = float(np.median(np.abs(log_ratio[near] - np.median(log_ratio[near]))))

    chroma_far = lit & (distance > max(CHROMA_MIN, 4.0 * float(np.median(distance[near]))))
    too_dark = log_ratio < -max(DARK_MIN, 3.0 * spread)
    too_bright = log_ratio > max(BRIGHT_MIN, 3.0 * spread)
    mask = foreground & (chroma_far | too_dark | too_bright)
    mask = ndimage.binary_opening(mask, iterations=1)
    return ndimage.binary_erosion(mask, iterations=1)


def pixel_votes(pixels: Float[np.ndarray, "N 3"]) -> dict[str, int]:
    """Votes per colour of RGB pixels ``[N, 3]`` in [0, 1] (see the module docstring for the rule)."""
    value = pixels.max(axis=-1)
    low = pixels.min(axis=-1)
    saturation = np.where(value > 1e-6, (value - low) / np.maximum(value, 1e-6), 0.0)
    r, g, b = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    span = np.maximum(value - low, 1e-6)
    hue = np.where(
        value == r,
        60.0 * ((g - b) / span % 6.0),
        np.where(value == g, 60.0 * ((b - r) / span + 2.0), 60.0 * ((r - g) / span + 4.0)),
    )
    black = value < BLACK_MAX_VALUE
    grey = ~black & (saturation < GREY_MAX_SATURATION)
    white = grey & (value >= WHITE_MIN_VALUE)
    chromatic = ~black & ~grey
    votes = {"black": int(black.sum()), "white": int(white.sum())}
    for name, (start, end) in HUE_SECTORS.items():
        inside = (hue >= start) & (hue < end) if start < end else (hue >= start) | (hue < end)
        votes[name] = int((chromatic & inside).sum())
    return {name: votes[name] for name in COLOURS}


def classify_colour(image: np.ndarray) -> ColourReading:
    """The dominant vocabulary colour of the objects in a toy-world picture (uint8 or float [0, 1] RGB)."""
    img = _as_float(image)
    mask = object_mask(img)
    fraction = float(mask.mean())
    if not mask.any():
        return ColourReading(None, 0.0, fraction)
    smooth = ndimage.median_filter(img, size=(3, 3, 1), mode="nearest")
    votes = pixel_votes(smooth[mask])
    total = sum(votes.values())
    if total == 0:
        return ColourReading(None, 0.0, fraction, votes)
    winner = max(votes, key=lambda name: votes[name])
    return ColourReading(winner, votes[winner] / total, fraction, votes)


def classify_colours(images: np.ndarray | Sequence[np.ndarray]) -> list[str | None]:
    """:func:`classify_colour` of each image ``[N, H, W, 3]``; None where no object was found."""
    return [classify_colour(np.asarray(image)).colour for image in images]


@dataclass(frozen=True)
class Accuracy:
    """Agreement of predicted colours with the truth."""

    overall: float
    """Share of correct predictions."""
    per_colour: dict[str, float]
    """Share of correct predictions per true colour (colours without samples are left out)."""
    count: int
    """Number of predictions."""

    def table(self) -> str:
        """A one-line-per-colour text table."""
        lines = [f"  {name:<7} {acc:6.1%}" for name, acc in self.per_colour.items()]
        return "\n".join([*lines, f"  {'overall':<7} {self.overall:6.1%}  ({self.count} images)"])


def accuracy(predicted: Sequence[str | None], truth: Sequence[str]) -> Accuracy:
    """Overall and per-colour accuracy of ``predicted`` colours (None counts as wrong)."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"need equally many predictions and truths (>0), got {len(predicted)} and {len(truth)}")
    right = [p == t for p, t in zip(predicted, truth, strict=True)]
    per_colour = {}
    for name in COLOURS:
        hits = [ok for ok, t in zip(right, truth, strict=True) if t == name]
        if hits:
            per_colour[name] = sum(hits) / len(hits)
    return Accuracy(sum(right) / len(right), per_colour, len(right))


def checker_accuracy(seed: int = 10_000, count: int = 400, resolution: int = 128) -> Accuracy:
    """The checker's accuracy on ``count`` generated pictures whose colour is known (samples of ``seed``)."""
    from mmstyle_ns.teacher.data import generate_images

    images, specs = generate_images(seed, 0, count, resolution)
    return accuracy(classify_colours(images), [spec.colour for spec in specs])
