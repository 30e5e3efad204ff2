"""Tests of the CLIP loader (mmstyle_ns.clip.loader) and the toy CLIP's training (mmstyle_ns.clip.train).

Every model is a random tiny CLIP (``TINY_CLIP_ARCHITECTURE``) written into a temporary folder. open_clip's model
config registry is global and ``load_clip`` registers ``<name>.json`` only for names open_clip does not know yet,
so each saved model gets a config under a name of its own and every test restores the registry afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmstyle_ns.clip.config import (
    TINY_CLIP_ARCHITECTURE,
    TOY_CLIP_NAME,
    TOY_CLIP_WEIGHTS,
    ClipTrainConfig,
    ToyClipArchitecture,
)
from mmstyle_ns.clip.loader import ClipFlags, ClipLoadError, check_clip, clip_model_config, load_clip
from mmstyle_ns.clip.train import build_model, contrastive_loss, render_pool, save_clip, train_clip_model

CAPTIONS = ["a red cube on grass", "two shiny blue spheres on a wooden floor", "a yellow cylinder on stone"]


def _unique(prefix: str = "tiny-clip") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _write_config(folder: Path, name: str, arch: ToyClipArchitecture) -> Path:
    path = folder / f"{name}.json"
    path.write_text(json.dumps(arch.model_config(), indent=2) + "\n")
    return path


@pytest.fixture(autouse=True)
def _isolated_open_clip_registry() -> Iterator[None]:
    """Restores open_clip's global model-config registry after each test."""
    import open_clip.factory as factory

    configs, paths = dict(factory._MODEL_CONFIGS), list(factory._MODEL_CONFIG_PATHS)
    yield
    factory._MODEL_CONFIGS = configs
    factory._MODEL_CONFIG_PATHS[:] = paths


@dataclass
class SavedClip:
    """A random tiny CLIP in memory (eval mode) and saved as float32 and as float16."""

    model: Any
    tokenizer: Any
    preprocess: Any
    name: str
    """Model name of the config written beside both weight files."""
    folder: Path
    """Folder with float32 weights."""
    half_folder: Path
    """Folder with float16 weights."""

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(texts)), dim=-1)

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray]) -> torch.Tensor:
        from PIL import Image

        pixels = torch.stack([self.preprocess(Image.fromarray(image)) for image in images])
        return F.normalize(self.model.encode_image(pixels), dim=-1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> SavedClip:
    """The tiny CLIP of seed 0, saved twice with ``save_clip`` plus a config under a test-only name."""
    model, preprocess, tokenizer = build_model(TINY_CLIP_ARCHITECTURE, seed=0)
    model.eval()
    name = _unique()
    folders = []
    for half in (False, True):
        folder = tmp_path_factory.mktemp("tiny_clip_half" if half else "tiny_clip")
        save_clip(model, TINY_CLIP_ARCHITECTURE, folder, {"test": True}, half_precision=half)
        _write_config(folder, name, TINY_CLIP_ARCHITECTURE)
        folders.append(folder)
    return SavedClip(model, tokenizer, preprocess, name, folders[0], folders[1])


def _pictures(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8), rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)]


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "weights-file"])
def test_load_gives_unit_embeddings_of_the_model_dim(saved: SavedClip, as_file: bool):
    """A folder or its weights file loads; both encoders return unit vectors of the embedding dim."""
    checkpoint = saved.folder / TOY_CLIP_WEIGHTS if as_file else saved.folder
    clip = load_clip(saved.name, str(checkpoint))
    assert clip.name == saved.name
    assert clip.embed_dim == TINY_CLIP_ARCHITECTURE.embed_dim == 16
    assert clip.image_size == TINY_CLIP_ARCHITECTURE.image_size == 32
    texts = clip.encode_texts(CAPTIONS)
    images = clip.encode_images(_pictures())
    assert texts.shape == (3, 16) and images.shape == (2, 16)
    assert texts.dtype == images.dtype == torch.float32
    torch.testing.assert_close(texts.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(2))
    assert not clip.model.training
    assert clip.encode_texts([]).shape == (0, 16) and clip.encode_images([]).shape == (0, 16)


def test_float32_weights_reproduce_the_saved_model(saved: SavedClip):
    """Weights saved without half precision load back to the same text and image embeddings."""
    clip = load_clip(saved.name, str(saved.folder))
    torch.testing.assert_close(clip.encode_texts(CAPTIONS), saved.text_embeddings(CAPTIONS), atol=1e-6, rtol=0)
    torch.testing.assert_close(clip.encode_images(_pictures()), saved.image_embeddings(_pictures()), atol=1e-5, rtol=0)
    # Different captions embed differently (the comparison above is not between constants).
    embeddings = clip.encode_texts(CAPTIONS)
    assert float((embeddings[0] - embeddings[1]).abs().max()) > 1e-3


