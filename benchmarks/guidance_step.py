"""Benchmark: the cost of one SDS and one DDS guidance step on the CPU.

A step is what a guided method pays per iteration on top of rendering: add noise, one classifier-free guided
UNet call (batch 2B for SDS, 4B for DDS), the gradient and the backward pass of the surrogate loss, timed from
latents (``[B, 4, S, S]``) and from images (``[B, 3, 8S, 8S]`` for SD, through the VAE encoder and back).

    python benchmarks/guidance_step.py                              # a small random SD-like model (built here)
    python benchmarks/guidance_step.py --model-path /models/sd-1-5  # a real Stable Diffusion folder

Without ``--model-path`` the numbers measure the guidance code around a tiny network, not Stable Diffusion.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import tyro
from timing import timed

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.scores import dds, sds
from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion


@dataclass
class Args:
    """Time one SDS and one DDS step."""

    model_path: str | None = None
    """Stable Diffusion folder (diffusers layout); None builds a small random SD-like model in a temp dir."""
    latent_size: int = 64
    """Latent height and width (64 = a 512x512 image for Stable Diffusion)."""
    batch: int = 1
    """Views per step."""
    repeats: int = 5
    """Timed steps per measurement (after one warm-up step)."""
    threads: int = 2
    """torch CPU threads."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Precision of the diffusion weights."""
    with_images: bool = True
    """Also time steps that start from images (VAE encode forward and backward included)."""


def run(backbone: DiffusionBackbone, args: Args) -> None:
    """Prints the timing table for ``backbone``."""
    size, batch = args.latent_size, args.batch
    generator = torch.Generator().manual_seed(0)
    target, source = backbone.text_embeddings("a photo of a red chair"), backbone.text_embeddings("a photo of a chair")
    latents = torch.randn(batch, backbone.latent_channels, size, size, generator=generator).requires_grad_()
    source_latents = torch.randn(batch, backbone.latent_channels, size, size, generator=generator)
    pixels = size * backbone.vae_scale_factor
    image = torch.rand(batch, 3, pixels, pixels, generator=generator).requires_grad_()

    def sds_latents() -> None:
        sds(backbone, latents, target, generator=generator).loss.backward()

    def dds_latents() -> None:
        dds(backbone, latents, source_latents, target, source, generator=generator).loss.backward()

    def sds_image() -> None:
        sds(backbone, backbone.encode_images(image), target, generator=generator).loss.backward()

    def dds_image() -> None:
        dds(
            backbone, backbone.encode_images(image), source_latents, target, source, generator=generator
        ).loss.backward()

    rows = [("SDS from latents", sds_latents, 2 * batch), ("DDS from latents", dds_latents, 4 * batch)]
    if args.with_images:
        rows += [("SDS from images", sds_image, 2 * batch), ("DDS from images", dds_image, 4 * batch)]
    print(f"latents [{batch}, {backbone.latent_channels}, {size}, {size}]  images [{batch}, 3, {pixels}, {pixels}]")
    print(f"{'step':18s} {'UNet batch':>10s} {'ms/step':>10s} {'std':>8s}")
    for name, step, unet_batch in rows:
        mean, std = timed(step, args.repeats)
        print(f"{name:18s} {unet_batch:10d} {mean:10.1f} {std:8.1f}", flush=True)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path
        if model_path is None:
            model_path = str(
                build_tiny_stable_diffusion(
                    Path(tmp) / "small-sd", unet_channels=(32, 64, 64), vae_channels=(8, 16, 16, 16), text_width=64
                )
            )
            print(
                "No --model-path: built a small RANDOM SD-like model in a temp dir (UNet channels 32/64/64, "
                "VAE x8 downsampling, text width 64). Timings show the guidance code's overhead, not Stable "
                "Diffusion's cost; pass --model-path for that."
            )
        backbone = DiffusionBackboneConfig(model_path=model_path, dtype=args.dtype).setup(device="cpu")
        params = sum(p.numel() for p in backbone.unet.parameters())
        print(f"model {model_path}  UNet {params / 1e6:.2f} M parameters  {args.dtype}  {args.threads} threads")
        run(backbone, args)


if __name__ == "__main__":
    main(tyro.cli(Args))
