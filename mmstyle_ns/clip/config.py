"""Settings of the toy CLIP: its open_clip architecture, training and evaluation.

Free of heavy imports (no torch, no open_clip), so the ``mmstyle-clip`` command line is parsed — and
``OMP_WAIT_POLICY`` set — before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOY_CLIP_NAME = "toy-clip"
"""open_clip model name of the toy CLIP (its config ships as ``<folder>/toy-clip.json``)."""

TOY_CLIP_WEIGHTS = "open_clip_model.safetensors"
"""File name of the toy CLIP's weights in its folder (the name open_clip's hub layout uses)."""


@dataclass(frozen=True)
class ToyClipArchitecture:
    """Sizes of the toy CLIP, written as an open_clip model config (``CLIP`` with a ``ModifiedResNet`` image
    tower and open_clip's text transformer over its own BPE vocabulary)."""

    image_size: int = 64
    """Input side in pixels; open_clip's preprocessing resizes and centre-crops any picture to it."""
    vision_layers: tuple[int, int, int, int] = (1, 1, 2, 1)
    """Bottleneck blocks per stage of the ResNet image tower (CLIP's RN50 has 3, 4, 6, 3)."""
    vision_width: int = 16
    """Stem width of the ResNet (RN50: 64); the last stage has ``32 x`` this many channels."""
    text_width: int = 64
    """Width of the text transformer (RN50: 512). The token table has one row per BPE token (49408)."""
    text_layers: int = 3
    """Text transformer depth."""
    text_heads: int = 4
    """Text transformer attention heads."""
    context_length: int = 32
    """Tokens per prompt (CLIP: 77); every caption of the toy world fits in 16."""
    embed_dim: int = 128
    """Dimension of the joint embedding space."""

    def model_config(self) -> dict[str, Any]:
        """The open_clip model config (the JSON that ``open_clip.add_model_config`` registers)."""
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {
                "image_size": self.image_size,
                "layers": list(self.vision_layers),
                "width": self.vision_width,
                "patch_size": None,
            },
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


TINY_CLIP_ARCHITECTURE = ToyClipArchitecture(
    image_size=32, vision_layers=(1, 1, 1, 1), vision_width=8, text_width=16, text_layers=1, text_heads=2, embed_dim=16
)
"""A small architecture for tests (random weights, a few steps)."""


@dataclass
class ClipTrainConfig:
    """Train the toy CLIP (contrastive image-caption objective) on generated toy-world pictures and save it."""

    output: Path = Path("toy-clip")
    """Folder that receives toy-clip.json (the open_clip model config), open_clip_model.safetensors and clip.json."""
    seed: int = 0
    """Seed of the picture pool (samples 0 .. pool_size - 1 of this seed), the initialisation and every random
    choice of training."""
    pool_size: int = 24_000
    """Generated training pictures (rendered once at 128x128 from frontal to high 360-degree viewpoints)."""
    steps: int = 1500
    """Optimiser steps."""
    batch_size: int = 256
    """Pictures per step (their captions are the negatives of each other; equal captions count as matches)."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up over 100 steps, cosine decay to 5%)."""
    weight_decay: float = 0.1
    """AdamW weight decay of the weight matrices (not of norms, biases, embeddings or the temperature)."""
    architecture: ToyClipArchitecture = field(default_factory=ToyClipArchitecture)
    """Network sizes."""
    workers: int = 2
    """Processes rendering the picture pool."""
    half_precision: bool = True
    """Store the weights as float16 (half the file; they load into the float32 model)."""
    device: str | None = None
    """Torch device; None picks an accelerator when torch has one, else the CPU."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""
    quiet: bool = False
    """No progress bar."""


@dataclass
class ClipEvalConfig:
    """Measure a CLIP on the toy world: zero-shot attributes, caption retrieval, scene renders, teacher samples."""

    clip_model: str = TOY_CLIP_NAME
    """open_clip model name (architecture), e.g. toy-clip or ViT-B-32."""
    clip_checkpoint: str = f"examples/toy-clip/{TOY_CLIP_WEIGHTS}"
    """open_clip weights: a checkpoint file (.safetensors, .pt, .bin) or a pretrained tag in the local cache."""
    output: Path = Path("renders/toy_clip_eval")
    """Folder for report.json and sheet.png."""
    held_out: int = 600
    """Generated pictures of a seed never used in training."""
    held_out_seed: int = 50_000
    """Seed of the held-out pictures (training uses seed 0)."""
    scene_views: int = 32
    """Renders of each embedded toy scene (written by mmstyle-scene's toy kind, not by the picture generator)."""
    scene_captions: tuple[str, ...] = (
        "a red cube on a wooden floor",
        "two shiny blue spheres on grass",
        "a yellow cylinder on stone",
    )
    """Captions of the embedded toy scenes measured (photo captions of the toy world's grammar)."""
    teacher: Path | None = Path("examples/toy-teacher")
    """Toy teacher whose samples are retrieved by their prompts (None skips it)."""
    teacher_samples_per_prompt: int = 4
    """Teacher samples per prompt (16 prompts, two per colour)."""
    device: str | None = None
    """Torch device; None picks an accelerator when torch has one, else the CPU."""
    threads: int | None = None
    """CPU threads for torch (None keeps torch's default)."""
