"""Tests of collections of toy scenes (``mmstyle-scene --kind toy-collection``), the data of tunemv3d."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from mmstyle_ns.data.collection import (
    HELD_OUT_PAIRS,
    INDEX,
    draw_captions,
    generate_collection,
    held_out_captions,
    is_held_out,
    load_collection,
)
from mmstyle_ns.teacher import vocab

SMALL: dict[str, Any] = {"num_scenes": 3, "num_views": 4, "resolution": 32, "supersample": 1}
"""A collection that takes a fraction of a second to write."""


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_collection(tmp_path_factory.mktemp("coll") / "toy", seed=5, **SMALL)


def test_index_lists_every_scene_with_its_caption(small: Path) -> None:
    index = json.loads((small / INDEX).read_text())
    assert index["generator"] == "mmstyle_ns.data.collection"
    assert (index["num_scenes"], index["num_views"], index["resolution"], index["seed"]) == (3, 4, 32, 5)
    assert [tuple(p) for p in index["held_out_pairs"]] == list(HELD_OUT_PAIRS)
    assert [s["name"] for s in index["scenes"]] == ["scene_00000", "scene_00001", "scene_00002"]
    assert [s["caption"] for s in index["scenes"]] == draw_captions(3, 5)
    assert len({s["seed"] for s in index["scenes"]}) == 3
    assert sorted(p.name for p in small.iterdir()) == [INDEX, "scene_00000", "scene_00001", "scene_00002"]
    for entry in index["scenes"]:
        meta = json.loads((small / entry["name"] / "scene.json").read_text())
        assert (meta["kind"], meta["caption"], meta["seed"]) == ("toy", entry["caption"], entry["seed"])
        transforms = json.loads((small / entry["name"] / "transforms.json").read_text())
        assert len(transforms["frames"]) == 4 and transforms["w"] == 32
        # Only the first view is held out (eval_every = num_views).
        assert transforms["val_filenames"] == ["images/frame_00001.png"]
    scenes = load_collection(small)
    assert [(s.name, s.caption, s.seed) for s in scenes] == [
        (e["name"], e["caption"], e["seed"]) for e in index["scenes"]
    ]
    assert all(s.path == small / s.name for s in scenes)


def test_scenes_load_with_nerfstudio_dataparser(small: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    for scene in load_collection(small):
        outputs = NerfstudioDataParserConfig(data=scene.path).setup().get_dataparser_outputs("train")
        assert len(outputs.image_filenames) == 3
        image = np.asarray(Image.open(outputs.image_filenames[0]))
        assert image.shape == (32, 32, 4)
        assert 0 < (image[..., 3] > 0).mean() < 1  # objects and ground in front of an empty background


def test_deterministic_and_replaces_an_older_collection(small: Path, tmp_path: Path) -> None:
    again = generate_collection(tmp_path / "again", seed=5, **SMALL)
    assert _tree(again) == _tree(small)
    # A smaller collection replacing a larger one leaves none of its scene folders behind.
    generate_collection(tmp_path / "again", seed=5, **{**SMALL, "num_scenes": 5})
    (tmp_path / "again" / "scene_00009").mkdir()  # left by an interrupted run (no scene.json): kept
    (tmp_path / "again" / "scene_00007").mkdir()
    (tmp_path / "again" / "scene_00007" / "scene.json").write_text("{}")  # interrupted run's scene: removed
    generate_collection(tmp_path / "again", seed=5, **SMALL)
    assert _tree(tmp_path / "again") == _tree(small)
    assert sorted(p.name for p in (tmp_path / "again").iterdir())[-1] == "scene_00009"
    other = generate_collection(tmp_path / "other", seed=6, **SMALL)
    assert json.loads((other / INDEX).read_text())["scenes"] != json.loads((small / INDEX).read_text())["scenes"]


def test_training_captions_exclude_held_out_pairs() -> None:
    captions = draw_captions(400, 0)
    specs = [vocab.parse_caption(text) for text in captions]
    assert not any(is_held_out(spec) for spec in specs)
    assert {spec.style for spec in specs} == {"photo"}
    # Everything else varies: the other 20 colour-shape pairs, every count, material and ground.
    assert len({(s.colour, s.shape) for s in specs}) == 24 - len(HELD_OUT_PAIRS)
    assert {s.count for s in specs} == set(vocab.COUNTS)
    assert {s.material for s in specs} == set(vocab.MATERIALS)
    assert {s.ground for s in specs} == set(vocab.GROUNDS)
    assert draw_captions(400, 0) == captions and draw_captions(50, 0) == captions[:50]
    assert draw_captions(50, 1) != captions[:50]
    assert {spec.colour for spec in specs} == set(vocab.COLOURS)
    assert {spec.shape for spec in specs} == set(vocab.SHAPES)


def test_held_out_captions() -> None:
    prompts = held_out_captions()
    assert len(prompts) == 2 * len(HELD_OUT_PAIRS) == len(set(prompts))
    assert prompts[0] == "a green cylinder on grass"
    specs = [vocab.parse_caption(text) for text in prompts]
    assert all(is_held_out(spec) and spec.style == "photo" for spec in specs)
    assert {spec.ground for spec in specs} == set(vocab.GROUNDS)
    on_stone = [vocab.caption(vocab.SceneSpec(c, s, "stone")) for c, s in HELD_OUT_PAIRS]
    assert held_out_captions(grounds=("stone",)) == on_stone and on_stone[2] == "an orange cube on stone"
    with pytest.raises(ValueError, match="ground"):
        held_out_captions(grounds=("moon",))
    assert is_held_out(vocab.SceneSpec("green", "cylinder", "grass", "painting", "shiny", 3))
    assert not is_held_out(vocab.SceneSpec("green", "cube"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_scenes": 0}, "num_scenes"),
        ({"num_views": 1}, "num_views"),
        ({"resolution": 4}, "resolution"),
        ({"supersample": 0}, "supersample"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_leave_the_old_collection(small: Path, tmp_path: Path, change: dict, message: str) -> None:
    shutil.copytree(small, tmp_path / "c")
    with pytest.raises(ValueError, match=message):
        generate_collection(tmp_path / "c", **(SMALL | change))
    assert _tree(tmp_path / "c") == _tree(small)


def test_refuses_a_file_or_a_single_scene_dataset(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        generate_collection(tmp_path / "file", **SMALL)
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "transforms.json").write_text("{}")
    with pytest.raises(ValueError, match="single-scene"):
        generate_collection(tmp_path / "single", **SMALL)


def test_load_collection_errors_name_the_path(small: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError) as error:
        load_collection(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / INDEX) in str(error.value)
    assert "not found" in str(error.value) and "--kind toy-collection" in str(error.value)

    broken = tmp_path / "broken"
    shutil.copytree(small, broken)
    shutil.rmtree(broken / "scene_00001")
    with pytest.raises(ValueError) as error:
        load_collection(broken)
    assert str(broken / "scene_00001" / "transforms.json") in str(error.value)

    (broken / INDEX).write_text("{not json")
    with pytest.raises(ValueError) as error:
        load_collection(broken)
    assert str(broken / INDEX) in str(error.value) and "not a valid" in str(error.value)

    index = json.loads((small / INDEX).read_text())
    for bad in (
        {**index, "scenes": []},
        {k: v for k, v in index.items() if k != "scenes"},
        {**index, "generator_version": "0"},
    ):
        (broken / INDEX).write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=str(broken / INDEX)):
            load_collection(broken)
    (broken / INDEX).write_text(json.dumps({**index, "scenes": [{**index["scenes"][0], "name": "../elsewhere"}]}))
    with pytest.raises(ValueError, match="names are subfolders"):
        load_collection(broken)
    # a collection of one's own: only names and captions (any subfolder names, no generator fields)
    own = tmp_path / "own"
    shutil.copytree(small / "scene_00000", own / "chair")
    (own / INDEX).write_text(json.dumps({"scenes": [{"name": "chair", "caption": "a red cube on grass"}]}))
    (scene,) = load_collection(own)
    assert scene.path == own / "chair" and scene.caption == "a red cube on grass" and scene.seed == 0


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from mmstyle_ns.scripts.scene import entrypoint

    out = tmp_path / "cli"
    base = ["mmstyle-scene", "--kind", "toy-collection", "--resolution", "16", "--supersample", "1"]
    monkeypatch.setattr(sys, "argv", [*base, "--num-scenes", "2", "--out", str(out)])
    entrypoint()
    assert "collection of 2 toy scenes, 16 views each" in capsys.readouterr().out
    assert [len(json.loads((s.path / "transforms.json").read_text())["frames"]) for s in load_collection(out)] == [
        16,
        16,
    ]
    for extra, message in (
        (["--caption", "a red cube on grass"], "--caption does not apply to --kind toy-collection"),
        (["--num-scenes", "0"], "num_scenes must be between 1"),
        (["--masks"], "--masks does not apply"),
    ):
        monkeypatch.setattr(sys, "argv", [*base, *extra, "--out", str(tmp_path / "bad")])
        with pytest.raises(SystemExit) as exc:
            entrypoint()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()
