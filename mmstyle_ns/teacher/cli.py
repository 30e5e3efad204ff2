"""``mmstyle-teacher``: train, evaluate and inspect the toy teacher.

Examples::

    mmstyle-teacher data --count 600                # generator speed, checker accuracy, a preview sheet
    mmstyle-teacher train --output toy-teacher --threads 2
    mmstyle-teacher evaluate --model toy-teacher --sheet docs/teacher_samples.png
    mmstyle-teacher edit --model toy-teacher --output guidance_2d   # SDS and DDS edits of single pictures

The trained folder is used like Stable Diffusion weights, e.g. ``--pipeline.model.guidance.model-path
toy-teacher``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

from mmstyle_ns.teacher.config import EditConfig, EvalConfig, TrainConfig


@dataclass
class DataConfig:
    """Measure the picture generator's speed and the colour checker's accuracy; write a preview sheet."""

    count: int = 600
    """Pictures to generate and classify."""
    seed: int = 10_000
    """Data seed (training uses 0 by default; this is a different sample stream)."""
    resolution: int = 128
    """Picture size in pixels."""
    preview: Path | None = Path("teacher_data_preview.png")
    """Where a grid of the first 48 pictures goes (None: not written)."""


@dataclass
class TrainCommand(TrainConfig):
    """Train the toy teacher (VAE, gate, text encoder + UNet), save it in the diffusers layout, evaluate it."""

    evaluate: bool = True
    """Evaluate the saved teacher (colour accuracy, VAE PSNR, sample sheet in the output folder) afterwards."""


def run_data(config: DataConfig) -> None:
    """Generator throughput, checker accuracy per colour and an optional preview grid."""
    from mmstyle_ns.teacher.checker import accuracy, classify_colours
    from mmstyle_ns.teacher.data import generate_images
    from mmstyle_ns.teacher.vocab import caption

    start = time.perf_counter()
    images, specs = generate_images(config.seed, 0, config.count, config.resolution)
    elapsed = time.perf_counter() - start
    print(f"Generated {config.count} pictures in {elapsed:.2f} s: {60 * config.count / elapsed:.0f} per minute")
    start = time.perf_counter()
    result = accuracy(classify_colours(images), [spec.colour for spec in specs])
    print(f"Checker on generated pictures ({time.perf_counter() - start:.2f} s):\n{result.table()}")
    if config.preview is not None and config.count >= 8:
        from PIL import Image

        n = min(48, config.count) // 8 * 8
        r = config.resolution
        grid = images[:n].reshape(n // 8, 8, r, r, 3).transpose(0, 2, 1, 3, 4).reshape(n // 8 * r, 8 * r, 3)
        Image.fromarray(grid).save(config.preview)
        print(f"Preview of the first {n} pictures: {config.preview}")
        for i in range(min(n, 8)):
            print(f"  {caption(specs[i])}")


def entrypoint() -> None:
    """Console-script entry point (``mmstyle-teacher {data,train,evaluate,edit}``)."""
    # Passive OpenMP waiting keeps torch fast when another process shares the cores; set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    config = tyro.extras.subcommand_cli_from_dict(
        {"data": DataConfig, "train": TrainCommand, "evaluate": EvalConfig, "edit": EditConfig},
        description="Toy text-to-image teacher: a small latent diffusion model of the embedded scenes' world.",
    )
    from mmstyle_ns.teacher.edit import EditInputError, run_edits
    from mmstyle_ns.teacher.evaluate import evaluate_teacher
    from mmstyle_ns.teacher.train import TeacherGateError, train_teacher

    try:
        if isinstance(config, DataConfig):
            run_data(config)
        elif isinstance(config, TrainCommand):
            folder = train_teacher(config)
            if config.evaluate:
                evaluate_teacher(EvalConfig(model=folder, device=config.device, threads=config.threads))
        elif isinstance(config, EditConfig):
            run_edits(config)
        else:
            evaluate_teacher(config)
    except (TeacherGateError, FileNotFoundError, EditInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entrypoint()
