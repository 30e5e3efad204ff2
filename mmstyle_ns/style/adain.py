"""AdaIN arbitrary style transfer (Huang and Belongie, `arXiv 1703.06868 <https://arxiv.org/abs/1703.06868>`_),
the 2D stylizer MM-NeRF's supervision comes from in the paper; it runs when the user supplies its weights.

A fixed VGG-19 encoder (up to ``relu4_1``) maps the content and the style image to feature maps; adaptive
instance normalisation gives the content features the style features' per-channel mean and standard deviation,

    ``AdaIN(x, y) = sigma(y) * (x - mu(x)) / sigma(x) + mu(y)``,

and a trained decoder turns the result back into an image. ``strength`` blends the normalised features with the
content's own, ``t = strength * AdaIN(x, y) + (1 - strength) * x``, which is how AdaIN trades content for style.

Weights: the normalised VGG-19 (``vgg_normalised.pth``, its first 1x1 convolution maps RGB in ``[0, 1]`` to the
network's input range) and the decoder (``decoder.pth``), as released with the AdaIN models, saved as state dicts
of ``nn.Sequential`` stacks. They are loaded by the order of their convolutions, so any ``Sequential`` layout of
the same layers loads; a VGG file with layers past ``relu4_1`` loads too (the rest is ignored). Nothing is
downloaded.

The stylizer has the interface of :class:`~mmstyle_ns.style.magenta.MagentaStylizer`: its "style vector" is the
mean and standard deviation of the style image's ``relu4_1`` features (1024 values).
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor, nn

from mmstyle_ns.style.sources import StyleInputError
from mmstyle_ns.style.stylizer import Stylizer, as_float_image

FEATURES = 512
"""Channels of the ``relu4_1`` features AdaIN normalises."""

ENCODER_CONVS: tuple[tuple[int, int, int], ...] = (
    (3, 3, 1),  # colour conversion of the normalised VGG
    (3, 64, 3),  # relu1_1
    (64, 64, 3),  # relu1_2
    (64, 128, 3),  # relu2_1
    (128, 128, 3),  # relu2_2
    (128, 256, 3),  # relu3_1
    (256, 256, 3),  # relu3_2
    (256, 256, 3),  # relu3_3
    (256, 256, 3),  # relu3_4
    (256, 512, 3),  # relu4_1
)
"""``(in, out, kernel)`` of the encoder's convolutions, in order."""

_POOL_AFTER = {2, 4, 8}
"""Encoder convolutions followed by 2x2 max pooling (ends of blocks 1-3)."""

DECODER_CONVS: tuple[tuple[int, int, int], ...] = (
    (512, 256, 3),
    (256, 256, 3),
    (256, 256, 3),
    (256, 256, 3),
    (256, 128, 3),
    (128, 128, 3),
    (128, 64, 3),
    (64, 64, 3),
    (64, 3, 3),
)
"""``(in, out, kernel)`` of the decoder's convolutions, in order."""

_UPSAMPLE_AFTER = {0, 4, 6}
"""Decoder convolutions followed by 2x nearest upsampling."""

FLAG_PREFIX = "--pipeline.adain."
"""Command-line prefix of the options (the pipeline config holds them as ``adain``)."""

_LAYOUT = "a torch state dict of an nn.Sequential (as released with the AdaIN models)"


def _flag(name: str) -> str:
    return FLAG_PREFIX + name.replace("_", "-")


def build_encoder() -> nn.Sequential:
    """The normalised VGG-19 up to ``relu4_1``, with reflection padding (in the layer order of the released file)."""
    layers: list[nn.Module] = []
    for index, (cin, cout, kernel) in enumerate(ENCODER_CONVS):
        if kernel == 1:
            layers.append(nn.Conv2d(cin, cout, 1))
            continue
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, kernel), nn.ReLU()]
        if index in _POOL_AFTER:
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
    return nn.Sequential(*layers)


def build_decoder() -> nn.Sequential:
    """The AdaIN decoder: the encoder's mirror image, nearest-neighbour upsampling instead of pooling."""
    layers: list[nn.Module] = []
    for index, (cin, cout, kernel) in enumerate(DECODER_CONVS):
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(cin, cout, kernel)]
        if index < len(DECODER_CONVS) - 1:
            layers.append(nn.ReLU())
        if index in _UPSAMPLE_AFTER:
            layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
    return nn.Sequential(*layers)


