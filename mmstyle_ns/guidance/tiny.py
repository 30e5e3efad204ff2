"""Tiny randomly initialised Stable-Diffusion-like models in the diffusers folder layout, built offline.

For tests, benchmarks and CPU smoke runs of the guided methods: no Stable Diffusion weights are reachable
offline, but a few-thousand-parameter UNet, VAE and CLIP text encoder with the real CLIP BPE tokenizer
(built from the vocabulary that ``open_clip`` ships, so token ids match open_clip's and Stable Diffusion's)
exercise exactly the code paths a real model does. The scores they produce are meaningless.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any, Literal

import torch

# CLIP's BPE: 256 byte symbols, 256 end-of-word byte symbols, 48894 merges, start and end tokens (49408 ids).
CLIP_VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The printable stand-in character of each byte 0..255, in byte order (GPT-2/CLIP byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + shift)
            shift += 1
    # CLIP orders its base vocabulary printable bytes first, then the shifted ones.
    printable_set = set(printable)
    order = printable + [b for b in range(256) if b not in printable_set]
    return [symbols[b] for b in order]


def clip_bpe_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's token-to-id map and BPE merges, read from the vocabulary file inside the ``open_clip`` package.

    Raises:
        ImportError: open_clip_torch is not installed.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("The CLIP BPE vocabulary comes with open_clip: pip install open_clip_torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 1 + _NUM_MERGES]
    base = _byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m.split()) for m in merges] + [START_TOKEN, END_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, max_length: int = 77) -> Path:
    """Writes a Stable-Diffusion-style ``tokenizer/`` folder (vocab.json, merges.txt, configs) for CLIP's BPE."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocabulary()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    specials = {"bos_token": START_TOKEN, "eos_token": END_TOKEN, "unk_token": END_TOKEN, "pad_token": END_TOKEN}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True, **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def build_tiny_stable_diffusion(
    root: str | Path,
    *,
    unet_channels: tuple[int, ...] = (8, 16),
    vae_channels: tuple[int, ...] = (8, 16),
    text_width: int = 16,
    text_layers: int = 1,
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon",
    controlnet: bool = False,
    seed: int = 0,
) -> Path:
    """Saves a tiny random model in the Stable Diffusion folder layout (``save_pretrained``) under ``root``.

    Args:
        root: output folder (gets model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).
        unet_channels: UNet ``block_out_channels``; the first block has cross-attention, the last does not.
        vae_channels: VAE ``block_out_channels``; the VAE downsamples by ``2 ** (len - 1)``.
        text_width: CLIP text encoder width, also the UNet's cross-attention width.
        text_layers: CLIP text encoder depth.
        prediction_type: what the UNet predicts, the scheduler's ``prediction_type``.
        controlnet: also save a matching ``controlnet/`` (a diffusers ControlNetModel) under ``root``.
        seed: initialisation seed.

    Returns:
        ``root`` as a path; the ControlNet, if requested, is at ``root / "controlnet"``.
    """
    from mmstyle_ns.guidance.checks import require_diffusion_libraries

    require_diffusion_libraries()
    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    groups = min(4, *unet_channels, *vae_channels)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        depth = len(unet_channels)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=unet_channels,
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (depth - 1),
            up_block_types=("UpBlock2D",) * (depth - 1) + ("CrossAttnUpBlock2D",),
            cross_attention_dim=text_width,
            attention_head_dim=2,
            norm_num_groups=groups,
        )
        vae_kwargs: dict[str, Any] = {
            "down_block_types": ("DownEncoderBlock2D",) * len(vae_channels),
            "up_block_types": ("UpDecoderBlock2D",) * len(vae_channels),
            "block_out_channels": vae_channels,
        }
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=groups,
            sample_size=8 * 2 ** (len(vae_channels) - 1),
            **vae_kwargs,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=CLIP_VOCAB_SIZE,
                hidden_size=text_width,
                intermediate_size=2 * text_width,
                num_hidden_layers=text_layers,
                num_attention_heads=2,
                max_position_embeddings=77,
                projection_dim=text_width,
                bos_token_id=CLIP_VOCAB_SIZE - 2,
                eos_token_id=CLIP_VOCAB_SIZE - 1,
                pad_token_id=CLIP_VOCAB_SIZE - 1,
            )
        )
        # Stable Diffusion's training schedule (scaled-linear betas, 1000 steps).
        scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            prediction_type=prediction_type,
        )
        unet.save_pretrained(root / "unet")
        vae.save_pretrained(root / "vae")
        text_encoder.save_pretrained(root / "text_encoder")
        scheduler.save_pretrained(root / "scheduler")
        write_clip_tokenizer(root / "tokenizer")
        if controlnet:
            # Conditioning images are at pixel resolution: downsample them by the VAE's factor.
            embedding = tuple(4 * 2**i for i in range(len(vae_channels)))
            control = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=embedding)
            # Its zero convolutions start at zero (no effect); a trained ControlNet's are not, so randomise them.
            zero_convs = (
                control.controlnet_cond_embedding.conv_out,
                *control.controlnet_down_blocks,
                control.controlnet_mid_block,
            )
            with torch.no_grad():
                for block in zero_convs:
                    for param in block.parameters():
                        param.normal_(0.0, 0.05)
            control.save_pretrained(root / "controlnet")
    finally:
        torch.random.set_rng_state(generator_state)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
