"""The diffusion backbone loads a tiny Stable-Diffusion-layout folder built here, and fails loudly when it cannot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.checks import GuidanceModelError, check_tokenizer
from mmstyle_ns.guidance.scores import sds
from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-like model (and a matching ControlNet) saved with ``save_pretrained``."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", controlnet=True, seed=0)


@pytest.fixture(scope="module")
def backbone(model_dir: Path) -> DiffusionBackbone:
    return DiffusionBackboneConfig(model_path=str(model_dir), controlnet_path=str(model_dir / "controlnet")).setup()


def _frozen_grads(backbone: DiffusionBackbone) -> list[torch.Tensor | None]:
    return [p.grad for module in backbone.frozen_modules() for p in module.parameters()]


def test_import_does_not_load_diffusers_or_transformers() -> None:
    code = "import sys, mmstyle_ns.guidance; print(sorted({'diffusers', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_loads_a_stable_diffusion_layout_frozen(backbone: DiffusionBackbone, model_dir: Path) -> None:
    assert json.loads((model_dir / "model_index.json").read_text())["unet"] == ["diffusers", "UNet2DConditionModel"]
    modules = backbone.frozen_modules()
    assert len(modules) == 4  # text encoder, VAE, UNet, ControlNet
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)
    assert type(backbone.scheduler).__name__ == "DDIMScheduler" and backbone.scheduler.config.clip_sample is False
    assert backbone.vae_scale_factor == 2 and backbone.latent_channels == 4
    assert backbone.alphas_cumprod.shape == (1000,) and backbone.device == torch.device("cpu")
    assert float(backbone.alphas_cumprod[0]) > float(backbone.alphas_cumprod[-1])


def test_tokenizer_ids_match_open_clip(backbone: DiffusionBackbone) -> None:
    """The tokenizer built from open_clip's BPE vocabulary and loaded through transformers agrees with open_clip."""
    import open_clip

    reference = open_clip.get_tokenizer("ViT-B-32")
    for text in [
        "a photo of a cat",
        "Portrait of a Werewolf, Pixar style!",
        "héllo wörld 123",
        "turn him   into a clown",
    ]:
        ours = backbone.tokenizer(text).input_ids
        theirs = reference([text])[0].tolist()
        assert ours == theirs[: theirs.index(49407) + 1], text
    assert len(backbone.tokenizer) == 49408


def test_text_embeddings_are_cached_per_prompt(backbone: DiffusionBackbone) -> None:
    backbone.clear_text_cache()
    calls: list[int] = []
    handle = backbone.text_encoder.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        first = backbone.text_embeddings(["a cat", "a dog", "a cat"])
        again = backbone.text_embeddings("a dog")
    finally:
        handle.remove()
    assert calls == [2], "one encoder call for the two distinct prompts, none for the cached one"
    assert first.shape == (3, 77, 16)
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(again[0], first[1])
    assert (first[0] - first[1]).abs().max() > 1e-4