def _conv_keys(state: dict[str, Tensor]) -> list[str]:
    """Prefixes of the convolutions of a ``Sequential`` state dict, in module order."""
    prefixes = [key[: -len(".weight")] for key, value in state.items() if key.endswith(".weight") and value.ndim == 4]

    def order(prefix: str) -> tuple[int, ...]:
        return tuple(int(part) if part.isdigit() else -1 for part in prefix.split("."))

    return sorted(prefixes, key=order)


def read_convolutions(path: Path, flag: str, module: nn.Sequential, allow_extra: bool) -> list[tuple[Tensor, Tensor]]:
    """The ``(weight, bias)`` of a ``Sequential`` state dict's convolutions, in module order, checked against the
    convolutions of ``module`` (a file may hold more after them when ``allow_extra``).

    Raises:
        StyleInputError: the file cannot be read, or its convolutions do not match ``module``'s.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise StyleInputError(
            f"cannot read {flag} {str(path)!r} ({type(exc).__name__}: {reason}); pass {_LAYOUT}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise StyleInputError(f"{flag} {str(path)!r} is not a state dict of tensors; pass {_LAYOUT}")
    convs = [m for m in module if isinstance(m, nn.Conv2d)]
    keys = _conv_keys(state)
    expected = [(tuple(c.weight.shape), (c.out_channels,)) for c in convs]
    found = [
        (tuple(state[k + ".weight"].shape), tuple(state[k + ".bias"].shape) if k + ".bias" in state else None)
        for k in keys
    ]
    if found[: len(convs)] != expected or (not allow_extra and len(found) != len(convs)):
        raise StyleInputError(
            f"{flag} {str(path)!r} holds convolutions (weight, bias shapes) {found}, expected {expected}"
            f"{' (and possibly more after them)' if allow_extra else ''}: is it the right file?"
        )
    return [(state[k + ".weight"], state[k + ".bias"]) for k in keys[: len(convs)]]


def load_convolutions(module: nn.Sequential, path: Path, flag: str, allow_extra: bool) -> None:
    """Loads a ``Sequential`` state dict into ``module`` by the order of their convolutions (see
    :func:`read_convolutions`)."""
    convs = [m for m in module if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, (weight, bias) in zip(convs, read_convolutions(path, flag, module, allow_extra), strict=True):
            assert conv.bias is not None
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)


def adaptive_instance_norm(
    content: Float[Tensor, "B C H W"],
    style_mean: Float[Tensor, "B C"],
    style_std: Float[Tensor, "B C"],
    eps: float = 1e-5,
) -> Float[Tensor, "B C H W"]:
    """Gives each channel of ``content`` the style's mean and standard deviation."""
    mean = content.mean(dim=(2, 3), keepdim=True)
    std = (content.var(dim=(2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    return (content - mean) / std * style_std[..., None, None] + style_mean[..., None, None]


def feature_statistics(features: Float[Tensor, "B C H W"], eps: float = 1e-5) -> Float[Tensor, "B 2C"]:
    """Per-channel mean and standard deviation of feature maps, concatenated."""
    mean = features.mean(dim=(2, 3))
    std = (features.var(dim=(2, 3), unbiased=False) + eps).sqrt()
    return torch.cat([mean, std], dim=1)


@dataclass
class AdaINConfig(InstantiateConfig):
    """AdaIN stylizer (2D supervision with ``--pipeline.stylizer adain``); its weights are not shipped."""

    _target: type = field(default_factory=lambda: AdaINStylizer)
    vgg_weights: Path | None = None
    """Normalised VGG-19 encoder weights (vgg_normalised.pth, a state dict of its nn.Sequential)."""
    decoder_weights: Path | None = None
    """AdaIN decoder weights (decoder.pth, a state dict of its nn.Sequential)."""
    content_size: int = 512
    """Content images are resized so that their shorter side has this many pixels (the result is resized back)."""
    style_size: int = 512
    """Style images are resized so that their shorter side has this many pixels."""
    device: str = "cpu"
    """Device the networks run on (they run once per style and view, before the stylization stage)."""

    def problems(self, read_weights: bool = True) -> list[str]:
        """What is wrong with this configuration (empty when the weights load); ``read_weights`` also reads the
        files and checks their convolutions (without building the networks)."""
        found = []
        files = (
            ("vgg_weights", "vgg_normalised.pth", build_encoder, True),
            ("decoder_weights", "decoder.pth", build_decoder, False),
        )
        for name, usual, build, allow_extra in files:
            value = getattr(self, name)
            if value is None:
                found.append(
                    f"AdaIN needs {_flag(name)} <{usual}: {_LAYOUT}>, and no AdaIN weights ship with the package; "
                    "or use --pipeline.stylizer magenta (offline)"
                )
            elif not Path(value).expanduser().is_file():
                found.append(f"{_flag(name)} {str(value)!r} is not a file; pass {_LAYOUT}")
            elif read_weights:
                try:
                    read_convolutions(Path(value).expanduser(), _flag(name), build(), allow_extra)
                except StyleInputError as error:
                    found.append(str(error))
        for name in ("content_size", "style_size"):
            if getattr(self, name) < 16:
                found.append(f"{_flag(name)} must be at least 16")
        return found


def _resize_short_side(image: Float[Tensor, "1 3 H W"], side: int) -> Float[Tensor, "1 3 h w"]:
    height, width = image.shape[-2:]
    scale = side / min(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size == (height, width):
        return image
    return F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=scale < 1)


class AdaINStylizer(Stylizer):
    """Arbitrary style transfer with AdaIN (interface of :class:`~mmstyle_ns.style.magenta.MagentaStylizer`).

    Args:
        config: weights and sizes.

    Raises:
        StyleInputError: the weights are missing, unreadable or of the wrong network.
    """

    vector_dim = 2 * FEATURES

    def __init__(self, config: AdaINConfig) -> None:
        problems = config.problems(read_weights=False)  # loading below checks the weights
        if problems:
            raise StyleInputError("\n".join(problems))
        assert config.vgg_weights is not None and config.decoder_weights is not None  # checked above
        self.config = config
        self.device = torch.device(config.device)
        self.vgg_path = Path(config.vgg_weights).expanduser()
        self.decoder_path = Path(config.decoder_weights).expanduser()
        self.encoder = build_encoder()
        self.decoder = build_decoder()
        load_convolutions(self.encoder, self.vgg_path, _flag("vgg_weights"), allow_extra=True)
        load_convolutions(self.decoder, self.decoder_path, _flag("decoder_weights"), allow_extra=False)
        self.encoder.to(self.device).eval().requires_grad_(False)
        self.decoder.to(self.device).eval().requires_grad_(False)
        digest = hashlib.sha256(f"adain|{config.content_size}|{config.style_size}|".encode())
        for module in (self.encoder, self.decoder):
            for tensor in module.state_dict().values():
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._identifier = f"adain-{digest.hexdigest()[:16]}"

    @property
    def identifier(self) -> str:
        """Identifies the weights and sizes, e.g. for cache keys."""
        return self._identifier

    def _tensor(self, image: Any, what: str) -> Float[Tensor, "1 3 H W"]:
        array = as_float_image(image, what)
        return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)[None].to(self.device)

    @torch.no_grad()
    def style_vector(self, image: Float[np.ndarray, "H W 3"]) -> Float[np.ndarray, "1024"]:
        """Mean and standard deviation of the style image's ``relu4_1`` features."""
        style = _resize_short_side(self._tensor(image, "style image"), self.config.style_size)
        return feature_statistics(self.encoder(style))[0].float().cpu().numpy()

    def _stylize_one(
        self, image: Float[np.ndarray, "H W 3"], vector: Float[np.ndarray, "1024"], strength: float
    ) -> Float[np.ndarray, "H W 3"]:
        """Encoded at ``content_size``, normalised to the style statistics, decoded and resized back; ``strength``
        blends the normalised features with the content's own before decoding."""
        style = torch.from_numpy(vector).to(self.device)
        mean, std = style[None, :FEATURES], style[None, FEATURES:]
        tensor = self._tensor(image, "content image")
        height, width = tensor.shape[-2:]
        with torch.no_grad():
            features = self.encoder(_resize_short_side(tensor, self.config.content_size))
            mixed = strength * adaptive_instance_norm(features, mean, std) + (1.0 - strength) * features
            decoded = self.decoder(mixed)
        decoded = F.interpolate(decoded, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        return decoded[0].clamp(0.0, 1.0).permute(1, 2, 0).cpu().numpy()
