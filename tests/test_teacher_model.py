"""A tiny teacher trained by the real training code saves in the diffusers layout, loads through
``DiffusionBackbone`` and ``StableDiffusionPipeline``, samples pictures of the right size; the VAE gate refuses
a VAE that loses colours."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.tiny import CLIP_VOCAB_SIZE
from mmstyle_ns.teacher.config import TINY_ARCHITECTURE, DenoiserStage, TeacherArchitecture, TrainConfig, VaeStage
from mmstyle_ns.teacher.data import generate_images
from mmstyle_ns.teacher.evaluate import sample_images, write_sheet
from mmstyle_ns.teacher.model import TEACHER_INFO_FILE, build_teacher, count_parameters, weights_size
from mmstyle_ns.teacher.train import (
    TeacherGateError,
    VaeReport,
    WeightAverage,
    check_gate,
    evaluate_vae,
    latent_object_share,
    train_teacher,
    train_vae,
)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config(output: Path, gate: float = 0.0) -> TrainConfig:
    return TrainConfig(
        output=output,
        pool_size=24,
        holdout_size=8,
        architecture=TINY_ARCHITECTURE,
        vae=VaeStage(steps=3, batch_size=4, crop=16),
        denoiser=DenoiserStage(steps=3, batch_size=8),
        gate_min_accuracy=gate,
        device="cpu",
        quiet=True,
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny teacher trained for a few steps by :func:`train_teacher` (gate off: a few steps cannot pass it)."""
    return train_teacher(_tiny_config(tmp_path_factory.mktemp("teacher") / "toy-teacher"), log=lambda _: None)


@pytest.fixture(scope="module")
def backbone(teacher_dir: Path) -> DiffusionBackbone:
    return DiffusionBackboneConfig(model_path=str(teacher_dir)).setup()


