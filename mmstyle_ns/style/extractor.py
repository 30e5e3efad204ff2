"""MM-NeRF's Multimodal Style Feature Extractor (MSFE): every style becomes a style image and an embedding.

MM-NeRF (`arXiv 2309.13607 <https://arxiv.org/abs/2309.13607>`_, Sec. 3.3) projects all style modalities
into one space by turning them into images first and encoding the images:

* image styles are used as they are;
* text styles are rendered into a style image by a text-to-image Stable-Diffusion pipeline;
* audio styles are matched to text: the clip is embedded with CLAP and compared (cosine) with the CLAP text
  embeddings of ``audio_prompts``; the best prompt then takes the text route. This is how audio reaches a
  style image without an audio-conditioned image generator.

The style image supervises 2D stylization of the training views; the embedding (Magenta's 100-d style
vector by default, or CLIP's image embedding) measures similarity between styles. Embeddings are
L2-normalised.

Every model is a config field that takes a hub id or a local folder/file, loaded with the library's own
loader. :meth:`MultimodalStyleExtractor.check` validates the configuration against the requested styles
before anything heavy is loaded, so a missing model fails with one message naming the flag to set.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from mmstyle_ns.clip.loader import ClipFlags, ClipLoadError, ClipModel, check_clip, clip_model_config, load_clip
from mmstyle_ns.style.cache import StylizedViewCache
from mmstyle_ns.style.magenta import MagentaStylizer, MissingDependencyError
from mmstyle_ns.style.sources import StyleInputError, StyleSource, load_audio, load_style_image
from mmstyle_ns.style.stylizer import as_float_image

FLAG_PREFIX = "--pipeline.model.style-extractor."
"""Command-line prefix of the extractor's options (the model config holds it as ``style_extractor``)."""

DEFAULT_AUDIO_PROMPTS = (
    "a dark stormy painting of thunder and heavy rain",
    "a bright cheerful painting of birds singing on a spring morning",
    "a calm blue watercolor of ocean waves on a beach",
    "a fiery red and orange painting of a crackling fire",
    "an energetic colorful abstract painting of loud electronic music",
    "a soft impressionist painting of gentle piano music",
    "a cold grey painting of howling wind in winter",
    "a busy city street at night painted in neon colors",
)
"""Style descriptions an audio clip is matched against when no other prompts are configured."""

_GENERATED = "generated-style-image"
_AUDIO_MATCH = "audio-match"
"""Namespaces (first key) of the extractor's entries in its store."""

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_DIFFUSERS_LAYOUT = (
    "a diffusers folder holding model_index.json and unet/, vae/, text_encoder/, tokenizer/, scheduler/ "
    "(as written by pipeline.save_pretrained(folder))"
)
_CLAP_LAYOUT = (
    "a transformers CLAP folder holding config.json, model.safetensors (or pytorch_model.bin), the tokenizer "
    "files and the feature-extractor config (as written by model.save_pretrained(folder) and "
    "processor.save_pretrained(folder))"
)


