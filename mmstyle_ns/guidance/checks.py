"""Checks that a diffusion model folder is complete and usable, and the one error raised when it is not.

Everything here is cheap (file-system checks and small helpers): a broken model is reported with the CLI flag
to set, what is missing and the expected layout, before any weights are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

# Smallest vocabulary a byte-level BPE tokenizer can have (256 bytes plus start/end tokens). transformers 5.x
# returns a 2-entry tokenizer without raising when its vocabulary files are missing offline.
_MIN_TOKENIZER_VOCAB = 258

_WEIGHT_SUFFIXES = (".safetensors", ".bin")

EXPECTED_LAYOUT = """\
  model_index.json
  unet/          config.json + diffusion_pytorch_model.safetensors (or .bin)
  vae/           config.json + diffusion_pytorch_model.safetensors (or .bin)
  text_encoder/  config.json + model.safetensors (or pytorch_model.bin)
  tokenizer/     vocab.json + merges.txt (or tokenizer.json)
  scheduler/     scheduler_config.json"""

EXPECTED_CONTROLNET_LAYOUT = """\
  config.json + diffusion_pytorch_model.safetensors (or .bin)   (a diffusers ControlNetModel)"""


class GuidanceModelError(RuntimeError):
    """The diffusion model (or ControlNet) for guidance is not set, missing, incomplete or inconsistent."""


def require_diffusion_libraries() -> None:
    """Raises an ``ImportError`` with the install command when diffusers or transformers is missing."""
    missing = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"Diffusion guidance needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir())


def missing_model_files(root: Path) -> list[str]:
    """What a Stable Diffusion folder in the diffusers layout lacks (empty when complete)."""
    missing: list[str] = []
    if not (root / "model_index.json").is_file():
        missing.append("model_index.json")
    for sub in ("unet", "vae", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            missing.append(f"{sub}/config.json")
        if not _has_weights(root / sub):
            missing.append(f"{sub}/ weights (*.safetensors or *.bin)")
    tok = root / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        missing += [f"tokenizer/{name}" for name in ("vocab.json", "merges.txt") if not (tok / name).is_file()]
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        missing.append("scheduler/scheduler_config.json")
    return missing


def missing_controlnet_files(root: Path) -> list[str]:
    """What a diffusers ControlNetModel folder lacks (empty when complete)."""
    missing = [] if (root / "config.json").is_file() else ["config.json"]
    if not _has_weights(root):
        missing.append("weights (*.safetensors or *.bin)")
    return missing


def check_tokenizer(tokenizer: Any, flag: str, text_vocab_size: int | None = None) -> None:
    """Fails loudly on a tokenizer that loaded without error but is unusable.

    transformers 5.x offline can return a ``CLIPTokenizer`` with 2 entries when its vocabulary files are
    missing; every prompt then maps to the same ids and guidance silently ignores the text.

    Raises:
        GuidanceModelError: the vocabulary is too small, or larger than the text encoder's embedding table.
    """
    size = len(tokenizer)
    if size < _MIN_TOKENIZER_VOCAB:
        raise GuidanceModelError(
            f"The tokenizer loaded with only {size} vocabulary entries (a CLIP BPE tokenizer has ~49408): its "
            "vocab.json/merges.txt (or tokenizer.json) are missing or empty, which transformers does not report "
            f"offline. Point {flag} at a complete model folder. Expected layout:\n{EXPECTED_LAYOUT}"
        )
    if text_vocab_size is not None and size > text_vocab_size:
        raise GuidanceModelError(
            f"The tokenizer has {size} entries but the text encoder embeds only {text_vocab_size}: tokenizer/ and "
            f"text_encoder/ come from different models. Check {flag}."
        )


def resolve_local(path_or_id: str, offline: bool) -> Path | None:
    """A local directory for ``path_or_id``: itself if it is one, else its snapshot in the hub cache (offline).

    Returns None when it is neither a directory nor resolvable offline (the caller reports it); with
    ``offline=False`` a hub id is left to the loaders (which download only what they need).
    """
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if not offline or path_or_id.count("/") != 1 or path_or_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path_or_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not in the local cache"
        return None
