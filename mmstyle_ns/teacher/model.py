"""The toy teacher's parts: CLIP BPE tokenizer, small CLIP text encoder, VAE, UNet and noise schedules.

The layout is Stable Diffusion's, scaled down: a ``CLIPTokenizer`` with CLIP's real vocabulary (built from
the one ``open_clip`` ships, so token ids equal open_clip's), a ``CLIPTextModel`` whose last hidden state
conditions a ``UNet2DConditionModel`` through cross-attention, an ``AutoencoderKL`` with 4 latent channels
and 8x downsampling (128x128 pictures, 16x16 latents), a DDPM training schedule (scaled-linear betas,
1000 steps, epsilon prediction) and a DDIM sampling schedule with ``clip_sample=False``.
:func:`save_teacher` writes the diffusers folder layout (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``) with ``StableDiffusionPipeline.save_pretrained``, so the
folder loads with ``DiffusionBackbone`` and with ``StableDiffusionPipeline.from_pretrained``.

The default sizes keep all weights below 20 MB in float32; CLIP's 49408-entry token table is a third of it.
diffusers and transformers are imported inside the functions.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mmstyle_ns.guidance.tiny import CLIP_VOCAB_SIZE, write_clip_tokenizer
from mmstyle_ns.teacher.config import TeacherArchitecture

TEACHER_INFO_FILE = "teacher.json"
"""File in the saved folder with the architecture, training settings and measured figures."""


@dataclass
class TeacherParts:
    """The networks, tokenizer and training schedule of a teacher (diffusers/transformers objects)."""

    tokenizer: Any
    """``transformers.CLIPTokenizer``."""
    text_encoder: Any
    """``transformers.CLIPTextModel``."""
    vae: Any
    """``diffusers.AutoencoderKL``."""
    unet: Any
    """``diffusers.UNet2DConditionModel``."""
    scheduler: Any
    """``diffusers.DDPMScheduler`` (training schedule)."""


def build_tokenizer(max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` with CLIP's BPE vocabulary (ids identical to open_clip's).

    Raises:
        RuntimeError: the tokenizer came out with the wrong vocabulary size.
    """
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(Path(tmp), max_length)))
    if len(tokenizer) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"CLIP tokenizer has {len(tokenizer)} entries, expected {CLIP_VOCAB_SIZE}")
    return tokenizer


def training_scheduler() -> Any:
    """Stable Diffusion's training schedule: DDPM, scaled-linear betas 0.00085..0.012, 1000 steps, epsilon."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="epsilon",
    )


def sampling_scheduler(training: Any) -> Any:
    """DDIM over the same noise schedule, with ``clip_sample=False`` (latents are not bounded to [-1, 1])."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(training.config, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def build_teacher(arch: TeacherArchitecture | None = None, seed: int = 0) -> TeacherParts:
    """Freshly initialised teacher parts (deterministic given ``seed``; the global RNG is left as it was).

    Args:
        arch: network sizes; None for the default :class:`TeacherArchitecture`.
        seed: initialisation seed.
    """
    from mmstyle_ns.guidance.checks import require_diffusion_libraries

    arch = TeacherArchitecture() if arch is None else arch
    require_diffusion_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        depth = len(arch.unet_channels)
        unet = UNet2DConditionModel(
            sample_size=arch.latent_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=arch.unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) * (depth - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (depth - 1),
            cross_attention_dim=arch.text_width,
            attention_head_dim=arch.attention_head_dim,
            norm_num_groups=arch.unet_norm_groups,
            addition_embed_type="text" if arch.pooled_text else None,
            addition_embed_type_num_heads=max(1, arch.text_width // 8),
        )
        blocks: dict[str, Any] = {  # diffusers annotates these as 1-tuples
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": arch.vae_channels,
        }
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            **blocks,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=arch.vae_norm_groups,
            sample_size=arch.resolution,
            mid_block_add_attention=False,
        )
        _start_near_deterministic(vae)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=arch.text_width,
                intermediate_size=4 * arch.text_width,
                num_hidden_layers=arch.text_layers,
                num_attention_heads=arch.text_heads,
                max_position_embeddings=arch.max_length,
                projection_dim=arch.text_width,
                bos_token_id=CLIP_VOCAB_SIZE - 2,
                eos_token_id=CLIP_VOCAB_SIZE - 1,
                pad_token_id=CLIP_VOCAB_SIZE - 1,
            )
        )
        with torch.no_grad():
            embeddings = getattr(text_encoder, "text_model", text_encoder).embeddings  # transformers 4 vs 5
            embeddings.token_embedding.weight.normal_(0.0, arch.token_init_std)
            embeddings.position_embedding.weight.normal_(0.0, 0.3 * arch.token_init_std)
    finally:
        torch.random.set_rng_state(state)
    return TeacherParts(build_tokenizer(arch.max_length), text_encoder, vae, unet, training_scheduler())


def _start_near_deterministic(vae: Any, log_variance: float = -8.0) -> None:
    """Starts the VAE posterior with a small variance (``exp(log_variance)``) instead of ~1.

    With unit posterior noise at initialisation the decoder first learns to ignore its input and to paint the
    mean picture; a small starting variance lets colour and shape reach it from the first step. The variance
    stays trainable (the KL term pulls it up again).
    """
    conv = vae.quant_conv
    channels = conv.out_channels // 2
    with torch.no_grad():
        conv.weight[channels:].mul_(0.1)
        conv.bias[channels:].fill_(log_variance)


def default_device() -> torch.device:
    """The current accelerator (a GPU) where torch has one, else the CPU."""
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None:
            return accelerator
    return torch.device("cpu")


def count_parameters(parts: TeacherParts) -> dict[str, int]:
    """Parameters per network."""
    modules = {"text_encoder": parts.text_encoder, "vae": parts.vae, "unet": parts.unet}
    return {name: sum(p.numel() for p in module.parameters()) for name, module in modules.items()}


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> Int[Tensor, "N L"]:
    """Token ids of prompts padded to the tokenizer's ``model_max_length`` (as Stable Diffusion pipelines do)."""
    out = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return out.input_ids


def encode_text(text_encoder: Any, ids: Int[Tensor, "N L"]) -> Float[Tensor, "N L D"]:
    """The text encoder's last hidden state for token ids (what the UNet cross-attends to)."""
    return text_encoder(ids.to(text_encoder.device))[0]


def save_teacher(parts: TeacherParts, folder: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Writes the teacher in the diffusers Stable Diffusion layout (float32 safetensors) plus ``teacher.json``.

    The scheduler saved is the DDIM sampling schedule (``clip_sample=False``); there is no safety checker.

    Args:
        parts: the trained parts.
        folder: output folder (created; files of an earlier teacher there are overwritten).
        info: extra JSON-serialisable facts for ``teacher.json`` (architecture, settings, measured figures).
    """
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=sampling_scheduler(parts.scheduler),
        safety_checker=None,  # type: ignore[arg-type]  # allowed with requires_safety_checker=False
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / TEACHER_INFO_FILE).write_text(json.dumps(info or {}, indent=2, default=str) + "\n")
    return folder


def architecture_dict(arch: TeacherArchitecture) -> dict[str, Any]:
    """The architecture as plain JSON values."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(arch).items()}


def weights_size(folder: str | Path) -> int:
    """Total bytes of the weight files (``*.safetensors``) under a saved teacher folder."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors"))
