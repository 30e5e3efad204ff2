"""Tests of the multimodal style feature extractor (mmstyle_ns.style.extractor).

Tiny randomly initialised models (a Stable-Diffusion-layout diffusers pipeline, a CLAP model, an open_clip
model) are built here, saved to a temporary folder and loaded back through the config fields a user sets.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from mmstyle_ns.style.cache import StylizedViewCache
from mmstyle_ns.style.extractor import (
    FLAG_PREFIX,
    MultimodalStyleExtractor,
    PreparedStyle,
    StyleExtractorConfig,
    check_tokenizer,
    most_similar,
    similarity,
)
from mmstyle_ns.style.magenta import MagentaStylizer
from mmstyle_ns.style.sources import StyleInputError, StyleSource, load_style_image, parse_style_specs

SIZE = 32
AUDIO_RATE = 16000
PROMPTS = ("heavy rain on a roof", "birds singing at dawn", "a roaring fire", "waves on the shore")


def _letters_vocab(specials: list[str], suffix: str) -> dict[str, int]:
    vocab = {token: i for i, token in enumerate(specials)}
    for c in "abcdefghijklmnopqrstuvwxyz,.":
        for token in (c, c + suffix) if suffix.startswith("<") else (c, suffix + c):
            vocab.setdefault(token, len(vocab))
    return vocab


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Stable-Diffusion-layout pipeline with tiny random weights, saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    vocab = _letters_vocab(["<|startoftext|>", "<|endoftext|>"], "</w>")
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    # Plain dicts: diffusers annotates block tuples as 1-tuples, which type checkers take literally.
    unet_config: dict[str, Any] = {
        "sample_size": SIZE // 2,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 16,
        "attention_head_dim": 2,
        "norm_num_groups": 4,
    }
    vae_config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (8, 16),
        "down_block_types": ("DownEncoderBlock2D",) * 2,
        "up_block_types": ("UpDecoderBlock2D",) * 2,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": SIZE,
    }
    components: dict[str, Any] = {
        "unet": UNet2DConditionModel(**unet_config),
        "vae": AutoencoderKL(**vae_config),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
        ),
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipeline = StableDiffusionPipeline(**components, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("models") / "tiny-sd"
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_clap(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLAP model with tiny random weights and its processor, saved with save_pretrained."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor, RobertaTokenizer

    torch.manual_seed(0)
    vocab = _letters_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "Ġ")
    tokenizer = RobertaTokenizer(vocab=vocab, merges=[])
    config = ClapConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
        },
        audio_config={
            "spec_size": 64,
            "num_mel_bins": 16,
            "window_size": 4,
            "patch_size": 2,
            "patch_stride": 2,
            "depths": [1, 1],
            "num_attention_heads": [2, 2],
            "hidden_size": 32,
            "patch_embeds_hidden_size": 16,
            "num_classes": 4,
        },
        projection_dim=16,
    )
    features = ClapFeatureExtractor(
        feature_size=16,
        sampling_rate=AUDIO_RATE,
        hop_length=160,
        max_length_s=1,
        fft_window_size=256,
        frequency_max=8000,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    folder = tmp_path_factory.mktemp("models") / "tiny-clap"
    ClapModel(config).eval().save_pretrained(folder)
    ClapProcessor(feature_extractor=features, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stylizer() -> MagentaStylizer:
    return MagentaStylizer()


@pytest.fixture
def clip_wav(tmp_path: Path) -> Path:
    t = np.arange(int(0.8 * AUDIO_RATE)) / AUDIO_RATE
    clip = 0.4 * np.sin(2 * np.pi * 330 * t) * np.exp(-2 * t) + 0.05 * np.sin(2 * np.pi * 2000 * t)
    path = tmp_path / "chirp.wav"
    soundfile.write(str(path), clip.astype(np.float32), AUDIO_RATE, subtype="FLOAT")
    return path


def _config(tiny_sd: Path, tiny_clap: Path | None = None, **kw) -> StyleExtractorConfig:
    kw.setdefault("text_to_image_size", SIZE)
    kw.setdefault("text_to_image_steps", 2)
    return StyleExtractorConfig(
        text_to_image_model=str(tiny_sd),
        audio_model=None if tiny_clap is None else str(tiny_clap),
        audio_prompts=PROMPTS,
        **kw,
    )


# ------------------------------------------------------------------------------------------------ checks


def test_check_names_the_flags_before_loading_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    sources = [StyleSource("watercolor", "text", "a watercolor"), StyleSource("rain", "audio", str(tmp_path / "r.wav"))]
    extractor = StyleExtractorConfig(embedding="clip").setup()
    assert isinstance(extractor, MultimodalStyleExtractor)
    for name in ("diffusers", "transformers", "open_clip"):  # importing any of them would now fail
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(StyleInputError) as info:
        extractor.prepare(sources)
    message = str(info.value)
    assert "style 'watercolor' is a text prompt; text styles need a text-to-image model: pass " in message
    assert f"{FLAG_PREFIX}text-to-image-model <hub id or diffusers folder>" in message
    assert "style 'rain' is an audio clip; audio styles need a CLAP model" in message
    assert f"{FLAG_PREFIX}audio-model" in message
    assert f"{FLAG_PREFIX}clip-checkpoint" in message
    assert extractor._pipeline is None and extractor._clap is None and extractor._clip is None
    # Image styles with the default embedding need no model at all.
    StyleExtractorConfig().setup().check([StyleSource("x", "image", "x.png")])


def test_check_rejects_bad_model_locations(tiny_sd: Path, tiny_clap: Path, tmp_path: Path):
    text = [StyleSource("t", "text", "a painting")]
    audio = [StyleSource("a", "audio", "a.wav")]

    def problem(sources, **kw) -> str:
        with pytest.raises(StyleInputError) as info:
            StyleExtractorConfig(**kw).setup().check(sources)
        return str(info.value)

    assert "is not an existing folder" in problem(text, text_to_image_model=str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "without model_index.json" in problem(text, text_to_image_model=str(tmp_path / "empty"))
    broken = tmp_path / "no-unet-weights"
    shutil.copytree(tiny_sd, broken)
    for weights in (broken / "unet").glob("*.safetensors"):
        weights.unlink()
    assert "lacks weights or folders for unet" in problem(text, text_to_image_model=str(broken))
    assert "nor in the local Hugging Face cache" in problem(text, text_to_image_model="nobody-xyz/not-cached-sd")
    assert "multiple of 8" in problem(text, text_to_image_model=str(tiny_sd), text_to_image_size=30)
    assert "lacks config.json or model weights" in problem(
        audio, text_to_image_model=str(tiny_sd), audio_model=str(tmp_path / "empty")
    )
    assert "audio-prompts is empty" in problem(
        audio, text_to_image_model=str(tiny_sd), audio_model=str(tiny_clap), audio_prompts=()
    )
    assert "does not exist" in problem(
        text, text_to_image_model=str(tiny_sd), embedding="clip", clip_checkpoint="./x.pt"
    )
    # A complete configuration passes.
    StyleExtractorConfig(text_to_image_model=str(tiny_sd), audio_model=str(tiny_clap)).setup().check(text + audio)


def test_empty_tokenizer_is_detected(tiny_sd: Path, tmp_path: Path):
    from transformers import CLIPTokenizer

    with pytest.raises(StyleInputError, match="is empty"):
        check_tokenizer(CLIPTokenizer(), "--flag", "somewhere")
    # A pipeline whose tokenizer files lost their vocabulary loads "fine" in transformers 5: we refuse it.
    broken = tmp_path / "sd-empty-tokenizer"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "tokenizer")
    CLIPTokenizer(model_max_length=16).save_pretrained(broken / "tokenizer")
    extractor = _config(broken).setup()
    with pytest.raises(StyleInputError, match=f"is empty.*{FLAG_PREFIX}text-to-image-model"):
        extractor.generate_image("a painting")


# ------------------------------------------------------------------------------------------------ routes


def test_image_styles_get_normalised_magenta_embeddings(stylizer: MagentaStylizer):
    sources = parse_style_specs(["builtin:hubble_deep_field", "builtin:coffee", "again=builtin:coffee"])
    extractor = StyleExtractorConfig(max_image_side=200).setup(stylizer=stylizer)
    prepared = extractor.prepare(sources)
    assert [p.source for p in prepared] == sources
    for style in prepared:
        assert isinstance(style, PreparedStyle) and style.prompt is None
        assert style.image.dtype == np.float32 and max(style.image.shape[:2]) == 200
        assert style.embedding.shape == (100,) and style.embedding.dtype == torch.float32
        assert float(style.embedding.norm()) == pytest.approx(1.0, abs=1e-5)
    expected = stylizer.style_vector(load_style_image(sources[0].path, 200))
    torch.testing.assert_close(prepared[0].embedding, F.normalize(torch.from_numpy(expected), dim=0))
    assert similarity(prepared[1].embedding, prepared[2].embedding) == pytest.approx(1.0, abs=1e-5)
    assert similarity(prepared[0].embedding, prepared[1].embedding) < 0.99
    assert most_similar(prepared[2].embedding, [p.embedding for p in prepared[:2]]) == 1


def test_text_route_is_seeded_and_sized(tiny_sd: Path, stylizer: MagentaStylizer):
    sources = parse_style_specs(["text:a watercolor painting", "text:an oil painting"])
    first = _config(tiny_sd).setup(stylizer=stylizer).prepare(sources)
    again = _config(tiny_sd).setup(stylizer=stylizer).prepare(sources)
    other_seed = _config(tiny_sd, seed=1).setup(stylizer=stylizer).prepare(sources[:1])
    bigger = _config(tiny_sd, text_to_image_size=48).setup(stylizer=stylizer).prepare(sources[:1])
    style = first[0]
    assert style.prompt == "a watercolor painting" and style.source.name == "a_watercolor_painting"
    assert style.image.shape == (SIZE, SIZE, 3) and style.image.dtype == np.float32
    assert 0.0 <= style.image.min() and style.image.max() <= 1.0 and style.image.std() > 0
    assert bigger[0].image.shape == (48, 48, 3)
    np.testing.assert_array_equal(style.image, again[0].image)
    torch.testing.assert_close(style.embedding, again[0].embedding)
    assert np.abs(style.image - other_seed[0].image).mean() > 1e-3
    assert np.abs(style.image - first[1].image).mean() > 1e-4  # the prompt matters
    assert float(style.embedding.norm()) == pytest.approx(1.0, abs=1e-5)


def test_audio_route_picks_the_closest_prompt(tiny_sd: Path, tiny_clap: Path, clip_wav: Path, stylizer):
    from transformers import ClapModel, ClapProcessor

    # Direct computation with the CLAP model loaded by hand.
    model: Any = ClapModel.from_pretrained(tiny_clap).eval()
    processor = ClapProcessor.from_pretrained(tiny_clap)
    audio, rate = soundfile.read(str(clip_wav), dtype="float32")
    assert rate == AUDIO_RATE and len(audio) <= AUDIO_RATE  # no resampling or cropping needed
    with torch.no_grad():
        audio_out = model.get_audio_features(
            **processor.feature_extractor(audio, sampling_rate=rate, return_tensors="pt")
        )
        text_out = model.get_text_features(**processor.tokenizer(list(PROMPTS), padding=True, return_tensors="pt"))
    audio_emb, text_emb = (out if isinstance(out, torch.Tensor) else out.pooler_output for out in (audio_out, text_out))
    expected = (F.normalize(text_emb, dim=-1) @ F.normalize(audio_emb, dim=-1)[0]).numpy()
    assert expected.max() - np.sort(expected)[-2] > 1e-5  # a unique best prompt
    best = PROMPTS[int(expected.argmax())]

    extractor = _config(tiny_sd, tiny_clap).setup(stylizer=stylizer)
    np.testing.assert_allclose(extractor.audio_prompt_scores(clip_wav), expected, atol=1e-5)
    (style,) = extractor.prepare(parse_style_specs([f"mood=audio:{clip_wav}"]))
    assert style.source.modality == "audio" and style.prompt == best
    assert extractor._clap is None and extractor._pipeline is None  # released after prepare
    # The matched prompt then takes the text route.
    np.testing.assert_array_equal(style.image, extractor.generate_image(best))
    # Reordering the prompts does not change the choice.
    reordered = _config(tiny_sd, tiny_clap).setup(stylizer=stylizer)
    reordered.config.audio_prompts = tuple(reversed(PROMPTS))
    assert reordered.match_audio(clip_wav) == best


def test_generated_style_images_are_stored_and_need_no_model_later(
    tiny_sd: Path, tiny_clap: Path, clip_wav: Path, stylizer: MagentaStylizer, tmp_path: Path
):
    models = tmp_path / "models"
    shutil.copytree(tiny_sd, models / "sd")
    shutil.copytree(tiny_clap, models / "clap")
    config = _config(models / "sd", models / "clap")
    store = StylizedViewCache(tmp_path / "store")
    sources = parse_style_specs(["wash=text:a watercolor", f"mood=audio:{clip_wav}"])
    first = config.setup(stylizer=stylizer, store=store).prepare(sources)
    assert all(config.setup(stylizer=stylizer, store=store).is_stored(s) for s in sources)  # same models, at hand
    shutil.rmtree(models)  # e.g. rendering the trained run on another day, with the models gone

    with pytest.raises(StyleInputError, match="is not an existing folder"):  # without the store they are needed
        config.setup(stylizer=stylizer).check(sources)
    later = config.setup(stylizer=stylizer, store=store)
    later.check(sources)
    second = later.prepare(sources)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert a.prompt == b.prompt and torch.equal(a.embedding, b.embedding)
    # (the models are gone: any attempt to load one would have failed)
    # another prompt, or another setting of the generator, is generated anew and needs the model
    with pytest.raises(StyleInputError, match="is not an existing folder"):
        later.check(parse_style_specs(["text:a pencil sketch"]))
    config.seed += 1
    with pytest.raises(StyleInputError, match="is not an existing folder"):
        later.check(sources[:1])
    config.seed -= 1
    # the same folder name with other contents (a retrained model) is another model
    shutil.copytree(tiny_sd, models / "sd")
    shutil.copytree(tiny_clap, models / "clap")
    weights = next((models / "sd" / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    retrained = config.setup(stylizer=stylizer, store=store)
    assert not retrained.is_stored(sources[0]) and not retrained.is_stored(sources[1])
    # an audio clip matched before needs no CLAP model, only the generator (here to redraw its image)
    shutil.rmtree(models / "clap")
    clap_gone = config.setup(stylizer=stylizer, store=store)
    clap_gone.check(sources)
    assert clap_gone.stored_prompt(sources[1]) == first[1].prompt and not clap_gone.is_stored(sources[1])


def test_clip_embedding_of_style_images(tiny_sd: Path, tmp_path: Path):
    import open_clip
    from PIL import Image

    name = "mmstyle-test-tiny-clip"
    config_file = tmp_path / f"{name}.json"
    config_file.write_text(
        json.dumps(
            {
                "embed_dim": 12,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
            }
        )
    )
    open_clip.add_model_config(config_file)
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(name)
    checkpoint = tmp_path / "tiny_clip.pt"
    torch.save(model.state_dict(), checkpoint)

    config = _config(tiny_sd, embedding="clip", clip_model=name, clip_checkpoint=str(checkpoint))
    extractor = config.setup()
    sources = parse_style_specs(["builtin:coffee", "text:a watercolor painting"])
    image_style, text_style = extractor.prepare(sources)
    assert image_style.embedding.shape == (12,) and text_style.embedding.shape == (12,)
    assert float(image_style.embedding.norm()) == pytest.approx(1.0, abs=1e-5)

    loaded, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(checkpoint))
    assert callable(preprocess)
    with torch.no_grad():
        for style in (image_style, text_style):  # text styles are embedded through their generated image
            pixels: Any = preprocess(Image.fromarray(np.round(style.image * 255).astype(np.uint8)))
            direct = F.normalize(loaded.eval().encode_image(pixels[None])[0], dim=0)
            torch.testing.assert_close(style.embedding, direct, atol=1e-5, rtol=1e-4)
    with pytest.raises(StyleInputError, match=f"cannot load {FLAG_PREFIX}clip-checkpoint"):
        StyleExtractorConfig(embedding="clip", clip_model=name, clip_checkpoint="not-a-tag").setup().clip()


def test_similarity_helpers():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])
    assert similarity(a, b) == pytest.approx(2**-0.5)
    assert similarity(a, -a) == pytest.approx(-1.0)
    table = torch.tensor([[0.0, 1.0], [2.0, 0.1], [-1.0, 0.0]])
    assert most_similar(a, table) == 1
    assert most_similar(torch.tensor([0.0, 3.0]), list(table)) == 0
    with pytest.raises(ValueError, match="non-empty"):
        most_similar(a, torch.zeros(0, 2))
