"""Trains the toy CLIP with fixed steps and seeds and saves it so that open_clip's own loader reads it.

* **Data.** A fixed pool of toy-world pictures (:mod:`mmstyle_ns.teacher.data`, the generator that trained the
  toy teacher: every colour, shape, ground, style, material and count) rendered at 128x128 from frontal to high
  360-degree viewpoints (:data:`~mmstyle_ns.teacher.data.WIDE_VIEWS`), each put through the model's own
  preprocessing once (open_clip's resize, centre crop and normalisation), then mirrored at random in training.
  Captions follow the toy grammar and are tokenized by open_clip's BPE tokenizer.
* **Objective.** CLIP's symmetric contrastive loss with a learnt temperature; pictures of a batch that share
  a caption are all positives of that caption (a target distribution over them), since the grammar has only
  1728 captions and a batch of 256 often holds two of one.
* **Saved** as ``toy-clip.json`` (the open_clip model config, registered by :func:`~mmstyle_ns.clip.loader.load_clip`
  with ``open_clip.add_model_config``) and ``open_clip_model.safetensors`` (the state dict, float16 by default),
  plus ``clip.json`` (how it was trained, timings).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mmstyle_ns.clip.config import TOY_CLIP_NAME, TOY_CLIP_WEIGHTS, ClipTrainConfig, ToyClipArchitecture
from mmstyle_ns.progress import print_line, progress
from mmstyle_ns.teacher.vocab import SceneSpec, all_specs, caption

_RENDER_RESOLUTION = 128


def build_model(arch: ToyClipArchitecture, seed: int) -> tuple[Any, Any, Any]:
    """A randomly initialised toy CLIP built by open_clip from ``arch``: ``(model, preprocess, tokenizer)``."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**arch.model_config())
    preprocess = image_transform_v2(PreprocessCfg(size=arch.image_size), is_train=False)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=arch.context_length)
    return model, preprocess, tokenizer


def _render_chunk(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[SceneSpec]]:
    """Renders samples ``start .. start + count - 1`` and preprocesses them (run in a worker process)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from PIL import Image

    from mmstyle_ns.teacher.data import WIDE_VIEWS, generate_images

    seed, start, count, image_size = args
    torch.set_num_threads(1)
    images, specs = generate_images(seed, start, count, _RENDER_RESOLUTION, WIDE_VIEWS)
    preprocess: Any = image_transform_v2(PreprocessCfg(size=image_size), is_train=False)
    pixels = torch.stack([preprocess(Image.fromarray(image)) for image in images]).to(torch.float16)
    return pixels.numpy(), specs


def render_pool(
    seed: int, count: int, image_size: int, workers: int = 1, start: int = 0
) -> tuple[Float[Tensor, "N 3 s s"], list[SceneSpec]]:
    """Generated pictures ``start .. start + count - 1`` of ``seed``, preprocessed (float16), with their specs."""
    chunk = 500
    jobs = [(seed, s, min(chunk, start + count - s), image_size) for s in range(start, start + count, chunk)]
    if workers > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_render_chunk, jobs)
    else:
        results = [_render_chunk(job) for job in jobs]
    pixels = torch.from_numpy(np.concatenate([r[0] for r in results]))
    return pixels, [spec for r in results for spec in r[1]]


def contrastive_loss(
    image_features: Float[Tensor, "B D"], text_features: Float[Tensor, "B D"], scale: Tensor, labels: Tensor
) -> Tensor:
    """Symmetric CLIP loss with shared captions as joint positives.

    ``L = (CE(s I T^T, P) + CE(s T I^T, P)) / 2`` where ``P[i, j] = [labels_i = labels_j] / #{j: labels_j =
    labels_i}``; with distinct labels this is CLIP's loss exactly.
    """
    same = (labels[:, None] == labels[None, :]).float()
    targets = same / same.sum(dim=1, keepdim=True)
    logits = scale * image_features @ text_features.T
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, plain = [], []
    for name, param in model.named_parameters():
        no_decay = param.ndim < 2 or "embedding" in name or "logit_scale" in name or "ln" in name or "bn" in name
        (plain if no_decay else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 5%."""
    if step < warmup:
        return (step + 1) / warmup
    done = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.475 * (1.0 + math.cos(math.pi * min(done, 1.0)))


