"""Hardening of the training and ``mmstyle-*`` commands: bad inputs stop with one message and nothing written,
resuming a killed run finishes its planned schedule, ``mmstyle-add-style`` overwrites nothing and is seeded, and
the viewer stays on this machine with a readable panel.

One module-scoped ``mm-nerf`` run is trained in a child process that is killed (SIGKILL) during the stylization
stage, then resumed here through nerfstudio's trainer; the ``mmstyle-add-style`` tests add styles to the resumed
run.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import ns_train_refusal, short_run_config
from nerfstudio.engine.trainer import TrainerConfig

from mmstyle_ns.engine import MMStyleTrainer, RunConfigError, checkpoint_step, resolve_schedule_start
from mmstyle_ns.style.sources import StyleInputError, parse_added_style_specs

OUR_METHODS = sorted(
    ep.name for ep in entry_points(group="nerfstudio.method_configs") if ep.value.startswith("mmstyle_ns.")
)
STYLES = ("builtin:coffee", "builtin:chelsea")  # both named automatically: coffee, chelsea
RECONSTRUCTION_STEPS = 20
TOTAL_STEPS = 40
SAVE_EVERY = 5
KILL_AT = RECONSTRUCTION_STEPS + 7  # a step of the stylization stage, between two saves


def _tree(folder: Path) -> dict[str, bytes]:
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _steps(models: Path) -> list[int]:
    return sorted(step for p in models.iterdir() if (step := checkpoint_step(p)) is not None)


pytestmark = pytest.mark.usefixtures("one_thread")


def _mm_config(scene: Path, root: Path, timestamp: str) -> TrainerConfig:
    """A short CPU mm-nerf run (the registered config, shrunk) that saves every SAVE_EVERY steps."""
    config = short_run_config("mm-nerf", scene, root, iterations=TOTAL_STEPS)
    pipeline: Any = config.pipeline
    pipeline.styles = STYLES
    pipeline.stylized_views = 4
    pipeline.incremental_views = 4
    model = pipeline.model
    model.reconstruction_steps = RECONSTRUCTION_STEPS
    model.regrid_steps = (8, 16)  # inside the reconstruction
    model.occupancy_warmup_steps = 6
    config.timestamp = timestamp
    config.steps_per_save = SAVE_EVERY
    config.save_only_latest_checkpoint = False
    return config


# ---- 1. bad inputs: one message, exit status 2, nothing written --------------------------------------------


def _bad_style(kind: str, folder: Path) -> tuple[str, str]:
    """A bad style spec of each kind the issue lists and a fragment of its message."""
    if kind == "missing":
        return f"image:{folder / 'no_such.png'}", "does not exist"
    if kind == "corrupt":
        (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
        return f"image:{folder / 'corrupt.png'}", "not a readable image"
    if kind == "empty_text":
        return "text:", "empty text prompt"
    if kind == "modality":
        return "foo:bar", "unknown modality 'foo'"
    assert kind == "not_audio"
    (folder / "noise.wav").write_bytes(b"this is no audio")
    return f"audio:{folder / 'noise.wav'}", "not a readable audio file"


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty_text", "modality", "not_audio"])
def test_ns_train_with_a_bad_style_prints_only_the_message(
    tiny_scene: Path, tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    spec, fragment = _bad_style(kind, tmp_path)
    config = _mm_config(tiny_scene, tmp_path, "bad-style")
    config.pipeline.styles = (STYLES[0], spec)  # type: ignore[attr-defined]
    with pytest.raises(SystemExit) as stopped:
        main(config)
    out = capsys.readouterr()
    assert stopped.value.code == 2
    text = out.out + out.err
    assert "Cannot train mm-nerf:" in text and fragment in text
    assert "Traceback" not in text and "TrainerConfig(" not in text, "only the message, not the config dump"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "style_cache").exists()


@pytest.mark.parametrize("method", OUR_METHODS)
@pytest.mark.parametrize("data", ["missing", "no_transforms", "bad_transforms"])
def test_ns_train_with_a_bad_data_folder_writes_nothing(
    method: str, data: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    folder = tmp_path / "data"
    if data != "missing":
        folder.mkdir()
    if data == "bad_transforms":
        (folder / "transforms.json").write_text("{ not json")
    config = short_run_config(method, folder, tmp_path, guidance_model=tmp_path / "unchecked")
    with pytest.raises(SystemExit) as stopped:
        main(config)
    text = capsys.readouterr().out
    fragment = {
        "missing": "the data folder does not exist",
        "no_transforms": "no transforms.json",
        "bad_transforms": "transforms.json cannot be read",
    }[data]
    if method == "tunemv3d" and data != "missing":  # a collection of scenes: its index is what is missing
        fragment = f"{folder / 'collection.json'} not found"
    assert stopped.value.code == 2 and f"Cannot train {method}: --data {folder}: {fragment}" in text
    assert "Traceback" not in text
    assert not (tmp_path / "runs").exists(), "config.yml was written"


def test_ns_train_command_with_a_wrong_data_path(tmp_path: Path) -> None:
    """The real console command: exit status 2, one line of error, no traceback, no output folder."""
    error, text = ns_train_refusal("mm-nerf", tmp_path / "nope", tmp_path / "out")
    assert "the data folder does not exist" in error
    assert "AssertionError" not in text


def test_load_dir_without_checkpoints_is_refused_before_writing(
    tiny_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    config = short_run_config("mmstyle-base", tiny_scene, tmp_path)
    config.load_dir = tiny_scene  # a folder, but no checkpoint folder
    with pytest.raises(SystemExit) as stopped:
        main(config)
    assert stopped.value.code == 2 and "must hold step-*.ckpt files" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# ---- 2. the schedule: resume finishes it, another checkpoint starts a new stage ------------------------------


def _fake_run(root: Path, method: str, steps: list[int], iterations: int, **fields: Any) -> Path:
    """A run folder with a config.yml of ``method`` and empty checkpoints (only their names are read)."""
    from nerfstudio.plugins.registry import discover_methods

    config = copy.deepcopy(discover_methods()[0][method])
    config.max_num_iterations = iterations
    for name, value in fields.items():
        setattr(config, name, value)
    run = root / method / f"run{len(list(root.rglob('config.yml')))}"
    (run / "nerfstudio_models").mkdir(parents=True)
    (run / "config.yml").write_text(yaml.dump(config))
    for step in steps:
        (run / "nerfstudio_models" / f"step-{step:09d}.ckpt").write_bytes(b"")
    return run / "nerfstudio_models"


def _new(method: str, iterations: int, **fields: Any) -> TrainerConfig:
    from nerfstudio.plugins.registry import discover_methods

    config = copy.deepcopy(discover_methods()[0][method])
    config.max_num_iterations = iterations
    for name, value in fields.items():
        setattr(config, name, value)
    return config


def test_schedule_start_resumes_unfinished_runs_of_the_same_method_only(tmp_path: Path) -> None:
    assert resolve_schedule_start(_new("mm-nerf", 1500)) == 0  # a fresh run
    killed = _fake_run(tmp_path, "mm-nerf", [500, 1000], 1500, schedule_start=0)
    assert resolve_schedule_start(_new("mm-nerf", 1500, load_dir=killed)) == 0  # resumed: ends at 1500
    # a resumed run killed again: its own start still counts
    again = _fake_run(tmp_path, "mm-nerf", [1200], 1500, schedule_start=0, load_dir=killed)
    assert resolve_schedule_start(_new("mm-nerf", 1500, load_dir=again)) == 0
    assert resolve_schedule_start(_new("mm-nerf", 1500, load_dir=killed, load_step=500)) == 0
    # a finished run of the same method: a new stage (ed-nerf's edit after its reconstruction, docs/ed_nerf.md)
    stage_1 = _fake_run(tmp_path, "ed-nerf", [1499], 1500, schedule_start=0)
    assert resolve_schedule_start(_new("ed-nerf", 200, load_dir=stage_1)) == 1500
    # stage 2 killed at 1600 and resumed: it finishes at 1700
    stage_2 = _fake_run(tmp_path, "ed-nerf", [1600], 200, schedule_start=1500, load_dir=stage_1)
    assert resolve_schedule_start(_new("ed-nerf", 200, load_dir=stage_2)) == 1500
    # another method's checkpoint, even an unfinished one: a new stage from it (docs/head_stylize.md)
    base = _fake_run(tmp_path, "mmstyle-base", [500], 750, schedule_start=0)
    assert resolve_schedule_start(_new("head-stylize", 100, load_dir=base)) == 501
    assert resolve_schedule_start(_new("mm-nerf", 100, load_dir=base)) == 501
    # a run written before schedules were recorded: started from scratch, so it resumes
    old = _fake_run(tmp_path, "mm-nerf", [700], 1500)
    assert resolve_schedule_start(_new("mm-nerf", 1500, load_dir=old)) == 0
    # by hand
    assert resolve_schedule_start(_new("mm-nerf", 1500, load_dir=base, schedule_start=0)) == 0


def test_a_new_stage_counts_max_num_iterations_from_the_loaded_step(tiny_scene: Path, tmp_path: Path) -> None:
    first = short_run_config("mmstyle-base", tiny_scene, tmp_path / "first", iterations=6)
    first.save_config()
    trainer = first.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    assert _steps(first.get_checkpoint_dir()) == [5]

    second = short_run_config("mmstyle-base", tiny_scene, tmp_path / "second", iterations=4)
    second.load_dir = first.get_checkpoint_dir()  # a finished run: continued by another --max-num-iterations
    second.save_config()
    assert yaml.load((second.get_base_dir() / "config.yml").read_text(), Loader=yaml.Loader).schedule_start == 6
    trainer = second.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert isinstance(trainer, MMStyleTrainer) and trainer.schedule == (6, 10)
    trainer.train()
    assert _steps(second.get_checkpoint_dir()) == [9]


def test_a_failed_save_leaves_the_previous_checkpoint_the_latest(
    tiny_scene: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = short_run_config("mmstyle-base", tiny_scene, tmp_path, iterations=3)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    models = config.get_checkpoint_dir()
    assert _steps(models) == [2]
    kept = (models / "step-000000002.ckpt").read_bytes()

    def killed_while_writing(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        Path(path).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # stands for a kill in the middle of the write

    monkeypatch.setattr(torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(3)
    assert _steps(models) == [2] and sorted(p.name for p in models.iterdir()) == ["step-000000002.ckpt"]
    assert (models / "step-000000002.ckpt").read_bytes() == kept


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path

    import torch
    import yaml

    torch.set_num_threads(1)
    config = yaml.load(Path(sys.argv[1]).read_text(), Loader=yaml.Loader)
    progress, kill_at = Path(sys.argv[2]), int(sys.argv[3])
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    iteration = trainer.train_iteration

    def step(index):
        out = iteration(index)
        progress.write_text(str(index))
        if index >= kill_at:
            time.sleep(0.5)  # time for the test to kill it here
        return out

    trainer.train_iteration = step
    trainer.train()
    """
)


