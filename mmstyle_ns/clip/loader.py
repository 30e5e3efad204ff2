"""The one CLIP loader of the package: open_clip's own ``create_model_and_transforms`` over a user's weights.

A CLIP is named by two settings, exactly as open_clip takes them:

* the model (architecture) name, e.g. ``ViT-B-32``, ``ViT-L-14`` or ``toy-clip``; a name open_clip does not
  know is looked up as ``<name>.json`` (an open_clip model config) beside the checkpoint and registered with
  ``open_clip.add_model_config``, which is how the toy CLIP's folder is read;
* the checkpoint: a weights file (``.safetensors``, ``.pt``, ``.bin``), a folder holding one
  (``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``, open_clip's hub layout), or a pretrained
  tag (e.g. ``laion2b_s34b_b79k``) whose file is already in the local cache (nothing is downloaded by us).

:func:`check_clip` validates the pair without loading anything (for checks before a run writes files);
:func:`load_clip` loads it and returns a :class:`ClipModel`, whose encoders take pictures through the model's
own preprocessing and texts through its own tokenizer. Every failure is a :class:`ClipLoadError` whose
message names the flags to set.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mmstyle_ns.clip.config import TOY_CLIP_NAME, TOY_CLIP_WEIGHTS

WEIGHT_FILES = (TOY_CLIP_WEIGHTS, "open_clip_pytorch_model.bin")
"""Weight file names looked for when the checkpoint is a folder (open_clip's hub layout)."""

_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class ClipLoadError(ValueError):
    """The CLIP settings cannot be used; the message says what is wrong and which flag to set."""


@dataclass(frozen=True)
class ClipFlags:
    """How the caller's command line names the two settings (for error messages)."""

    model: str = "--clip-model"
    """Flag of the model (architecture) name."""
    checkpoint: str = "--clip-checkpoint"
    """Flag of the weights."""


def _layout(flags: ClipFlags, model_name: str) -> str:
    return (
        f"an open_clip checkpoint file (.safetensors/.pt/.bin) for {flags.model} {model_name}, a folder holding "
        f"{' or '.join(WEIGHT_FILES)}, or a pretrained tag in the local cache; the toy CLIP of the embedded world: "
        f"{flags.model} {TOY_CLIP_NAME} {flags.checkpoint} examples/toy-clip"
    )


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or "/" in value or "\\" in value or Path(value).suffix in _SUFFIXES


def _weights_path(checkpoint: str) -> Path | None:
    """The weights file a checkpoint setting names, or None for a pretrained tag."""
    path = Path(checkpoint).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        return path  # a folder without weights: reported by check_clip
    if path.is_file() or _looks_like_path(checkpoint):
        return path
    return None


def _register_beside(model_name: str, weights: Path | None) -> bool:
    """Registers ``<model_name>.json`` found beside ``weights`` with open_clip (it wins over a config of that name
    registered before, e.g. from another folder); True when the name is known afterwards."""
    import open_clip

    if model_name.startswith("hf-hub:"):
        return True
    candidate = weights.parent / f"{model_name}.json" if weights is not None else None
    if candidate is not None and candidate.is_file():
        try:
            beside = json.loads(candidate.read_text())
        except (OSError, ValueError):
            beside = None
        if beside is not None and open_clip.get_model_config(model_name) != beside:
            open_clip.add_model_config(candidate)
    return open_clip.get_model_config(model_name) is not None


def check_clip(model_name: str, checkpoint: str | None, flags: ClipFlags = ClipFlags()) -> list[str]:
    """Problems with a CLIP setting, found without loading weights (empty when it looks loadable)."""
    layout = _layout(flags, model_name)
    if checkpoint is None or not checkpoint.strip():
        return [f"CLIP needs weights, and none ship with open_clip offline: pass {flags.checkpoint} <{layout}>"]
    weights = _weights_path(checkpoint)
    if weights is not None:
        if weights.is_dir():
            return [f"{flags.checkpoint} {checkpoint!r} is a folder without {' or '.join(WEIGHT_FILES)}; pass {layout}"]
        if not weights.is_file():
            return [f"{flags.checkpoint} {checkpoint!r} does not exist; pass {layout}"]
    try:
        import open_clip  # noqa: F401
    except ImportError:
        return ["CLIP needs open_clip: pip install open_clip_torch"]
    if not _register_beside(model_name, weights):
        return [
            f"{flags.model} {model_name!r} is not an open_clip model name (see open_clip.list_models()) and no "
            f"{model_name}.json model config lies beside {flags.checkpoint} {checkpoint!r}"
        ]
    return []


def clip_model_config(model_name: str, checkpoint: str | None, flags: ClipFlags = ClipFlags()) -> dict[str, Any]:
    """The open_clip model config of a CLIP setting (registering one that ships beside the checkpoint)."""
    problems = check_clip(model_name, checkpoint, flags)
    if problems:
        raise ClipLoadError(problems[0])
    import open_clip

    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ClipLoadError(f"{flags.model} {model_name!r}: the model config is only known after loading it")
    return config


class ClipModel:
    """A loaded CLIP with its own preprocessing and tokenizer; encoders return L2-normalised embeddings."""

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, name: str, device: torch.device) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.device = device

    @property
    def embed_dim(self) -> int:
        """Length of the joint embeddings."""
        return int(self.model.text_projection.shape[1])

    @property
    def image_size(self) -> int:
        """Side of the model's input pictures (after its preprocessing)."""
        size = self.model.visual.image_size
        return int(size[0] if isinstance(size, tuple | list) else size)

    def pixels(self, images: Sequence[np.ndarray] | np.ndarray) -> Float[Tensor, "N 3 s s"]:
        """Pictures ``[N, H, W, 3]`` (uint8, or float in [0, 1]) through the model's own preprocessing."""
        from PIL import Image

        batch = []
        for image in images:
            array = np.asarray(image)
            if array.dtype != np.uint8:
                array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
            if array.ndim != 3 or array.shape[-1] != 3:
                raise ValueError(f"expected RGB pictures [H, W, 3], got shape {array.shape}")
            batch.append(self.preprocess(Image.fromarray(array)))
        return torch.stack(batch).to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64) -> Float[Tensor, "N D"]:
        """Normalised image embeddings (CPU, float32) of pictures ``[N, H, W, 3]``."""
        if len(images) == 0:
            return torch.zeros(0, self.embed_dim)
        out = []
        for start in range(0, len(images), batch_size):
            features = self.model.encode_image(self.pixels(images[start : start + batch_size]))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    def style_vector(self, image: Float[np.ndarray, "H W 3"]) -> Float[np.ndarray, " D"]:
        """The image embedding of one picture as numpy (so a CLIP serves as a style predictor of
        :func:`mmstyle_ns.metrics.style_match_report`: style match in CLIP space)."""
        return self.encode_images(np.asarray(image)[None])[0].numpy()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Float[Tensor, "N D"]:
        """Normalised text embeddings (CPU, float32)."""
        if len(texts) == 0:
            return torch.zeros(0, self.embed_dim)
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)


def load_clip(
    model_name: str, checkpoint: str | None, device: str | torch.device = "cpu", flags: ClipFlags = ClipFlags()
) -> ClipModel:
    """Loads a CLIP with ``open_clip.create_model_and_transforms(model_name, pretrained=checkpoint)``.

    Raises:
        ClipLoadError: missing or unreadable weights, an unknown model name, or weights of another architecture.
    """
    problems = check_clip(model_name, checkpoint, flags)
    if problems:
        raise ClipLoadError(problems[0])
    assert checkpoint is not None  # ruled out by check_clip
    import open_clip

    weights = _weights_path(checkpoint)
    pretrained = str(weights) if weights is not None else checkpoint
    device = torch.device(device)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as exc:  # unreadable files fail with SafetensorError, UnpicklingError, EOFError, ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if any(key in str(exc) for key in ("size mismatch", "Missing key", "Unexpected key", "width changed")):
            detail = f"its tensors do not fit the {model_name} architecture ({detail[:200]})"
        raise ClipLoadError(
            f"cannot load {flags.checkpoint} {checkpoint!r} for {flags.model} {model_name}: {detail}; "
            f"pass {_layout(flags, model_name)}"
        ) from exc
    return ClipModel(model, preprocess, tokenizer, model_name, device)
