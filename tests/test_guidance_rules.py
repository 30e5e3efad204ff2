"""Typed score-rule configs: each rule is its pure function, shown by tyro as a subcommand, with checked inputs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import tyro
from torch import Tensor

import mmstyle_ns.guidance.scores as scores_module
from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.rules import (
    DDSConfig,
    DDSRule,
    LDConfig,
    LDRule,
    ScoreInputs,
    ScoreRuleConfig,
    SDSConfig,
    SDSRule,
)
from mmstyle_ns.guidance.scores import dds, likelihood_distillation, sds
from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> DiffusionBackbone:
    root = build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=1)
    return DiffusionBackboneConfig(model_path=str(root)).setup()


def _latents(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _seed(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _autograd(loss_of: Any, latents: Tensor) -> Tensor:
    """Gradient of ``loss_of(z).loss`` on a fresh leaf copy ``z`` of ``latents``."""
    z = latents.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_of(z).loss, z)
    return grad


# ---------------------------------------------------------------------- defaults
def test_config_defaults_are_the_documented_ones() -> None:
    sds_config, dds_config, ld_config = SDSConfig(), DDSConfig(), LDConfig()
    assert (sds_config.guidance_scale, sds_config.min_step_ratio, sds_config.max_step_ratio) == (7.5, 0.02, 0.98)
    assert sds_config.weighting == "sds"
    # Official DDS: t in [50, 950] of 1000, w(t) = 1, CFG 7.5; the masked variant is on when a mask is given.
    assert (dds_config.guidance_scale, dds_config.min_step_ratio, dds_config.max_step_ratio) == (7.5, 0.05, 0.95)
    assert dds_config.weighting == "uniform" and dds_config.use_mask is True
    assert (ld_config.guidance_scale, ld_config.min_step_ratio, ld_config.max_step_ratio) == (7.5, 0.02, 0.98)
    assert ld_config.rank_weights == (1.0, 0.75, 0.5, 0.25) and ld_config.match_statistics is True
    assert ld_config.weighting == "sqrt_alpha" and ld_config.score == "guidance" and ld_config.use_mask is True
    assert isinstance(sds_config.setup(), SDSRule)
    assert isinstance(dds_config.setup(), DDSRule)
    assert isinstance(ld_config.setup(), LDRule)


def test_configs_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="min_step_ratio < max_step_ratio"):
        DDSConfig(min_step_ratio=0.9, max_step_ratio=0.1)
    with pytest.raises(ValueError, match="guidance_scale"):
        SDSConfig(guidance_scale=-1.0)
    with pytest.raises(ValueError, match="rank_weights"):
        LDConfig(rank_weights=())


def test_dds_range_maps_to_timesteps_50_to_950(backbone: DiffusionBackbone) -> None:
    rule = DDSConfig().setup()
    low, high = backbone.timestep_range(min_step_ratio=0.05, max_step_ratio=0.95)
    assert (low, high) == (50, 949)  # ratios of the last index 999, as the backbone's own range
    t = rule.sample_timesteps(backbone, 4000, generator=_seed())
    assert int(t.min()) == 50 and int(t.max()) == 949


# ---------------------------------------------------------------------- tyro
@dataclass
class _MethodConfig:
    """A stand-in method config holding a rule."""

    rule: ScoreRuleConfig = field(default_factory=DDSConfig)
    """Score rule."""


def test_tyro_shows_the_rules_as_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    parsed = tyro.cli(_MethodConfig, args=["rule:sds", "--rule.guidance-scale", "20"])
    assert isinstance(parsed.rule, SDSConfig)
    assert parsed.rule == SDSConfig(guidance_scale=20.0)
    default = tyro.cli(_MethodConfig, args=[])
    assert default.rule == DDSConfig()
    ld = tyro.cli(_MethodConfig, args=["rule:ld", "--rule.rank-weights", "1", "0.5", "--rule.no-use-mask"])
    assert isinstance(ld.rule, LDConfig) and ld.rule.rank_weights == (1.0, 0.5) and ld.rule.use_mask is False
    no_weights = tyro.cli(_MethodConfig, args=["rule:ld", "--rule.rank-weights", "None"])
    assert isinstance(no_weights.rule, LDConfig) and no_weights.rule.rank_weights is None
    with pytest.raises(SystemExit):
        tyro.cli(_MethodConfig, args=["--help"])
    top = capsys.readouterr().out
    assert "rule:sds" in top and "rule:dds" in top and "rule:ld" in top and "(default: rule:dds)" in top
    with pytest.raises(SystemExit):
        tyro.cli(_MethodConfig, args=["rule:dds", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--rule.use-mask" in help_text and "masked DDS" in help_text, "field docstrings become --help"
    assert "(default: 0.05)" in help_text and "(default: 0.95)" in help_text


# ---------------------------------------------------------------------- rules are their functions
def test_sds_rule_is_sds_with_the_same_seed(backbone: DiffusionBackbone) -> None:
    latents = _latents()
    emb = backbone.text_embeddings("a cat")
    rule = SDSConfig(guidance_scale=20.0).setup()
    got = _autograd(lambda z: rule.loss(backbone, ScoreInputs(z, "a cat"), generator=_seed(3)), latents)
    # The backbone samples its own range 0.02..0.98, the SDS default: the function draws the same t and noise.
    want = _autograd(lambda z: sds(backbone, z, emb, guidance_scale=20.0, generator=_seed(3)), latents)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_dds_rule_is_dds_with_the_same_seed(backbone: DiffusionBackbone) -> None:
    latents, source = _latents(seed=0), _latents(seed=1)
    target_emb, source_emb = backbone.text_embeddings("a red car"), backbone.text_embeddings("a car")
    rule = DDSConfig().setup()

    def inputs(z: Tensor) -> ScoreInputs:
        return ScoreInputs(z, "a red car", source_text="a car", source_latents=source)

    out = rule.loss(backbone, inputs(latents.clone()), generator=_seed(5))
    got = _autograd(lambda z: rule.loss(backbone, inputs(z), generator=_seed(5)), latents)
    # The same frozen weights with the DDS range as the backbone's own: dds draws the same t and noise.
    dds_backbone = dataclasses.replace(backbone.config, min_step_ratio=0.05, max_step_ratio=0.95).setup()
    want_out = dds(dds_backbone, latents.clone(), source, target_emb, source_emb, generator=_seed(5))
    want = _autograd(lambda z: dds(dds_backbone, z, source, target_emb, source_emb, generator=_seed(5)), latents)
    assert float(want.abs().max()) > 0
    torch.testing.assert_close(out.timesteps, want_out.timesteps, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_ld_rule_is_likelihood_distillation_with_its_rank_weights(
    backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    latents, emb = _latents(), backbone.text_embeddings("a clown")
    seen: list[tuple[tuple[float, ...], bool]] = []
    original = scores_module.rank_weighted_score

    def spy(score: Tensor, weights: Any, match_statistics: bool = False) -> Tensor:
        seen.append((tuple(weights), match_statistics))
        return original(score, weights, match_statistics)

    monkeypatch.setattr(scores_module, "rank_weighted_score", spy)
    rule = LDConfig().setup()
    got = _autograd(lambda z: rule.loss(backbone, ScoreInputs(z, "a clown"), generator=_seed(7)), latents)
    assert seen == [((1.0, 0.75, 0.5, 0.25), True)], "the rule decomposes with its configured rank weights"
    want = _autograd(lambda z: likelihood_distillation(backbone, z, emb, generator=_seed(7)), latents)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # The weights matter: without the decomposition the gradient differs.
    plain = LDConfig(rank_weights=None).setup()
    unweighted = _autograd(lambda z: plain.loss(backbone, ScoreInputs(z, "a clown"), generator=_seed(7)), latents)
    assert len(seen) == 2, "the function above decomposed once more; rank_weights=None skips it"
    assert float((unweighted - got).abs().max()) > 1e-4


# ---------------------------------------------------------------------- properties and input checks
def test_dds_rule_with_equal_prompts_and_latents_gives_zero_gradient(backbone: DiffusionBackbone) -> None:
    latents = _latents()
    inputs = ScoreInputs(latents.clone(), "a vase", source_text="a vase", source_latents=latents.clone())
    out = DDSConfig().setup().loss(backbone, inputs, generator=_seed())
    assert out.grad.abs().max() == 0 and float(out.loss) == 0.0


def test_dds_rule_without_source_prompt_or_latents_raises(backbone: DiffusionBackbone) -> None:
    rule = DDSConfig().setup()
    latents = _latents()
    with pytest.raises(ValueError, match=r"DDS needs ScoreInputs\.source_text:"):
        rule.loss(backbone, ScoreInputs(latents, "a red car", source_latents=latents))
    with pytest.raises(ValueError, match=r"DDS needs ScoreInputs\.source_latents:"):
        rule.loss(backbone, ScoreInputs(latents, "a red car", source_text="a car"))
    with pytest.raises(ValueError, match=r"source_text and ScoreInputs\.source_latents"):
        rule.loss(backbone, ScoreInputs(latents, "a red car"))


def test_sds_rule_refuses_a_mask_and_ignores_source_inputs(backbone: DiffusionBackbone) -> None:
    rule = SDSConfig().setup()
    latents = _latents()
    with pytest.raises(ValueError, match="SDS has no masked variant"):
        rule.loss(backbone, ScoreInputs(latents, "a cat", mask=torch.ones(2, 1, 16, 16)))
    # One ScoreInputs for every rule: the DDS fields do not change SDS.
    plain = rule.loss(backbone, ScoreInputs(latents, "a cat"), generator=_seed(1))
    full = rule.loss(
        backbone, ScoreInputs(latents, "a cat", source_text="x", source_latents=latents * 0), generator=_seed(1)
    )
    torch.testing.assert_close(plain.grad, full.grad, atol=0, rtol=0)


def test_dds_rule_mask_is_used_unless_turned_off(backbone: DiffusionBackbone) -> None:
    latents, source = _latents(seed=0), _latents(seed=1)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., :4] = 1.0  # the left half of the latents
    inputs = ScoreInputs(latents, "a red car", source_text="a car", source_latents=source, mask=mask)
    masked = DDSConfig().setup().loss(backbone, inputs, generator=_seed(2))
    assert masked.grad[..., 4:].abs().max() == 0 and float(masked.grad[..., :4].abs().max()) > 0
    ignored = DDSConfig(use_mask=False).setup().loss(backbone, inputs, generator=_seed(2))
    unmasked = DDSConfig().setup().loss(backbone, dataclasses.replace(inputs, mask=None), generator=_seed(2))
    torch.testing.assert_close(ignored.grad, unmasked.grad, atol=0, rtol=0)
    assert float(ignored.grad[..., 4:].abs().max()) > 0


def test_rules_share_one_call_and_send_the_gradient_to_the_render(backbone: DiffusionBackbone) -> None:
    image = torch.rand(1, 3, 16, 16, requires_grad=True)
    latents = backbone.encode_images(image)
    source = backbone.encode_images(torch.rand(1, 3, 16, 16)).detach()
    inputs = ScoreInputs(latents, "a bronze statue", source_text="a statue", source_latents=source)
    total = torch.zeros(())
    for config in (DDSConfig(), LDConfig(), SDSConfig()):
        out = config.setup().loss(backbone, inputs, step=10, max_steps=100, generator=_seed(4))
        assert out.grad.shape == latents.shape and out.timesteps.shape == (1,)
        total = total + out.loss
    total.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert all(p.grad is None for module in backbone.frozen_modules() for p in module.parameters())