def test_predict_noise_is_classifier_free_guidance_in_one_call(backbone: DiffusionBackbone) -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    cond, uncond = backbone.text_embeddings("a red chair"), backbone.text_embeddings("")
    calls: list[int] = []
    handle = backbone.unet.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    try:
        guided = backbone.predict_noise(latents, t, cond, guidance_scale=5.0)
    finally:
        handle.remove()
    assert calls == [4], "uncond and cond of both samples in one batched UNet call"
    with torch.no_grad():
        eps_c = backbone.unet(latents, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample
        eps_u = backbone.unet(latents, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
    torch.testing.assert_close(guided, eps_u + 5.0 * (eps_c - eps_u), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(backbone.predict_noise(latents, t, cond, guidance_scale=1.0), eps_c, atol=1e-5, rtol=0)


def test_encode_decode_and_gradients_reach_the_image_only(backbone: DiffusionBackbone) -> None:
    torch.manual_seed(0)
    image = torch.rand(2, 3, 16, 16, requires_grad=True)
    latents = backbone.encode_images(image)
    assert latents.shape == (2, 4, 8, 8) and latents.requires_grad
    decoded = backbone.decode_latents(latents.detach())
    assert decoded.shape == (2, 3, 16, 16) and float(decoded.min()) >= 0.0 and float(decoded.max()) <= 1.0
    sds(backbone, latents, backbone.text_embeddings("a cat")).loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0.0
    assert all(g is None for g in _frozen_grads(backbone))
    with pytest.raises(ValueError, match="multiple of 2"):
        backbone.encode_images(torch.rand(1, 3, 15, 16))


def test_add_noise_matches_the_scheduler(backbone: DiffusionBackbone) -> None:
    torch.manual_seed(0)
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    torch.testing.assert_close(backbone.add_noise(latents, noise, t), backbone.scheduler.add_noise(latents, noise, t))


def test_timesteps_stay_in_range_and_anneal_linearly(model_dir: Path) -> None:
    config = DiffusionBackboneConfig(model_path=str(model_dir), anneal="linear", anneal_final_max_step_ratio=0.5)
    backbone = config.setup()
    assert backbone.timestep_range() == (20, 979)
    assert backbone.timestep_range(0, 100) == (20, 979)
    assert backbone.timestep_range(50, 100) == (20, round(0.74 * 999))
    assert backbone.timestep_range(100, 100) == backbone.timestep_range(500, 100) == (20, round(0.5 * 999))
    generator = torch.Generator().manual_seed(0)
    early = backbone.sample_timesteps(4000, step=0, max_steps=100, generator=generator)
    late = backbone.sample_timesteps(4000, step=100, max_steps=100, generator=generator)
    assert early.dtype == torch.long and int(early.min()) >= 20 and int(early.max()) <= 979
    assert int(early.max()) > 900 and int(late.max()) <= 500 and int(late.min()) >= 20


def test_v_and_sample_predictions_are_converted_to_noise(
    backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([50, 900])
    noisy = backbone.add_noise(x0, eps, t)
    alpha = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    monkeypatch.setattr(backbone, "prediction_type", "v_prediction")
    torch.testing.assert_close(backbone.epsilon_from_model_output(velocity, noisy, t), eps, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(backbone, "prediction_type", "sample")
    torch.testing.assert_close(backbone.epsilon_from_model_output(x0, noisy, t), eps, atol=1e-4, rtol=1e-3)


def test_controlnet_depth_conditioning_changes_the_prediction(backbone: DiffusionBackbone, model_dir: Path) -> None:
    torch.manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    emb = backbone.text_embeddings("a head")
    near, far = torch.zeros(1, 1, 16, 16), torch.linspace(0, 1, 16).expand(1, 1, 16, 16)
    eps_near = backbone.predict_noise(latents, t, emb, controlnet_cond=near)
    eps_far = backbone.predict_noise(latents, t, emb, controlnet_cond=far)
    assert (eps_near - eps_far).abs().max() > 1e-4
    # One-channel depth equals its three-channel copy; any resolution is resized to the latents' pixel size.
    torch.testing.assert_close(
        backbone.predict_noise(latents, t, emb, controlnet_cond=far.expand(1, 3, -1, -1)), eps_far
    )
    big = torch.nn.functional.interpolate(far, size=(32, 32), mode="bilinear", align_corners=False)
    assert backbone.predict_noise(latents, t, emb, controlnet_cond=big).shape == (1, 4, 8, 8)
    # The gradient goes through the encoder to the image, never into the ControlNet's weights.
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    sds(backbone, backbone.encode_images(image), emb, controlnet_cond=far).loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert backbone.controlnet is not None and all(p.grad is None for p in backbone.controlnet.parameters())
    plain = DiffusionBackboneConfig(model_path=str(model_dir), flag_prefix="--pipeline.model.head").setup()
    with pytest.raises(GuidanceModelError, match="--pipeline.model.head.controlnet-path"):
        plain.predict_noise(latents, t, emb, controlnet_cond=far)


def test_no_model_path_names_the_flag() -> None:
    with pytest.raises(GuidanceModelError, match=r"--pipeline\.model\.guidance\.model-path") as info:
        DiffusionBackboneConfig(model_path=None).setup()
    assert "unet/" in str(info.value) and "model_index.json" in str(info.value)


def test_incomplete_folder_gives_one_error_listing_what_is_missing(model_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(model_dir, tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "tokenizer" / "vocab.json").unlink()
    config = DiffusionBackboneConfig(model_path=str(broken), flag_prefix="--pipeline.model.edit")
    with pytest.raises(GuidanceModelError) as info:
        config.setup()
    message = str(info.value)
    assert "--pipeline.model.edit.model-path" in message
    assert "unet/ weights" in message and "tokenizer/vocab.json" in message
    assert "vae/" not in message.split("Expected layout")[0], "only what is missing is listed as missing"
    assert "text_encoder/  config.json" in message, "the expected layout is shown"


def test_unknown_hub_id_offline_names_the_flag() -> None:
    with pytest.raises(GuidanceModelError, match="model-path='nobody/no-such-model'.*local Hugging Face cache"):
        DiffusionBackboneConfig(model_path="nobody/no-such-model").setup()


def test_incomplete_controlnet_names_its_flag(model_dir: Path, tmp_path: Path) -> None:
    broken = shutil.copytree(model_dir / "controlnet", tmp_path / "controlnet")
    (broken / "config.json").unlink()
    with pytest.raises(GuidanceModelError, match=r"controlnet-path.*Missing: config\.json"):
        DiffusionBackboneConfig(model_path=str(model_dir), controlnet_path=str(broken)).setup()


def test_silently_empty_tokenizer_is_detected(backbone: DiffusionBackbone, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    empty = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)  # no vocabulary, no error
    assert len(empty) < 10, "the transformers trap this check exists for"
    with pytest.raises(GuidanceModelError, match=r"only \d+ vocabulary entries.*--x\.model-path"):
        check_tokenizer(empty, "--x.model-path")
    with pytest.raises(GuidanceModelError, match="different models"):
        check_tokenizer(backbone.tokenizer, "--x.model-path", text_vocab_size=1000)
    check_tokenizer(backbone.tokenizer, "--x.model-path", text_vocab_size=49408)


def test_config_rejects_an_empty_timestep_range() -> None:
    with pytest.raises(ValueError, match="min_step_ratio"):
        DiffusionBackboneConfig(min_step_ratio=0.5, max_step_ratio=0.4)


@pytest.mark.gpu
def test_half_precision_backbone_on_the_accelerator_feeds_a_cpu_render(model_dir: Path) -> None:
    """fp16 weights on the accelerator; the caller's image and its gradient stay on the CPU in fp32."""
    accelerator = torch.accelerator.current_accelerator()
    assert accelerator is not None
    config = DiffusionBackboneConfig(model_path=str(model_dir), dtype="float16", device=str(accelerator))
    backbone = config.setup()
    assert next(backbone.unet.parameters()).dtype == torch.float16
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    latents = backbone.encode_images(image)
    assert latents.device.type == "cpu" and latents.dtype == torch.float32
    sds(backbone, latents, backbone.text_embeddings("a cat")).loss.backward()
    assert image.grad is not None and torch.isfinite(image.grad).all() and float(image.grad.abs().sum()) > 0


def test_timestep_range_can_be_overridden_by_a_rule(model_dir: Path) -> None:
    config = DiffusionBackboneConfig(model_path=str(model_dir), anneal="linear", anneal_final_max_step_ratio=0.5)
    backbone = config.setup()
    assert backbone.timestep_range(min_step_ratio=0.05, max_step_ratio=0.95) == (50, 949)
    assert backbone.timestep_range(0, 100, 0.05, 0.95) == (50, 949)
    assert backbone.timestep_range(50, 100, 0.05, 0.95) == (50, round(0.725 * 999)), "anneals from the given max"
    assert backbone.timestep_range(100, 100, 0.6, 0.9) == (round(0.6 * 999),) * 2, "never below the lowest"
    t = backbone.sample_timesteps(4000, generator=torch.Generator().manual_seed(0), min_step_ratio=0.5)
    assert int(t.min()) == round(0.5 * 999) and int(t.max()) == 979
    with pytest.raises(ValueError, match="min_step_ratio < max_step_ratio"):
        backbone.timestep_range(min_step_ratio=0.99)


def _residuals(backbone: DiffusionBackbone, n: int, scale: float, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random residuals of the shapes the UNet takes for 8x8 latents, as trainable leaves."""
    generator = torch.Generator().manual_seed(seed)
    down_shapes, mid_shape = backbone.unet_residual_shapes(8, 8)
    down = [(scale * torch.randn(n, *s, generator=generator)).requires_grad_() for s in down_shapes]
    mid = (scale * torch.randn(n, *mid_shape, generator=generator)).requires_grad_()
    return down, mid


def test_residual_shapes_are_the_controlnet_outputs(backbone: DiffusionBackbone) -> None:
    down_shapes, mid_shape = backbone.unet_residual_shapes(8, 8)
    assert backbone.unet_residual_shapes(8, 8) == (down_shapes, mid_shape), "cached"
    # conv_in and the first block's resnet at 8x8, its downsampler at 4x4, the second (last) block 16 wide.
    assert down_shapes == [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4)] and mid_shape == (16, 4, 4)
    latents, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([300]), backbone.text_embeddings("a head")
    with torch.no_grad():
        down, mid = backbone.controlnet(
            latents, t, encoder_hidden_states=emb, controlnet_cond=torch.rand(1, 3, 16, 16), return_dict=False
        )
    assert [tuple(r.shape[1:]) for r in down] == down_shapes and tuple(mid.shape[1:]) == mid_shape


def test_unet_with_residuals_agrees_with_the_no_grad_path(backbone: DiffusionBackbone) -> None:
    torch.manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    emb = backbone.text_embeddings("a red chair")
    eps_u, eps_c = backbone.noise_predictions(latents, t, emb)
    torch.testing.assert_close(backbone.unet_with_residuals(latents, t, emb), eps_c, atol=1e-5, rtol=1e-4)
    guided = backbone.unet_with_residuals(latents, t, emb, guidance_scale=5.0)
    torch.testing.assert_close(
        guided, backbone.predict_noise(latents, t, emb, guidance_scale=5.0), atol=1e-5, rtol=1e-4
    )
    # A ControlNet's residuals given by hand are what controlnet_cond does inside noise_predictions.
    control = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        down, mid = backbone.controlnet(
            latents,
            t,
            encoder_hidden_states=emb.expand(2, -1, -1),
            controlnet_cond=control.expand(2, -1, -1, -1),
            return_dict=False,
        )
    by_hand = backbone.unet_with_residuals(latents, t, emb, down, mid)
    torch.testing.assert_close(
        by_hand, backbone.noise_predictions(latents, t, emb, controlnet_cond=control)[1], atol=1e-5, rtol=1e-4
    )
    # The no-grad paths stay no-grad even for inputs that require a gradient.
    assert not backbone.predict_noise(latents.requires_grad_(), t, emb).requires_grad


def test_unet_with_residuals_sends_gradients_to_inputs_and_residuals_never_to_weights(
    backbone: DiffusionBackbone,
) -> None:
    torch.manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    text = backbone.text_embeddings("a statue").clone().requires_grad_()
    down, mid = _residuals(backbone, 2, 0.1, seed=0)
    t = torch.tensor([200, 600])
    for guidance_scale in (None, 7.5):
        eps = backbone.unet_with_residuals(latents, t, text, down, mid, guidance_scale=guidance_scale)
        assert eps.shape == (2, 4, 8, 8) and eps.requires_grad
        eps.square().mean().backward()
        assert all(g is None for g in _frozen_grads(backbone)), "frozen weights never get a gradient"
        for residual in [*down, mid]:
            assert residual.grad is not None and float(residual.grad.abs().sum()) > 0
        assert latents.grad is not None and float(latents.grad.abs().sum()) > 0
        assert text.grad is not None and float(text.grad.abs().sum()) > 0
        for leaf in [*down, mid, latents, text]:
            leaf.grad = None
    # The residuals reach the decoder: they change the prediction.
    with torch.no_grad():
        assert (
            backbone.unet_with_residuals(latents, t, text, down, mid) - backbone.unet_with_residuals(latents, t, text)
        ).abs().max() > 1e-4


def test_unet_with_residuals_takes_either_residual_alone_and_checks_them(backbone: DiffusionBackbone) -> None:
    torch.manual_seed(0)
    latents, t, emb = torch.randn(1, 4, 8, 8), torch.tensor([500]), backbone.text_embeddings("a cat")
    down, mid = _residuals(backbone, 1, 0.5, seed=1)
    zero_down, zero_mid = [torch.zeros_like(r) for r in down], torch.zeros_like(mid)
    with torch.no_grad():
        # Down residuals alone are skip-connection residuals (not diffusers' T2I-Adapter reading of them).
        torch.testing.assert_close(
            backbone.unet_with_residuals(latents, t, emb, down),
            backbone.unet_with_residuals(latents, t, emb, down, zero_mid),
        )
        mid_only = backbone.unet_with_residuals(latents, t, emb, mid_block_additional_residual=mid)
        torch.testing.assert_close(mid_only, backbone.unet_with_residuals(latents, t, emb, zero_down, mid))
        assert (mid_only - backbone.unet_with_residuals(latents, t, emb)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="skip connections"):
        backbone.unet_with_residuals(latents, t, emb, down[:-1], mid)
    with pytest.raises(ValueError, match=r"mid_block_additional_residual has shape"):
        backbone.unet_with_residuals(latents, t, emb, down, mid[:, :, :2])
    with pytest.raises(ValueError, match=r"down_block_additional_residuals\[2\] has shape"):
        backbone.unet_with_residuals(latents, t, emb, [*down[:2], down[0], *down[3:]], mid)  # 8x8 where 4x4 goes


def _residual_gradients_cross_precision_and_device(
    model_dir: Path, dtype: Literal["float16", "bfloat16"], device: str | None
) -> None:
    """Half-precision weights (optionally on another device); fp32 CPU latents and residuals still get gradients."""
    backbone = DiffusionBackboneConfig(model_path=str(model_dir), dtype=dtype, device=device).setup()
    down, mid = _residuals(backbone, 1, 0.1, seed=2)
    latents = torch.randn(1, 4, 8, 8, requires_grad=True)
    eps = backbone.unet_with_residuals(latents, 400, backbone.text_embeddings("a cat"), down, mid, guidance_scale=3.0)
    assert eps.device.type == "cpu" and eps.dtype == torch.float32
    eps.square().mean().backward()
    for leaf in [*down, mid, latents]:
        assert leaf.grad is not None and leaf.grad.dtype == torch.float32 and torch.isfinite(leaf.grad).all()
        assert float(leaf.grad.abs().sum()) > 0
    assert all(g is None for g in _frozen_grads(backbone))


def test_residual_gradients_cross_precision(model_dir: Path) -> None:
    _residual_gradients_cross_precision_and_device(model_dir, "bfloat16", None)


@pytest.mark.gpu
def test_residual_gradients_cross_to_a_half_precision_accelerator(model_dir: Path) -> None:
    accelerator = torch.accelerator.current_accelerator()
    assert accelerator is not None
    _residual_gradients_cross_precision_and_device(model_dir, "float16", str(accelerator))
