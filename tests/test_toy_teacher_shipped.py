"""The toy teacher shipped in ``examples/toy-teacher`` loads like Stable Diffusion and still follows colour prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig
from mmstyle_ns.teacher.checker import classify_colour
from mmstyle_ns.teacher.evaluate import images_to_uint8, sample_images
from mmstyle_ns.teacher.vocab import colour_prompts

SHIPPED = Path(__file__).resolve().parents[1] / "examples" / "toy-teacher"


@pytest.fixture(scope="module")
def backbone():  # noqa: ANN201
    if not (SHIPPED / "model_index.json").is_file():
        pytest.fail(f"the trained toy teacher is missing from {SHIPPED}")
    return DiffusionBackboneConfig(model_path=str(SHIPPED)).setup()


def test_shipped_teacher_loads_in_the_stable_diffusion_layout(backbone) -> None:  # noqa: ANN001
    assert backbone.latent_channels == 4 and backbone.vae_scale_factor == 8
    assert int(backbone.unet.config.sample_size) == 16  # 128x128 views of the embedded scenes
    ids = backbone.tokenizer("a red cube on grass").input_ids
    assert len(ids) > 4 and ids[0] == backbone.tokenizer.bos_token_id  # a real BPE tokenizer, not an empty one
    weights = sum(p.stat().st_size for p in SHIPPED.rglob("*.safetensors"))
    assert weights <= 20 * 2**20


def test_shipped_teacher_follows_colour_prompts(backbone) -> None:  # noqa: ANN001
    prompts = [text for text, _ in colour_prompts(1)]  # one prompt per colour, 8 in all
    truth = [spec.colour for _, spec in colour_prompts(1)]
    with torch.no_grad():
        images = sample_images(backbone, prompts, steps=15, generator=torch.Generator().manual_seed(0))
    read = [classify_colour(np.ascontiguousarray(p)).colour for p in images_to_uint8(images)]
    correct = sum(r == t for r, t in zip(read, truth, strict=True))
    assert correct >= 7, f"the checker read {read} for {truth}"
