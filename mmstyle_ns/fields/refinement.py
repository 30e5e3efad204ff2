"""The refinement layer of ED-NeRF: pixel interactions over a rendered latent image.

ED-NeRF (Park et al., "ED-NeRF: Efficient Text-Guided Editing of 3D Scene with Latent Space NeRF",
arXiv 2310.02712, section 3.2) renders Stable Diffusion's VAE latents with a NeRF. Every ray is rendered on its
own, but in the VAE's latent space neighbouring pixels interfere through the ResNet and self-attention layers
of its encoder and decoder; a latent NeRF without those interactions reconstructs deformed views. The
refinement layer restores them: ResNet blocks and a spatial self-attention block applied to the rendered
latent image (a patch or a whole view), trained jointly with the NeRF.

:class:`RefinementLayer` starts as the identity (its last convolution is zero and the network is a residual
branch, ``out = x + f(x)``), so the first stage of training starts from the plain latent NeRF.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

__all__ = ["RefinementLayer", "RefinementLayerConfig", "ResnetBlock", "SpatialSelfAttention"]


@dataclass
class RefinementLayerConfig(InstantiateConfig):
    """Configuration of the ED-NeRF refinement layer (ResNet blocks and self-attention over latent pixels)."""

    _target: type = field(default_factory=lambda: RefinementLayer)
    channels: int = 4
    """Latent channels of the rendered image, in and out; the caller sets it from the VAE (``latent_channels``)."""
    hidden_channels: int = 64
    """Width of the ResNet blocks and the attention block."""
    num_res_blocks: int = 2
    """Number of ResNet blocks (GroupNorm-SiLU-conv twice, with a residual), before the attention block."""
    use_attention: bool = True
    """Apply spatial self-attention over all h*w latent pixels after the ResNet blocks (global interactions)."""
    num_heads: int = 1
    """Attention heads; must divide hidden_channels (Stable Diffusion's VAE uses one)."""
    num_groups: int = 32
    """GroupNorm groups; must divide hidden_channels."""

    def __post_init__(self) -> None:
        if self.channels < 1 or self.hidden_channels < 1 or self.num_res_blocks < 0 or self.num_heads < 1:
            raise ValueError(
                "Need channels >= 1, hidden_channels >= 1, num_res_blocks >= 0 and num_heads >= 1, got "
                f"{self.channels}, {self.hidden_channels}, {self.num_res_blocks}, {self.num_heads}"
            )
        if self.num_groups < 1 or self.hidden_channels % self.num_groups:
            raise ValueError(f"num_groups={self.num_groups} must divide hidden_channels={self.hidden_channels}")
        if self.hidden_channels % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_channels={self.hidden_channels}")


class ResnetBlock(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with 3x3 convolutions at a constant width.

    Args:
        channels: input and output channels.
        num_groups: GroupNorm groups (must divide ``channels``).
    """

    def __init__(self, channels: int, num_groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B C h w"]:
        """Applies the block."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over the ``h*w`` pixels of a feature map, with a residual.

    ``x + W_o softmax(Q K^T / sqrt(d)) V`` where ``Q, K, V`` are linear maps of the group-normalised pixels;
    every output pixel attends to every pixel of the same image (memory grows with ``(h*w)^2``).

    Args:
        channels: feature channels (the token width).
        num_heads: attention heads (must divide ``channels``).
        num_groups: GroupNorm groups (must divide ``channels``).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.to_qkv = nn.Linear(channels, 3 * channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Float[Tensor, "B C h w"]) -> Float[Tensor, "B C h w"]:
        """Applies the block."""
        batch, channels, height, width = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, h*w, C]
        qkv = self.to_qkv(tokens).reshape(batch, height * width, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, h*w, C/heads]
        attended = F.scaled_dot_product_attention(q, k, v)
        attended = attended.transpose(1, 2).reshape(batch, height * width, channels)  # [B, h*w, C]
        out = self.to_out(attended).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out


class RefinementLayer(nn.Module):
    """ED-NeRF's refinement layer (arXiv 2310.02712, section 3.2): ``out = x + f(x)`` on rendered latents.

    ``f`` is a 3x3 convolution to ``hidden_channels``, ``num_res_blocks`` :class:`ResnetBlock` s, an optional
    :class:`SpatialSelfAttention` block over all latent pixels, then GroupNorm-SiLU and a 3x3 convolution back
    to ``channels``. That last convolution is initialised to zero (weights and bias), so **the layer starts as
    the identity** and stage-1 training starts from the plain latent NeRF; its first gradient step moves only
    that convolution, after which every parameter receives gradients.

    It is fully convolutional plus global attention, so it accepts patches and whole latent views of any size
    (zero padding at the borders). Attention mixes pixels within one input: a patch attends within the patch.

    Args:
        config: the layer's configuration (``config.channels`` set from the VAE).
    """

    def __init__(self, config: RefinementLayerConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        self.conv_in = nn.Conv2d(config.channels, hidden, kernel_size=3, padding=1)
        self.res_blocks = nn.ModuleList(ResnetBlock(hidden, config.num_groups) for _ in range(config.num_res_blocks))
        self.attention = (
            SpatialSelfAttention(hidden, config.num_heads, config.num_groups) if config.use_attention else None
        )
        self.norm_out = nn.GroupNorm(config.num_groups, hidden, eps=1e-6)
        self.conv_out = nn.Conv2d(hidden, config.channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        if self.conv_out.bias is not None:
            nn.init.zeros_(self.conv_out.bias)

    def residual(self, latents: Float[Tensor, "B c h w"]) -> Float[Tensor, "B c h w"]:
        """The learned correction ``f(x)`` (zero at initialisation)."""
        h = self.conv_in(latents)
        for block in self.res_blocks:
            h = block(h)
        if self.attention is not None:
            h = self.attention(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, latents: Float[Tensor, "B c h w"]) -> Float[Tensor, "B c h w"]:
        """Refines rendered latent images (patches or whole views).

        Args:
            latents: rendered latents, ``[B, channels, h, w]`` with any ``h, w >= 1``.

        Returns:
            Refined latents of the same shape, dtype and device.

        Raises:
            ValueError: the input is not ``[B, channels, h, w]``.
        """
        if latents.ndim != 4 or latents.shape[1] != self.config.channels:
            raise ValueError(f"Expected latents [B, {self.config.channels}, h, w], got {tuple(latents.shape)}")
        return latents + self.residual(latents)
