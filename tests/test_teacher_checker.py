"""The colour checker reads generated pictures right, abstains on empty ones, and covers the vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from mmstyle_ns.teacher.checker import (
    ACHROMATIC,
    HUE_SECTORS,
    accuracy,
    checker_accuracy,
    classify_colour,
    object_mask,
    pixel_votes,
)
from mmstyle_ns.teacher.data import generate_batch, generate_sample
from mmstyle_ns.teacher.vocab import COLOURS, GROUNDS, STYLES, SceneSpec


def test_rules_cover_exactly_the_vocabulary() -> None:
    assert set(HUE_SECTORS) | set(ACHROMATIC) == set(COLOURS)
    assert not set(HUE_SECTORS) & set(ACHROMATIC)


def test_checker_is_accurate_on_generated_pictures() -> None:
    result = checker_accuracy(seed=10_000, count=100)
    assert result.count == 100
    assert result.overall >= 0.95, result.table()


@pytest.mark.parametrize("colour", COLOURS)
def test_every_colour_on_every_ground_and_style(colour: str) -> None:
    """Hard pairs included: green on grass, orange on wood, white and black on stone, cartoon outlines."""
    for k, (ground, style) in enumerate((g, s) for g in GROUNDS for s in STYLES):
        spec = SceneSpec(colour, ("sphere", "cube", "cylinder")[k % 3], ground, style, ("matte", "shiny")[k % 2])
        reading = classify_colour(generate_sample(5, k, 128, spec=spec).image)
        assert reading.colour == colour, (spec, reading)


def test_object_mask_finds_the_objects() -> None:
    batch = generate_batch(11, 0, 6)
    for image, truth in zip(batch.images, batch.masks, strict=True):
        found = object_mask(image)
        # Eroded, so a subset of the object (and little else); not empty.
        assert found.sum() > 0.3 * truth.sum()
        assert (found & ~truth).sum() <= 0.05 * found.sum()


def test_empty_or_uniform_pictures_have_no_colour() -> None:
    assert classify_colour(np.full((64, 64, 3), 255, dtype=np.uint8)).colour is None
    assert classify_colour(np.full((64, 64, 3), 0.4, dtype=np.float32)).colour is None


def test_pixel_votes() -> None:
    pixels = np.array(
        [[0.9, 0.1, 0.1], [0.95, 0.5, 0.1], [0.9, 0.85, 0.1], [0.1, 0.7, 0.2], [0.1, 0.3, 0.9], [0.6, 0.2, 0.8]]
        + [[0.85, 0.85, 0.83], [0.05, 0.05, 0.06], [0.4, 0.4, 0.4]],
        dtype=np.float32,
    )
    votes = pixel_votes(pixels)
    assert list(votes) == list(COLOURS)
    assert all(v == 1 for v in votes.values())  # one vote each; the mid grey abstains


def test_accuracy_counts_none_as_wrong() -> None:
    result = accuracy(["red", None, "blue", "blue"], ["red", "red", "blue", "green"])
    assert result.overall == 0.5 and result.count == 4
    assert result.per_colour == {"red": 0.5, "green": 0.0, "blue": 1.0}
    assert "overall" in result.table()
    with pytest.raises(ValueError):
        accuracy(["red"], ["red", "blue"])
    with pytest.raises(ValueError, match="RGB"):
        classify_colour(np.zeros((8, 8), dtype=np.uint8))
