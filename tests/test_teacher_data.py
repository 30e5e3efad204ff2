"""The toy world's generator is deterministic, its captions follow one grammar and its styles do what they say."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mmstyle_ns.teacher.data import BACKGROUND, generate_batch, generate_images, generate_sample
from mmstyle_ns.teacher.vocab import (
    COLOURS,
    COUNTS,
    GROUND_PHRASES,
    GROUNDS,
    MATERIALS,
    SHAPES,
    STYLE_PREFIXES,
    STYLES,
    SceneSpec,
    caption,
    colour_prompts,
    parse_caption,
    sample_spec,
)


def test_importing_the_package_and_cli_loads_no_heavy_library() -> None:
    code = (
        "import sys, mmstyle_ns.teacher, mmstyle_ns.teacher.cli, mmstyle_ns.teacher.vocab; "
        "print(sorted({'torch', 'diffusers', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_samples_are_deterministic_and_index_addressable() -> None:
    a = generate_sample(3, 7, resolution=64)
    b = generate_sample(3, 7, resolution=64)
    assert np.array_equal(a.image, b.image) and a.spec == b.spec and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, generate_sample(3, 8, resolution=64).image)
    assert not np.array_equal(a.image, generate_sample(4, 7, resolution=64).image)
    # A slice of the data set equals the samples generated one by one, in any order.
    images, specs = generate_images(3, 6, 3, resolution=64)
    assert np.array_equal(images[1], a.image) and specs[1] == a.spec


def test_pictures_have_the_expected_layout() -> None:
    batch = generate_batch(0, 0, 12, resolution=96)
    assert batch.images.shape == (12, 96, 96, 3) and batch.images.dtype == np.uint8
    assert batch.masks.shape == (12, 96, 96) and batch.masks.dtype == bool
    white = np.round(np.asarray(BACKGROUND) * 255)
    for image, mask in zip(batch.images, batch.masks, strict=True):
        # Corners show the (near-)white background; objects cover a few percent of the picture, away from the edge.
        assert np.abs(image[:3, :3].reshape(-1, 3) - white).max() < 40
        assert 0.005 < mask.mean() < 0.3
        assert not mask[:4].any() and not mask[-4:].any()


def test_object_colour_follows_the_spec() -> None:
    red = SceneSpec("red", "cube", "stone", "photo")
    blue = SceneSpec("blue", "cube", "stone", "photo")
    a, b = generate_sample(0, 1, 64, spec=red), generate_sample(0, 1, 64, spec=blue)
    ra, rb = a.image[a.mask].astype(float).mean(axis=0), b.image[b.mask].astype(float).mean(axis=0)
    assert ra[0] > ra[2] + 60 and rb[2] > rb[0] + 60
    # Same seed and index, same layout: only the colour changed.
    assert np.array_equal(a.mask, b.mask)


def test_styles_change_the_picture_but_not_the_scene() -> None:
    specs = {style: SceneSpec("green", "sphere", "wood", style) for style in STYLES}
    samples = {style: generate_sample(0, 2, 96, spec=spec) for style, spec in specs.items()}
    photo = samples["photo"].image.astype(float)
    for style in ("painting", "cartoon"):
        assert np.abs(samples[style].image.astype(float) - photo).mean() > 2.0
        assert np.array_equal(samples[style].mask, samples["photo"].mask)
    # Cartoon outlines: dark pixels along the silhouettes that the photo does not have.
    dark = lambda img: (img.max(axis=-1) < 25).mean()  # noqa: E731
    assert dark(samples["cartoon"].image) > dark(samples["photo"].image) + 0.01


def test_captions_round_trip_and_use_the_whole_vocabulary() -> None:
    rng = np.random.default_rng(0)
    specs = [sample_spec(rng) for _ in range(600)]
    captions = [caption(spec) for spec in specs]
    assert all(parse_caption(text) == spec for text, spec in zip(captions, specs, strict=True))
    joined = " ".join(captions)
    for word in [*COLOURS, *SHAPES, *GROUND_PHRASES.values(), "shiny", "two", "three"]:
        assert word in joined
    assert {s.style for s in specs} == set(STYLES) and {s.ground for s in specs} == set(GROUNDS)
    assert {s.material for s in specs} == set(MATERIALS) and {s.count for s in specs} == set(COUNTS)
    assert all(text.startswith(STYLE_PREFIXES[s.style]) for text, s in zip(captions, specs, strict=True))


def test_caption_grammar_examples() -> None:
    assert caption(SceneSpec("red", "cube", "wood")) == "a red cube on a wooden floor"
    assert caption(SceneSpec("blue", "sphere", "grass", "painting")) == "a painting of a blue sphere on grass"
    assert caption(SceneSpec("orange", "cylinder", "stone", "cartoon", "shiny", 3)) == (
        "a cartoon of three shiny orange cylinders on stone"
    )
    assert caption(SceneSpec("orange", "cube", "plain")) == "an orange cube on a plain floor"
    assert caption(SceneSpec("white", "cube", "grass", count=2), with_ground=False) == "two white cubes"


def test_invalid_specs_and_captions_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown colour"):
        SceneSpec("teal", "cube")
    with pytest.raises(ValueError, match="unknown count"):
        SceneSpec("red", "cube", count=4)
    for text in ["a red cube", "a red cube on the moon", "a cube on grass", "a red cubes on grass"]:
        with pytest.raises(ValueError):
            parse_caption(text)
    with pytest.raises(ValueError):
        generate_sample(-1, 0)


def test_colour_prompts_cover_every_colour_shape_and_ground() -> None:
    prompts = colour_prompts(2)
    assert len(prompts) == 2 * len(COLOURS)
    assert [spec.colour for _, spec in prompts] == [c for c in COLOURS for _ in range(2)]
    assert {spec.shape for _, spec in prompts} == set(SHAPES)
    assert {spec.ground for _, spec in prompts} == set(GROUNDS)
    assert all(parse_caption(text) == spec for text, spec in prompts)