def test_half_precision_weights_are_close(saved: SavedClip):
    """float16 weights (half the file) load into the float32 model and embed texts within about 1e-2."""
    clip = load_clip(saved.name, str(saved.half_folder))
    assert next(clip.model.parameters()).dtype == torch.float32
    loaded, original = clip.encode_texts(CAPTIONS), saved.text_embeddings(CAPTIONS)
    assert float((loaded - original).abs().max()) < 1e-2
    full = (saved.folder / TOY_CLIP_WEIGHTS).stat().st_size
    half = (saved.half_folder / TOY_CLIP_WEIGHTS).stat().st_size
    assert half < 0.6 * full


def test_save_clip_layout_loads_under_the_toy_name(tmp_path: Path):
    """``save_clip`` writes toy-clip.json (the architecture's open_clip config), the weights and clip.json."""
    import open_clip.factory as factory

    arch = dataclasses.replace(TINY_CLIP_ARCHITECTURE, embed_dim=24)
    model, _, _ = build_model(arch, seed=1)
    weights = save_clip(model, arch, tmp_path, {"steps": 0})
    assert weights == tmp_path / TOY_CLIP_WEIGHTS
    assert json.loads((tmp_path / f"{TOY_CLIP_NAME}.json").read_text()) == arch.model_config()
    assert json.loads((tmp_path / "clip.json").read_text()) == {"steps": 0}
    factory._MODEL_CONFIGS.pop(TOY_CLIP_NAME, None)  # forget a toy CLIP another test loaded (restored afterwards)
    clip = load_clip(TOY_CLIP_NAME, str(tmp_path))
    assert clip.embed_dim == 24
    assert clip.encode_texts(CAPTIONS[:1]).shape == (1, 24)


def test_open_clip_api_reads_the_saved_files(saved: SavedClip):
    """open_clip's own add_model_config + create_model_and_transforms give load_clip's embeddings."""
    import open_clip

    weights = saved.folder / TOY_CLIP_WEIGHTS
    open_clip.add_model_config(saved.folder / f"{saved.name}.json")
    model, _, preprocess = open_clip.create_model_and_transforms(saved.name, pretrained=str(weights))
    model.eval()
    tokenizer = open_clip.get_tokenizer(saved.name)
    with torch.no_grad():
        direct = F.normalize(model.encode_text(tokenizer(CAPTIONS)), dim=-1)
    clip = load_clip(saved.name, str(weights))
    torch.testing.assert_close(clip.encode_texts(CAPTIONS), direct, atol=1e-6, rtol=0)
    torch.testing.assert_close(direct, saved.text_embeddings(CAPTIONS), atol=1e-6, rtol=0)


def test_tokenizer_is_open_clip_bpe(saved: SavedClip):
    """The tokenizer gives ViT-B-32's BPE ids, padded to the toy context of 32 tokens instead of 77."""
    import open_clip

    clip = load_clip(saved.name, str(saved.folder))
    ours = clip.tokenizer(["a red cube on grass"])
    reference = open_clip.get_tokenizer("ViT-B-32")(["a red cube on grass"])
    assert ours.shape == (1, 32) and reference.shape == (1, 77)
    length = int((reference[0] != 0).sum())
    assert length == 7  # start, five words, end
    assert ours[0, :length].tolist() == reference[0, :length].tolist()
    assert ours[0, 0] == 49406 and ours[0, length - 1] == 49407
    assert not ours[0, length:].any() and not reference[0, length:].any()


def test_encode_images_takes_any_size_uint8_or_float(saved: SavedClip):
    """Pictures of any size, uint8 or float in [0, 1], embed alike (the float version of a uint8 picture too)."""
    clip = load_clip(saved.name, str(saved.folder))
    pictures = _pictures()
    as_uint8 = clip.encode_images(pictures)
    as_float = clip.encode_images([p.astype(np.float32) / 255.0 for p in pictures])
    assert as_uint8.shape == as_float.shape == (2, 16)
    torch.testing.assert_close(as_float, as_uint8, atol=1e-3, rtol=0)
    # An [N, H, W, 3] array works as well, in batches.
    batch = np.stack([pictures[0], pictures[0][::-1].copy(), pictures[0][:, ::-1].copy()])
    batched = clip.encode_images(batch, batch_size=2)
    assert batched.shape == (3, 16)
    torch.testing.assert_close(batched[0], as_uint8[0], atol=1e-5, rtol=0)
    assert float((batched[0] - batched[1]).abs().max()) > 1e-4  # the flipped picture is another picture
    with pytest.raises(ValueError, match="RGB"):
        clip.encode_images([pictures[0][..., :2]])


