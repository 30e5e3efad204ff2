"""Collections of many toy-world scenes: the training data of multi-view generation (``tunemv3d``).

``mmstyle-scene --kind toy-collection --num-scenes 200 --out data/toy-collection`` writes one ``toy`` scene per
caption (16 views each by default, see :func:`mmstyle_ns.data.scene.generate_scene`) into ``scene_00000/``, ... and
an index, ``collection.json``:

.. code-block:: json

    {"generator": "mmstyle_ns.data.collection", "generator_version": "1", "num_scenes": 200, "num_views": 16,
     "resolution": 128, "seed": 0, "supersample": 2, "held_out_pairs": [["green", "cylinder"], ...],
     "scenes": [{"name": "scene_00000", "caption": "two shiny red cubes on grass", "seed": 0}, ...]}

Captions are photo captions of the toy grammar (:mod:`mmstyle_ns.teacher.vocab`) drawn from the seed, except the
colour-shape pairs of :data:`HELD_OUT_PAIRS`: prompts that name them (:func:`held_out_captions`) test generation on
what the trained model has never seen. Each scene holds out only its first view as the val/test split.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmstyle_ns.teacher import vocab

__all__ = [
    "COLLECTION_VERSION",
    "HELD_OUT_PAIRS",
    "INDEX",
    "CollectionScene",
    "draw_captions",
    "generate_collection",
    "held_out_captions",
    "is_held_out",
    "load_collection",
]

GENERATOR = "mmstyle_ns.data.collection"
"""Generator name recorded in the index."""

COLLECTION_VERSION = "1"
"""Bumped whenever the content of a collection changes for the same arguments."""

HELD_OUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("green", "cylinder"),
    ("purple", "sphere"),
    ("orange", "cube"),
    ("white", "cylinder"),
)
"""Colour-shape pairs no training scene shows: 4 of the 24, four different colours and every shape, so each held-out
colour and each held-out shape is still seen in training in other combinations (compositional generalisation)."""

_EVAL_GROUND_CYCLE = ("grass", "wood", "stone", "plain")
"""Grounds the default held-out prompts cycle through."""

INDEX = "collection.json"
"""Name of a collection's index file."""

MAX_SCENES = 100_000
"""Most scenes a collection may hold (folder names have five digits)."""

_SCENE_NAME = re.compile(r"scene_\d{5}")
"""Folder names of a collection's scenes (the only folders replacing a collection removes)."""

_SCENE_SEED_STRIDE = 100_003
"""Scene ``i`` of a collection with seed ``s`` has scene seed ``s * stride + i`` (distinct across seeds)."""


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
    """Whether a scene shows one of the :data:`HELD_OUT_PAIRS` (whatever its count, material, ground or style)."""
    return (spec.colour, spec.shape) in HELD_OUT_PAIRS


def held_out_captions(grounds: Sequence[str] | None = None) -> list[str]:
    """Evaluation prompts no training scene shows: one matte object of each held-out pair per ground.

    Args:
        grounds: Grounds of :data:`mmstyle_ns.teacher.vocab.GROUNDS` each pair is shown on. None gives two per pair,
            pair ``i`` on grounds ``i`` and ``i + 1`` of :data:`_EVAL_GROUND_CYCLE`, so every ground appears twice:
            8 prompts, starting ``"a green cylinder on grass"``, ``"a green cylinder on a wooden floor"``.

    Returns:
        Photo captions, pairs in :data:`HELD_OUT_PAIRS` order, e.g. ``"a green cylinder on grass"``.

    Raises:
        ValueError: An unknown ground.
    """
    prompts = []
    for i, (colour, shape) in enumerate(HELD_OUT_PAIRS):
        if grounds is None:
            on = (_EVAL_GROUND_CYCLE[i % 4], _EVAL_GROUND_CYCLE[(i + 1) % 4])
        else:
            on = tuple(grounds)
        prompts.extend(vocab.caption(vocab.SceneSpec(colour, shape, ground)) for ground in on)
    return prompts


def draw_captions(count: int, seed: int) -> list[str]:
    """The training captions of a collection: ``count`` photo captions drawn from ``seed``.

    Counts, materials and grounds follow :func:`mmstyle_ns.teacher.vocab.sample_spec`; colour-shape pairs are uniform
    over those not in :data:`HELD_OUT_PAIRS`. Caption ``i`` depends only on ``seed`` and ``i`` (a longer list extends
    a shorter one).
    """
    rng = np.random.default_rng([seed, 7])
    captions: list[str] = []
    while len(captions) < count:
        spec = vocab.sample_spec(rng)
        spec = vocab.SceneSpec(spec.colour, spec.shape, spec.ground, "photo", spec.material, spec.count)
        if not is_held_out(spec):
            captions.append(vocab.caption(spec))
    return captions


def _validate(num_scenes: int, num_views: int, resolution: int, seed: int, supersample: int) -> None:
    """Checks the arguments of :func:`generate_collection` before anything is written or removed."""
    if not 1 <= num_scenes <= MAX_SCENES:
        raise ValueError(f"num_scenes must be between 1 and {MAX_SCENES}, got {num_scenes}")
    if num_views < 2:
        raise ValueError(f"num_views must be at least 2 (one training and one evaluation view), got {num_views}")
    if not 8 <= resolution <= 4096:
        raise ValueError(f"resolution must be between 8 and 4096 pixels, got {resolution}")
    if not 1 <= supersample <= 8:
        raise ValueError(f"supersample must be between 1 and 8, got {supersample}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")


