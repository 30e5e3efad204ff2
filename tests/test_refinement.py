"""ED-NeRF's refinement layer starts as the identity, trains every parameter, mixes pixels and can deblur."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mmstyle_ns.fields.refinement import RefinementLayer, RefinementLayerConfig


def _layer(use_attention: bool = True, seed: int = 0) -> RefinementLayer:
    torch.manual_seed(seed)
    config = RefinementLayerConfig(
        channels=4, hidden_channels=16, num_res_blocks=1, num_groups=4, num_heads=2, use_attention=use_attention
    )
    layer = config.setup()
    assert isinstance(layer, RefinementLayer)
    return layer


def _train_step(layer: RefinementLayer, latents: Tensor, target: Tensor, lr: float = 1e-2) -> None:
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    optimizer.zero_grad()
    F.mse_loss(layer(latents), target).backward()
    optimizer.step()


@pytest.mark.parametrize("size", [(16, 16), (8, 12), (5, 7)])
def test_starts_as_the_identity(size: tuple[int, int]) -> None:
    layer = _layer()
    latents = torch.randn(2, 4, *size)
    assert torch.equal(layer(latents), latents)
    assert torch.count_nonzero(layer.conv_out.weight) == 0


def test_gradients_reach_every_parameter_after_one_step() -> None:
    layer = _layer()
    latents, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    F.mse_loss(layer(latents), target).backward()
    out_params = {id(p) for p in layer.conv_out.parameters()}
    for name, param in layer.named_parameters():
        assert param.grad is not None, name
        if id(param) in out_params:
            assert float(param.grad.abs().max()) > 0.0, f"{name}: the zero convolution learns first"
        else:
            assert torch.count_nonzero(param.grad) == 0, f"{name}: behind a zero convolution, no gradient yet"

    _train_step(layer, latents, target)
    layer.zero_grad()
    F.mse_loss(layer(latents), target).backward()
    silent = [name for name, p in layer.named_parameters() if p.grad is None or float(p.grad.abs().max()) == 0.0]
    assert silent == []


@pytest.mark.parametrize("size", [(16, 16), (8, 12), (5, 7), (1, 3)])
def test_output_shape_on_any_size(size: tuple[int, int]) -> None:
    layer = _layer()
    latents = torch.randn(3, 4, 8, 8)
    _train_step(layer, latents, latents.flip(-1))
    out = layer(torch.randn(3, 4, *size))
    assert out.shape == (3, 4, *size) and out.dtype == torch.float32
    assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize("use_attention", [True, False])
def test_mixes_neighbouring_pixels_after_training(use_attention: bool) -> None:
    layer = _layer(use_attention).double()
    latents = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    bumped = latents.clone()
    bumped[0, :, 8, 8] += 1.0

    def change(a: Tensor, b: Tensor) -> Tensor:
        with torch.no_grad():
            return (layer(a) - layer(b)).abs().amax(dim=1)[0]  # [h, w]

    at_init = change(bumped, latents)
    assert float(at_init[8, 8]) == pytest.approx(1.0)
    at_init[8, 8] = 0.0
    assert torch.count_nonzero(at_init) == 0, "the identity does not mix pixels"

    _train_step(layer, latents, torch.roll(latents, 1, dims=-1))
    after = change(bumped, latents)
    assert float(after[8, 7]) > 1e-4 and float(after[7, 8]) > 1e-4, "neighbours influence each other"
    # Beyond the convolutions' 3-pixel reach the whole image still reacts: through attention and GroupNorm statistics.
    assert int((after > 1e-8).sum()) == 16 * 16 and float(after[0, 0]) > 1e-6


def _blur(latents: Tensor) -> Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16.0).expand(latents.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(latents, (1, 1, 1, 1), mode="replicate"), kernel, groups=latents.shape[1])


def _blocky_latents(n: int, generator: torch.Generator) -> Tensor:
    """Piecewise-constant latent images (4x4 blocks of 4x4 pixels): sharp edges that a blur visibly smears."""
    return F.interpolate(torch.randn(n, 4, 4, 4, generator=generator), scale_factor=4, mode="nearest")


def test_learns_to_sharpen_a_blurred_latent_image_better_than_the_identity() -> None:
    generator = torch.Generator().manual_seed(0)
    train, held_out = _blocky_latents(8, generator), _blocky_latents(8, generator)
    layer = _layer(seed=1)
    optimizer = torch.optim.Adam(layer.parameters(), lr=3e-3)
    identity_error = F.mse_loss(_blur(held_out), held_out).item()
    for _ in range(50):
        optimizer.zero_grad()
        F.mse_loss(layer(_blur(train)), train).backward()
        optimizer.step()
    with torch.no_grad():
        refined_error = F.mse_loss(layer(_blur(held_out)), held_out).item()
    assert refined_error < 0.5 * identity_error, (refined_error, identity_error)


def test_rejects_latents_with_other_channels() -> None:
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        _layer()(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError):
        _layer()(torch.randn(4, 8, 8))


@pytest.mark.parametrize(
    "kwargs", [{"hidden_channels": 30, "num_groups": 4}, {"hidden_channels": 16, "num_heads": 3}, {"channels": 0}]
)
def test_config_rejects_inconsistent_widths(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RefinementLayerConfig(**{"num_groups": 4, **kwargs})
