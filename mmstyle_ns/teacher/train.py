"""Trains the toy teacher in two gated stages with fixed step counts and seeds, and saves it.

1. **VAE.** An ``AutoencoderKL`` learns to reconstruct random crops (centre-biased, mirrored) of a fixed pool
   of generated pictures: L1 + L2 + chroma L1 with saturated pixels weighed up, an image-gradient L1 and a
   small KL term (Stable Diffusion's ``kl-f8`` recipe without the perceptual and adversarial losses; the
   colour terms make colours arrive within the step budget). Then the **gate**: the colour checker reads
   the VAE's reconstructions of held-out pictures; below ``gate_min_accuracy`` training stops with
   :class:`TeacherGateError`, because a VAE that loses colours makes every later colour figure meaningless.
   Reconstruction PSNR is printed too. The latent scaling factor (``1 / std`` of the pool's latents) is stored
   in the VAE config, as SD does.
2. **Denoiser.** The CLIP text encoder and the UNet learn jointly (no pretrained CLIP exists offline, so the
   text encoder starts from random weights and is trained by the denoising loss alone) on the pool's latents:
   epsilon prediction under the DDPM schedule, min-SNR loss weighting, latent cells covering objects weighed
   up, captions dropped to the empty prompt with ``uncond_prob`` (classifier-free guidance) and shortened (no
   ground) with ``short_caption_prob``.
   An exponential moving average of the weights is what gets saved.

Every random choice comes from the seed; the same settings repeat the same run on the same machine and
thread count. Call :func:`train_teacher` (or ``mmstyle-teacher train``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from torch import Tensor

from mmstyle_ns.progress import print_line, progress
from mmstyle_ns.teacher.checker import Accuracy, accuracy, classify_colours
from mmstyle_ns.teacher.config import DenoiserStage, TrainConfig, VaeStage
from mmstyle_ns.teacher.data import generate_batch, generate_images
from mmstyle_ns.teacher.model import (
    TeacherParts,
    architecture_dict,
    build_teacher,
    count_parameters,
    default_device,
    encode_text,
    save_teacher,
    tokenize,
    weights_size,
)
from mmstyle_ns.teacher.vocab import SceneSpec, caption


class TeacherGateError(RuntimeError):
    """The VAE's reconstructions lose the objects' colours: training stops before the denoiser stage."""


@dataclass(frozen=True)
class VaeReport:
    """How well the VAE reconstructs held-out pictures."""

    psnr: float
    """Mean PSNR (dB) of reconstructions against the originals."""
    colour: Accuracy
    """Colour-checker accuracy on the reconstructions (truth: the generated colour)."""
    checker_on_originals: Accuracy
    """The checker's own accuracy on the original pictures."""


