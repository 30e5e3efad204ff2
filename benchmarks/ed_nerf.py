"""ED-NeRF's speed claim, measured in one run: a DDS step in latent space vs. the same step in RGB space.

* latent space (ed-nerf): render the view's latents at 1/8 resolution, refine, DDS against the view's latent;
* RGB space (the alternative ED-NeRF improves on): render the view in RGB at full resolution with an RGB base
  field of the same scene (``mmstyle-base``, trained here for ``--base-steps``), encode it with the VAE, DDS;
  gradients flow back through the encoder to the render.

Both use the same diffusion model, prompts, rule and views. Prints the time per step of each and the ratio, and
the process's peak memory after each phase.

    python benchmarks/ed_nerf.py --load-config outputs/toy/ed-nerf/stage1/config.yml
"""

from __future__ import annotations

import copy
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tyro


@dataclass
class Args:
    load_config: Path
    """config.yml of a trained ed-nerf run (stage 1 is enough)."""
    target_prompt: str = "a blue cube on a wooden floor"
    """Target of the timed DDS steps."""
    steps: int = 10
    """Timed steps per path (after 2 warm-up steps)."""
    base_steps: int = 300
    """Training steps of the RGB base field of the same scene."""
    threads: int = 2
    """CPU threads."""


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(args: Args) -> None:
    from nerfstudio.plugins.registry import discover_methods
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.guidance.rules import ScoreInputs

    torch.set_num_threads(args.threads)
    loaded = eval_setup(args.load_config, test_mode="test")
    pipeline: Any = loaded[1]
    model: Any = pipeline.model
    backbone: Any = pipeline.backbone
    model.train()
    model.config.target_prompt = args.target_prompt
    model.start_guided_stage()
    datamanager = pipeline.datamanager
    cameras = datamanager.train_dataset.cameras
    views = [i % len(cameras) for i in range(args.steps + 2)]

    def latent_step(i: int) -> None:
        camera = cameras[i : i + 1]
        batch = {"latent_target": pipeline.train_latents[i][None], "image_idx": i}
        outputs = model.guided_outputs(camera, batch, 0)
        model.get_loss_dict(outputs, batch)["score_loss"].backward()
        model.zero_grad(set_to_none=True)

    def timed(step: object) -> float:
        for i in views[:2]:
            step(i)  # type: ignore[operator]
        start = time.perf_counter()
        for i in views[2:]:
            step(i)  # type: ignore[operator]
        return (time.perf_counter() - start) / args.steps

    latent_seconds = timed(latent_step)
    latent_peak = _peak_mb()

    methods, _ = discover_methods()
    config: Any = copy.deepcopy(methods["mmstyle-base"])
    config.pipeline.datamanager.data = Path(pipeline.config.datamanager.data)
    config.output_dir = Path(tempfile.mkdtemp(prefix="ed_nerf_benchmark_"))
    config.max_num_iterations = args.base_steps
    config.vis = "tensorboard"
    config.steps_per_save = 10**6
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    config.pipeline.model.regrid_steps = (args.base_steps // 10, args.base_steps // 2)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    base: Any = trainer.pipeline.model
    base.train()
    rule = model.rule
    source_text, target_text = model.config.source_prompt, args.target_prompt

    def rgb_step(i: int) -> None:
        camera = cameras[i : i + 1]
        rgb = base.render_camera(camera)["rgb"].permute(2, 0, 1)[None]  # [1, 3, H, W] at full resolution
        latents = backbone.encode_images(rgb)
        inputs = ScoreInputs(
            latents=latents,
            target_text=target_text,
            source_text=source_text,
            source_latents=pipeline.train_latents[i][None],
        )
        rule.loss(backbone, inputs).loss.backward()
        base.zero_grad(set_to_none=True)

    rgb_seconds = timed(rgb_step)
    height, width = int(cameras.height[0]), int(cameras.width[0])
    print(f"views {width}x{height}, latents {width // 8}x{height // 8}, {args.threads} threads, {args.steps} steps")
    print(f"DDS step in latent space (ed-nerf): {1000 * latent_seconds:.1f} ms; peak RSS {latent_peak:.0f} MB")
    print(f"DDS step in RGB space (render, VAE encode): {1000 * rgb_seconds:.1f} ms; peak RSS {_peak_mb():.0f} MB")
    print(f"ratio RGB / latent: {rgb_seconds / latent_seconds:.1f}x")


if __name__ == "__main__":
    main(tyro.cli(Args))
