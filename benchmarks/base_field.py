"""Benchmark: held-out PSNR against wall-clock training time for ``mmstyle-base`` and nerfacto (small).

Both methods train on the same generated scenes (the default object scene, the forward-facing one and the
unbounded one) through nerfstudio's own trainer (its pipeline,
optimizers and callbacks, one iteration at a time); the clock runs only while training, and every
``--eval-every`` seconds all held-out views are rendered and scored. Prints one table per method, the
time each reached 25 / 30 dB, the PSNR at 30 s and 120 s, and the process's peak memory.

    python benchmarks/base_field.py --resolution 128 --seconds 120
"""

from __future__ import annotations

import dataclasses
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from nerfstudio.engine.callbacks import TrainingCallbackLocation
from nerfstudio.engine.trainer import TrainerConfig


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10(((a - b) ** 2).mean().clamp_min(1e-10)))


@torch.no_grad()
def evaluate(trainer) -> float:  # noqa: ANN001 - nerfstudio Trainer
    """Mean PSNR over all held-out views."""
    pipeline = trainer.pipeline
    pipeline.eval()
    dataset = pipeline.datamanager.eval_dataset
    scores = []
    for i in range(len(dataset)):
        camera = dataset.cameras[i : i + 1].to(pipeline.device)
        outputs = pipeline.model.get_outputs_for_camera(camera)
        gt = pipeline.model.renderer_rgb.blend_background(dataset[i]["image"].to(pipeline.device), "white")
        scores.append(_psnr(outputs["rgb"].clamp(0, 1), gt))
    pipeline.train()
    return sum(scores) / len(scores)


