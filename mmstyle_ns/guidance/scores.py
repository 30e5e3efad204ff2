"""Score-distillation rules over a :class:`~mmstyle_ns.guidance.backbone.DiffusionBackbone`.

Each rule returns a :class:`ScoreOutput`: the gradient ``g`` it prescribes for the latents and a surrogate loss
``0.5 * ||z - sg(z - g)||^2`` whose gradient with respect to the latents ``z`` is exactly ``g``. Calling
``backward()`` on the loss sends ``g`` through the encoder to whatever rendered the latents; nothing reaches the
frozen diffusion weights (the UNet runs without an autograd graph and every weight has ``requires_grad=False``).

Rules:
    * :func:`sds` — Score Distillation Sampling (Poole et al., DreamFusion, 2022).
    * :func:`dds` — Delta Denoising Score (Hertz et al., 2023) as used by ED-NeRF (Park et al., arXiv 2310.02712,
      Sec. 3.3), with an optional spatial mask.
    * :func:`likelihood_distillation` — negative log-likelihood distillation with rank-weighted scores (Bilecen et
      al., "Identity Preserving 3D Head Stylization with Multiview Score Distillation", arXiv 2411.13536).
    * helpers of that paper: :func:`rank_weighted_score`, multi-view grids (:func:`pack_grid`,
      :func:`unpack_grid`) and mirror gradients (:func:`flip_horizontal`, :func:`combine_mirror_gradients`,
      :func:`mirror_pair_loss`, :func:`mirror_grid`), and the depth condition of a ControlNet
      (:func:`depth_control_image`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mmstyle_ns.guidance.backbone import DiffusionBackbone

ScoreWeighting = Literal["uniform", "sds", "sqrt_alpha"]
"""Timestep weight ``w(t)``: 'uniform' 1; 'sds' ``1 - alpha_bar_t`` (DreamFusion); 'sqrt_alpha'
``sqrt(alpha_bar_t)`` (= dz_t/dz, the likelihood-distillation chain rule)."""


@dataclass
class ScoreOutput:
    """What a score rule returns."""

    loss: Float[Tensor, ""]
    """Surrogate loss ``0.5 * ||z - sg(z - g)||^2`` (summed); its gradient w.r.t. the latents is ``grad``."""
    grad: Float[Tensor, "B c h w"]
    """The gradient prescribed for the latents (detached)."""
    timesteps: Int[Tensor, " B"]
    """Diffusion timesteps used."""
    noise: Float[Tensor, "B c h w"]
    """Noise added to the latents."""


def timestep_weight(alphas: Float[Tensor, "*bs"], weighting: ScoreWeighting) -> Float[Tensor, "*bs"]:
    """``w(t)`` from ``alpha_bar_t``: 1, ``1 - alpha_bar_t`` or ``sqrt(alpha_bar_t)`` (see :data:`ScoreWeighting`)."""
    if weighting == "uniform":
        return torch.ones_like(alphas)
    if weighting == "sds":
        return 1.0 - alphas
    if weighting == "sqrt_alpha":
        return alphas.sqrt()
    raise ValueError(f"Unknown weighting {weighting!r}")


def surrogate_loss(latents: Float[Tensor, "B c h w"], grad: Float[Tensor, "B c h w"]) -> Float[Tensor, ""]:
    """``0.5 * ||z - sg(z - g)||^2`` summed over all elements: d/dz is ``g``, and no gradient flows into ``g``."""
    if latents.shape != grad.shape:
        raise ValueError(f"latents {tuple(latents.shape)} and grad {tuple(grad.shape)} differ in shape")
    target = (latents.detach().float() - grad.detach().to(latents.device).float()).detach()
    return 0.5 * (latents.float() - target).square().sum()


def _timesteps_and_noise(
    backbone: DiffusionBackbone,
    latents: Tensor,
    timesteps: Tensor | None,
    noise: Tensor | None,
    step: int | None,
    max_steps: int | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    if latents.ndim != 4:
        raise ValueError(f"Expected latents [B, c, h, w], got {tuple(latents.shape)}")
    batch = latents.shape[0]
    if timesteps is None:
        timesteps = backbone.sample_timesteps(batch, step, max_steps, generator)
    timesteps = torch.as_tensor(timesteps).long().reshape(-1).to(latents.device)
    if timesteps.shape[0] == 1:
        timesteps = timesteps.expand(batch)
    if timesteps.shape[0] != batch:
        raise ValueError(f"timesteps has {timesteps.shape[0]} entries for a batch of {batch}")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    elif noise.shape != latents.shape:
        raise ValueError(f"noise {tuple(noise.shape)} does not match latents {tuple(latents.shape)}")
    return timesteps, noise.to(latents.device, latents.dtype)


def _expand(x: Tensor, batch: int, name: str) -> Tensor:
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {batch}")


def _finish(latents: Tensor, grad: Tensor, timesteps: Tensor, noise: Tensor) -> ScoreOutput:
    grad = grad.to(latents.dtype).detach()
    return ScoreOutput(loss=surrogate_loss(latents, grad), grad=grad, timesteps=timesteps, noise=noise)


def sds(
    backbone: DiffusionBackbone,
    latents: Float[Tensor, "B c h w"],
    text_emb: Float[Tensor, "B L D"],
    *,
    uncond_emb: Float[Tensor, "B L D"] | None = None,
    guidance_scale: float | None = None,
    weighting: ScoreWeighting = "sds",
    timesteps: Int[Tensor, " B"] | None = None,
    noise: Float[Tensor, "B c h w"] | None = None,
    controlnet_cond: Float[Tensor, "B 3 H W"] | None = None,
    step: int | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> ScoreOutput:
    """Score Distillation Sampling: ``g = w(t) (eps_hat(z_t; y, t) - eps)``, ``z_t = sqrt(a_t) z + sqrt(1-a_t) eps``.

    ``eps_hat`` is the classifier-free guided prediction (``guidance_scale``, default the backbone's). Timesteps
    are sampled (annealed by ``step``/``max_steps``) and noise drawn unless given. Embeddings and the ControlNet
    condition may have batch 1.
    """
    t, noise = _timesteps_and_noise(backbone, latents, timesteps, noise, step, max_steps, generator)
    noisy = backbone.add_noise(latents.detach(), noise, t)
    eps_hat = backbone.predict_noise(noisy, t, text_emb, guidance_scale, uncond_emb, controlnet_cond)
    grad = timestep_weight(backbone.alphas_at(t, latents), weighting) * (eps_hat.float() - noise.float())
    return _finish(latents, grad, t, noise)


def _resize_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"Expected a mask [B, 1, H, W] or [B, H, W], got {tuple(mask.shape)}")
    mask = mask.to(like.device, torch.float32)
    if tuple(mask.shape[-2:]) != tuple(like.shape[-2:]):
        mask = F.interpolate(mask, size=like.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    return _expand(mask, like.shape[0], "mask")


def dds(
    backbone: DiffusionBackbone,
    latents: Float[Tensor, "B c h w"],
    source_latents: Float[Tensor, "B c h w"],
    target_emb: Float[Tensor, "B L D"],
    source_emb: Float[Tensor, "B L D"],
    *,
    mask: Float[Tensor, "B 1 H W"] | None = None,
    uncond_emb: Float[Tensor, "B L D"] | None = None,
    guidance_scale: float | None = None,
    weighting: ScoreWeighting = "uniform",
    timesteps: Int[Tensor, " B"] | None = None,
    noise: Float[Tensor, "B c h w"] | None = None,
    controlnet_cond: Float[Tensor, "B 3 H W"] | None = None,
    step: int | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> ScoreOutput:
    """Delta Denoising Score: ``g = w(t) (eps_hat(z_t; y_tgt, t) - eps_hat(zs_t; y_src, t))`` (ED-NeRF Sec. 3.3).

    ``z`` are the latents being edited (rendered), ``zs`` the source (original) latents of the same views;
    both are noised with the same ``eps`` and ``t``, so the noise term cancels and only the text-driven
    difference remains. Both predictions (each with classifier-free guidance) come from one UNet call.
    ``mask`` (values in [0, 1], any resolution, resized to the latents) multiplies the gradient: the masked
    variant edits only where the mask is non-zero.
    """
    if source_latents.shape != latents.shape:
        raise ValueError(f"source_latents {tuple(source_latents.shape)} != latents {tuple(latents.shape)}")
    batch = latents.shape[0]
    t, noise = _timesteps_and_noise(backbone, latents, timesteps, noise, step, max_steps, generator)
    noisy = backbone.add_noise(latents.detach(), noise, t)
    noisy_source = backbone.add_noise(source_latents.detach().to(latents.device, latents.dtype), noise, t)
    emb = torch.cat([_expand(target_emb, batch, "target_emb"), _expand(source_emb, batch, "source_emb")])
    if uncond_emb is not None:
        uncond_emb = _expand(uncond_emb, batch, "uncond_emb").repeat(2, 1, 1)
    if controlnet_cond is not None:
        controlnet_cond = _expand(controlnet_cond, batch, "controlnet_cond").repeat(2, 1, 1, 1)
    eps = backbone.predict_noise(
        torch.cat([noisy, noisy_source]), torch.cat([t, t]), emb, guidance_scale, uncond_emb, controlnet_cond
    )
    eps_target, eps_source = eps.float().chunk(2)
    grad = timestep_weight(backbone.alphas_at(t, latents), weighting) * (eps_target - eps_source)
    if mask is not None:
        grad = grad * _resize_mask(mask, latents)
    return _finish(latents, grad, t, noise)


def rank_weighted_score(
    score: Float[Tensor, "B c h w"], weights: Sequence[float], match_statistics: bool = False
) -> Float[Tensor, "B c h w"]:
    """Re-weights the singular values of each sample's score over latent channels (arXiv 2411.13536).

    Per sample, the score is reshaped to ``M = [c, h*w]`` and decomposed ``M = U diag(s) V^T`` (singular values
    descending); the result is ``U diag(w * s) V^T``, e.g. ``w = (1, .75, .5, .25)`` for SD's 4 channels.
    Components beyond ``len(weights)`` are dropped (weight 0); extra weights beyond the rank are ignored; all
    weights 1 with ``len(weights) >= c`` leave the score unchanged. ``match_statistics`` then restores each
    channel's spatial mean and standard deviation to the input's (as the authors' released code does), so the
    weighting changes the structure of the score but not its per-channel scale.
    """
    if score.ndim != 4:
        raise ValueError(f"Expected a score [B, c, h, w], got {tuple(score.shape)}")
    if len(weights) == 0:
        raise ValueError("rank weights must not be empty")
    batch, channels, height, width = score.shape
    matrix = score.float().reshape(batch, channels, height * width)  # [B, c, h*w]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)  # [B, c, r], [B, r], [B, r, h*w]
    rank = s.shape[-1]
    w = torch.zeros(rank, device=s.device)
    given = torch.as_tensor(list(weights)[:rank], dtype=torch.float32, device=s.device)
    w[: given.shape[0]] = given
    out = (u * (s * w)[:, None, :]) @ vh  # [B, c, h*w]
    if match_statistics:
        eps = 1e-5
        mean_in, std_in = matrix.mean(-1, keepdim=True), matrix.std(-1, keepdim=True) + eps
        mean_out, std_out = out.mean(-1, keepdim=True), out.std(-1, keepdim=True) + eps
        out = (out - mean_out) / std_out * std_in + mean_in
    return out.reshape(batch, channels, height, width).to(score.dtype)


def likelihood_distillation(
    backbone: DiffusionBackbone,
    latents: Float[Tensor, "B c h w"],
    text_emb: Float[Tensor, "B L D"],
    *,
    score: Literal["guidance", "full"] = "guidance",
    rank_weights: Sequence[float] | None = (1.0, 0.75, 0.5, 0.25),
    match_statistics: bool = True,
    uncond_emb: Float[Tensor, "B L D"] | None = None,
    guidance_scale: float | None = None,
    weighting: ScoreWeighting = "sqrt_alpha",
    mask: Float[Tensor, "B 1 H W"] | None = None,
    timesteps: Int[Tensor, " B"] | None = None,
    noise: Float[Tensor, "B c h w"] | None = None,
    controlnet_cond: Float[Tensor, "B 3 H W"] | None = None,
    step: int | None = None,
    max_steps: int | None = None,
    generator: torch.Generator | None = None,
) -> ScoreOutput:
    """Negative log-likelihood distillation with a rank-weighted score (arXiv 2411.13536): ``g = w(t) R_W(S)``.

    ``-grad_z log p(z_t | y) = sqrt(a_t) eps_hat / sigma_t`` (chain rule through ``z_t``), so unlike SDS the
    added noise is not subtracted. ``S`` is the score that is decomposed: 'guidance' uses the classifier-free
    guidance direction ``s (eps_c - eps_u)`` (what the authors' released code decomposes), 'full' the whole
    guided prediction ``eps_u + s (eps_c - eps_u)``. ``R_W`` is :func:`rank_weighted_score` with
    ``rank_weights`` (None skips it); ``w(t)`` defaults to ``sqrt(a_t)``, the ``1/sigma_t`` being left to the
    caller's loss weight. ``mask`` multiplies the gradient (e.g. the head's silhouette).
    """
    scale = backbone.config.guidance_scale if guidance_scale is None else guidance_scale
    t, noise = _timesteps_and_noise(backbone, latents, timesteps, noise, step, max_steps, generator)
    noisy = backbone.add_noise(latents.detach(), noise, t)
    eps_uncond, eps_cond = backbone.noise_predictions(noisy, t, text_emb, uncond_emb, controlnet_cond)
    guided = scale * (eps_cond.float() - eps_uncond.float())
    if score == "full":
        guided = guided + eps_uncond.float()
    elif score != "guidance":
        raise ValueError(f"Unknown score {score!r}")
    if rank_weights is not None:
        guided = rank_weighted_score(guided, rank_weights, match_statistics)
    grad = timestep_weight(backbone.alphas_at(t, latents), weighting) * guided
    if mask is not None:
        grad = grad * _resize_mask(mask, latents)
    return _finish(latents, grad, t, noise)


# ---------------------------------------------------------------------- multi-view grids
def pack_grid(views: Float[Tensor, "B C H W"], k: int | None = None) -> Float[Tensor, "G C GH GW"]:
    """Tiles ``k x k`` views into one image per group: ``[G*k*k, C, H, W] -> [G, C, k*H, k*W]``.

    Views fill the grid row-major (view ``i`` of a group at row ``i // k``, column ``i % k``). ``k`` defaults to
    ``sqrt(B)`` (one group). Pure reshapes: exact, differentiable, inverted by :func:`unpack_grid`.
    """
    if views.ndim != 4:
        raise ValueError(f"Expected views [B, C, H, W], got {tuple(views.shape)}")
    batch, channels, height, width = views.shape
    if k is None:
        k = math.isqrt(batch)
    if k < 1 or batch % (k * k):
        raise ValueError(f"{batch} views do not fill {k}x{k} grids")
    groups = batch // (k * k)
    grid = views.reshape(groups, k, k, channels, height, width).permute(0, 3, 1, 4, 2, 5)  # [G, C, k, H, k, W]
    return grid.reshape(groups, channels, k * height, k * width)


def unpack_grid(grid: Float[Tensor, "G C GH GW"], k: int) -> Float[Tensor, "B C H W"]:
    """Splits ``k x k`` grids back into views, ``[G, C, k*H, k*W] -> [G*k*k, C, H, W]``; inverts :func:`pack_grid`."""
    if grid.ndim != 4 or k < 1 or grid.shape[-2] % k or grid.shape[-1] % k:
        raise ValueError(f"Grid {tuple(grid.shape)} does not split into {k}x{k} tiles")
    groups, channels, full_h, full_w = grid.shape
    height, width = full_h // k, full_w // k
    views = grid.reshape(groups, channels, k, height, k, width).permute(0, 2, 4, 1, 3, 5)  # [G, k, k, C, H, W]
    return views.reshape(groups * k * k, channels, height, width)


# ---------------------------------------------------------------------- ControlNet conditions
def depth_control_image(
    depth: Float[Tensor, "B 1 H W"], accumulation: Float[Tensor, "B 1 H W"], threshold: float = 0.5
) -> Float[Tensor, "B 1 H W"]:
    """A rendered depth as a depth ControlNet's condition: inverse depth normalised per view to [0, 1] over the
    pixels whose ``accumulation`` exceeds ``threshold`` (nearest 1, farthest 0), multiplied by the accumulation so
    that empty space is black — the convention of the monocular depth maps such ControlNets are trained on.
    A view without such pixels is all zeros."""
    if depth.shape != accumulation.shape or depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(
            f"Expected depth and accumulation [B, 1, H, W], got {tuple(depth.shape)}, {tuple(accumulation.shape)}"
        )
    inverse = 1.0 / depth.clamp_min(1e-6)
    solid = accumulation > threshold
    big = torch.finfo(inverse.dtype).max
    lo = torch.where(solid, inverse, big).amin(dim=(1, 2, 3), keepdim=True)
    hi = torch.where(solid, inverse, -big).amax(dim=(1, 2, 3), keepdim=True)
    normalised = ((inverse - lo) / (hi - lo).clamp_min(1e-6)).clamp(0.0, 1.0)
    present = solid.flatten(1).any(dim=1).view(-1, 1, 1, 1)
    return torch.where(present, normalised * accumulation.clamp(0.0, 1.0), torch.zeros_like(normalised))


# ---------------------------------------------------------------------- mirror gradients
def flip_horizontal(x: Float[Tensor, "*bs W"]) -> Float[Tensor, "*bs W"]:
    """Mirrors images, latents or gradients left-right (the last axis); applying it twice is the identity."""
    return x.flip(-1)


def mirror_grid(grid: Float[Tensor, "G C GH GW"], k: int) -> Float[Tensor, "G C GH GW"]:
    """Mirrors every tile of ``k x k`` grids in place (tile order kept), unlike :func:`flip_horizontal` of a grid."""
    return pack_grid(flip_horizontal(unpack_grid(grid, k)), k)


def combine_mirror_gradients(
    grad: Float[Tensor, "B c h w"],
    mirror_grad: Float[Tensor, "B c h w"],
    weight: float = 0.5,
    mirror_weight: float = 0.5,
) -> Float[Tensor, "B c h w"]:
    """Gradient of a view combined with its mirrored view's: ``g' = weight * g + mirror_weight * flip(g_mirror)``.

    ``mirror_grad`` is the gradient computed for the view rendered from the symmetric pose (yaw negated);
    flipping it maps it onto this view. With equal weights the two combined gradients are exact mirror images.
    """
    if grad.shape != mirror_grad.shape:
        raise ValueError(f"grad {tuple(grad.shape)} and mirror_grad {tuple(mirror_grad.shape)} differ")
    return weight * grad + mirror_weight * flip_horizontal(mirror_grad.to(grad.device, grad.dtype))


def mirror_pair_loss(
    latents: Float[Tensor, "B c h w"],
    mirror_latents: Float[Tensor, "B c h w"],
    grad: Float[Tensor, "B c h w"],
    weight: float = 0.75,
    mirror_weight: float = 0.25,
) -> Float[Tensor, ""]:
    """Applies one view's gradient to the view and, mirrored, to its symmetric-pose view (arXiv 2411.13536).

    ``weight * 0.5||z - sg(z - g)||^2 + mirror_weight * 0.5||z_m - sg(z_m - flip(g))||^2``: ``z`` receives
    ``weight * g`` and ``z_m`` receives ``mirror_weight * flip(g)``, one score evaluation for both views.
    """
    if mirror_latents.shape != latents.shape:
        raise ValueError(f"mirror_latents {tuple(mirror_latents.shape)} != latents {tuple(latents.shape)}")
    return weight * surrogate_loss(latents, grad) + mirror_weight * surrogate_loss(
        mirror_latents, flip_horizontal(grad)
    )