def _schedule(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def to_tensor(images: UInt8[np.ndarray, "N H W 3"], device: torch.device) -> Float[Tensor, "N 3 H W"]:
    """uint8 pictures to a float tensor in [-1, 1] (the VAE's input range)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: Float[Tensor, "N 3 H W"]) -> UInt8[np.ndarray, "N H W 3"]:
    """A float tensor in [-1, 1] back to uint8 pictures."""
    return ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_gradient_l1(a: Float[Tensor, "B C H W"], b: Float[Tensor, "B C H W"]) -> Tensor:
    """Mean L1 distance between the horizontal and vertical finite differences of two images."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def vae_loss(recon: Float[Tensor, "B 3 H W"], x: Float[Tensor, "B 3 H W"], stage: VaeStage) -> tuple[Tensor, Tensor]:
    """Colour-weighted reconstruction loss of stage 1 (without the KL term); returns ``(plain L1, loss)``.

    ``w = 1 + e * sat(x)``; ``loss = mean(w |r - x|) + m mean(w (r - x)^2) + c mean(w |chroma(r) - chroma(x)|)
    + g |grad(r) - grad(x)|_1``, with ``chroma(x) = x - mean_rgb(x)``.
    """
    saturation = (x.amax(dim=1, keepdim=True) - x.amin(dim=1, keepdim=True)) / 2.0
    weight = 1.0 + stage.colour_emphasis * saturation
    weight = weight / weight.mean()
    diff = recon - x
    l1 = diff.abs().mean()
    chroma = diff - diff.mean(dim=1, keepdim=True)
    loss = (weight * diff.abs()).mean() + stage.mse_weight * (weight * diff.square()).mean()
    loss = loss + stage.chroma_weight * (weight * chroma.abs()).mean()
    return l1.detach(), loss + stage.gradient_weight * image_gradient_l1(recon, x)


def train_vae(
    vae: Any, pool: UInt8[np.ndarray, "N H W 3"], stage: VaeStage, seed: int, device: torch.device, quiet: bool = False
) -> list[float]:
    """Stage 1: trains ``vae`` in place on random crops (and mirror images) of ``pool``; returns the losses."""
    if stage.crop % 8 or stage.crop > pool.shape[1]:
        raise ValueError(f"crop must be a multiple of 8 and at most {pool.shape[1]}, got {stage.crop}")
    vae.to(device).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=stage.lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator(device=device).manual_seed(seed)
    losses = []
    size, crop = pool.shape[1], stage.crop
    with progress(stage.steps, "VAE", quiet) as advance:
        for step in range(stage.steps):
            for group in optimiser.param_groups:
                group["lr"] = stage.lr * _schedule(step, stage.steps, 50)
            idx = rng.integers(0, len(pool), stage.batch_size)
            # Objects stand near the middle: crop offsets follow a triangular law centred there.
            positions = (size - crop) // 8
            y0, x0 = (
                (rng.integers(0, positions // 2 + 1, 2) + rng.integers(0, positions - positions // 2 + 1, 2)) * 8
            ).tolist()
            batch = pool[idx, y0 : y0 + crop, x0 : x0 + crop]
            if rng.random() < 0.5:
                batch = batch[:, :, ::-1]
            x = to_tensor(batch, device)
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=gen)).sample
            l1, loss = vae_loss(recon, x, stage)
            loss = loss + stage.kl_weight * posterior.kl().mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimiser.step()
            losses.append(loss.item())
            advance(l1=float(l1))
    vae.eval()
    return losses


@torch.no_grad()
def reconstruct(vae: Any, images: UInt8[np.ndarray, "N H W 3"], batch_size: int = 32) -> UInt8[np.ndarray, "N H W 3"]:
    """VAE reconstructions (posterior mean, decoded) of pictures."""
    device = next(vae.parameters()).device
    out = np.empty_like(images)
    for i in range(0, len(images), batch_size):
        x = to_tensor(images[i : i + batch_size], device)
        out[i : i + batch_size] = to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return out


def psnr(a: UInt8[np.ndarray, "N H W 3"], b: UInt8[np.ndarray, "N H W 3"]) -> float:
    """Mean PSNR (dB) between two stacks of uint8 pictures."""
    diff = (a.astype(np.float64) - b.astype(np.float64)) / 255.0
    mse = np.maximum((diff**2).reshape(len(a), -1).mean(axis=1), 1e-10)
    return float(np.mean(10.0 * np.log10(1.0 / mse)))


def evaluate_vae(vae: Any, images: UInt8[np.ndarray, "N H W 3"], specs: list[SceneSpec]) -> VaeReport:
    """PSNR and colour-checker accuracy of the VAE's reconstructions of ``images`` (true colours in ``specs``)."""
    recon = reconstruct(vae, images)
    truth = [spec.colour for spec in specs]
    return VaeReport(
        psnr(recon, images), accuracy(classify_colours(recon), truth), accuracy(classify_colours(images), truth)
    )


def check_gate(report: VaeReport, min_accuracy: float) -> None:
    """Raises :class:`TeacherGateError` when the checker reads too few colours right on the reconstructions."""
    if report.colour.overall < min_accuracy:
        raise TeacherGateError(
            f"VAE gate failed: the colour checker reads {report.colour.overall:.1%} of the held-out "
            f"reconstructions right (needs {min_accuracy:.0%}; it reads {report.checker_on_originals.overall:.1%} "
            f"of the originals right; PSNR {report.psnr:.2f} dB). Per colour:\n{report.colour.table()}\n"
            "The denoiser stage was not started: train the VAE longer (--vae.steps) or wider "
            "(--architecture.vae-channels) and run again."
        )


@torch.no_grad()
def encode_pool(
    vae: Any, pool: UInt8[np.ndarray, "N H W 3"], batch_size: int = 64
) -> tuple[Float[Tensor, "N 4 h w"], Float[Tensor, "N 4 h w"]]:
    """Unscaled posterior means and standard deviations of the pool's latents (on the VAE's device)."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(pool), batch_size):
        posterior = vae.encode(to_tensor(pool[i : i + batch_size], device)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def latent_object_share(masks: np.ndarray, device: torch.device, factor: int = 8) -> Float[Tensor, "N 1 h w"]:
    """Share of object pixels in each ``factor x factor`` cell (one latent cell) of boolean masks ``[N, H, W]``."""
    n, h, w = masks.shape
    cells = masks.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4), dtype=np.float32)
    return torch.from_numpy(cells[:, None]).to(device)


class WeightAverage:
    """Exponential moving average of parameters, ``decay_n = min(decay, (1 + n) / (10 + n))``."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Moves the average towards the current parameters."""
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrites the parameters with their average."""
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def train_denoiser(
    parts: TeacherParts,
    means: Float[Tensor, "N 4 h w"],
    stds: Float[Tensor, "N 4 h w"],
    specs: list[SceneSpec],
    stage: DenoiserStage,
    seed: int,
    object_share: Float[Tensor, "N 1 h w"] | None = None,
    quiet: bool = False,
) -> list[float]:
    """Stage 2: trains text encoder and UNet in place on scaled pool latents; leaves the averaged weights in them.

    Args:
        parts: the teacher (its VAE config holds the latent scaling factor).
        means: unscaled posterior means of the pool's latents.
        stds: their posterior standard deviations (latents are sampled each step).
        specs: what each pool picture shows (captions).
        stage: settings.
        seed: seed of every random choice.
        object_share: share of object pixels in each latent cell, for ``stage.object_emphasis``.
        quiet: no progress bar.
    """
    device = means.device
    scale = float(parts.vae.config.scaling_factor)
    full = tokenize(parts.tokenizer, [caption(s) for s in specs]).to(device)
    short = tokenize(parts.tokenizer, [caption(s, with_ground=False) for s in specs]).to(device)
    empty = tokenize(parts.tokenizer, [""]).to(device)
    unet, text_encoder = parts.unet.to(device).train(), parts.text_encoder.to(device).train()
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimiser = torch.optim.AdamW(params, lr=stage.lr, weight_decay=0.0)
    average = WeightAverage([unet, text_encoder], stage.ema_decay)
    alphas = parts.scheduler.alphas_cumprod.to(device)
    num_timesteps = int(parts.scheduler.config.num_train_timesteps)
    gen = torch.Generator(device=device).manual_seed(seed + 2)
    losses = []
    with progress(stage.steps, "text encoder + UNet", quiet) as advance:
        for step in range(stage.steps):
            for group in optimiser.param_groups:
                group["lr"] = stage.lr * _schedule(step, stage.steps, 100)
            b = stage.batch_size
            idx = torch.randint(0, len(means), (b,), generator=gen, device=device)
            eps = torch.randn(means[idx].shape, generator=gen, device=device)
            latents = (means[idx] + stds[idx] * eps) * scale
            noise = torch.randn(latents.shape, generator=gen, device=device)
            t = torch.randint(0, num_timesteps, (b,), generator=gen, device=device)
            noisy = parts.scheduler.add_noise(latents, noise, t)
            r = torch.rand(b, generator=gen, device=device)[:, None]
            ids = torch.where(r < stage.uncond_prob, empty, full[idx])
            ids = torch.where(
                (r >= stage.uncond_prob) & (r < stage.uncond_prob + stage.short_caption_prob), short[idx], ids
            )
            pred = unet(noisy, t, encoder_hidden_states=encode_text(text_encoder, ids)).sample
            error = (pred - noise) ** 2
            if object_share is not None and stage.object_emphasis > 0:
                weight = 1.0 + stage.object_emphasis * object_share[idx]
                error = error * (weight / weight.mean())
            per_sample = error.mean(dim=(1, 2, 3))
            if stage.min_snr_gamma > 0:
                snr = alphas[t] / (1.0 - alphas[t])
                per_sample = per_sample * snr.clamp(max=stage.min_snr_gamma) / snr
            loss = per_sample.mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimiser.step()
            average.update()
            losses.append(loss.item())
            advance(loss=float(np.mean(losses[-50:])))
    average.copy_to_model()
    unet.eval()
    text_encoder.eval()
    return losses


def _load_stage1_vae(folder: Path, device: torch.device) -> Any:
    from diffusers import AutoencoderKL

    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"--reuse-vae needs a stage-1 VAE at {folder / 'vae'}; train one without the flag")
    vae: Any = AutoencoderKL.from_pretrained(str(folder / "vae"))
    return vae.to(device).eval()


def train_teacher(config: TrainConfig, log: Callable[[str], None] = print_line) -> Path:
    """Runs both stages, the gate between them, and saves the teacher to ``config.output``.

    Returns:
        The output folder.

    Raises:
        TeacherGateError: the VAE's reconstructions fail the colour checker (nothing of stage 2 is run).
    """
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device is not None else default_device()
    arch = config.architecture
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    tick = time.perf_counter()
    batch = generate_batch(config.seed, 0, config.pool_size, arch.resolution)
    pool, specs = batch.images, batch.specs
    holdout, holdout_specs = generate_images(config.seed, config.pool_size, config.holdout_size, arch.resolution)
    tick = lap("data", tick)
    log(f"Generated {len(pool)} training and {len(holdout)} held-out pictures in {timings['data']:.1f} s")

    parts = build_teacher(arch, config.seed)
    counts = count_parameters(parts)
    log(f"Parameters: {', '.join(f'{k} {v / 1e6:.2f}M' for k, v in counts.items())} on {device}")

    if config.reuse_vae:
        parts.vae = _load_stage1_vae(config.output, device)
        log(f"Reusing the stage-1 VAE from {config.output / 'vae'}")
    else:
        train_vae(parts.vae, pool, config.vae, config.seed, device, config.quiet)
    tick = lap("vae", tick)
    report = evaluate_vae(parts.vae, holdout, holdout_specs)
    log(
        f"VAE: held-out reconstruction PSNR {report.psnr:.2f} dB; colour checker on reconstructions "
        f"{report.colour.overall:.1%} (on originals {report.checker_on_originals.overall:.1%})"
    )
    tick = lap("gate", tick)
    check_gate(report, config.gate_min_accuracy)

    means, stds = encode_pool(parts.vae, pool)
    scale = 1.0 / float(means.std())
    parts.vae.register_to_config(scaling_factor=scale)
    if not config.reuse_vae:
        parts.vae.save_pretrained(str(config.output / "vae"))
    tick = lap("encode", tick)
    log(f"Encoded the pool to {tuple(means.shape[1:])} latents; scaling factor {scale:.4f}")

    losses = train_denoiser(
        parts, means, stds, specs, config.denoiser, config.seed, latent_object_share(batch.masks, device), config.quiet
    )
    tick = lap("denoiser", tick)
    info = {
        "architecture": architecture_dict(arch),
        "seed": config.seed,
        "pool_size": config.pool_size,
        "vae": asdict(config.vae),
        "denoiser": asdict(config.denoiser),
        "parameters": counts,
        "vae_psnr_db": round(report.psnr, 3),
        "vae_colour_accuracy": round(report.colour.overall, 4),
        "final_denoiser_loss": round(float(np.mean(losses[-50:])), 5) if losses else None,
        "seconds": timings,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }
    save_teacher(parts, config.output, info)
    log(
        f"Saved the teacher to {config.output} ({weights_size(config.output) / 1e6:.1f} MB of weights) after "
        f"{time.perf_counter() - start:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())})"
    )
    return config.output
