"""``mmstyle-add-style``: add styles to a trained ``mm-nerf`` run in minutes (MM-NeRF's incremental learning).

Each new style's head starts as a copy of the head of the most similar trained style (cosine similarity of the
style embeddings); only the new heads train, on a few stylized views, with the shared style grid and the
geometry frozen — the trained styles render exactly as before. The result is a new run folder (config.yml and
checkpoint) that opens in the viewer, ``ns-render`` and ``mmstyle-mm-eval`` like any other.

Nothing is overwritten unless asked: a new style whose name the run already has is refused (the run's styles keep
their names and heads), and so is an output folder that holds a run (``--overwrite`` replaces it). The training is
seeded (``--seed``), so the same command gives the same heads.
"""

from __future__ import annotations

import copy
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
import yaml
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import track

EXTRACTOR_OPTIONS = ("text_to_image_model", "text_to_image_size", "audio_model")
"""Options of the run's style extractor this command can override."""

_FOLDER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class AddStyleArgs:
    """Add styles to a trained mm-nerf run (incremental learning); writes a new run folder."""

    load_config: Path
    """config.yml of the trained mm-nerf run."""
    styles: tuple[str, ...]
    """Styles to add, in the same syntax as --pipeline.styles (e.g. builtin:rocket, image:art.png); their names
    must differ from the run's styles' names (name one with 'name=...', e.g. swirl=image:swirl.png)."""
    steps: int = 100
    """Training iterations of the new heads (all new styles share them, one style per iteration)."""
    views: int = 8
    """Views the new styles train on, spread over the first stylization's views (whose ray samples are stored);
    0 or more than those: all of them."""
    timestamp: str = "add-style"
    """Name of the new run folder, next to the loaded one."""
    overwrite: bool = False
    """Replace the run in the --timestamp folder when there is one (its config.yml and checkpoints; the loaded run
    itself when --timestamp is its folder). Without it, a folder holding a run is refused."""
    seed: int = 42
    """Seed of the random number generators: the same command gives the same heads."""
    cache_dir: Path | None = None
    """Folder of the stylized-view and ray-sample caches (default: the run's, where its first stylization stored
    the samples of its views)."""
    text_to_image_model: str | None = None
    """Text-to-image model (hub id or diffusers folder) for text and audio styles; default: the run's."""
    text_to_image_size: int | None = None
    """Side of the generated style images (a multiple of 8); default: the run's."""
    audio_model: str | None = None
    """CLAP model (hub id or folder) matching audio styles to style prompts; default: the run's."""


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest ``step-*.ckpt`` of a run.

    Raises:
        RunConfigError: the run has none.
    """
    from mmstyle_ns.engine import RunConfigError
    from mmstyle_ns.engine import latest_checkpoint as newest

    found = newest(run_dir / "nerfstudio_models")
    if found is None:
        raise RunConfigError(f"no checkpoint (step-*.ckpt) in {run_dir / 'nerfstudio_models'}; train the run first")
    return found


def output_folder(args: AddStyleArgs) -> Path:
    """The new run's folder, next to the loaded run's.

    Raises:
        RunConfigError: ``--timestamp`` is no plain folder name, or names a folder holding a run (the loaded one
            included) and ``--overwrite`` is not given.
    """
    from mmstyle_ns.engine import RunConfigError

    if not _FOLDER_NAME_RE.match(args.timestamp):
        raise RunConfigError(
            f"--timestamp {args.timestamp!r} must be a plain folder name (letters, digits, '_', '-', '.')"
        )
    source = args.load_config.parent
    target = source.parent / args.timestamp
    if args.overwrite or not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return target
    if target.resolve() == source.resolve():
        raise RunConfigError(
            f"--timestamp {args.timestamp} is the loaded run's own folder; pass another --timestamp for a new run, "
            "or --overwrite to replace the loaded run with the one with the added styles"
        )
    raise RunConfigError(f"{target} exists already; pass another --timestamp, or --overwrite to replace that run")


def seed_everything(seed: int) -> None:
    """Seeds Python's, numpy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def add_styles(args: AddStyleArgs) -> tuple[Path, float]:
    """Trains the new styles; returns the new run's config path and the wall time it took (set-up included).

    Raises:
        RunConfigError: no usable run at ``--load-config``, or an output folder that would be overwritten.
        StyleInputError: a bad new style, a name the run has already, or a model the new styles need is missing.
    """
    from mmstyle_ns.engine import RunConfigError, load_run_config
    from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipeline, MMNeRFPipelineConfig
    from mmstyle_ns.style.sources import StyleInputError, parse_added_style_specs, parse_style_specs

    config = load_run_config(args.load_config)
    if not isinstance(config.pipeline, MMNeRFPipelineConfig):
        raise RunConfigError(f"--load-config {args.load_config} is a {config.method_name} run, not an mm-nerf run")
    run_dir = output_folder(args)
    old_specs, new_specs = tuple(config.pipeline.styles), tuple(args.styles)
    old_sources = parse_style_specs(old_specs)
    old_names = [s.name for s in old_sources]
    new_sources = parse_added_style_specs(old_specs, new_specs)  # refuses a name the run has
    new_names = [s.name for s in new_sources]
    extractor = config.pipeline.model.style_extractor
    generated = [s.name for s in old_sources if s.modality in ("text", "audio")]
    for name in EXTRACTOR_OPTIONS:
        value, before = getattr(args, name), getattr(extractor, name)
        if value is None or value == before:
            continue
        if generated and before is not None:  # the run's own style images would change with it
            raise StyleInputError(
                f"the run's styles {generated} were made with {name.replace('_', '-')} {before!r}; adding styles with "
                f"--{name.replace('_', '-')} {value!r} would change them: leave the flag out (the run's is used)"
            )
        setattr(extractor, name, value)
    if args.cache_dir is not None:
        config.pipeline.cache_dir = args.cache_dir
    # the models the new styles need; this command's own flags are named where it has them
    flags = {name: "--" + name.replace("_", "-") for name in EXTRACTOR_OPTIONS}
    config.pipeline.style_extractor(flags).check(new_sources)
    checkpoint_path = latest_checkpoint(args.load_config.parent)

    start = time.perf_counter()
    config.pipeline.styles = (*old_specs, *new_specs)
    config.pipeline.incremental_views = args.views
    config.timestamp = args.timestamp
    config.load_dir = None
    config.load_checkpoint = None
    config.output_dir = args.load_config.parent.parent.parent.parent
    written = copy.deepcopy(config)  # what config.yml holds: building the pipeline writes run-time values into it
    device = config.machine.device_type
    if device != "cpu" and not torch.cuda.is_available():  # a GPU run loaded on a CPU-only machine
        device = "cpu"
    seed_everything(args.seed)
    pipeline = config.pipeline.setup(device=device, test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    loaded = torch.load(checkpoint_path, map_location=device)
    step = int(loaded["step"])
    pipeline.load_pipeline(loaded["pipeline"], step)
    if not pipeline.mm_model.trained_styles:
        raise RunConfigError(
            f"the run's latest checkpoint ({checkpoint_path.name}) was saved before its stylization started: "
            "finish the run (resume it with ns-train ... --load-dir) before adding styles"
        )
    if set(pipeline.mm_model.trained_styles) != set(old_names):
        raise RunConfigError(
            f"the checkpoint's styles {sorted(pipeline.mm_model.trained_styles)} differ from the run's {old_names}"
        )
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    pipeline.train()
    pipeline.prepare_stylization(optimizers)
    for i in track(range(args.steps), description=f"Training {', '.join(new_names)}"):
        _, losses, _ = pipeline.get_train_loss_dict(step + 1 + i)
        optimizers.zero_grad_all()
        torch.stack(list(losses.values())).sum().backward()
        optimizers.optimizer_step_all()
    seconds = time.perf_counter() - start

    final_step = step + args.steps
    new_config = write_run(run_dir, written, pipeline.state_dict(), final_step, args.load_config.parent)
    CONSOLE.print(f"Added {new_names} in {seconds:.1f} s (set-up included); new run: {new_config}")
    return new_config, seconds


def write_run(run_dir: Path, config: object, state: dict, step: int, source: Path) -> Path:
    """Writes a run folder: the checkpoint (replacing any earlier ones there), the dataparser transform of the
    ``source`` run and ``config.yml``; each file appears complete or not at all. Returns the config's path."""
    models = run_dir / "nerfstudio_models"
    models.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:09d}.ckpt"
    partial = run_dir / f".{name}.partial"  # outside nerfstudio_models, which nerfstudio reads steps from
    torch.save({"step": step, "pipeline": state, "optimizers": {}, "scalers": {}}, partial)
    os.replace(partial, models / name)
    for old in models.glob("step-*.ckpt"):  # an earlier run's checkpoints there would be loaded instead
        if old.name != name:
            old.unlink()
    transforms = source / "dataparser_transforms.json"
    if transforms.exists() and transforms.resolve() != (run_dir / transforms.name).resolve():
        _write_text(run_dir / transforms.name, transforms.read_text())
    new_config = run_dir / "config.yml"
    _write_text(new_config, yaml.dump(config))
    return new_config


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text, "utf8")
    os.replace(partial, path)


def entrypoint() -> None:
    """Console entry point."""
    from mmstyle_ns.engine import reported_run_config_errors
    from mmstyle_ns.scripts import reported_input_errors

    args = tyro.cli(AddStyleArgs)
    with reported_run_config_errors("Cannot add these styles"), reported_input_errors("Cannot add these styles"):
        add_styles(args)


if __name__ == "__main__":
    entrypoint()