# ---------------------------------------------------------------- errors


def _load_error(model_name: str, checkpoint: str | None, flags: ClipFlags | None = None) -> str:
    with pytest.raises(ClipLoadError) as info:
        load_clip(model_name, checkpoint, flags=flags or ClipFlags())
    assert isinstance(info.value, ValueError)
    return str(info.value)


def test_missing_checkpoint_names_the_flag(saved: SavedClip):
    """No checkpoint (None or blank) is a ClipLoadError naming the checkpoint flag."""
    for checkpoint in (None, "  "):
        message = _load_error(saved.name, checkpoint)
        assert "needs weights" in message and "--clip-checkpoint" in message


def test_nonexistent_file_and_folder_without_weights(tmp_path: Path, saved: SavedClip):
    """A missing weights file, or a folder without open_clip_model.safetensors, names the checkpoint flag."""
    message = _load_error(saved.name, str(tmp_path / "missing.safetensors"))
    assert "does not exist" in message and "--clip-checkpoint" in message and "missing.safetensors" in message
    empty = tmp_path / "empty"
    empty.mkdir()
    _write_config(empty, saved.name, TINY_CLIP_ARCHITECTURE)
    message = _load_error(saved.name, str(empty))
    assert "folder without" in message and TOY_CLIP_WEIGHTS in message and "--clip-checkpoint" in message


def test_unknown_model_name_without_config(saved: SavedClip):
    """A model name open_clip does not know, with no ``<name>.json`` beside the weights, names the model flag."""
    unknown = _unique("no-such-clip")
    message = _load_error(unknown, str(saved.folder))
    assert "--clip-model" in message and unknown in message and f"{unknown}.json" in message


@pytest.mark.parametrize(
    "change", [{"text_width": 32}, {"vision_width": 16}, {"embed_dim": 32}], ids=["text", "vision", "embed"]
)
def test_weights_of_another_architecture_do_not_fit(tmp_path: Path, saved: SavedClip, change: dict[str, int]):
    """TINY weights under a config with other widths fail with 'does not fit', naming both flags."""
    (tmp_path / TOY_CLIP_WEIGHTS).write_bytes((saved.folder / TOY_CLIP_WEIGHTS).read_bytes())
    name = _unique("wider-clip")
    _write_config(tmp_path, name, dataclasses.replace(TINY_CLIP_ARCHITECTURE, **change))
    assert check_clip(name, str(tmp_path)) == []  # the setting looks fine until the tensors are read
    message = _load_error(name, str(tmp_path))
    assert "do not fit" in message and name in message
    assert "--clip-checkpoint" in message and "--clip-model" in message


@pytest.mark.parametrize("file_name", [TOY_CLIP_WEIGHTS, "weights.pt"])
def test_unreadable_weights_are_a_load_error(tmp_path: Path, file_name: str):
    """A weights file that is no checkpoint passes check_clip (nothing is read) but fails as ClipLoadError."""
    (tmp_path / file_name).write_bytes(b"these are not the weights you are looking for")
    name = _unique()
    _write_config(tmp_path, name, TINY_CLIP_ARCHITECTURE)
    checkpoint = str(tmp_path / file_name)
    assert check_clip(name, checkpoint) == []
    message = _load_error(name, checkpoint)
    assert "cannot load" in message and "--clip-checkpoint" in message


def test_custom_flag_names_appear_in_messages(tmp_path: Path, saved: SavedClip):
    """The caller's own flag names replace the default ones in every message."""
    flags = ClipFlags(model="--x.clip-model", checkpoint="--x.clip-checkpoint")
    messages = [
        _load_error(saved.name, None, flags),
        _load_error(saved.name, str(tmp_path / "nope.safetensors"), flags),
        _load_error(_unique("no-such-clip"), str(saved.folder), flags),
    ]
    for message in messages:
        assert "--x.clip-checkpoint" in message or "--x.clip-model" in message
        assert "--clip-checkpoint" not in message and "--clip-model" not in message
    assert "--x.clip-checkpoint" in messages[0] and "--x.clip-model" in messages[2]
    assert check_clip(saved.name, None, flags)[0] == messages[0]


