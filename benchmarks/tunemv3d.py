"""TuneMV3D's cost, measured in one run: a training step, and a multi-view sample against independent sampling.

* training step: Eq. 3 on one scene (``views_per_step`` inputs and ``novel_views_per_step`` novel views of the
  run's collection), forward and backward, optimizer excluded;
* sample: ``--steps`` DDIM steps of ``--views`` views with classifier-free guidance, every view through the
  interactive model at every step (TuneMV3D), and the same frozen model sampling each view on its own (the
  baseline TuneMV3D is measured against).

Prints times per step and per sample, their ratio, and the process's peak memory; the device is named.

    python benchmarks/tunemv3d.py --load-config outputs/toy-collection/tunemv3d/main/config.yml
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro
from timing import timed


@dataclass
class Args:
    """Time a tunemv3d training step and a multi-view sample against independent sampling."""

    load_config: Path
    """config.yml of a tunemv3d run (trained or not: the cost does not depend on the weights)."""
    prompt: str = "a green cylinder on grass"
    """Prompt of the timed samples."""
    steps: int = 20
    """DDIM steps per sample."""
    views: int | None = None
    """Views per sample (default: the run's views per step)."""
    repeats: int = 3
    """Timed repetitions of each measurement (after one warm-up)."""
    threads: int = 2
    """CPU threads."""


def main(args: Args) -> dict[str, Any]:
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.scripts.tunemv3d import generation_cameras

    torch.set_num_threads(args.threads)
    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="val")
    model: Any = pipeline.model
    model.train()
    device = pipeline.device
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else f"CPU, {args.threads} threads"

    def train_step() -> None:
        _, losses, _ = pipeline.get_train_loss_dict(0)  # type: ignore[attr-defined]
        model.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    step_ms, step_sd = timed(train_step, args.repeats)
    model.eval()
    cameras = generation_cameras(pipeline, args.views)

    def sample(modulate: bool) -> None:
        model.generate(cameras, args.prompt, steps=args.steps, generator=torch.Generator().manual_seed(0),
                       modulate=modulate)  # fmt: skip

    ours_ms, ours_sd = timed(lambda: sample(True), args.repeats)
    base_ms, base_sd = timed(lambda: sample(False), args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak = torch.cuda.max_memory_allocated(device) / 2**20 if torch.device(device).type == "cuda" else None
    datamanager: Any = pipeline.datamanager
    result = {
        "device": name,
        "train_step_ms": step_ms,
        "views_per_step": datamanager.config.views_per_step,
        "novel_views_per_step": datamanager.config.novel_views_per_step,
        "sample_ms_tunemv3d": ours_ms,
        "sample_ms_independent": base_ms,
        "sample_ratio": ours_ms / base_ms,
        "views": len(cameras),
        "ddim_steps": args.steps,
        "peak_rss_mb": peak,
        "peak_gpu_mb": gpu_peak,
    }
    print(f"device: {name}")
    print(f"training step ({result['views_per_step']} + {result['novel_views_per_step']} views): "
          f"{step_ms:.0f} +- {step_sd:.0f} ms")  # fmt: skip
    print(f"sample of {len(cameras)} views, {args.steps} DDIM steps: TuneMV3D {ours_ms / 1000:.2f} +- "
          f"{ours_sd / 1000:.2f} s, independent {base_ms / 1000:.2f} +- {base_sd / 1000:.2f} s, "
          f"ratio {ours_ms / base_ms:.1f}x")  # fmt: skip
    print(f"peak memory (RSS): {peak:.0f} MB" + (f", GPU {gpu_peak:.0f} MB allocated" if gpu_peak else ""))
    return result


if __name__ == "__main__":
    main(tyro.cli(Args))
