"""Evaluates a saved toy teacher through :class:`~mmstyle_ns.guidance.DiffusionBackbone`, the path SD takes.

* **Colour accuracy.** For every colour prompt of :func:`~mmstyle_ns.teacher.vocab.colour_prompts`, samples
  pictures with DDIM and classifier-free guidance (noise predictions from ``DiffusionBackbone.predict_noise``,
  decoding with ``decode_latents``) and reads their colour with the independent checker; prints per-colour
  and overall accuracy.
* **VAE PSNR** of ``encode_images`` -> ``decode_latents`` round trips on pictures never trained on.
* **Sample sheet**: a PNG with one row per prompt and one column per sample; a green frame marks a picture
  whose colour the checker read as prompted, a red frame one it did not.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from mmstyle_ns.teacher.checker import Accuracy, accuracy, classify_colour
from mmstyle_ns.teacher.config import EvalConfig
from mmstyle_ns.teacher.data import generate_images
from mmstyle_ns.teacher.model import default_device
from mmstyle_ns.teacher.vocab import colour_prompts

HELD_OUT_SEED = 1_000_003
"""Data seed of the evaluation pictures (training uses the run's seed, a different sample stream)."""


@dataclass(frozen=True)
class EvalReport:
    """Results of :func:`evaluate_teacher`."""

    colour: Accuracy
    """Checker accuracy on the samples (truth: the prompted colour)."""
    vae_psnr: float | None
    """Mean PSNR (dB) of VAE round trips of held-out pictures (None when skipped)."""
    prompts: list[str]
    """The prompts, one per sheet row."""
    predictions: list[list[str | None]]
    """The checker's reading of every sample, ``[prompt][sample]``."""
    sheet: Path
    """The sample sheet."""


@torch.no_grad()
def sample_images(
    backbone: Any,
    prompts: Sequence[str],
    steps: int = 30,
    guidance_scale: float = 5.0,
    generator: torch.Generator | None = None,
) -> Float[Tensor, "N 3 H W"]:
    """DDIM + classifier-free guidance samples of ``prompts`` from a ``DiffusionBackbone``, RGB in [0, 1].

    Uses the backbone's own operations (``text_embeddings``, ``predict_noise``, ``decode_latents``) and a copy
    of its DDIM scheduler, so a teacher that samples well here is usable by every score rule.
    """
    scheduler = copy.deepcopy(backbone.scheduler)
    scheduler.set_timesteps(steps)
    size = int(backbone.unet.config.sample_size)
    shape = (len(prompts), backbone.latent_channels, size, size)
    gen_device = generator.device if generator is not None else backbone.device
    latents = torch.randn(shape, generator=generator, device=gen_device).to(backbone.device)
    latents = latents * float(scheduler.init_noise_sigma)
    text = backbone.text_embeddings(list(prompts))
    empty = backbone.text_embeddings("")
    for t in scheduler.timesteps:
        eps = backbone.predict_noise(latents, int(t), text, guidance_scale=guidance_scale, uncond_emb=empty)
        latents = scheduler.step(eps, t, latents).prev_sample
    return backbone.decode_latents(latents)


def images_to_uint8(images: Float[Tensor, "N 3 H W"]) -> UInt8[np.ndarray, "N H W 3"]:
    """RGB images in [0, 1] (as the backbone decodes them) to uint8 pictures ``[N, H, W, 3]``."""
    return (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def write_sheet(
    images: UInt8[np.ndarray, "P S H W 3"],
    prompts: Sequence[str],
    correct: Sequence[Sequence[bool]],
    path: Path,
) -> Path:
    """A PNG grid: one row per prompt (its text on the left), one column per sample; frames mark the verdict."""
    from PIL import Image, ImageDraw

    rows, cols, h, w = images.shape[:4]
    label, pad = 230, 4
    sheet = Image.new("RGB", (label + cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        top = pad + r * (h + pad)
        draw.text((6, top + h // 2 - 6), prompts[r], fill=(0, 0, 0))
        for c in range(cols):
            left = label + pad + c * (w + pad)
            sheet.paste(Image.fromarray(images[r, c]), (left, top))
            colour = (40, 170, 60) if correct[r][c] else (210, 40, 40)
            draw.rectangle((left, top, left + w - 1, top + h - 1), outline=colour, width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def evaluate_teacher(config: EvalConfig, log: Callable[[str], None] = print) -> EvalReport:
    """Samples, checks and measures a saved teacher (see the module docstring); prints and returns the figures."""
    from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig

    if not (Path(config.model) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No teacher at --model {config.model} (no model_index.json): train one first with "
            f"'mmstyle-teacher train --output {config.model}'"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device is not None else default_device()
    start = time.perf_counter()
    backbone = DiffusionBackboneConfig(
        model_path=str(config.model), flag_prefix="--model", guidance_scale=config.guidance_scale
    ).setup(device=device)
    resolution = int(backbone.unet.config.sample_size) * backbone.vae_scale_factor

    vae_psnr = None
    if config.vae_images > 0:
        from mmstyle_ns.teacher.train import psnr

        originals, _ = generate_images(HELD_OUT_SEED, 0, config.vae_images, resolution)
        recon = np.concatenate(
            [
                images_to_uint8(
                    backbone.decode_latents(backbone.encode_images(torch.from_numpy(chunk).permute(0, 3, 1, 2) / 255.0))
                )
                for chunk in np.array_split(originals, max(1, len(originals) // 32))
            ]
        )
        vae_psnr = psnr(recon, originals)
        log(f"VAE round trip through DiffusionBackbone: {vae_psnr:.2f} dB PSNR on {len(originals)} held-out pictures")

    pairs = colour_prompts(config.prompts_per_colour)
    prompts = [text for text, _ in pairs]
    flat = [text for text in prompts for _ in range(config.samples_per_prompt)]
    generator = torch.Generator(device=backbone.device).manual_seed(config.seed)
    chunks = [
        images_to_uint8(
            sample_images(backbone, flat[i : i + config.batch_size], config.steps, config.guidance_scale, generator)
        )
        for i in range(0, len(flat), config.batch_size)
    ]
    samples = np.concatenate(chunks).reshape(len(prompts), config.samples_per_prompt, resolution, resolution, 3)
    predictions = [[classify_colour(img).colour for img in row] for row in samples]
    truth = [spec.colour for _, spec in pairs]
    correct = [[p == t for p in row] for row, t in zip(predictions, truth, strict=True)]
    result = accuracy(
        [p for row in predictions for p in row], [t for t in truth for _ in range(config.samples_per_prompt)]
    )
    sheet = write_sheet(samples, prompts, correct, config.sheet or config.model / "samples.png")
    log(
        f"Colour accuracy of {result.count} samples ({config.steps} DDIM steps, guidance {config.guidance_scale}):\n"
        f"{result.table()}\nSample sheet: {sheet} ({time.perf_counter() - start:.0f} s)"
    )
    return EvalReport(result, vae_psnr, prompts, predictions, sheet)