def _remove_old(out: Path) -> None:
    """Removes the collection in ``out``: its index and its scene folders (those the index lists, and any left by an
    interrupted run, i.e. ``scene_NNNNN`` folders holding a scene this generator wrote)."""
    index = out / INDEX
    names: set[str] = set()
    if index.is_file():
        try:
            entries = json.loads(index.read_text("utf8")).get("scenes", [])
            names |= {str(e.get("name")) for e in entries if isinstance(e, dict)}
        except (OSError, UnicodeDecodeError, ValueError, AttributeError):
            pass  # an unreadable index: the scan below still finds the scene folders
        index.unlink()
    names |= {p.name for p in out.glob("scene_*") if (p / "scene.json").is_file()}
    for name in sorted(names):
        folder = out / name
        if _SCENE_NAME.fullmatch(name) and folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)


def generate_collection(
    out_dir: str | Path,
    num_scenes: int,
    num_views: int = 16,
    resolution: int = 128,
    seed: int = 0,
    supersample: int = 2,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Writes a collection of toy scenes and its index (layout in the module docstring).

    Scene ``i`` shows caption ``i`` of :func:`draw_captions` with its own scene seed and is written by
    :func:`mmstyle_ns.data.scene.generate_scene` (kind ``toy``, only the first view held out) into
    ``out_dir/scene_<i:05d>/``. The same arguments give byte-identical files. An existing collection in ``out_dir``
    is replaced; the index is written last, so an interrupted run leaves no index.

    Args:
        out_dir: Output folder (created if missing).
        num_scenes: Number of scenes (1 to :data:`MAX_SCENES`).
        num_views: Views per scene (at least 2).
        resolution: Width and height of the square images in pixels (8 to 4096).
        seed: Non-negative seed of the captions and the scene seeds.
        supersample: Colour samples per pixel along each axis (1 to 8).
        log: Optional callback for progress messages (every 10 scenes, at most ~10 s apart, and at the end).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ValueError: A bad argument, or ``out_dir`` is a file or holds a single-scene dataset.
    """
    from mmstyle_ns.data.scene import generate_scene

    _validate(num_scenes, num_views, resolution, seed, supersample)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} exists and is not a directory")
    if (out / "transforms.json").is_file():
        raise ValueError(f"{out} holds a single-scene dataset (transforms.json); write the collection elsewhere")
    _remove_old(out)
    out.mkdir(parents=True, exist_ok=True)
    scenes: list[dict[str, Any]] = []
    start = last = time.perf_counter()
    for i, caption in enumerate(draw_captions(num_scenes, seed)):
        name, scene_seed = f"scene_{i:05d}", seed * _SCENE_SEED_STRIDE + i
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
        now, done = time.perf_counter(), i + 1
        if log is not None and (done % 10 == 0 or now - last >= 10.0 or done == num_scenes):
            left = (now - start) / done * (num_scenes - done)
            log(f"wrote {done}/{num_scenes} scenes ({now - start:.0f} s, ~{left:.0f} s left)")
            last = now
    index = {
        "generator": GENERATOR,
        "generator_version": COLLECTION_VERSION,
        "num_scenes": num_scenes,
        "num_views": num_views,
        "resolution": resolution,
        "seed": seed,
        "supersample": supersample,
        "held_out_pairs": [list(pair) for pair in HELD_OUT_PAIRS],
        "scenes": scenes,
    }
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf8")
    return out


def load_collection(folder: str | Path) -> list[CollectionScene]:
    """The scenes of a collection, checked: the index is valid and every scene folder has a ``transforms.json``.

    A collection of one's own needs only ``collection.json`` with ``{"scenes": [{"name": <subfolder>, "caption":
    <text>}, ...]}`` (``seed`` is optional) next to the scenes' nerfstudio datasets, all in one world frame; the
    generator fields are checked only for collections this module wrote.

    Args:
        folder: A collection folder (e.g. written by :func:`generate_collection`).

    Returns:
        The scenes in index order.

    Raises:
        ValueError: One message naming the file or folder that is missing or wrong.
    """
    root = Path(folder)
    index = root / INDEX
    hint = f"write a collection with mmstyle-scene --kind toy-collection --out {root}"
    if not index.is_file():
        raise ValueError(f"{index} not found: {hint}")
    try:
        meta = json.loads(index.read_text("utf8"))
        scenes = [
            CollectionScene(str(e["name"]), root / str(e["name"]), str(e["caption"]), int(e.get("seed", 0)))
            for e in meta["scenes"]
        ]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{index} is not a valid scene collection index ({error}); {hint}") from None
    if meta.get("generator") == GENERATOR and meta.get("generator_version") != COLLECTION_VERSION:
        raise ValueError(
            f"{index} was written by collection generator version {meta.get('generator_version')!r}, this is "
            f"version {COLLECTION_VERSION}; {hint}"
        )
    if not scenes:
        raise ValueError(f"{index} lists no scenes; {hint}")
    for scene in scenes:
        name = Path(scene.name)
        if not scene.name or name.is_absolute() or ".." in name.parts:
            raise ValueError(f"{index} lists a scene named {scene.name!r}: names are subfolders of {root}")
        if not scene.caption.strip():
            raise ValueError(f"{index}: scene {scene.name!r} has an empty caption")
        if not (scene.path / "transforms.json").is_file():
            raise ValueError(
                f"{scene.path / 'transforms.json'} not found: the collection in {root} is incomplete; {hint}"
            )
    return scenes