@dataclass
class Resumed:
    """The killed run and its resumption."""

    killed: TrainerConfig
    resumed: TrainerConfig
    trainer: MMStyleTrainer
    killed_at: int
    """Last step the killed run completed."""
    start: int
    """First step the resumed run trained."""
    scene: Path
    root: Path


@pytest.fixture(scope="module")
def resumed(tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Resumed:
    root = tmp_path_factory.mktemp("resume")
    killed = _mm_config(tiny_scene, root, "killed")
    killed.save_config()
    (root / "child.py").write_text(CHILD)
    progress = root / "progress.txt"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONWARNINGS="ignore")
    config_path = killed.get_base_dir() / "config.yml"
    log = root / "child.log"
    with log.open("w") as output:
        child = subprocess.Popen(
            [sys.executable, str(root / "child.py"), str(config_path), str(progress), str(KILL_AT)],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            text = progress.read_text().strip() if progress.exists() else ""  # read once: the child rewrites it
            if text.isdigit() and int(text) >= KILL_AT:
                break
            time.sleep(0.02)
        assert child.poll() is None, f"the run ended before it was killed: {log.read_text()[-2000:]}"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    killed_at = int(progress.read_text())

    config = _mm_config(tiny_scene, root, "resumed")
    config.load_dir = killed.get_checkpoint_dir()  # ns-train mm-nerf ... --load-dir <killed run>/nerfstudio_models
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert isinstance(trainer, MMStyleTrainer)
    start = trainer._start_step
    trainer.train()
    return Resumed(killed, config, trainer, killed_at, start, tiny_scene, root)


def test_resuming_a_killed_run_finishes_its_planned_schedule(resumed: Resumed) -> None:
    killed_steps = _steps(resumed.killed.get_checkpoint_dir())
    assert killed_steps[-1] < resumed.killed_at <= killed_steps[-1] + SAVE_EVERY  # killed between two saves
    assert resumed.killed_at > RECONSTRUCTION_STEPS, "killed during the stylization stage"
    assert resumed.start == killed_steps[-1] + 1
    assert resumed.killed_at + 1 - resumed.start <= SAVE_EVERY, "lost more than one save interval"
    assert resumed.trainer.schedule == (0, TOTAL_STEPS)
    assert resumed.trainer.step == TOTAL_STEPS - 1
    assert _steps(resumed.resumed.get_checkpoint_dir())[-1] == TOTAL_STEPS - 1  # not TOTAL_STEPS + start
    recorded = yaml.load((resumed.resumed.get_base_dir() / "config.yml").read_text(), Loader=yaml.Loader)
    assert recorded.schedule_start == 0 and recorded.max_num_iterations == TOTAL_STEPS
    pipeline: Any = resumed.trainer.pipeline
    assert pipeline.style_ready and pipeline.mm_model.trainable == [0, 1]  # both styles went on training


def test_viewer_panel_has_a_readable_name(resumed: Resumed) -> None:
    from nerfstudio.viewer.utils import parse_object
    from nerfstudio.viewer.viewer_elements import ViewerElement

    from mmstyle_ns.models.mm_nerf import STYLE_PANEL

    found = parse_object(resumed.trainer.pipeline, ViewerElement, "Custom Elements")  # what the viewer installs
    assert sorted(element.name for _, element in found) == ["Blend", "Blend with", "Style"]
    assert {path.rsplit("/", 1)[0] for path, _ in found} == {f"Custom Elements/{STYLE_PANEL}"}
    assert STYLE_PANEL == "Styles"


@pytest.mark.parametrize("method", OUR_METHODS)
def test_viewer_listens_on_this_machine_only_by_default(method: str) -> None:
    from nerfstudio.plugins.registry import discover_methods

    assert discover_methods()[0][method].viewer.websocket_host == "127.0.0.1"


# ---- 3. mmstyle-add-style: no data loss, no silent overwrite, seeded, plain YAML ----------------------------


def test_added_style_names_must_differ_from_the_runs() -> None:
    with pytest.raises(StyleInputError, match=r"the name 'chelsea' is taken by the run's style 'builtin:chelsea'"):
        parse_added_style_specs(STYLES, ("chelsea=builtin:rocket",))
    with pytest.raises(StyleInputError, match=r"'chelsea' is taken .* e\.g\. 'chelsea_2=builtin:chelsea'"):
        parse_added_style_specs(STYLES, ("builtin:chelsea",))  # an automatic name that is taken
    added = parse_added_style_specs(STYLES, ("rocket=builtin:chelsea", "builtin:rocket"))
    assert [s.name for s in added] == ["rocket", "rocket_2"]


def _swirl(folder: Path) -> Path:
    from PIL import Image

    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    angle = np.arctan2(yy - 0.5, xx - 0.5) + 12 * np.hypot(yy - 0.5, xx - 0.5)
    image = np.stack([np.sin(angle), np.cos(angle), np.sin(2 * angle)], -1) * 0.5 + 0.5
    path = folder / "swirl.png"
    Image.fromarray((image * 255).astype(np.uint8)).save(path)
    return path


def _add(resumed: Resumed, styles: tuple[str, ...], timestamp: str, **options: Any) -> Path:
    from mmstyle_ns.scripts.add_style import AddStyleArgs, add_styles

    load_config = resumed.resumed.get_base_dir() / "config.yml"
    return add_styles(AddStyleArgs(load_config, styles, steps=4, timestamp=timestamp, **options))[0]


def test_add_style_refuses_a_taken_name_and_writes_nothing(
    resumed: Resumed, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mmstyle_ns.scripts.add_style import entrypoint

    runs = resumed.resumed.get_base_dir().parent
    before = _tree(runs)
    spec = f"chelsea=image:{_swirl(resumed.root)}"
    load_config = resumed.resumed.get_base_dir() / "config.yml"
    monkeypatch.setattr(sys, "argv", ["mmstyle-add-style", "--load-config", str(load_config), "--styles", spec])
    with pytest.raises(SystemExit) as stopped:
        entrypoint()
    assert stopped.value.code == 2
    message = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert "the name 'chelsea' is taken by the run's style 'builtin:chelsea'" in message
    assert _tree(runs) == before


def test_add_style_is_seeded_keeps_the_old_styles_and_writes_plain_yaml(resumed: Resumed) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    swirl = f"swirl=image:{_swirl(resumed.root)}"
    first, second = _add(resumed, (swirl,), "seeded-1"), _add(resumed, (swirl,), "seeded-2")
    other = _add(resumed, (swirl,), "seeded-3", seed=7)
    states = [
        torch.load(next((p.parent / "nerfstudio_models").glob("*.ckpt")))["pipeline"] for p in (first, second, other)
    ]
    heads = [{k: v for k, v in state.items() if k.startswith("_model.heads.2.")} for state in states]
    assert heads[0] and all(torch.equal(heads[0][k], heads[1][k]) for k in heads[0]), "the same command differs"
    assert any(not torch.equal(heads[0][k], heads[2][k]) for k in heads[0]), "--seed changes nothing"

    text = first.read_text()
    assert "!!python/object/apply:torch" not in text and "torch._utils" not in text
    config = yaml.load(text, Loader=yaml.Loader)
    assert config.pipeline.datamanager.pixel_sampler.is_equirectangular is False

    _, pipeline, _, _ = eval_setup(first, test_mode="inference")
    _, source, _, _ = eval_setup(resumed.resumed.get_base_dir() / "config.yml", test_mode="inference")
    model: Any = pipeline.model
    assert model.style_names == ["coffee", "chelsea", "swirl"]
    camera = resumed.trainer.pipeline.datamanager.eval_dataset.cameras[0:1]  # type: ignore[union-attr]
    with torch.no_grad():
        new, old = model.get_outputs_for_camera(camera), source.model.get_outputs_for_camera(camera)
    for name in ("coffee", "chelsea"):
        torch.testing.assert_close(new[name], old[name], rtol=0, atol=1e-6)
    assert (new["swirl"] - new["chelsea"]).abs().max() > 1e-4


def test_add_style_does_not_overwrite_a_run_unless_asked(resumed: Resumed) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    rocket = ("builtin:rocket",)
    source = resumed.resumed.get_base_dir()
    first = _add(resumed, rocket, "twice")
    written = _tree(first.parent)
    with pytest.raises(RunConfigError, match="exists already; pass another --timestamp, or --overwrite"):
        _add(resumed, rocket, "twice")
    assert _tree(first.parent) == written
    source_files = _tree(source)
    with pytest.raises(RunConfigError, match="is the loaded run's own folder"):
        _add(resumed, rocket, source.name)
    assert _tree(source) == source_files, "the loaded run was touched"

    (first.parent / "nerfstudio_models" / "step-999999999.ckpt").write_bytes(b"a later, stale checkpoint")
    again = _add(resumed, ("builtin:astronaut",), "twice", overwrite=True)
    assert again == first and _steps(first.parent / "nerfstudio_models") == [TOTAL_STEPS - 1 + 4]
    _, pipeline, _, _ = eval_setup(again, test_mode="inference")
    assert pipeline.model.style_names == ["coffee", "chelsea", "astronaut"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", ["add_style", "mm_eval"])
def test_missing_load_config_is_one_line(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    module = importlib.import_module(f"mmstyle_ns.scripts.{command}")
    missing = tmp_path / "no_run" / "config.yml"
    extra = ["--styles", "builtin:rocket"] if command == "add_style" else []
    monkeypatch.setattr(sys, "argv", [command, "--load-config", str(missing), *extra])
    with pytest.raises(SystemExit) as stopped:
        module.entrypoint()
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert stopped.value.code == 2
    assert len(lines) == 1 and f"--load-config {missing} does not exist" in lines[0], lines
    assert not (tmp_path / "no_run").exists()