@dataclass
class StyleExtractorConfig(InstantiateConfig):
    """Configuration of :class:`MultimodalStyleExtractor`."""

    _target: type = field(default_factory=lambda: MultimodalStyleExtractor)
    embedding: Literal["magenta", "clip"] = "magenta"
    """Embedding space: Magenta's 100-d style vector (offline) or CLIP's style-image embedding (clip-checkpoint)."""
    clip_model: str = "ViT-B-32"
    """open_clip model name (architecture) used when embedding is clip, e.g. ViT-B-32, ViT-L-14, or toy-clip (the
    toy CLIP of the embedded world, whose config ships beside its weights)."""
    clip_checkpoint: str | None = None
    """CLIP weights for embedding clip: an open_clip checkpoint file, a folder holding open_clip_model.safetensors
    (e.g. examples/toy-clip), or a pretrained tag in the local cache."""
    text_to_image_model: str | None = None
    """Hub id or diffusers folder of a text-to-image pipeline rendering text and audio styles as style images."""
    text_to_image_steps: int = 30
    """Denoising steps of the text-to-image pipeline."""
    text_to_image_size: int | None = None
    """Side of the square generated style images (a multiple of 8); default: the model's own resolution (512 for
    Stable Diffusion 1.x, 128 for the toy teacher)."""
    text_to_image_guidance: float = 7.5
    """Classifier-free guidance scale of the text-to-image pipeline."""
    seed: int = 0
    """Seed of the text-to-image generator (same seed and prompt give the same style image)."""
    audio_model: str | None = None
    """Hub id or folder of a CLAP model (ClapModel + ClapProcessor) that matches audio styles to audio-prompts."""
    audio_prompts: tuple[str, ...] = DEFAULT_AUDIO_PROMPTS
    """Style descriptions an audio clip is matched to (CLAP cosine); the best one is rendered as a text style."""
    max_image_side: int = 1024
    """Style images are downscaled so that their longer side is at most this many pixels."""
    device: str = "cpu"
    """Device the CLIP, CLAP and text-to-image models run on."""
    offline: bool = True
    """Never download: models are loaded from local folders or the local Hugging Face cache only."""
    release_generators: bool = True
    """Free the text-to-image and CLAP models once prepare() has produced all style images."""


@dataclass
class PreparedStyle:
    """A style ready for training: its style image and its embedding."""

    source: StyleSource
    """The style as the user gave it."""
    image: Float[np.ndarray, "H W 3"]
    """Style image, float32 in ``[0, 1]`` (given, or generated from text/audio)."""
    embedding: Float[Tensor, " D"]
    """L2-normalised style embedding (CPU, float32)."""
    prompt: str | None = None
    """Prompt the style image was generated from (text styles, and the matched prompt of audio styles)."""


def similarity(a: Float[Tensor, " D"], b: Float[Tensor, " D"]) -> float:
    """Cosine similarity of two embeddings."""
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))


def most_similar(embedding: Float[Tensor, " D"], embeddings: Float[Tensor, "S D"] | Sequence[Tensor]) -> int:
    """Index of the embedding in ``embeddings`` with the highest cosine similarity to ``embedding``."""
    table = embeddings if isinstance(embeddings, Tensor) else torch.stack([e.flatten() for e in embeddings])
    if table.ndim != 2 or table.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [S, D] table, got shape {tuple(table.shape)}")
    scores = F.cosine_similarity(table.float(), embedding.flatten().float()[None], dim=1)
    return int(scores.argmax())


def check_tokenizer(tokenizer: Any, flag: str, where: str) -> None:
    """Fails loudly on a tokenizer without regular tokens.

    transformers 5.x can load a tokenizer offline as an EMPTY one (only special tokens, vocab size 2) without
    raising; a model fed by it would silently see every prompt as the same few ids.
    """
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", []))
    if not [token for token in vocab if token not in special]:
        raise StyleInputError(
            f"the tokenizer loaded from {where} is empty (vocabulary of {len(vocab)} special tokens): its vocabulary "
            f"files are missing or could not be read offline; point {flag} at a folder with complete tokenizer "
            "files (tokenizer.json, or vocab.json + merges.txt)"
        )


