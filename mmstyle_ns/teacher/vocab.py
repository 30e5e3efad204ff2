"""The toy world's vocabulary and caption grammar — the one place the generator, checker, trainer and tests read.

A scene is described by a :class:`SceneSpec`: ``count`` objects of one ``shape``, ``colour`` and ``material``
on a ``ground``, drawn in a ``style``. Its caption follows one grammar::

    caption := [style prefix] count-word [material word] colour shape[s] " on " ground-phrase

e.g. ``"a red cube on a wooden floor"``, ``"a painting of a blue sphere on grass"``,
``"a cartoon of three shiny orange cylinders on stone"``. Plain photos and matte objects are the unmarked
case (no words). :func:`parse_caption` inverts :func:`caption`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "white", "black")
"""Object colours; the checker classifies images into exactly these names."""

SHAPES: tuple[str, ...] = ("sphere", "cube", "cylinder")
"""Object shapes (plural: the name plus ``s``)."""

GROUNDS: tuple[str, ...] = ("wood", "grass", "stone", "plain")
"""Ground kinds under the objects."""

GROUND_PHRASES: dict[str, str] = {
    "wood": "a wooden floor",
    "grass": "grass",
    "stone": "stone",
    "plain": "a plain floor",
}
"""How a ground is named in a caption (after ``on``)."""

STYLES: tuple[str, ...] = ("photo", "painting", "cartoon")
"""Picture styles: a plain render, a painterly one (brush-like smoothing) and a cartoon (flat colours, outlines)."""

STYLE_PREFIXES: dict[str, str] = {"photo": "", "painting": "a painting of ", "cartoon": "a cartoon of "}
"""Caption prefix of each style (a photo is the unmarked case)."""

MATERIALS: tuple[str, ...] = ("matte", "shiny")
"""Object materials: diffuse, or with a specular highlight."""

MATERIAL_WORDS: dict[str, str] = {"matte": "", "shiny": "shiny"}
"""Caption word of each material (matte is the unmarked case)."""

COUNTS: tuple[int, ...] = (1, 2, 3)
"""Number of objects in a scene."""

COUNT_WEIGHTS: tuple[float, ...] = (0.5, 0.3, 0.2)
"""Probability of each count when specs are sampled."""

COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
"""Caption word of each count (``a`` becomes ``an`` before a vowel)."""


@dataclass(frozen=True)
class SceneSpec:
    """What one toy image shows; its caption is :func:`caption` of it."""

    colour: str
    """One of :data:`COLOURS`."""
    shape: str
    """One of :data:`SHAPES`."""
    ground: str = "wood"
    """One of :data:`GROUNDS`."""
    style: str = "photo"
    """One of :data:`STYLES`."""
    material: str = "matte"
    """One of :data:`MATERIALS`."""
    count: int = 1
    """One of :data:`COUNTS`."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("ground", self.ground, GROUNDS),
            ("style", self.style, STYLES),
            ("material", self.material, MATERIALS),
            ("count", self.count, COUNTS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(str, allowed))}")


def caption(spec: SceneSpec, with_ground: bool = True) -> str:
    """The caption of a scene, e.g. ``"a painting of two shiny red cubes on grass"``.

    Args:
        spec: the scene.
        with_ground: append ``" on <ground>"`` (False gives the short form ``"two shiny red cubes"``).
    """
    words = [MATERIAL_WORDS[spec.material], spec.colour, spec.shape + ("s" if spec.count > 1 else "")]
    body = " ".join(w for w in words if w)
    article = COUNT_WORDS[spec.count]
    if article == "a" and body[0] in "aeiou":
        article = "an"
    text = f"{STYLE_PREFIXES[spec.style]}{article} {body}"
    return f"{text} on {GROUND_PHRASES[spec.ground]}" if with_ground else text


def parse_caption(text: str) -> SceneSpec:
    """Inverse of :func:`caption` for full captions (with the ground).

    Raises:
        ValueError: ``text`` does not follow the grammar.
    """
    rest = text.strip()
    style = "photo"
    for name, prefix in STYLE_PREFIXES.items():
        if prefix and rest.startswith(prefix):
            style, rest = name, rest[len(prefix) :]
            break
    head, sep, ground_phrase = rest.partition(" on ")
    grounds = {phrase: name for name, phrase in GROUND_PHRASES.items()}
    if not sep or ground_phrase not in grounds:
        raise ValueError(f"caption {text!r} does not end in ' on <ground>' with a known ground")
    words = head.split()
    counts = {word: n for n, word in COUNT_WORDS.items()} | {"an": 1}
    if len(words) < 3 or words[0] not in counts:
        raise ValueError(f"caption {text!r} does not start with a count word")
    count = counts[words[0]]
    materials = {word: name for name, word in MATERIAL_WORDS.items() if word}
    material = "matte"
    body = words[1:]
    if body[0] in materials:
        material, body = materials[body[0]], body[1:]
    if len(body) != 2:
        raise ValueError(f"caption {text!r} should name one colour and one shape")
    colour, noun = body
    shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
    spec = SceneSpec(colour, shape, grounds[ground_phrase], style, material, count)
    if caption(spec) != text.strip():
        raise ValueError(f"caption {text!r} is not in canonical form ({caption(spec)!r})")
    return spec


def sample_spec(rng: np.random.Generator) -> SceneSpec:
    """A random scene: every attribute uniform except the count (:data:`COUNT_WEIGHTS`)."""
    return SceneSpec(
        colour=str(rng.choice(COLOURS)),
        shape=str(rng.choice(SHAPES)),
        ground=str(rng.choice(GROUNDS)),
        style=str(rng.choice(STYLES)),
        material=str(rng.choice(MATERIALS)),
        count=int(rng.choice(COUNTS, p=COUNT_WEIGHTS)),
    )


def all_specs() -> list[SceneSpec]:
    """Every scene the grammar can describe (8 colours x 3 shapes x 4 grounds x 3 styles x 2 materials x 3 counts =
    1728), in a fixed order; their captions are the candidate pool of caption retrieval."""
    return [
        SceneSpec(colour, shape, ground, style, material, count)
        for style in STYLES
        for count in COUNTS
        for material in MATERIALS
        for colour in COLOURS
        for shape in SHAPES
        for ground in GROUNDS
    ]


ATTRIBUTES: dict[str, tuple[str | int, ...]] = {
    "colour": COLOURS,
    "shape": SHAPES,
    "ground": GROUNDS,
    "style": STYLES,
    "material": MATERIALS,
    "count": COUNTS,
}
"""Each attribute of a :class:`SceneSpec` and its values (the classes of zero-shot classification)."""


def colour_prompts(per_colour: int = 2) -> list[tuple[str, SceneSpec]]:
    """Evaluation prompts: ``per_colour`` photo captions per colour, cycling shapes and grounds.

    Prompt ``i`` takes shape ``i mod 3`` and ground ``i mod 4``, so a colour's prompts differ in both and every
    shape-ground pair appears once in any 12 consecutive prompts.
    Returns ``(caption, spec)`` pairs, colours in :data:`COLOURS` order.
    """
    prompts = []
    for c, colour in enumerate(COLOURS):
        for k in range(per_colour):
            i = c * per_colour + k
            spec = SceneSpec(colour, SHAPES[i % len(SHAPES)], GROUNDS[i % len(GROUNDS)])
            prompts.append((caption(spec), spec))
    return prompts
