"""Property tests of the score rules (SDS, DDS, likelihood distillation) and the grid/mirror helpers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.scores import (
    combine_mirror_gradients,
    dds,
    flip_horizontal,
    likelihood_distillation,
    mirror_grid,
    mirror_pair_loss,
    pack_grid,
    rank_weighted_score,
    sds,
    surrogate_loss,
    timestep_weight,
    unpack_grid,
)
from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> DiffusionBackbone:
    root = build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=1)
    return DiffusionBackboneConfig(model_path=str(root), guidance_scale=7.5).setup()


def _latents(batch: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class OracleUNet(nn.Module):
    """Stand-in UNet that predicts exactly the noise added to ``clean``: the ideal denoiser of a point mass."""

    def __init__(self, clean: Tensor, alphas_cumprod: Tensor) -> None:
        super().__init__()
        self.clean, self.alphas_cumprod = clean, alphas_cumprod

    def forward(self, sample: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, **kwargs: Any) -> Any:
        alpha = self.alphas_cumprod[timestep].view(-1, 1, 1, 1)
        clean = self.clean.repeat(sample.shape[0] // self.clean.shape[0], 1, 1, 1)
        return ((sample - alpha.sqrt() * clean) / (1 - alpha).sqrt(),)


# ---------------------------------------------------------------------- SDS
def test_sds_vanishes_when_the_predicted_noise_is_the_added_noise(
    backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    clean = _latents()
    monkeypatch.setattr(backbone, "unet", OracleUNet(clean, backbone.alphas_cumprod))
    emb = backbone.text_embeddings("a cat")
    t = torch.tensor([100, 800])
    at_clean = sds(backbone, clean.clone().requires_grad_(), emb, timesteps=t)
    assert float(at_clean.grad.abs().max()) < 1e-4
    # Away from it the gradient is w(t) sqrt(a)/sigma (z - clean) = sigma sqrt(a) (z - clean) for w = 1 - a.
    moved = clean + 0.3 * _latents(seed=1)
    out = sds(backbone, moved.clone().requires_grad_(), emb, timesteps=t)
    alpha = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, (1 - alpha).sqrt() * alpha.sqrt() * (moved - clean), atol=1e-4, rtol=1e-3)


def test_surrogate_loss_gradient_is_the_score(backbone: DiffusionBackbone) -> None:
    latents = _latents().requires_grad_()
    out = sds(backbone, latents, backbone.text_embeddings("a cat"), generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(out.loss, latents)
    assert float(out.grad.abs().max()) > 0
    torch.testing.assert_close(grad, out.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, 0.5 * out.grad.square().sum(), atol=1e-4, rtol=1e-4)
    low, high = backbone.timestep_range()
    assert out.timesteps.shape == (2,) and low <= int(out.timesteps.min()) <= int(out.timesteps.max()) <= high


def test_sds_is_the_weighted_guided_noise_residual(backbone: DiffusionBackbone) -> None:
    latents, noise, t = _latents(), _latents(seed=3), torch.tensor([300, 600])
    emb = backbone.text_embeddings("a cat")
    out = sds(backbone, latents, emb, timesteps=t, noise=noise, weighting="uniform", guidance_scale=3.0)
    expected = backbone.predict_noise(backbone.add_noise(latents, noise, t), t, emb, guidance_scale=3.0) - noise
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------- DDS
def test_dds_with_equal_prompts_and_latents_is_zero(backbone: DiffusionBackbone) -> None:
    latents = _latents()
    cat, dog = backbone.text_embeddings("a cat"), backbone.text_embeddings("a dog")
    same = dds(backbone, latents.clone().requires_grad_(), latents, cat, cat)
    assert float(same.grad.abs().max()) < 1e-6
    edit = dds(
        backbone, latents.clone().requires_grad_(), latents, dog, cat, timesteps=same.timesteps, noise=same.noise
    )
    assert float(edit.grad.abs().max()) > 1e-3, "a different target prompt must move the latents"
    moved = dds(backbone, _latents(seed=5), latents, cat, cat, timesteps=same.timesteps, noise=same.noise)
    assert float(moved.grad.abs().max()) > 1e-3, "different latents under the same prompt differ too"


def test_dds_is_the_difference_of_two_guided_predictions(backbone: DiffusionBackbone) -> None:
    latents, source, noise, t = _latents(), _latents(seed=1), _latents(seed=2), torch.tensor([250, 750])
    target_emb, source_emb = backbone.text_embeddings("a dog"), backbone.text_embeddings("a cat")
    out = dds(backbone, latents, source, target_emb, source_emb, timesteps=t, noise=noise, weighting="sds")
    eps_t = backbone.predict_noise(backbone.add_noise(latents, noise, t), t, target_emb)
    eps_s = backbone.predict_noise(backbone.add_noise(source, noise, t), t, source_emb)
    alpha = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.grad, (1 - alpha) * (eps_t - eps_s), atol=1e-5, rtol=1e-4)


def test_masked_dds_edits_only_inside_the_mask(backbone: DiffusionBackbone) -> None:
    latents, source = _latents(), _latents(seed=1)
    target_emb, source_emb = backbone.text_embeddings("a dog"), backbone.text_embeddings("a cat")
    full = dds(backbone, latents, source, target_emb, source_emb, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0
    kw: dict[str, Any] = {"timesteps": full.timesteps, "noise": full.noise}
    masked = dds(backbone, latents, source, target_emb, source_emb, mask=mask, **kw)
    assert float(masked.grad[..., :4].abs().max()) == 0.0
    torch.testing.assert_close(masked.grad[..., 4:], full.grad[..., 4:])
    # A mask at image resolution is resized to the latents.
    image_mask = torch.zeros(1, 16, 16)
    image_mask[:, :, 12:] = 1.0
    resized = dds(backbone, latents, source, target_emb, source_emb, mask=image_mask, **kw)
    assert float(resized.grad[..., :4].abs().max()) == 0.0 and float(resized.grad[..., 7:].abs().max()) > 0


# ---------------------------------------------------------------------- likelihood distillation
def test_rank_weights_of_one_leave_the_score_unchanged() -> None:
    score = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rank_weighted_score(score, (1.0, 1.0, 1.0, 1.0)), score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rank_weighted_score(score, (1.0,) * 4, match_statistics=True), score, atol=1e-5, rtol=0)


def test_rank_weights_scale_the_singular_values_over_channels() -> None:
    score = torch.randn(2, 4, 6, 5, generator=torch.Generator().manual_seed(1))
    weights = np.array([1.0, 0.75, 0.5, 0.25])
    out = rank_weighted_score(score, tuple(weights))
    for b in range(2):
        matrix = score[b].reshape(4, 30).double().numpy()
        u, s, vh = np.linalg.svd(matrix, full_matrices=False)
        np.testing.assert_allclose(out[b].reshape(4, 30).numpy(), (u * (s * weights)) @ vh, atol=1e-5)
        np.testing.assert_allclose(
            np.linalg.svd(out[b].reshape(4, 30).numpy(), compute_uv=False), s * weights, rtol=1e-4
        )
    # Fewer weights than channels: the best low-rank approximation (Eckart-Young).
    low = rank_weighted_score(score, (1.0, 1.0))
    s_all = torch.linalg.svdvals(score.reshape(2, 4, 30))
    assert int(torch.linalg.matrix_rank(low[0].reshape(4, 30))) == 2
    torch.testing.assert_close(
        (low - score).reshape(2, -1).norm(dim=-1), s_all[:, 2:].norm(dim=-1), atol=1e-4, rtol=1e-4
    )
    # match_statistics keeps each channel's spatial mean and std but not the values.
    matched = rank_weighted_score(score, tuple(weights), match_statistics=True)
    torch.testing.assert_close(matched.mean((-2, -1)), score.mean((-2, -1)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(matched.std((-2, -1)), score.std((-2, -1)), atol=1e-4, rtol=1e-4)
    assert float((matched - score).abs().max()) > 1e-2
    with pytest.raises(ValueError):
        rank_weighted_score(score, ())


def test_likelihood_distillation_is_the_weighted_guidance_score(backbone: DiffusionBackbone) -> None:
    latents, noise, t = _latents(), _latents(seed=2), torch.tensor([200, 900])
    emb = backbone.text_embeddings("portrait of a werewolf")
    noisy = backbone.add_noise(latents, noise, t)
    eps_u, eps_c = backbone.noise_predictions(noisy, t, emb)
    alpha = backbone.alphas_cumprod[t].view(-1, 1, 1, 1)
    weights = (1.0, 0.75, 0.5, 0.25)
    out = likelihood_distillation(backbone, latents, emb, timesteps=t, noise=noise, rank_weights=weights)
    expected = alpha.sqrt() * rank_weighted_score(7.5 * (eps_c - eps_u), weights, match_statistics=True)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-4)
    full = likelihood_distillation(backbone, latents, emb, timesteps=t, noise=noise, score="full", rank_weights=None)
    guided = backbone.predict_noise(noisy, t, emb)
    torch.testing.assert_close(full.grad, alpha.sqrt() * guided, atol=1e-5, rtol=1e-4)
    # Unlike SDS the added noise is not subtracted; with the empty prompt the guidance score vanishes.
    empty = likelihood_distillation(backbone, latents, backbone.text_embeddings(""), timesteps=t, noise=noise)
    assert float(empty.grad.abs().max()) < 1e-6 and float(out.grad.abs().max()) > 1e-3


@pytest.mark.parametrize("rule", ["sds", "dds", "ld"])
def test_gradients_reach_the_rendered_image_and_never_the_weights(backbone: DiffusionBackbone, rule: str) -> None:
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    latents = backbone.encode_images(image)
    emb = backbone.text_embeddings("a cat")
    if rule == "sds":
        out = sds(backbone, latents, emb)
    elif rule == "dds":
        source = backbone.encode_images(torch.rand(2, 3, 16, 16)).detach()
        out = dds(backbone, latents, source, backbone.text_embeddings("a dog"), emb)
    else:
        out = likelihood_distillation(backbone, latents, emb)
    out.loss.backward()
    assert image.grad is not None and float(image.grad.abs().sum()) > 0
    assert all(p.grad is None for m in backbone.frozen_modules() for p in m.parameters())


def test_timestep_weights() -> None:
    alphas = torch.tensor([0.25, 0.81])
    torch.testing.assert_close(timestep_weight(alphas, "uniform"), torch.ones(2))
    torch.testing.assert_close(timestep_weight(alphas, "sds"), torch.tensor([0.75, 0.19]))
    torch.testing.assert_close(timestep_weight(alphas, "sqrt_alpha"), torch.tensor([0.5, 0.9]))


# ---------------------------------------------------------------------- grids and mirrors
def test_grid_pack_and_unpack_round_trip_exactly() -> None:
    views = torch.randn(2 * 9, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    grid = pack_grid(views, k=3)
    assert grid.shape == (2, 4, 15, 21)
    assert torch.equal(unpack_grid(grid, 3), views)
    assert torch.equal(pack_grid(unpack_grid(grid, 3), 3), grid)
    # Row-major tiles: view 5 of the second group sits at row 1, column 2.
    assert torch.equal(grid[1, :, 5:10, 14:21], views[9 + 5])
    assert pack_grid(views[:4]).shape == (1, 4, 10, 14)  # k inferred from a square batch
    with pytest.raises(ValueError):
        pack_grid(views[:5])
    with pytest.raises(ValueError):
        unpack_grid(grid, 4)


def test_grid_distillation_sends_a_gradient_to_every_view(backbone: DiffusionBackbone) -> None:
    views = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grid = pack_grid(views, k=2)  # [1, 4, 16, 16]: one diffusion input for four views
    out = likelihood_distillation(backbone, grid, backbone.text_embeddings("a statue"), rank_weights=None)
    out.loss.backward()
    assert views.grad is not None
    torch.testing.assert_close(views.grad, unpack_grid(out.grad, 2), atol=1e-5, rtol=1e-4)
    assert all(float(views.grad[i].abs().sum()) > 0 for i in range(4))


def test_mirroring_twice_is_the_identity_and_pairs_are_symmetric() -> None:
    generator = torch.Generator().manual_seed(0)
    grad, mirror = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    assert torch.equal(flip_horizontal(flip_horizontal(grad)), grad)
    assert not torch.equal(flip_horizontal(grad), grad)
    grid = pack_grid(torch.randn(4, 4, 8, 8, generator=generator), k=2)
    assert torch.equal(mirror_grid(mirror_grid(grid, 2), 2), grid)
    assert torch.equal(unpack_grid(mirror_grid(grid, 2), 2), flip_horizontal(unpack_grid(grid, 2)))
    # Equal weights: the combined gradients of a symmetric pair are exact mirror images of each other.
    a = combine_mirror_gradients(grad, mirror, 0.5, 0.5)
    b = combine_mirror_gradients(mirror, grad, 0.5, 0.5)
    torch.testing.assert_close(b, flip_horizontal(a))
    # A view whose mirror already agrees with it keeps its gradient (weights summing to one).
    torch.testing.assert_close(combine_mirror_gradients(grad, flip_horizontal(grad), 0.75, 0.25), grad)
    torch.testing.assert_close(combine_mirror_gradients(grad, mirror, 1.0, 0.0), grad)


def test_mirror_pair_loss_sends_the_flipped_gradient_to_the_mirrored_view() -> None:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator).requires_grad_()
    mirrored = torch.randn(1, 4, 8, 8, generator=generator).requires_grad_()
    grad = torch.randn(1, 4, 8, 8, generator=generator)
    mirror_pair_loss(latents, mirrored, grad, weight=0.75, mirror_weight=0.25).backward()
    assert latents.grad is not None and mirrored.grad is not None
    torch.testing.assert_close(latents.grad, 0.75 * grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirrored.grad, 0.25 * flip_horizontal(grad), atol=1e-5, rtol=1e-5)
    assert surrogate_loss(latents, grad).item() == pytest.approx(0.5 * float(grad.square().sum()), rel=1e-4)