def _model_output_features(output: Any) -> Tensor:
    """Projected features from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if isinstance(pooled, Tensor):
        return pooled
    raise TypeError(f"unexpected output of a get_*_features call: {type(output).__name__}")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(
        p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in folder.iterdir()
    )


def _looks_like_path(value: str) -> bool:
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.count("/") > 1
        or Path(value).suffix in _WEIGHT_SUFFIXES
    )


def _in_hub_cache(repo_id: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError:  # not a valid repo id
        return False


def model_fingerprint(value: str | None, index_file: str) -> str:
    """What identifies a model's contents, cheaply: for a folder, its files' names, sizes and modification times
    and its JSON configs' text; for a hub id, the cached snapshot (its commit) that would be loaded."""
    if value is None:
        return "none"
    path = Path(value).expanduser()
    if path.is_dir():
        digest = hashlib.sha256(b"folder|")
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}|{stat.st_size}|{stat.st_mtime_ns}|".encode())
            if file.suffix == ".json":
                digest.update(file.read_bytes())
        return f"folder:{digest.hexdigest()}"
    snapshot = None
    try:
        from huggingface_hub import try_to_load_from_cache

        snapshot = try_to_load_from_cache(value, index_file)
    except (ImportError, ValueError):
        pass
    return f"hub:{value}:{snapshot if isinstance(snapshot, str) else 'not-cached'}"