def test_saved_in_the_stable_diffusion_layout(teacher_dir: Path) -> None:
    index = json.loads((teacher_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"] and index["safety_checker"] == [None, None]
    for sub in ("unet", "vae", "text_encoder"):
        assert any(p.suffix == ".safetensors" for p in (teacher_dir / sub).iterdir())
    scheduler = json.loads((teacher_dir / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["clip_sample"] is False and scheduler["beta_schedule"] == "scaled_linear"
    info = json.loads((teacher_dir / TEACHER_INFO_FILE).read_text())
    assert info["architecture"]["resolution"] == 32 and set(info["seconds"]) >= {"data", "vae", "gate", "denoiser"}
    # The latent scaling factor was measured on the pool, not left at Stable Diffusion's 0.18215.
    vae_config = json.loads((teacher_dir / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != pytest.approx(0.18215)


def test_loads_through_the_diffusion_backbone(backbone: DiffusionBackbone) -> None:
    assert type(backbone.scheduler).__name__ == "DDIMScheduler" and backbone.scheduler.config.clip_sample is False
    assert backbone.vae_scale_factor == 8 and backbone.latent_channels == 4
    images = torch.rand(2, 3, 32, 32)
    latents = backbone.encode_images(images)
    assert latents.shape == (2, 4, 4, 4)
    assert backbone.decode_latents(latents).shape == (2, 3, 32, 32)
    emb = backbone.text_embeddings(["a red cube on grass", ""])
    assert emb.shape == (2, TINY_ARCHITECTURE.max_length, TINY_ARCHITECTURE.text_width)
    eps = backbone.predict_noise(latents, 500, emb[:1], guidance_scale=3.0, uncond_emb=emb[1:])
    assert eps.shape == latents.shape and torch.isfinite(eps).all()


def test_tokenizer_ids_match_open_clip(backbone: DiffusionBackbone) -> None:
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    assert len(backbone.tokenizer) == CLIP_VOCAB_SIZE
    for text in ["a painting of two shiny orange cylinders on a wooden floor", "a cartoon of a black sphere on stone"]:
        ours = backbone.tokenizer(text).input_ids
        theirs = reference([text])[0].tolist()
        assert ours == theirs[: len(ours)] and ours[-1] == CLIP_VOCAB_SIZE - 1


def test_samples_through_the_backbone(backbone: DiffusionBackbone) -> None:
    generator = torch.Generator().manual_seed(0)
    images = sample_images(backbone, ["a red cube on grass", "a blue sphere on stone"], 3, 4.0, generator)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    again = sample_images(
        backbone, ["a red cube on grass", "a blue sphere on stone"], 3, 4.0, torch.Generator().manual_seed(0)
    )
    assert torch.equal(images, again)


def test_loads_and_samples_with_stable_diffusion_pipeline(teacher_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_dir), local_files_only=True)
    assert pipe.safety_checker is None
    assert pipe.text_encoder.dtype == pipe.unet.dtype == pipe.vae.dtype == torch.float32
    out = pipe(
        "a red cube on a wooden floor",
        num_inference_steps=2,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    images = np.asarray(out.images)  # type: ignore[union-attr]
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_gate_refuses_an_untrained_vae() -> None:
    images, specs = generate_images(1, 0, 8)
    vae = build_teacher(TINY_ARCHITECTURE, seed=0).vae.eval()
    report = evaluate_vae(vae, images, specs)
    assert report.checker_on_originals.overall == 1.0
    assert report.colour.overall < 0.5 and report.psnr < 15.0
    with pytest.raises(TeacherGateError, match="VAE gate failed"):
        check_gate(report, 0.9)
    # The same gate lets a perfect reconstruction through.
    check_gate(VaeReport(60.0, report.checker_on_originals, report.checker_on_originals), 0.9)


def test_training_stops_at_the_gate(tmp_path: Path) -> None:
    output = tmp_path / "refused"
    with pytest.raises(TeacherGateError):
        train_teacher(_tiny_config(output, gate=0.9), log=lambda _: None)
    assert not (output / "model_index.json").exists() and not (output / "unet").exists()


def test_vae_training_is_deterministic_and_learns() -> None:
    pool, _ = generate_images(2, 0, 16, resolution=32)
    stage = VaeStage(steps=12, batch_size=4, crop=16, lr=3e-3)
    runs = [train_vae(build_teacher(TINY_ARCHITECTURE, seed=1).vae, pool, stage, 0, CPU, quiet=True) for _ in range(2)]
    assert runs[0] == runs[1]
    assert np.mean(runs[0][-3:]) < np.mean(runs[0][:3])


def test_default_architecture_fits_the_size_budget() -> None:
    parts = build_teacher(TeacherArchitecture())
    counts = count_parameters(parts)
    assert sum(counts.values()) * 4 <= 20e6, counts  # float32 bytes
    assert parts.vae.config.latent_channels == 4 and len(parts.vae.config.block_out_channels) == 4  # 8x down
    assert parts.unet.config.sample_size == 16 and parts.unet.config.cross_attention_dim == 32
    with pytest.raises(ValueError, match="divisible"):
        dataclasses.replace(TeacherArchitecture(), vae_channels=(6, 16, 32, 64))


def test_saved_weights_are_float32(teacher_dir: Path) -> None:
    from safetensors import safe_open

    for path in teacher_dir.rglob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())  # noqa: SIM118
    assert weights_size(teacher_dir) > 0


def test_latent_object_share_and_weight_average() -> None:
    masks = np.zeros((1, 16, 16), dtype=bool)
    masks[0, :8, :4] = True
    share = latent_object_share(masks, CPU)
    assert share.shape == (1, 1, 2, 2) and share[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    layer = torch.nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.zero_()
    average = WeightAverage([layer], decay=0.5)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average.update()  # decay min(0.5, 2 / 11) = 2/11: the average moves 9/11 of the way
    average.copy_to_model()
    assert torch.allclose(layer.weight, torch.full_like(layer.weight, 9 / 11))


def test_sample_sheet(tmp_path: Path) -> None:
    from PIL import Image

    images = np.zeros((2, 3, 32, 32, 3), dtype=np.uint8)
    path = write_sheet(
        images, ["a red cube on grass", "a blue cube on grass"], [[True] * 3, [False] * 3], tmp_path / "s.png"
    )
    with Image.open(path) as sheet:
        width, height = sheet.size
        assert height == 2 * (32 + 4) + 4 and width > 3 * 32
        # Frames: green for a right colour (first row), red for a wrong one (second row).
        assert sheet.getpixel((width - 4 - 32, 4)) == (40, 170, 60)
        assert sheet.getpixel((width - 4 - 32, 4 + 36)) == (210, 40, 40)
