"""``mmstyle-add-style``: add styles to a trained ``mm-nerf`` run in minutes (MM-NeRF's incremental learning).

Each new style's head starts as a copy of the head of the most similar trained style (cosine similarity of the
style embeddings); only the new heads train, on a few stylized views, with the shared style grid and the
geometry frozen — the trained styles render exactly as before. The result is a new run folder (config.yml and
checkpoint) that opens in the viewer, ``ns-render`` and ``mmstyle-mm-eval`` like any other.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
import yaml
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.utils.rich_utils import CONSOLE
from rich.progress import track

EXTRACTOR_OPTIONS = ("text_to_image_model", "text_to_image_size", "audio_model")
"""Options of the run's style extractor this command can override."""


@dataclass
class AddStyleArgs:
    """Add styles to a trained mm-nerf run (incremental learning); writes a new run folder."""

    load_config: Path
    """config.yml of the trained mm-nerf run."""
    styles: tuple[str, ...]
    """Styles to add, in the same syntax as --pipeline.styles (e.g. builtin:rocket, image:art.png)."""
    steps: int = 100
    """Training iterations of the new heads (all new styles share them, one style per iteration)."""
    views: int = 8
    """Views the new styles train on, spread over the first stylization's views (whose ray samples are stored);
    0 or more than those: all of them."""
    timestamp: str = "add-style"
    """Name of the new run folder, next to the loaded one."""
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
    """The newest ``step-*.ckpt`` of a run."""
    checkpoints = sorted((run_dir / "nerfstudio_models").glob("step-*.ckpt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint in {run_dir / 'nerfstudio_models'}")
    return checkpoints[-1]


def add_styles(args: AddStyleArgs) -> tuple[Path, float]:
    """Trains the new styles; returns the new run's config path and the wall time it took (set-up included)."""
    from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipeline, MMNeRFPipelineConfig
    from mmstyle_ns.style.sources import StyleInputError, parse_style_specs

    config = yaml.load(args.load_config.read_text(), Loader=yaml.Loader)
    if not isinstance(config.pipeline, MMNeRFPipelineConfig):
        raise ValueError(f"{args.load_config} is not an mm-nerf run")
    old_names = [s.name for s in parse_style_specs(config.pipeline.styles)]
    new_specs = tuple(args.styles)
    all_sources = parse_style_specs((*config.pipeline.styles, *new_specs))  # validates the new styles first
    new_names = [s.name for s in all_sources[len(old_names) :]]
    extractor = config.pipeline.model.style_extractor
    generated = [s.name for s in all_sources[: len(old_names)] if s.modality in ("text", "audio")]
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
    config.pipeline.style_extractor(flags).check(all_sources[len(old_names) :])
    checkpoint_path = latest_checkpoint(args.load_config.parent)

    start = time.perf_counter()
    config = copy.deepcopy(config)
    config.pipeline.styles = (*config.pipeline.styles, *new_specs)
    config.pipeline.incremental_views = args.views
    config.timestamp = args.timestamp
    config.load_dir = None
    device = config.machine.device_type
    if device != "cpu" and not torch.cuda.is_available():  # a GPU run loaded on a CPU-only machine
        device = "cpu"
    pipeline = config.pipeline.setup(device=device, test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    loaded = torch.load(checkpoint_path, map_location=device)
    step = int(loaded["step"])
    pipeline.load_pipeline(loaded["pipeline"], step)
    if set(pipeline.mm_model.trained_styles) != set(old_names):
        raise ValueError(f"the checkpoint's styles {sorted(pipeline.mm_model.trained_styles)} differ from {old_names}")
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    pipeline.train()
    pipeline.prepare_stylization(optimizers)
    for i in track(range(args.steps), description=f"Training {', '.join(new_names)}"):
        _, losses, _ = pipeline.get_train_loss_dict(step + 1 + i)
        optimizers.zero_grad_all()
        torch.stack(list(losses.values())).sum().backward()
        optimizers.optimizer_step_all()
    seconds = time.perf_counter() - start

    run_dir = args.load_config.parent.parent / args.timestamp
    models = run_dir / "nerfstudio_models"
    models.mkdir(parents=True, exist_ok=True)
    final_step = step + args.steps
    torch.save(
        {"step": final_step, "pipeline": pipeline.state_dict(), "optimizers": {}, "scalers": {}},
        models / f"step-{final_step:09d}.ckpt",
    )
    for extra in ("dataparser_transforms.json",):
        source = args.load_config.parent / extra
        if source.exists():
            (run_dir / extra).write_text(source.read_text())
    config.output_dir = args.load_config.parent.parent.parent.parent
    new_config = run_dir / "config.yml"
    new_config.write_text(yaml.dump(config), "utf8")
    CONSOLE.print(f"Added {new_names} in {seconds:.1f} s (set-up included); new run: {new_config}")
    return new_config, seconds


def entrypoint() -> None:
    """Console entry point."""
    from mmstyle_ns.scripts import reported_input_errors

    args = tyro.cli(AddStyleArgs)
    with reported_input_errors("Cannot add these styles"):
        add_styles(args)


if __name__ == "__main__":
    entrypoint()