class MultimodalStyleExtractor:
    """Turns image, text and audio styles into style images and embeddings (MM-NeRF's MSFE, Sec. 3.3).

    Args:
        config: the extractor configuration.
        stylizer: Magenta stylizer whose style vectors serve as ``"magenta"`` embeddings; built on first use
            when not given (pass the one the model already holds to share it).
        flags: how a command other than ns-train spells some options (field name to flag), for error messages;
            the others are named as ns-train's flags (the run's configuration).
        store: where generated style images are kept (``None``: generated every time).
    """

    def __init__(
        self,
        config: StyleExtractorConfig,
        stylizer: MagentaStylizer | None = None,
        flags: Mapping[str, str] | None = None,
        store: StylizedViewCache | None = None,
    ) -> None:
        self.config = config
        self.flags = dict(flags or {})
        """Command-line spelling of options, by field name, where a command names them other than ns-train."""
        self._fingerprints: dict[str, np.ndarray | None] = {}
        self.store = store
        """On-disk store of generated style images (and audio clips' matched prompts): a text or audio style is
        generated once; later runs, and renders of a trained run, read it and need no model for it. Entries are
        keyed by the prompt and the generator's settings, and record the model's contents (file names, sizes,
        times, configs): when the model is at hand and has changed (retrained), the style is generated again."""
        self._stylizer = stylizer
        self._pipeline: Any = None
        self._clap: tuple[Any, Any] | None = None
        self._clip: ClipModel | None = None

    def _flag(self, name: str) -> str:
        return self.flags.get(name, FLAG_PREFIX + name.replace("_", "-"))

    # ------------------------------------------------------------------------------------------- checks

    def check(self, sources: Sequence[StyleSource]) -> None:
        """Validates the configuration for these styles without loading any model. Text and audio styles whose
        style images are in :attr:`store` need no model.

        Raises:
            StyleInputError: a text/audio style without the models it needs, a CLIP embedding without weights,
                a model path that does not exist or lacks weights, or invalid numbers. All problems found are
                listed in one message.
        """
        cfg = self.config
        problems: list[str] = []
        if cfg.embedding not in ("magenta", "clip"):
            problems.append(f"unknown embedding {cfg.embedding!r}: pass {self._flag('embedding')} magenta or clip")
        generated = [s for s in sources if s.modality in ("text", "audio") and not self.is_stored(s)]
        # audio clips matched before need no CLAP model, only the generator for their (stored) prompt
        unmatched = [s for s in generated if s.modality == "audio" and self.stored_prompt(s) is None]
        for source in generated:
            if source.modality == "text" and cfg.text_to_image_model is None:
                problems.append(
                    f"style '{source.name}' is a text prompt; text styles need a text-to-image model: pass "
                    f"{self._flag('text_to_image_model')} <hub id or diffusers folder> ({_DIFFUSERS_LAYOUT})"
                )
            if source.modality == "audio":
                if source in unmatched and cfg.audio_model is None:
                    problems.append(
                        f"style '{source.name}' is an audio clip; audio styles need a CLAP model to match the clip "
                        f"to a style prompt: pass {self._flag('audio_model')} <hub id or CLAP folder> ({_CLAP_LAYOUT})"
                    )
                if cfg.text_to_image_model is None:
                    problems.append(
                        f"style '{source.name}' is an audio clip; its matched prompt is rendered by a text-to-image "
                        f"model: pass {self._flag('text_to_image_model')} <hub id or diffusers folder> "
                        f"({_DIFFUSERS_LAYOUT})"
                    )
                if source in unmatched and not self.audio_prompts:
                    problems.append(
                        f"style '{source.name}' is an audio clip but {self._flag('audio_prompts')} is empty; pass the "
                        "style descriptions to match it against"
                    )
        needs_generator = bool(generated)
        if needs_generator and cfg.text_to_image_model is not None:
            problems += self._check_text_to_image(cfg.text_to_image_model)
            size = cfg.text_to_image_size
            if size is not None and (size < 8 or size % 8):
                problems.append(f"{self._flag('text_to_image_size')} must be a positive multiple of 8")
            if cfg.text_to_image_steps < 1:
                problems.append(f"{self._flag('text_to_image_steps')} must be at least 1")
        if unmatched and cfg.audio_model is not None:
            problems += self._check_clap(cfg.audio_model)
        if cfg.embedding == "clip" and sources:
            problems += self._check_clip()
        if problems:
            raise StyleInputError("\n".join(problems))

    def _check_text_to_image(self, value: str) -> list[str]:
        flag = self._flag("text_to_image_model")
        path = Path(value).expanduser()
        if path.is_dir():
            index = path / "model_index.json"
            if not index.is_file():
                return [f"{flag} {value!r} is a folder without model_index.json; pass {_DIFFUSERS_LAYOUT}"]
            missing = [c for c in ("unet", "vae", "text_encoder") if (path / c).exists() and not _has_weights(path / c)]
            missing += [c for c in ("unet", "vae", "text_encoder", "tokenizer") if not (path / c).is_dir()]
            if missing:
                parts = ", ".join(sorted(set(missing)))
                return [f"{flag} {value!r} lacks weights or folders for {parts}; pass {_DIFFUSERS_LAYOUT}"]
            return []
        if path.exists() or _looks_like_path(value):
            return [f"{flag} {value!r} is not an existing folder; pass {_DIFFUSERS_LAYOUT}, or a hub id"]
        if self.config.offline and not _in_hub_cache(value, "model_index.json"):
            return [
                f"{flag} {value!r} is neither a local folder nor in the local Hugging Face cache, and nothing is "
                f"downloaded ({self._flag('offline')} is on); pass {_DIFFUSERS_LAYOUT}"
            ]
        return []

    def _check_clap(self, value: str) -> list[str]:
        flag = self._flag("audio_model")
        path = Path(value).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file() or not _has_weights(path):
                return [f"{flag} {value!r} lacks config.json or model weights; pass {_CLAP_LAYOUT}"]
            return []
        if path.exists() or _looks_like_path(value):
            return [f"{flag} {value!r} is not an existing folder; pass {_CLAP_LAYOUT}, or a hub id"]
        if self.config.offline and not _in_hub_cache(value, "config.json"):
            return [
                f"{flag} {value!r} is neither a local folder nor in the local Hugging Face cache, and nothing is "
                f"downloaded ({self._flag('offline')} is on); pass {_CLAP_LAYOUT}"
            ]
        return []

    def _clip_flags(self) -> ClipFlags:
        return ClipFlags(model=self._flag("clip_model"), checkpoint=self._flag("clip_checkpoint"))

    def _check_clip(self) -> list[str]:
        problems = check_clip(self.config.clip_model, self.config.clip_checkpoint, self._clip_flags())
        if problems and self.config.clip_checkpoint is None:
            problems = [f"{self._flag('embedding')} clip: {problems[0]}; or use {self._flag('embedding')} magenta"]
        return problems

    # ------------------------------------------------------------------------------------------- models

    @property
    def stylizer(self) -> MagentaStylizer:
        """The Magenta stylizer used for ``"magenta"`` embeddings (built on first use)."""
        if self._stylizer is None:
            self._stylizer = MagentaStylizer()
        return self._stylizer

    def _load_error(self, flag_name: str, value: str, layout: str, exc: Exception) -> StyleInputError:
        return StyleInputError(
            f"cannot load {self._flag(flag_name)} {value!r} ({type(exc).__name__}: {exc}); pass {layout}"
        )

    def text_to_image_pipeline(self) -> Any:
        """The text-to-image pipeline (loaded on first use with diffusers' ``AutoPipelineForText2Image``)."""
        if self._pipeline is None:
            value = self.config.text_to_image_model
            if value is None:
                raise StyleInputError(
                    f"no text-to-image model configured: pass {self._flag('text_to_image_model')} <hub id or diffusers "
                    f"folder> ({_DIFFUSERS_LAYOUT})"
                )
            try:
                from diffusers import AutoPipelineForText2Image
            except ImportError as exc:
                raise MissingDependencyError("text styles need diffusers: pip install diffusers") from exc
            source = str(Path(value).expanduser()) if Path(value).expanduser().is_dir() else value
            try:
                # fp32 (the loader's default) unless a caller converts the pipeline
                pipeline = AutoPipelineForText2Image.from_pretrained(source, local_files_only=self.config.offline)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise self._load_error("text_to_image_model", value, _DIFFUSERS_LAYOUT, exc) from exc
            for name in ("tokenizer", "tokenizer_2"):
                tokenizer = getattr(pipeline, name, None)
                if tokenizer is not None:
                    check_tokenizer(tokenizer, self._flag("text_to_image_model"), f"{value}/{name}")
            pipeline = pipeline.to(self.config.device)
            pipeline.set_progress_bar_config(disable=True)
            self._pipeline = pipeline
        return self._pipeline

    def clap(self) -> tuple[Any, Any]:
        """The CLAP model and processor (loaded on first use with transformers' ``from_pretrained``)."""
        if self._clap is None:
            value = self.config.audio_model
            if value is None:
                raise StyleInputError(
                    f"no CLAP model configured: pass {self._flag('audio_model')} <hub id or CLAP folder> "
                    f"({_CLAP_LAYOUT})"
                )
            try:
                from transformers import ClapModel, ClapProcessor
            except ImportError as exc:
                raise MissingDependencyError("audio styles need transformers: pip install transformers") from exc
            source = str(Path(value).expanduser()) if Path(value).expanduser().is_dir() else value
            try:
                model: Any = ClapModel.from_pretrained(source, local_files_only=self.config.offline)
                processor = ClapProcessor.from_pretrained(source, local_files_only=self.config.offline)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise self._load_error("audio_model", value, _CLAP_LAYOUT, exc) from exc
            check_tokenizer(processor.tokenizer, self._flag("audio_model"), value)
            self._clap = (model.to(self.config.device).eval(), processor)
        return self._clap

    def clip(self) -> ClipModel:
        """The CLIP (loaded on first use through the package's one loader, :func:`~mmstyle_ns.clip.load_clip`)."""
        if self._clip is None:
            problems = self._check_clip()
            if problems:
                raise StyleInputError(problems[0])
            try:
                self._clip = load_clip(
                    self.config.clip_model, self.config.clip_checkpoint, self.config.device, self._clip_flags()
                )
            except ClipLoadError as exc:
                raise StyleInputError(str(exc)) from exc
        return self._clip

    def release_generators(self) -> None:
        """Frees the text-to-image and CLAP models (they are only needed while preparing styles)."""
        self._pipeline = None
        self._clap = None

    # ---------------------------------------------------------------------------------------- the routes

    @torch.no_grad()
    def generate_image(self, prompt: str) -> Float[np.ndarray, "H W 3"]:
        """Renders a prompt into a square style image of ``text_to_image_size`` pixels (seeded; ``None``: the
        pipeline's default size, from its UNet's sample size)."""
        cfg = self.config
        pipeline = self.text_to_image_pipeline()
        generator = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        output = pipeline(
            prompt=prompt,
            num_inference_steps=cfg.text_to_image_steps,
            guidance_scale=cfg.text_to_image_guidance,
            height=cfg.text_to_image_size,
            width=cfg.text_to_image_size,
            generator=generator,
            output_type="np",
        )
        return as_float_image(np.asarray(output.images[0]), "generated image")

    @torch.no_grad()
    def audio_prompt_scores(self, path: Path) -> Float[np.ndarray, " P"]:
        """Cosine similarity of an audio clip's CLAP embedding with each of ``audio_prompts``."""
        prompts = self.audio_prompts
        if not prompts:
            raise StyleInputError(
                f"{self._flag('audio_prompts')} is empty; pass the style descriptions to match audio to"
            )
        model, processor = self.clap()
        extractor = processor.feature_extractor
        rate = int(extractor.sampling_rate)
        audio = load_audio(path, rate, getattr(extractor, "max_length_s", None))
        device = torch.device(self.config.device)
        audio_inputs = extractor(audio, sampling_rate=rate, return_tensors="pt")
        audio_embedding = _model_output_features(model.get_audio_features(**audio_inputs.to(device)))
        text_inputs = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        text_embedding = _model_output_features(model.get_text_features(**text_inputs.to(device)))
        scores = F.normalize(text_embedding.float(), dim=-1) @ F.normalize(audio_embedding.float(), dim=-1)[0]
        return scores.cpu().numpy()

    def match_audio(self, path: Path) -> str:
        """The one of ``audio_prompts`` whose CLAP text embedding is closest to the audio clip's."""
        return self.audio_prompts[int(np.argmax(self.audio_prompt_scores(path)))]

    def embedding_dim(self) -> int:
        """Length of the style embeddings, known without loading a model."""
        if self.config.embedding != "clip":
            return MagentaStylizer.vector_dim
        try:
            config = clip_model_config(self.config.clip_model, self.config.clip_checkpoint, self._clip_flags())
        except ClipLoadError as exc:
            raise StyleInputError(str(exc)) from exc
        return int(config["embed_dim"])

    @torch.no_grad()
    def embed_image(self, image: Float[np.ndarray, "H W 3"]) -> Float[Tensor, " D"]:
        """L2-normalised embedding of a style image in the configured space (CPU, float32)."""
        image = as_float_image(image, "style image")
        if self.config.embedding == "clip":
            vector = self.clip().encode_images(image[None])[0]
        else:
            vector = torch.from_numpy(self.stylizer.style_vector(image))
        return F.normalize(vector.float(), dim=0)

    @property
    def audio_prompts(self) -> list[str]:
        """The non-empty style descriptions audio clips are matched to."""
        return [p for p in self.config.audio_prompts if p.strip()]

    def _image_key(self, prompt: str) -> str:
        cfg = self.config
        recipe = (
            f"generated|v2|{cfg.text_to_image_model}|{cfg.device}|{cfg.text_to_image_steps}|"
            f"{cfg.text_to_image_size}|{cfg.text_to_image_guidance!r}|{cfg.seed}|{prompt}"
        )
        return hashlib.sha256(recipe.encode()).hexdigest()

    def _audio_key(self, path: Path) -> str:
        prompts = chr(0).join(self.audio_prompts)
        digest = hashlib.sha256(f"audio-match|v2|{self.config.audio_model}|{prompts}|".encode())
        digest.update(Path(path).read_bytes())
        return digest.hexdigest()

    def _model_state(self, which: str) -> np.ndarray | None:
        """Fingerprint (32 bytes as float32) of the text-to-image (``"generator"``) or CLAP (``"clap"``) model's
        contents, or ``None`` when the model is not at hand (a folder that is gone, a hub id not cached)."""
        if which not in self._fingerprints:
            value = self.config.text_to_image_model if which == "generator" else self.config.audio_model
            index = "model_index.json" if which == "generator" else "config.json"
            available = value is not None and (Path(value).expanduser().is_dir() or _in_hub_cache(value, index))
            digest = hashlib.sha256(model_fingerprint(value, index).encode()).digest()
            self._fingerprints[which] = np.frombuffer(digest, dtype=np.uint8).astype(np.float32) if available else None
        return self._fingerprints[which]

    def _load_checked(self, namespace: str, key: str, which: str) -> np.ndarray | None:
        """A stored entry, unless the model that made it is at hand and is no longer the same."""
        assert self.store is not None
        entry = self.store.load(namespace, key)
        if entry is None:
            return None
        state = self._model_state(which)
        if state is not None:  # the model is here: the entry must be its own (it may have been retrained)
            made_by = self.store.load(namespace + "-model", key)
            if made_by is None or not np.array_equal(made_by, state):
                return None
        return entry

    def _store_checked(self, namespace: str, key: str, which: str, entry: np.ndarray) -> None:
        assert self.store is not None
        self.store.store(namespace, key, entry)
        state = self._model_state(which)
        if state is not None:
            self.store.store(namespace + "-model", key, state)

    def stored_prompt(self, source: StyleSource) -> str | None:
        """The prompt a text or audio style is rendered from, when known without a model (an audio clip's match
        comes from :attr:`store`)."""
        if source.modality == "text":
            return source.value
        if source.modality != "audio" or self.store is None or not Path(source.path).is_file():
            return None
        match = self._load_checked(_AUDIO_MATCH, self._audio_key(source.path), "clap")
        prompts = self.audio_prompts
        if match is None or match.size != 1 or not 0 <= int(match[0]) < len(prompts):
            return None
        return prompts[int(match[0])]

    def _stored_image(self, prompt: str) -> np.ndarray | None:
        if self.store is None:
            return None
        return self._load_checked(_GENERATED, self._image_key(prompt), "generator")

    def is_stored(self, source: StyleSource) -> bool:
        """Whether a text or audio style's style image is in :attr:`store` (it then needs no model)."""
        prompt = self.stored_prompt(source)
        return prompt is not None and self._stored_image(prompt) is not None

    def generated_image(self, prompt: str) -> Float[np.ndarray, "H W 3"]:
        """The style image of a prompt: from :attr:`store` when it was generated before (by the same model, when
        that model is at hand), else generated and stored."""
        stored = self._stored_image(prompt)
        if stored is not None:
            return stored
        image = self.generate_image(prompt)
        if self.store is not None:
            self._store_checked(_GENERATED, self._image_key(prompt), "generator", image)
        return image

    def prepare(self, sources: Sequence[StyleSource]) -> list[PreparedStyle]:
        """Style image and embedding of every style, in the order given.

        Raises:
            StyleInputError: see :meth:`check` (run first, before any model is loaded).
        """
        self.check(sources)
        prepared: list[PreparedStyle] = []
        try:
            for source in sources:
                prompt: str | None = None
                if source.modality == "image":
                    image = load_style_image(source.path, self.config.max_image_side)
                else:
                    prompt = self.stored_prompt(source)
                    if prompt is None:  # an audio clip not matched before
                        prompt = self.match_audio(source.path)
                        if self.store is not None:
                            index = np.array([self.audio_prompts.index(prompt)], dtype=np.float32)
                            self._store_checked(_AUDIO_MATCH, self._audio_key(source.path), "clap", index)
                    image = self.generated_image(prompt)
                prepared.append(PreparedStyle(source, image, self.embed_image(image), prompt))
        finally:
            if self.config.release_generators:
                self.release_generators()
        return prepared