def train_for(config: TrainerConfig, seconds: float, eval_every: float) -> list[tuple[float, int, float]]:
    """Trains for ``seconds`` of training time; returns ``(train_seconds, step, psnr)`` rows."""
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    rows: list[tuple[float, int, float]] = []
    elapsed, next_eval, step = 0.0, eval_every, 0
    while elapsed < seconds:
        start = time.perf_counter()
        trainer.pipeline.train()
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.BEFORE_TRAIN_ITERATION)
        trainer.train_iteration(step)
        for callback in trainer.callbacks:
            callback.run_callback_at_location(step, location=TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
        elapsed += time.perf_counter() - start
        step += 1
        if elapsed >= next_eval or elapsed >= seconds:
            rows.append((elapsed, step, evaluate(trainer)))
            print(f"  {elapsed:7.1f} s  step {step:5d}  PSNR {rows[-1][2]:6.2f} dB", flush=True)
            next_eval += eval_every
    return rows


def psnr_at(rows: list[tuple[float, int, float]], seconds: float) -> float:
    """PSNR of the evaluation taken when the training clock passed ``seconds`` (it overshoots by less than one
    iteration; the rows printed during training show the exact times)."""
    after = [r for r in rows if r[0] >= seconds - 1e-6]
    return after[0][2] if after else float("nan")


def time_to(rows: list[tuple[float, int, float]], psnr: float) -> float:
    """Training seconds at the first evaluation reaching ``psnr`` (nan if never)."""
    return next((r[0] for r in rows if r[2] >= psnr), float("nan"))


def nerfacto_small(max_steps: int) -> TrainerConfig:
    """nerfacto with the small CPU settings (512 rays, 2^14 table, 8 levels, hidden 32, torch hash grid)."""
    from nerfstudio.configs.method_configs import method_configs
    from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    config = dataclasses.replace(method_configs["nerfacto"])
    assert isinstance(config, TrainerConfig)
    model = config.pipeline.model
    assert isinstance(model, NerfactoModelConfig)
    model.implementation = "torch"
    model.log2_hashmap_size = 14
    model.num_levels = 8
    model.hidden_dim = 32
    model.hidden_dim_color = 32
    model.background_color = "white"
    model.camera_optimizer.mode = "off"
    assert isinstance(config.pipeline.datamanager, VanillaDataManagerConfig)
    config.pipeline.datamanager.train_num_rays_per_batch = 512
    config.max_num_iterations = max_steps
    if not torch.cuda.is_available():
        config.machine.device_type = "cpu"
    return config


@dataclass
class Args:
    """PSNR-vs-time of the base field and nerfacto (small) on the embedded scene."""

    resolution: int = 128
    """Image size of the generated scene."""
    seconds: float = 120.0
    """Training time per method."""
    eval_every: float = 10.0
    """Seconds of training between evaluations."""
    num_views: int = 100
    """Views in the generated scene (every 8th held out)."""
    skip_nerfacto: bool = False
    """Only benchmark the base field."""
    kinds: tuple[str, ...] = ("object360", "forward", "unbounded")
    """Scene kinds (of mmstyle-scene), one run of each method per scene."""
    seeds: tuple[int, ...] = (0, 9173, 0)
    """Seed of each scene (one per kind)."""
    base_options: tuple[str, ...] = ()
    """Extra mmstyle-base model options as name=value pairs (e.g. unbounded=off), for ablations."""


def main(args: Args) -> None:
    from mmstyle_ns.method_configs.base import (  # pyright: ignore[reportMissingImports]
        base_trainer_config as base_config,
    )

    from mmstyle_ns.data.scene import generate_scene
    from mmstyle_ns.fields.nerfacto_geometry import without_lpips

    if len(args.seeds) != len(args.kinds):
        raise SystemExit("--seeds needs one seed per --kinds entry")
    torch.set_num_threads(2)
    results: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, seed in zip(args.kinds, args.seeds, strict=True):
            data = generate_scene(
                kind, Path(tmp) / f"{kind}-{seed}", num_views=args.num_views, resolution=args.resolution, seed=seed
            )
            methods = {"mmstyle-base": base_config()}  # its own (default) learning-rate schedule
            for option in args.base_options:
                name, value = option.split("=", 1)
                current = getattr(methods["mmstyle-base"].pipeline.model, name)
                setattr(methods["mmstyle-base"].pipeline.model, name, type(current)(value))
            if not args.skip_nerfacto:
                methods["nerfacto-small"] = nerfacto_small(100_000)
            for name, config in methods.items():
                config.pipeline.datamanager.data = data
                config.output_dir = Path(tmp) / "runs"
                config.vis = "tensorboard"
                config.steps_per_save = 10**9
                config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**9
                print(f"{name} on {kind} (seed {seed}) at {args.resolution}x{args.resolution}:", flush=True)
                with without_lpips():  # nerfacto's LPIPS network would download AlexNet weights; only PSNR is scored
                    results[(kind, name)] = train_for(config, args.seconds, args.eval_every)
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
                print(f"  process peak RSS so far: {peak:.2f} GB")
    print(f"\nresolution {args.resolution}  ({torch.get_num_threads()} threads)")
    header = f"{'scene':10s} {'method':16s} {'PSNR@30s':>9s} {'PSNR@120s':>10s} {'t(25dB)':>8s} {'t(30dB)':>8s}"
    print(header + f" {'final':>7s}")
    for (kind, name), rows in results.items():
        print(
            f"{kind:10s} {name:16s} {psnr_at(rows, 30):9.2f} {psnr_at(rows, 120):10.2f} {time_to(rows, 25):8.1f} "
            f"{time_to(rows, 30):8.1f} {rows[-1][2]:7.2f}"
        )
    for kind in args.kinds:
        if (kind, "nerfacto-small") in results:
            lead = psnr_at(results[(kind, "mmstyle-base")], 120) - psnr_at(results[(kind, "nerfacto-small")], 120)
            print(f"{kind}: mmstyle-base leads nerfacto-small by {lead:+.2f} dB at 120 s")


if __name__ == "__main__":
    main(tyro.cli(Args))
