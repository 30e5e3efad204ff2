"""Training views are encoded to VAE latents once and cached by the VAE's contents and the view's pixels."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mmstyle_ns.data.latents import (
    LatentCache,
    encode_dataset,
    encode_views,
    model_key_for,
    prepare_view,
    vae_input_size,
    view_key_for,
)
from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD-like model whose VAE downsamples by 8, like Stable Diffusion's."""
    return build_tiny_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", vae_channels=(8, 8, 8, 8), seed=0)


def _backbone(path: Path) -> DiffusionBackbone:
    return DiffusionBackboneConfig(model_path=str(path)).setup()


@pytest.fixture(scope="module")
def backbone(model_dir: Path) -> DiffusionBackbone:
    return _backbone(model_dir)


def _views(n: int = 3, height: int = 32, width: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, height, width, 3, generator=torch.Generator().manual_seed(seed))


class _CountingEncoder:
    """Wraps ``backbone.encode_images`` and counts the images it encodes."""

    def __init__(self, backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        original = backbone.encode_images

        def counting(images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self.images += images.shape[0]
            return original(images, *args, **kwargs)

        monkeypatch.setattr(backbone, "encode_images", counting)


def test_output_shape_is_latent_channels_at_one_eighth(backbone: DiffusionBackbone) -> None:
    assert backbone.vae_scale_factor == 8
    latents = encode_views(backbone, _views(3, 32, 24))
    assert latents.shape == (3, backbone.latent_channels, 4, 3) and latents.dtype == torch.float32


def test_latents_are_the_scaled_vae_encoding(backbone: DiffusionBackbone) -> None:
    views = _views(2)
    with torch.no_grad():
        direct = backbone.encode_images(views.permute(0, 3, 1, 2).contiguous())
    assert torch.equal(encode_views(backbone, views, batch_size=2), direct)


def test_cached_latents_equal_fresh_ones_and_skip_the_vae(
    backbone: DiffusionBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = _views(3)
    fresh = encode_views(backbone, views, batch_size=2)
    counter = _CountingEncoder(backbone, monkeypatch)
    cache = LatentCache(tmp_path / "latents")
    first = encode_views(backbone, views, cache, batch_size=2)
    assert counter.images == 3 and (cache.hits, cache.misses) == (0, 3)
    again = encode_views(backbone, views, LatentCache(tmp_path / "latents"), batch_size=2)
    assert counter.images == 3, "the second run reads every view from disk"
    assert torch.equal(first, fresh) and torch.equal(again, fresh)


def test_a_changed_view_recomputes_only_that_view(
    backbone: DiffusionBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    views = _views(3)
    cache = LatentCache(tmp_path)
    before = encode_views(backbone, views, cache)
    counter = _CountingEncoder(backbone, monkeypatch)
    changed = views.clone()
    changed[1, 5, 7] = 1.0 - changed[1, 5, 7]
    after = encode_views(backbone, changed, cache)
    assert counter.images == 1 and (cache.hits, cache.misses) == (2, 3 + 1)
    assert torch.equal(after[[0, 2]], before[[0, 2]]) and not torch.equal(after[1], before[1])
    assert torch.equal(after[1], encode_views(backbone, changed[1:2])[0])


def test_identical_views_are_encoded_once(
    backbone: DiffusionBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    view = _views(1)[0]
    counter = _CountingEncoder(backbone, monkeypatch)
    latents = encode_views(backbone, [view, view.clone(), view.numpy()], LatentCache(tmp_path))
    assert counter.images == 1 and torch.equal(latents[0], latents[2])


def test_a_corrupt_entry_is_recomputed(backbone: DiffusionBackbone, tmp_path: Path) -> None:
    views = _views(2)
    cache = LatentCache(tmp_path)
    expected = encode_views(backbone, views, cache)
    path = cache.path(model_key_for(backbone), view_key_for(views[0], (32, 24)))
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert cache.load(model_key_for(backbone), view_key_for(views[0], (32, 24))) is None
    again = encode_views(backbone, views, cache)
    assert (cache.hits, cache.misses) == (1, 2 + 1)
    assert torch.equal(again[1], expected[1])
    # Re-encoded alone rather than in a batch of two: equal to a fresh single encoding, to rounding otherwise.
    assert torch.equal(again[0], encode_views(backbone, views[:1])[0])
    torch.testing.assert_close(again[0], expected[0], rtol=0.0, atol=1e-6)
    path.write_bytes(b"")  # a truncated file too
    assert torch.equal(encode_views(backbone, views, cache)[0], again[0]) and cache.misses == 4


def test_model_key_follows_the_vae_contents_not_its_path(
    backbone: DiffusionBackbone, model_dir: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL

    copied = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    assert model_key_for(_backbone(copied)) == model_key_for(backbone), "a copied model keeps its latents"

    retrained = Path(shutil.copytree(model_dir, tmp_path / "retrained"))
    vae = AutoencoderKL.from_pretrained(retrained / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1.5)  # "retraining": other weights, same files, same size
    vae.save_pretrained(retrained / "vae")
    other = _backbone(retrained)
    assert model_key_for(other) != model_key_for(backbone)

    rescaled = Path(shutil.copytree(model_dir, tmp_path / "rescaled"))
    config_path = rescaled / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["scaling_factor"] = 0.5
    config_path.write_text(json.dumps(config))
    assert model_key_for(_backbone(rescaled)) != model_key_for(backbone), "the VAE config is part of the key"

    cache = LatentCache(tmp_path / "cache")
    views = _views(2)
    ours = encode_views(backbone, views, cache)
    theirs = encode_views(other, views, cache)
    assert (cache.hits, cache.misses) == (0, 4) and not torch.equal(ours, theirs)


def test_sizes_not_multiple_of_eight_are_resized_to_the_nearest_multiple(backbone: DiffusionBackbone) -> None:
    assert vae_input_size(30, 21, 8) == (32, 24) and vae_input_size(35, 36, 8) == (32, 40)
    assert vae_input_size(3, 64, 8) == (8, 64)
    views = _views(2, 30, 21)
    latents = encode_views(backbone, views)
    assert latents.shape == (2, 4, 4, 3)
    resized = torch.stack([prepare_view(v, (32, 24)) for v in views])
    with torch.no_grad():
        assert torch.equal(latents, backbone.encode_images(resized))
    assert encode_views(backbone, views, size=(16, 16)).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match="multiples"):
        encode_views(backbone, views, size=(30, 21))
    with pytest.raises(ValueError, match="pass size"):
        encode_views(backbone, [views[0], _views(1, 64, 64)[0]])


def test_rgba_views_are_composited_over_the_background(backbone: DiffusionBackbone, tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    rgba = torch.rand(1, 16, 16, 4, generator=generator)
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    grey = (0.2, 0.4, 0.6)
    composite = rgb * alpha + torch.tensor(grey) * (1.0 - alpha)
    cache = LatentCache(tmp_path)
    assert torch.equal(encode_views(backbone, rgba, cache, background=grey), encode_views(backbone, composite))
    white = encode_views(backbone, rgba, cache)
    assert cache.misses == 2, "the background is part of an RGBA view's key"
    assert torch.equal(white, encode_views(backbone, rgb * alpha + (1.0 - alpha)))
    assert view_key_for(rgb[0], (16, 16), grey) == view_key_for(rgb[0], (16, 16)), "RGB keys ignore it"


def test_uint8_views_and_bad_inputs(backbone: DiffusionBackbone) -> None:
    views = (_views(2) * 255).round().to(torch.uint8)
    assert torch.equal(encode_views(backbone, views), encode_views(backbone, views.float() / 255.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        encode_views(backbone, views.float())
    with pytest.raises(ValueError, match="No views"):
        encode_views(backbone, [])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        encode_views(backbone, [np.zeros((8, 8, 2), np.float32)])


class _Dataset:
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def get_image_float32(self, image_idx: int) -> torch.Tensor:
        return self.images[image_idx]


def test_encode_dataset_reads_every_image(backbone: DiffusionBackbone, tmp_path: Path) -> None:
    views = _views(3)
    cache = LatentCache(tmp_path)
    latents = encode_dataset(backbone, _Dataset(views), cache, batch_size=2)
    assert torch.equal(latents, encode_views(backbone, views, batch_size=2)) and cache.misses == 3


def test_importing_loads_no_diffusion_library() -> None:
    code = (
        "import sys, mmstyle_ns.data.latents, mmstyle_ns.fields.refinement; "
        "print(sorted({'diffusers', 'transformers'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