def train_clip_model(
    model: Any,
    tokenizer: Any,
    pixels: Float[Tensor, "N 3 s s"],
    specs: list[SceneSpec],
    config: ClipTrainConfig,
    device: torch.device,
) -> list[float]:
    """Optimises ``model`` in place on the preprocessed pool; returns the loss of every step."""
    captions = [caption(spec) for spec in all_specs()]
    index = {text: i for i, text in enumerate(captions)}
    labels = torch.tensor([index[caption(spec)] for spec in specs])
    tokens = tokenizer(captions)  # [1728, context]: every caption of the grammar, tokenized once
    model.to(device).train()
    optimizer = torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=(0.9, 0.98))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    warmup = min(100, config.steps // 10 + 1)
    with progress(config.steps, "toy CLIP", config.quiet) as advance:
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = config.lr * _schedule(step, config.steps, warmup)
            batch = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
            flip = torch.rand(config.batch_size, generator=generator) < 0.5
            x = pixels[batch].float()
            x = torch.where(flip[:, None, None, None], x.flip(-1), x).to(device)
            y = labels[batch]
            unique, inverse = torch.unique(y, return_inverse=True)
            image_features = F.normalize(model.encode_image(x), dim=-1)
            text_features = F.normalize(model.encode_text(tokens[unique].to(device)), dim=-1)[inverse]
            loss = contrastive_loss(image_features, text_features, model.logit_scale.exp(), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0.0, math.log(100.0))
            losses.append(float(loss.detach()))
            advance(loss=float(np.mean(losses[-20:])), scale=float(model.logit_scale.detach().exp()))
    return losses


def save_clip(
    model: Any, arch: ToyClipArchitecture, output: Path, info: dict[str, Any], half_precision: bool = True
) -> Path:
    """Writes ``toy-clip.json``, the weights and ``clip.json`` into ``output``; returns the weights file."""
    from safetensors.torch import save_file

    output.mkdir(parents=True, exist_ok=True)
    (output / f"{TOY_CLIP_NAME}.json").write_text(json.dumps(arch.model_config(), indent=2) + "\n")
    dtype = torch.float16 if half_precision else torch.float32
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    weights = output / TOY_CLIP_WEIGHTS
    save_file(state, str(weights))
    (output / "clip.json").write_text(json.dumps(info, indent=2) + "\n")
    return weights


def train_clip(config: ClipTrainConfig, log: Callable[[str], None] = print_line) -> Path:
    """Renders the pool, trains, saves; returns the output folder."""
    from mmstyle_ns.teacher.model import default_device

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device is not None else default_device()
    arch = config.architecture
    start = time.perf_counter()
    pixels, specs = render_pool(config.seed, config.pool_size, arch.image_size, config.workers)
    data_seconds = time.perf_counter() - start
    log(f"Rendered and preprocessed {len(pixels)} pictures in {data_seconds:.0f} s")
    model, _, tokenizer = build_model(arch, config.seed)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"Toy CLIP: {parameters / 1e6:.2f}M parameters on {device}")
    tick = time.perf_counter()
    losses = train_clip_model(model, tokenizer, pixels, specs, config, device)
    train_seconds = time.perf_counter() - tick
    info = {
        "model_name": TOY_CLIP_NAME,
        "architecture": asdict(arch),
        "train": {k: v for k, v in asdict(config).items() if k not in ("architecture", "output")},
        "parameters": parameters,
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "temperature": round(float(model.logit_scale.exp()), 3),
        "seconds": {"data": round(data_seconds, 1), "train": round(train_seconds, 1)},
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    weights = save_clip(model.cpu(), arch, config.output, info, config.half_precision)
    log(
        f"Saved the toy CLIP to {config.output} ({weights.stat().st_size / 1e6:.1f} MB) after "
        f"{time.perf_counter() - start:.0f} s (data {data_seconds:.0f} s, training {train_seconds:.0f} s); "
        f"final loss {info['final_loss']}"
    )
    return config.output
