"""Benchmark: mm-nerf's stylization cost, measured in one run and printed as ratios.

* a stylization step with 1 style vs. 16 styles (one style trains per step: the ratio should stay near 1), with the
  default patch objective (perceptual loss on a rendered patch) and, for reference, the pixel objective;
* a stylization step (cached samples, colour heads only) vs. a full base-field step on the same geometry;
* adding a style to a trained model (incremental learning) vs. the first stylization of 3 styles, set-up
  (2D stylization of the views, sample cache) included in both. The new style is stylized from scratch; the ray
  samples of its views are read from the store the first stylization wrote (and, for reference, marched again).

Needs a trained mm-nerf run (``make demo`` writes one)::

    python benchmarks/mm_nerf.py --load-config outputs/object360/mm-nerf/demo/config.yml
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
import yaml


@dataclass
class Args:
    """Stylization cost ratios of a trained mm-nerf run."""

    load_config: Path
    """config.yml of a trained mm-nerf run (its geometry is reused)."""
    steps: int = 30
    """Timed steps per measurement."""
    first_stylization_steps: int = 900
    """Stylization steps of the first stylization (3 styles)."""
    incremental_steps: int = 100
    """Training steps of the incremental style."""


def build(config_path: Path, styles: tuple[str, ...], stylized_views: int, cache_dir: Path, pixel: bool = False):  # noqa: ANN201
    """A fresh mm-nerf pipeline with ``styles``, the run's trained geometry loaded, and its optimizers (``pixel``:
    with the per-pixel objective instead of the run's)."""
    from nerfstudio.engine.optimizers import Optimizers

    from mmstyle_ns.models.mm_nerf import PixelObjectiveConfig
    from mmstyle_ns.scripts.add_style import latest_checkpoint

    config = copy.deepcopy(yaml.load(config_path.read_text(), Loader=yaml.Loader))
    config.pipeline.styles = styles
    config.pipeline.stylized_views = stylized_views
    config.pipeline.cache_dir = cache_dir
    if pixel:
        config.pipeline.model.objective = PixelObjectiveConfig()
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    state = torch.load(latest_checkpoint(config_path.parent), map_location="cpu")["pipeline"]
    per_style = (".heads.", ".residuals.", "style_", "_extra_state")
    geometry = {k: v for k, v in state.items() if not any(part in k for part in per_style)}
    pipeline.load_state_dict(geometry, strict=False)
    optimizers = Optimizers(config.optimizers, pipeline.get_param_groups())
    pipeline.train()
    return pipeline, optimizers, config.pipeline.model.reconstruction_steps


def timed_steps(pipeline, optimizers, first_step: int, steps: int) -> float:  # noqa: ANN001
    """Mean seconds of a training step (loss, backward, optimizer) from ``first_step`` on (after 3 warm-ups)."""
    for i in range(steps + 3):
        if i == 3:
            start = time.perf_counter()
        _, losses, _ = pipeline.get_train_loss_dict(first_step + i)
        optimizers.zero_grad_all()
        torch.stack(list(losses.values())).sum().backward()
        optimizers.optimizer_step_all()
    return (time.perf_counter() - start) / steps


def main(args: Args) -> None:
    from mmstyle_ns.scripts.add_style import AddStyleArgs, add_styles

    torch.set_num_threads(2)
    builtins = ["coffee", "hubble_deep_field", "chelsea", "astronaut", "rocket", "brick", "grass", "gravel"]
    sixteen = tuple(f"s{i}=builtin:{builtins[i % len(builtins)]}" for i in range(16))
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        results = {}
        for pixel in (False, True):
            kind = "pixel_" if pixel else ""
            for count in (1, 16):
                pipeline, optimizers, recon = build(args.load_config, sixteen[:count], 2, cache, pixel)
                pipeline.prepare_stylization(optimizers)
                results[f"{kind}style_{count}"] = seconds = timed_steps(pipeline, optimizers, recon, args.steps)
                label = "pixel objective" if pixel else "patch objective"
                print(f"stylization step ({label}), {count:2d} style(s): {seconds * 1000:7.1f} ms", flush=True)
        pipeline, optimizers, recon = build(args.load_config, sixteen[:1], 2, cache)
        results["base"] = timed_steps(pipeline, optimizers, 0, args.steps)  # reconstruction stage on the same grid
        print(f"full base-field step:            {results['base'] * 1000:7.1f} ms", flush=True)

        three = ("builtin:coffee", "builtin:hubble_deep_field", "builtin:chelsea")
        pipeline, optimizers, recon = build(args.load_config, three, 32, Path(tmp) / "cache_first")
        start = time.perf_counter()
        pipeline.prepare_stylization(optimizers)
        timed_steps(pipeline, optimizers, recon, args.first_stylization_steps - 3)
        results["first"] = time.perf_counter() - start
        print(f"first stylization (3 styles, set-up + {args.first_stylization_steps} steps): {results['first']:.1f} s")
        # rocket is none of the first stylization's styles, so its views are stylized from scratch in both runs;
        # the first reuses the ray samples the first stylization stored, the second marches them again
        for key, cache_dir in (("incremental", "cache_first"), ("incremental_cold", "cache_cold")):
            _, results[key] = add_styles(
                AddStyleArgs(
                    args.load_config,
                    ("builtin:rocket",),
                    steps=args.incremental_steps,
                    timestamp=f"bench-add-{key}",
                    cache_dir=Path(tmp) / cache_dir,
                )
            )
        print(f"incremental style (set-up + {args.incremental_steps} steps): {results['incremental']:.1f} s")
        print(f"  the same without stored ray samples: {results['incremental_cold']:.1f} s")

    print("\nratios (measured in this run)")
    print(f"  step with 16 styles / 1 style:        {results['style_16'] / results['style_1']:.2f}  (target <= 1.2)")
    print(f"  the same, pixel objective:            {results['pixel_style_16'] / results['pixel_style_1']:.2f}")
    print(f"  patch step / pixel step:              {results['style_1'] / results['pixel_style_1']:.2f}")
    print(f"  stylization step / base-field step:   {results['style_1'] / results['base']:.2f}")
    print(f"  incremental style / first stylization: {results['incremental'] / results['first']:.2f}  (target <= 0.10)")
    print(f"  the same without stored ray samples:   {results['incremental_cold'] / results['first']:.2f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
