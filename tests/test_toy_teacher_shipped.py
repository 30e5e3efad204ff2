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


def test_text_styles_take_the_text_to_image_route_through_the_shipped_teacher() -> None:
    from mmstyle_ns.style.extractor import StyleExtractorConfig
    from mmstyle_ns.style.sources import parse_style_specs

    config = StyleExtractorConfig(text_to_image_model=str(SHIPPED), text_to_image_steps=15)  # its own 128x128 size
    sources = parse_style_specs(("text:a red sphere on wood", "text:a blue cube on grass"))
    extractor = config.setup()
    extractor.check(sources)
    prepared = extractor.prepare(sources)
    assert [p.prompt for p in prepared] == ["a red sphere on wood", "a blue cube on grass"]
    assert all(p.image.shape == (128, 128, 3) for p in prepared)
    read = [classify_colour(np.round(p.image * 255).astype(np.uint8)).colour for p in prepared]
    assert read == ["red", "blue"]
    first, second = (p.embedding for p in prepared)
    torch.testing.assert_close(first.norm(), torch.tensor(1.0))
    assert float(first @ second) < 0.999  # two styles, two places in the embedding space
