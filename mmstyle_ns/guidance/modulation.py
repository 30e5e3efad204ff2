"""Multi-view modulation of a frozen diffusion UNet: a trainable copy of its encoder whose zero-initialised 1x1
convolutions produce the residuals that :meth:`DiffusionBackbone.unet_with_residuals` adds to the frozen decoder.

The copy is diffusers' own ``ControlNetModel.from_unet`` (encoder blocks, mid block, time and text embeddings
copied from the UNet; one zero 1x1 convolution per skip connection and one after the mid block). Two changes make
it a TuneMV3D modulator rather than an image ControlNet:

* its main input is a *latent* (the 3-D field's rendered ``x_0`` prediction), which the copied ``conv_in`` already
  takes, so nothing downsamples it;
* ControlNet's conditioning embedding (three stride-2 convolutions for pixel-space hints) is replaced by a light
  encoder of the raw noisy latent ``x_t`` at latent resolution (:class:`RawNoiseEncoder`), or by nothing
  (:class:`NoRawInput`, the supplement's ablation without raw noise).

At initialisation every residual is exactly zero, so the modulated UNet predicts what the frozen UNet predicts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

__all__ = ["MultiViewModulator", "NoRawInput", "RawNoiseEncoder"]


class RawNoiseEncoder(nn.Module):
    """Light encoder of the noisy latent ``x_t`` at latent resolution; its last convolution starts at zero.

    Args:
        in_channels: latent channels.
        hidden: width of the hidden convolutions.
        out_channels: channels of the copied ``conv_in`` output it is added to.
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
        )
        self.conv_out = nn.Conv2d(hidden, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        assert self.conv_out.bias is not None
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, noisy: Float[Tensor, "N c h w"]) -> Float[Tensor, "N C h w"]:
        return self.conv_out(self.net(noisy))


class NoRawInput(nn.Module):
    """Stands in for :class:`RawNoiseEncoder` when the raw noisy latent is not fed to the modulator: adds nothing."""

    def forward(self, noisy: Float[Tensor, "N c h w"]) -> Float[Tensor, ""]:
        return noisy.new_zeros(())


class MultiViewModulator(nn.Module):
    """Trainable copy of a UNet's encoder mapping rendered ``x_0`` latents (and the noisy ``x_t``) to decoder residuals.

    Args:
        unet: the frozen ``diffusers.UNet2DConditionModel`` to copy (its weights are copied, never shared).
        raw_noise: feed the raw noisy latent through :class:`RawNoiseEncoder` (False: the ablation without it).
        raw_hidden: width of the raw-noise encoder.
        takes_features: the main input is already a first-level feature map (``block_out_channels[0]`` channels,
            e.g. rendered by a field that predicts features directly): the copied ``conv_in`` is dropped.
    """

    def __init__(self, unet: Any, raw_noise: bool = True, raw_hidden: int = 32, takes_features: bool = False) -> None:
        super().__init__()
        from diffusers import ControlNetModel

        extra = unet.config.get("addition_embed_type")
        if extra not in (None, "text"):
            raise ValueError(
                f"MultiViewModulator supports UNets without extra conditioning or with text pooling, not "
                f"addition_embed_type={extra!r} (e.g. SDXL's size and crop conditioning)"
            )
        channels = int(unet.config.in_channels)
        encoder: Any = ControlNetModel.from_unet(unet, conditioning_channels=channels)
        if hasattr(unet, "add_embedding") and unet.add_embedding is not None:
            # from_unet builds the text-pooling embedding with ControlNet's default head count (64), which a narrow
            # text width cannot split (AttentionPooling needs width // heads > 0): take the UNet's own module
            encoder.add_embedding = copy.deepcopy(unet.add_embedding)
        first = int(unet.config.block_out_channels[0])
        encoder.controlnet_cond_embedding = RawNoiseEncoder(channels, raw_hidden, first) if raw_noise else NoRawInput()
        if takes_features:
            encoder.conv_in = nn.Identity()
        self.encoder = encoder.to(dtype=torch.float32).requires_grad_(True).train()
        self.raw_noise = raw_noise

    def forward(
        self,
        x0: Float[Tensor, "N c h w"],
        noisy: Float[Tensor, "N c h w"],
        t: Int[Tensor, " N"],
        text_emb: Float[Tensor, "N L D"],
    ) -> tuple[list[Float[Tensor, "N C hi wi"]], Float[Tensor, "N Cm hm wm"]]:
        """Residuals for every skip connection of the UNet (in order) and for its mid block.

        Args:
            x0: rendered ``x_0`` predictions (the copied encoder's main input), or first-level features when the
                modulator ``takes_features``.
            noisy: the noisy latents ``x_t`` of the same views.
            t: timesteps.
            text_emb: prompt embeddings of the frozen text encoder.
        """
        parameter = next(self.encoder.parameters())
        dtype = parameter.dtype
        down, mid = self.encoder(
            x0.to(dtype),
            t,
            encoder_hidden_states=text_emb.to(x0.device, dtype),
            controlnet_cond=noisy.to(dtype),
            return_dict=False,
        )
        return list(down), mid

    def zero_outputs(self) -> bool:
        """Whether every output convolution is still exactly zero (the modulator then adds nothing)."""
        blocks = [*self.encoder.controlnet_down_blocks, self.encoder.controlnet_mid_block]
        return all(not bool(p.detach().abs().max() > 0) for b in blocks for p in b.parameters())
