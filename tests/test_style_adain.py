"""AdaIN stylizer: the normalisation, loading user weights (random ones here, in the released layout), errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mmstyle_ns.style.adain import (
    AdaINConfig,
    AdaINStylizer,
    adaptive_instance_norm,
    build_decoder,
    build_encoder,
    feature_statistics,
)
from mmstyle_ns.style.sources import StyleInputError

SIZE = 48


@pytest.fixture(scope="module")
def weights(adain_weights: tuple[Path, Path]) -> tuple[Path, Path]:
    return adain_weights


@pytest.fixture(scope="module")
def stylizer(weights: tuple[Path, Path]) -> AdaINStylizer:
    return AdaINConfig(vgg_weights=weights[0], decoder_weights=weights[1], content_size=SIZE, style_size=SIZE).setup()


def _image(seed: int, height: int = 40, width: int = 56) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((1, 1, 3)) * np.linspace(0.2, 1.0, width)[None, :, None]
    return np.clip(base + 0.2 * rng.random((height, width, 3)), 0, 1).astype(np.float32)


def test_adaptive_instance_norm_gives_the_style_statistics() -> None:
    generator = torch.Generator().manual_seed(0)
    content = torch.randn(2, 8, 9, 7, generator=generator) * 3 + 1
    style = torch.randn(2, 8, 5, 6, generator=generator) * 0.5 - 2
    stats = feature_statistics(style)
    out = adaptive_instance_norm(content, stats[:, :8], stats[:, 8:])
    torch.testing.assert_close(feature_statistics(out), stats, rtol=1e-4, atol=1e-4)
    # the content's pattern is kept: per channel, an increasing affine map of it
    flat_in, flat_out = content[0, 0].flatten(), out[0, 0].flatten()
    assert torch.equal(flat_in.argsort(), flat_out.argsort())


def test_networks_have_the_released_layout() -> None:
    """Module indices of the convolutions in the released vgg_normalised.pth and decoder.pth."""
    encoder_convs = [i for i, m in enumerate(build_encoder()) if isinstance(m, nn.Conv2d)]
    decoder_convs = [i for i, m in enumerate(build_decoder()) if isinstance(m, nn.Conv2d)]
    assert encoder_convs == [0, 2, 5, 9, 12, 16, 19, 22, 25, 29]
    assert decoder_convs == [1, 5, 8, 11, 14, 18, 21, 25, 28]
    pools = [i for i, m in enumerate(build_encoder()) if isinstance(m, nn.MaxPool2d)]
    assert pools == [7, 14, 27] and all(build_encoder()[i].ceil_mode for i in pools)
    assert not isinstance(build_decoder()[-1], nn.ReLU)  # the decoder ends on its last convolution


def test_weights_load_by_the_order_of_their_convolutions(weights: tuple[Path, Path], stylizer: AdaINStylizer) -> None:
    saved = torch.load(weights[0], weights_only=True)
    convs = [m for m in stylizer.encoder if isinstance(m, nn.Conv2d)]
    torch.testing.assert_close(convs[-1].weight, saved["29.weight"])  # relu4_1's convolution; later layers unused
    # a Sequential without the padding layers (other indices) holds the same convolutions and loads the same
    decoder = [m for m in stylizer.decoder if isinstance(m, nn.Conv2d)]
    compact = nn.Sequential(*[nn.Conv2d(c.in_channels, c.out_channels, 3) for c in decoder])
    compact.load_state_dict({f"{i}.{k}": v for i, c in enumerate(decoder) for k, v in c.state_dict().items()})
    path = weights[1].parent / "compact_decoder.pth"
    torch.save(compact.state_dict(), path)
    other = AdaINConfig(vgg_weights=weights[0], decoder_weights=path, content_size=SIZE, style_size=SIZE).setup()
    image = _image(1)
    vector = stylizer.style_vector(_image(2))
    np.testing.assert_array_equal(other.stylize(image, vector), stylizer.stylize(image, vector))
    assert other.identifier == stylizer.identifier


def test_stylize_keeps_shapes_and_follows_style_and_strength(stylizer: AdaINStylizer) -> None:
    first, second = stylizer.style_vector(_image(2)), stylizer.style_vector(_image(3, 64, 30))
    assert first.shape == (1024,) and not np.allclose(first, second)
    content = np.stack([_image(4), _image(5)])
    out = stylizer.stylize(content, first)
    assert out.shape == content.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(stylizer.stylize(content, second) - out).mean() > 1e-3  # another style, another picture
    np.testing.assert_array_equal(stylizer.stylize(content[0], first), out[0])  # single image, deterministic
    # strength 0 decodes the content's own features: the style no longer matters
    np.testing.assert_allclose(stylizer.stylize(content, first, 0.0), stylizer.stylize(content, second, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match="1024 values"):
        stylizer.stylize(content, first[:100])


def test_missing_or_wrong_weights_name_the_flag(weights: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(StyleInputError) as missing:
        AdaINConfig().setup()
    assert "--pipeline.adain.vgg-weights" in str(missing.value)
    assert "--pipeline.adain.decoder-weights" in str(missing.value)
    assert "--pipeline.stylizer magenta" in str(missing.value)
    with pytest.raises(StyleInputError, match="--pipeline.adain.decoder-weights .* is not a file"):
        AdaINConfig(vgg_weights=weights[0], decoder_weights=tmp_path / "nope.pth").setup()
    with pytest.raises(StyleInputError, match="--pipeline.adain.vgg-weights .*expected"):  # the decoder as VGG
        AdaINConfig(vgg_weights=weights[1], decoder_weights=weights[1]).setup()
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(StyleInputError, match="cannot read --pipeline.adain.decoder-weights"):
        AdaINConfig(vgg_weights=weights[0], decoder_weights=garbage).setup()