def test_check_clip_accepts_a_good_setting_without_loading(saved: SavedClip, monkeypatch: pytest.MonkeyPatch):
    """check_clip and clip_model_config validate a good setting with open_clip's loaders switched off."""
    import open_clip
    import open_clip.factory as factory

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("check_clip must not load a model")

    for module in (open_clip, factory):
        monkeypatch.setattr(module, "create_model_and_transforms", refuse)
        monkeypatch.setattr(module, "create_model", refuse)
    monkeypatch.setattr(factory, "load_checkpoint", refuse)
    assert check_clip(saved.name, str(saved.folder)) == []
    assert check_clip(saved.name, str(saved.folder / TOY_CLIP_WEIGHTS)) == []
    assert clip_model_config(saved.name, str(saved.folder)) == TINY_CLIP_ARCHITECTURE.model_config()
    assert check_clip(saved.name, None) != []  # the same call does report a bad setting
    with pytest.raises(ClipLoadError, match="not an open_clip model name"):
        clip_model_config(_unique("no-such-clip"), str(saved.folder))


# ---------------------------------------------------------------- training


def _features(batch: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    texts = F.normalize(images + 0.5 * torch.randn(batch, dim, generator=generator), dim=-1)
    return images, texts


def test_contrastive_loss_with_distinct_labels_is_clip_loss():
    """With distinct labels (any values) the loss is open_clip's ClipLoss."""
    from open_clip.loss import ClipLoss

    images, texts = _features(6, 8, seed=0)
    scale = torch.tensor(14.3)
    reference = ClipLoss()(images, texts, scale)
    for labels in (torch.arange(6), torch.tensor([5, 3, 9, 0, 2, 7])):
        ours = contrastive_loss(images, texts, scale, labels)
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert float(reference) > 0.1  # not a degenerate batch


def test_contrastive_loss_treats_a_shared_caption_as_joint_positive():
    """Pictures sharing a caption are joint positives: swapping their texts changes nothing; targets split evenly."""
    images, texts = _features(5, 8, seed=1)
    scale = torch.tensor(10.0)
    shared, distinct = torch.tensor([0, 0, 1, 2, 3]), torch.arange(5)
    swapped = texts[[1, 0, 2, 3, 4]]
    as_shared = contrastive_loss(images, texts, scale, shared)
    torch.testing.assert_close(contrastive_loss(images, swapped, scale, shared), as_shared)
    as_distinct_swapped = contrastive_loss(images, swapped, scale, distinct)
    assert float(as_distinct_swapped) > float(contrastive_loss(images, texts, scale, distinct)) + 0.1
    assert float(contrastive_loss(images, swapped, scale, shared)) < float(as_distinct_swapped)
    # By hand: images e0, e1 and texts e0, e1 at scale 1 give logits I; one caption for both makes every row's
    # target (1/2, 1/2): -(1 + 0) / 2 + log(e + 1); as two captions it is CLIP's -1 + log(e + 1).
    eye = torch.eye(2)
    one_caption = contrastive_loss(eye, eye, torch.tensor(1.0), torch.tensor([4, 4]))
    assert float(one_caption) == pytest.approx(np.log(np.e + 1.0) - 0.5, abs=1e-6)
    two_captions = contrastive_loss(eye, eye, torch.tensor(1.0), torch.tensor([4, 7]))
    assert float(two_captions) == pytest.approx(np.log(np.e + 1.0) - 1.0, abs=1e-6)


def test_tiny_training_run_lowers_the_loss():
    """Fifteen steps of the tiny CLIP on 64 generated pictures lower the loss (last five below first five)."""
    pixels, specs = render_pool(0, 64, image_size=32, workers=1)
    assert pixels.shape == (64, 3, 32, 32) and pixels.dtype == torch.float16 and len(specs) == 64
    model, _, tokenizer = build_model(TINY_CLIP_ARCHITECTURE, seed=0)
    before = model.text_projection.detach().clone()
    config = ClipTrainConfig(
        seed=0, steps=15, batch_size=32, architecture=TINY_CLIP_ARCHITECTURE, workers=1, quiet=True
    )
    losses = train_clip_model(model, tokenizer, pixels, specs, config, torch.device("cpu"))
    assert len(losses) == 15 and all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert not torch.equal(model.text_projection.detach(), before)
    assert 1.0 <= float(model.logit_scale.detach().exp()) <= 100.0
