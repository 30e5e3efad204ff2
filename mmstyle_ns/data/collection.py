"""Collections of many toy-world scenes: the training data of multi-view generation (``tunemv3d``).

``mmstyle-scene --kind toy-collection --num-scenes 200 --out data/toy-collection`` writes one ``toy`` scene per
caption (16 views each by default, see :func:`mmstyle_ns.data.scene.generate_scene`) into ``scene_00000/``, ... and
an index, ``collection.json``:

.. code-block:: json

    {"generator": "mmstyle_ns.data.collection", "generator_version": "1", "num_scenes": 200, "num_views": 16,
     "resolution": 128, "seed": 0, "held_out_pairs": [["green", "cylinder"], ...],
     "scenes": [{"name": "scene_00000", "caption": "two shiny red cubes on grass", "seed": 1000}, ...]}

Captions are photo captions of the toy grammar (:mod:`mmstyle_ns.teacher.vocab`) drawn from the seed, except the
colour-shape pairs of :data:`HELD_OUT_PAIRS`: prompts that name them (:func:`held_out_captions`) test generation on
what the trained model has never seen.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmstyle_ns.teacher import vocab

__all__ = [
    "HELD_OUT_PAIRS",
    "CollectionScene",
    "draw_captions",
    "generate_collection",
    "held_out_captions",
    "is_held_out",
    "load_collection",
]

COLLECTION_VERSION = "1"
"""Bumped whenever the content of a collection changes for the same arguments."""

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "cylinder"),
    ("purple", "sphere"),
    ("orange", "cube"),
    ("white", "cylinder"),
)
"""Colour-shape pairs no training scene shows (four colours, every shape)."""

INDEX = "collection.json"
"""Name of a collection's index file."""


@dataclass(frozen=True)
class CollectionScene:
    """One scene of a collection."""

    name: str
    """Folder name inside the collection."""
    path: Path
    """The scene's nerfstudio dataset folder."""
    caption: str
    """What the scene shows (a toy-world photo caption)."""
    seed: int
    """Seed of the scene's layout and cameras."""


def is_held_out(spec: vocab.SceneSpec) -> bool:
    """Whether a scene shows one of the :data:`HELD_OUT_PAIRS`."""
    return (spec.colour, spec.shape) in HELD_OUT_PAIRS


def held_out_captions() -> list[str]:
    """Evaluation prompts no training scene shows: every held-out pair, one matte object, on two grounds each."""
    grounds = ("grass", "wood", "stone", "plain")
    prompts = []
    for i, (colour, shape) in enumerate(HELD_OUT_PAIRS):
        for ground in (grounds[i % 4], grounds[(i + 1) % 4]):
            prompts.append(vocab.caption(vocab.SceneSpec(colour, shape, ground)))
    return prompts


def draw_captions(count: int, seed: int) -> list[str]:
    """``count`` photo captions drawn from ``seed`` (any count, material and ground), none with a held-out pair."""
    rng = np.random.default_rng([seed, 7])
    captions: list[str] = []
    while len(captions) < count:
        spec = vocab.sample_spec(rng)
        spec = vocab.SceneSpec(spec.colour, spec.shape, spec.ground, "photo", spec.material, spec.count)
        if not is_held_out(spec):
            captions.append(vocab.caption(spec))
    return captions


def generate_collection(
    out_dir: str | Path,
    num_scenes: int,
    num_views: int = 16,
    resolution: int = 128,
    seed: int = 0,
    supersample: int = 2,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Writes ``num_scenes`` toy scenes and the index (see the module docstring); deterministic in its arguments.

    An existing collection in ``out_dir`` is replaced (the scene folders its index lists are removed first).

    Raises:
        ValueError: a bad argument, or ``out_dir`` is a file.
    """
    from mmstyle_ns.data.scene import generate_scene

    if num_scenes < 1:
        raise ValueError(f"num_scenes must be at least 1, got {num_scenes}")
    if num_views < 2:
        raise ValueError(f"num_views must be at least 2, got {num_views}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    old = out / INDEX
    if old.is_file():
        try:
            for entry in json.loads(old.read_text("utf8")).get("scenes", []):
                folder = out / str(entry.get("name", ""))
                if folder != out and folder.is_dir():
                    shutil.rmtree(folder)
        except (OSError, ValueError, AttributeError):
            pass
        old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    scenes = []
    start = time.perf_counter()
    for i, caption in enumerate(draw_captions(num_scenes, seed)):
        name, scene_seed = f"scene_{i:05d}", seed * 100_003 + i
        generate_scene(
            "toy",
            out / name,
            num_views=num_views,
            resolution=resolution,
            seed=scene_seed,
            eval_every=num_views,
            supersample=supersample,
            caption=caption,
        )
        scenes.append({"name": name, "caption": caption, "seed": scene_seed})
        if log is not None and ((i + 1) % 10 == 0 or i + 1 == num_scenes):
            log(f"wrote {i + 1}/{num_scenes} scenes ({time.perf_counter() - start:.0f} s)")
    index = {
        "generator": "mmstyle_ns.data.collection",
        "generator_version": COLLECTION_VERSION,
        "num_scenes": num_scenes,
        "num_views": num_views,
        "resolution": resolution,
        "seed": seed,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "scenes": scenes,
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return out


def load_collection(folder: str | Path) -> list[CollectionScene]:
    """The scenes of a collection, checked: the index is readable and every scene folder has a transforms.json.

    Raises:
        ValueError: one message naming what is missing or wrong.
    """
    root = Path(folder)
    index = root / INDEX
    hint = "write one with mmstyle-scene --kind toy-collection --out <folder>"
    if not index.is_file():
        raise ValueError(f"{index} not found: a scene collection has an index; {hint}")
    try:
        meta = json.loads(index.read_text("utf8"))
        entries = meta["scenes"]
        scenes = [
            CollectionScene(str(e["name"]), root / str(e["name"]), str(e["caption"]), int(e["seed"])) for e in entries
        ]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{index} cannot be read as a scene collection ({type(error).__name__}: {error}); {hint}"
        ) from None
    if not scenes:
        raise ValueError(f"{index} lists no scenes; {hint}")
    for scene in scenes:
        if not (scene.path / "transforms.json").is_file():
            raise ValueError(
                f"{scene.path / 'transforms.json'} not found: the collection at {root} is incomplete; {hint}"
            )
    return scenes
