"""One frozen text-conditioned latent diffusion model (Stable Diffusion layout) shared by every score rule.

:class:`DiffusionBackbone` loads the UNet, VAE, CLIP text encoder, tokenizer and noise schedule of a model in the
diffusers folder layout (a local directory or a hub id already in the local cache), optionally a depth
ControlNet, freezes them and offers the few operations score distillation needs: encode images to latents,
decode latents, embed prompts (cached), add noise, sample (annealed) timesteps and predict noise with
classifier-free guidance in one batched UNet call. The score rules themselves live in
:mod:`mmstyle_ns.guidance.scores`.

Nothing heavy happens at import: diffusers and transformers are imported when a backbone is built.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from mmstyle_ns.guidance.checks import (
    EXPECTED_CONTROLNET_LAYOUT,
    EXPECTED_LAYOUT,
    GuidanceModelError,
    check_tokenizer,
    missing_controlnet_files,
    missing_model_files,
    require_diffusion_libraries,
    resolve_local,
)

__all__ = ["DiffusionBackbone", "DiffusionBackboneConfig", "GuidanceModelError"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class DiffusionBackboneConfig(InstantiateConfig):
    """Configuration of the frozen latent diffusion model that guidance scores are distilled from."""

    _target: type = field(default_factory=lambda: DiffusionBackbone)
    model_path: str | None = None
    """Stable Diffusion weights: a local directory in the diffusers layout (unet/, vae/, text_encoder/, tokenizer/,
    scheduler/, model_index.json), e.g. a copy of SD 1.5 or 2.1, or a hub id already in the local cache."""
    variant: str | None = None
    """Weight-file variant to load (e.g. 'fp16' for diffusion_pytorch_model.fp16.safetensors); None for the
    plain files."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Precision of the frozen diffusion weights; half precision is opt-in (use it on a GPU)."""
    device: str | None = None
    """Device that holds the diffusion model (e.g. a second GPU); None puts it on the caller's device."""
    offline: bool = True
    """Only read local files (local_files_only); never reach a model hub."""
    guidance_scale: float = 7.5
    """Classifier-free guidance weight used when a score rule does not give its own."""
    min_step_ratio: float = 0.02
    """Smallest diffusion timestep sampled, as a fraction of the training timesteps."""
    max_step_ratio: float = 0.98
    """Largest diffusion timestep sampled, as a fraction of the training timesteps (at step 0 when annealing)."""
    anneal: Literal["none", "linear"] = "none"
    """Timestep annealing: 'linear' moves the largest timestep from max_step_ratio at step 0 to
    anneal_final_max_step_ratio at the last training step."""
    anneal_final_max_step_ratio: float = 0.5
    """Largest timestep ratio at the end of training when annealing."""
    sample_latents: bool = False
    """Encode images to a sample of the VAE posterior instead of its mean (the mean is deterministic)."""
    scheduler: Literal["ddim", "ddpm"] = "ddim"
    """Scheduler class built from the model's scheduler config (clip_sample is turned off for latents)."""
    controlnet_path: str | None = None
    """Optional diffusers ControlNetModel (e.g. depth conditioning): local directory or cached hub id."""
    controlnet_scale: float = 1.0
    """Strength of the ControlNet residuals."""
    flag_prefix: str = "--pipeline.model.guidance"
    """CLI prefix of this config, used by error messages to name the exact flag to set."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_step_ratio < self.max_step_ratio <= 1.0:
            raise ValueError(
                f"Need 0 <= min_step_ratio < max_step_ratio <= 1, got {self.min_step_ratio}, {self.max_step_ratio}"
            )
        if not self.min_step_ratio < self.anneal_final_max_step_ratio <= 1.0:
            raise ValueError("anneal_final_max_step_ratio must lie in (min_step_ratio, 1]")

    def flag(self, name: str) -> str:
        """The CLI flag of field ``name`` (tyro spells underscores as hyphens)."""
        return f"{self.flag_prefix}.{name.replace('_', '-')}"


class DiffusionBackbone:
    """A frozen Stable-Diffusion-like model (UNet, VAE, CLIP text encoder, noise schedule, optional ControlNet).

    Deliberately not an ``nn.Module``: its weights must never enter a model's ``state_dict``, optimizer or
    ``.to()`` moves. It keeps its own device (``config.device``) and precision; every operation takes inputs on
    any device/dtype and returns results on the input's device and dtype, so gradients cross devices through
    ``.to()``. All weights have ``requires_grad=False`` and are in eval mode.

    Args:
        config: the backbone configuration.
        device: the caller's device, used when ``config.device`` is None.

    Raises:
        GuidanceModelError: weights not set, missing, incomplete or mutually inconsistent; the message names
            the config flag and lists the expected folder layout.
    """

    # diffusers/transformers objects, typed loosely: they are imported lazily and their stubs are partial.
    tokenizer: Any
    """``transformers.CLIPTokenizer``."""
    text_encoder: Any
    """``transformers.CLIPTextModel``."""
    vae: Any
    """``diffusers.AutoencoderKL``."""
    unet: Any
    """``diffusers.UNet2DConditionModel``."""
    scheduler: Any
    """``diffusers.DDIMScheduler`` or ``DDPMScheduler`` (only its noise schedule is used here)."""
    controlnet: Any
    """``diffusers.ControlNetModel`` or None."""

    def __init__(self, config: DiffusionBackboneConfig, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.device = torch.device(config.device if config.device is not None else device)
        self.dtype = _DTYPES[config.dtype]
        self._text_cache: dict[str, Tensor] = {}
        self._load()
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod: Float[Tensor, " T"] = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type: str = str(self.scheduler.config.get("prediction_type", "epsilon"))
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        config = self.config
        flag = config.flag("model_path")
        if config.model_path is None:
            raise GuidanceModelError(
                f"No diffusion model is set for guidance. Set {flag} to a local Stable Diffusion folder in the "
                f"diffusers layout (or a hub id in the local cache). Expected layout:\n{EXPECTED_LAYOUT}"
            )
        root = resolve_local(config.model_path, config.offline)
        if root is None and config.offline:
            raise GuidanceModelError(
                f"{flag}={config.model_path!r} is neither a local directory nor a model in the local Hugging Face "
                f"cache (offline mode, nothing is downloaded). Point it at a folder with this layout:\n"
                f"{EXPECTED_LAYOUT}"
            )
        if root is not None:
            missing = missing_model_files(root)
            if missing:
                raise GuidanceModelError(
                    f"The diffusion model at {flag}={str(root)!r} is incomplete. Missing: {', '.join(missing)}.\n"
                    f"Expected layout:\n{EXPECTED_LAYOUT}"
                )
        source = str(root) if root is not None else config.model_path

        require_diffusion_libraries()
        from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        common: dict[str, Any] = {"local_files_only": config.offline}
        diffusers_kw: dict[str, Any] = {
            **common,
            "torch_dtype": self.dtype,
            "variant": config.variant,
            "low_cpu_mem_usage": importlib.util.find_spec("accelerate") is not None,
        }

        def load(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - re-raised as one clear error with the cause attached
                raise GuidanceModelError(
                    f"Could not load the {what} of the diffusion model at {flag}={source!r}: "
                    f"{type(error).__name__}: {error}\nExpected layout:\n{EXPECTED_LAYOUT}"
                ) from error

        # Cheap parts first, so a broken folder fails before the heavy weights are read.
        self.tokenizer = load("tokenizer", CLIPTokenizer.from_pretrained, source, subfolder="tokenizer", **common)
        check_tokenizer(self.tokenizer, flag)
        scheduler_cls = DDIMScheduler if config.scheduler == "ddim" else DDPMScheduler
        scheduler_config = load("scheduler", scheduler_cls.load_config, source, subfolder="scheduler", **common)
        self.scheduler = scheduler_cls.from_config(scheduler_config, clip_sample=False)
        self.text_encoder = load(
            "text encoder",
            CLIPTextModel.from_pretrained,
            source,
            subfolder="text_encoder",
            dtype=self.dtype,
            variant=config.variant,
            **common,
        )
        check_tokenizer(self.tokenizer, flag, int(self.text_encoder.config.vocab_size))
        self.vae = load("VAE", AutoencoderKL.from_pretrained, source, subfolder="vae", **diffusers_kw)
        self.unet = load("UNet", UNet2DConditionModel.from_pretrained, source, subfolder="unet", **diffusers_kw)
        if int(self.unet.config.in_channels) != int(self.vae.config.latent_channels):
            raise GuidanceModelError(
                f"UNet takes {self.unet.config.in_channels} channels but the VAE makes "
                f"{self.vae.config.latent_channels}: unet/ and vae/ at {flag} come from different models."
            )
        if int(self.unet.config.cross_attention_dim) != int(self.text_encoder.config.hidden_size):
            raise GuidanceModelError(
                f"UNet cross-attention width {self.unet.config.cross_attention_dim} does not match the text "
                f"encoder width {self.text_encoder.config.hidden_size}: components at {flag} do not belong together."
            )
        self.controlnet = None
        if config.controlnet_path is not None:
            self.controlnet = self._load_controlnet(config.controlnet_path, diffusers_kw)
        for module in (self.text_encoder, self.vae, self.unet, self.controlnet):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)

    def _load_controlnet(self, path: str, diffusers_kw: dict[str, Any]) -> Any:
        config = self.config
        flag = config.flag("controlnet_path")
        root = resolve_local(path, config.offline)
        if root is None and config.offline:
            raise GuidanceModelError(
                f"{flag}={path!r} is neither a local directory nor a model in the local Hugging "
                f"Face cache (offline mode). Expected a ControlNet folder:\n{EXPECTED_CONTROLNET_LAYOUT}"
            )
        if root is not None:
            missing = missing_controlnet_files(root)
            if missing:
                raise GuidanceModelError(
                    f"The ControlNet at {flag}={str(root)!r} is incomplete. Missing: {', '.join(missing)}.\n"
                    f"Expected:\n{EXPECTED_CONTROLNET_LAYOUT}"
                )
        from diffusers import ControlNetModel

        source = str(root) if root is not None else path
        try:
            # The base model's weight variant does not apply: ControlNets ship their own files.
            controlnet: Any = ControlNetModel.from_pretrained(source, **{**diffusers_kw, "variant": None})
        except Exception as error:  # noqa: BLE001
            raise GuidanceModelError(
                f"Could not load the ControlNet at {flag}={source!r}: {type(error).__name__}: {error}\n"
                f"Expected:\n{EXPECTED_CONTROLNET_LAYOUT}"
            ) from error
        if int(controlnet.config.cross_attention_dim) != int(self.unet.config.cross_attention_dim):
            raise GuidanceModelError(
                f"The ControlNet at {flag} has cross-attention width {controlnet.config.cross_attention_dim}, the "
                f"UNet {self.unet.config.cross_attention_dim}: it was trained for another base model."
            )
        return controlnet

    def frozen_modules(self) -> list[torch.nn.Module]:
        """The frozen networks (text encoder, VAE, UNet and, if loaded, the ControlNet)."""
        modules = [self.text_encoder, self.vae, self.unet, self.controlnet]
        return [m for m in modules if isinstance(m, torch.nn.Module)]

    # ------------------------------------------------------------------ images <-> latents
    def encode_images(
        self, images: Float[Tensor, "B 3 H W"], generator: torch.Generator | None = None
    ) -> Float[Tensor, "B c h w"]:
        """VAE latents of RGB images in [0, 1], scaled by the VAE's ``scaling_factor``; differentiable.

        ``H`` and ``W`` must be multiples of :attr:`vae_scale_factor` (8 for Stable Diffusion; resize first).
        The posterior mean is used unless ``config.sample_latents``. Returned on the images' device and dtype.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-2] % self.vae_scale_factor or images.shape[-1] % self.vae_scale_factor:
            raise ValueError(f"Image size {tuple(images.shape[-2:])} is not a multiple of {self.vae_scale_factor}")
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        posterior = self.vae.encode(x).latent_dist
        latents = posterior.sample(generator) if self.config.sample_latents else posterior.mean
        latents = latents * float(self.vae.config.scaling_factor)
        return latents.to(images.device, images.dtype)

    def decode_latents(self, latents: Float[Tensor, "B c h w"]) -> Float[Tensor, "B 3 H W"]:
        """RGB images in [0, 1] from scaled latents (inverse of :meth:`encode_images`); differentiable."""
        z = latents.to(self.device, self.dtype) / float(self.vae.config.scaling_factor)
        images = self.vae.decode(z).sample
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0).to(latents.device, latents.dtype)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def text_embeddings(self, prompts: str | Sequence[str]) -> Float[Tensor, "N L D"]:
        """CLIP token embeddings (last hidden state) of prompts, cached per prompt, on the backbone's device."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if len(prompts) == 0:
            raise ValueError("text_embeddings needs at least one prompt")
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            length = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
            ids = self.tokenizer(
                new, padding="max_length", max_length=length, truncation=True, return_tensors="pt"
            ).input_ids.to(self.device)
            hidden = self.text_encoder(ids)[0]
            for prompt, emb in zip(new, hidden, strict=True):
                self._text_cache[prompt] = emb
        return torch.stack([self._text_cache[p] for p in prompts])

    def clear_text_cache(self) -> None:
        """Drops cached prompt embeddings."""
        self._text_cache.clear()

    # ------------------------------------------------------------------ noise schedule
    def timestep_range(self, step: int | None = None, max_steps: int | None = None) -> tuple[int, int]:
        """Inclusive ``(lowest, highest)`` timestep sampled at training ``step`` of ``max_steps``.

        With ``anneal='linear'`` the highest ratio moves linearly from ``max_step_ratio`` (step 0) to
        ``anneal_final_max_step_ratio`` (step ``max_steps``); without a step it is not annealed.
        """
        config = self.config
        high_ratio = config.max_step_ratio
        if config.anneal == "linear" and step is not None and max_steps:
            progress = min(max(step / max_steps, 0.0), 1.0)
            high_ratio += (config.anneal_final_max_step_ratio - config.max_step_ratio) * progress
        last = self.num_train_timesteps - 1
        low = int(round(config.min_step_ratio * last))
        high = max(int(round(high_ratio * last)), low)
        return low, high

    def sample_timesteps(
        self,
        batch: int,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, " B"]:
        """Uniform integer timesteps in :meth:`timestep_range` (annealed by ``step``/``max_steps``)."""
        low, high = self.timestep_range(step, max_steps)
        gen_device = generator.device if generator is not None else self.device
        t = torch.randint(low, high + 1, (batch,), generator=generator, device=gen_device)
        return t.to(self.device)

    def alphas_at(self, t: Int[Tensor, " B"], like: Tensor) -> Float[Tensor, "B 1 1 1"]:
        """``alpha_bar_t`` broadcastable over ``like`` (a ``[B, ...]`` tensor), on its device, in float32."""
        alphas = self.alphas_cumprod.to(like.device)[t.to(like.device).long()]
        return alphas.view(-1, *([1] * (like.ndim - 1)))

    def add_noise(
        self, latents: Float[Tensor, "B c h w"], noise: Float[Tensor, "B c h w"], t: Int[Tensor, " B"]
    ) -> Float[Tensor, "B c h w"]:
        """Forward diffusion ``z_t = sqrt(alpha_bar_t) z + sqrt(1 - alpha_bar_t) eps`` (differentiable in z)."""
        alpha = self.alphas_at(t, latents)
        return (alpha.sqrt() * latents + (1.0 - alpha).sqrt() * noise).to(latents.dtype)

    def epsilon_from_model_output(
        self, output: Float[Tensor, "B c h w"], latents_noisy: Float[Tensor, "B c h w"], t: Int[Tensor, " B"]
    ) -> Float[Tensor, "B c h w"]:
        """Converts the UNet's output to a noise prediction whatever the model's ``prediction_type``.

        ``epsilon``: unchanged; ``v_prediction`` (SD 2.x 768): ``eps = sqrt(a) v + sqrt(1 - a) z_t``;
        ``sample``: ``eps = (z_t - sqrt(a) x0) / sqrt(1 - a)``, with ``a = alpha_bar_t``.
        """
        if self.prediction_type == "epsilon":
            return output
        alpha = self.alphas_at(t, latents_noisy)
        if self.prediction_type == "v_prediction":
            return (alpha.sqrt() * output + (1.0 - alpha).sqrt() * latents_noisy).to(output.dtype)
        if self.prediction_type == "sample":
            return ((latents_noisy - alpha.sqrt() * output) / (1.0 - alpha).sqrt()).to(output.dtype)
        raise GuidanceModelError(f"Unsupported scheduler prediction_type {self.prediction_type!r}")

    # ------------------------------------------------------------------ noise prediction
    def _prepare_control(self, cond: Tensor, n: int, latent_hw: tuple[int, int]) -> Tensor:
        if cond.ndim != 4 or cond.shape[1] not in (1, 3):
            raise ValueError(f"Expected controlnet_cond [B, 1 or 3, H, W] in [0, 1], got {tuple(cond.shape)}")
        cond = cond.to(self.device, self.dtype)
        if cond.shape[1] == 1:
            cond = cond.expand(-1, 3, -1, -1)
        size = (latent_hw[0] * self.vae_scale_factor, latent_hw[1] * self.vae_scale_factor)
        if tuple(cond.shape[-2:]) != size:
            cond = F.interpolate(cond, size=size, mode="bilinear", align_corners=False, antialias=True)
        return _broadcast_batch(cond, n, "controlnet_cond")

    @torch.no_grad()
    def noise_predictions(
        self,
        latents_noisy: Float[Tensor, "N c h w"],
        t: Int[Tensor, " N"] | int,
        text_emb: Float[Tensor, "N L D"],
        uncond_emb: Float[Tensor, "N L D"] | None = None,
        controlnet_cond: Float[Tensor, "N 3 H W"] | None = None,
    ) -> tuple[Float[Tensor, "N c h w"], Float[Tensor, "N c h w"]]:
        """Unconditional and conditional noise predictions from one batched UNet call (no autograd graph).

        ``text_emb``/``uncond_emb``/``controlnet_cond`` may have batch 1 (shared). ``uncond_emb`` defaults to
        the empty prompt. ``controlnet_cond`` (depth etc., in [0, 1], 1 or 3 channels, any size) needs
        ``config.controlnet_path``. Returned in ``latents_noisy``'s device and dtype.
        """
        n = latents_noisy.shape[0]
        if uncond_emb is None:
            uncond_emb = self.text_embeddings("")
        t = torch.as_tensor(t, device=self.device).long().reshape(-1)
        t = _broadcast_batch(t, n, "t")
        cond_emb = _broadcast_batch(text_emb.to(self.device, self.dtype), n, "text_emb")
        uncond_emb = _broadcast_batch(uncond_emb.to(self.device, self.dtype), n, "uncond_emb")
        x = latents_noisy.to(self.device, self.dtype)
        x2, t2, emb2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond_emb, cond_emb])
        extra: dict[str, Any] = {}
        if controlnet_cond is not None:
            if self.controlnet is None:
                raise GuidanceModelError(
                    f"controlnet_cond was given but no ControlNet is loaded; set {self.config.flag('controlnet_path')}"
                )
            control = self._prepare_control(controlnet_cond, n, (x.shape[-2], x.shape[-1]))
            down, mid = self.controlnet(
                x2,
                t2,
                encoder_hidden_states=emb2,
                controlnet_cond=torch.cat([control, control]),
                conditioning_scale=self.config.controlnet_scale,
                return_dict=False,
            )
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        out = self.unet(x2, t2, encoder_hidden_states=emb2, return_dict=False, **extra)[0]
        eps = self.epsilon_from_model_output(out, x2, t2).to(latents_noisy.device, latents_noisy.dtype)
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond, eps_cond

    @torch.no_grad()
    def predict_noise(
        self,
        latents_noisy: Float[Tensor, "N c h w"],
        t: Int[Tensor, " N"] | int,
        text_emb: Float[Tensor, "N L D"],
        guidance_scale: float | None = None,
        uncond_emb: Float[Tensor, "N L D"] | None = None,
        controlnet_cond: Float[Tensor, "N 3 H W"] | None = None,
    ) -> Float[Tensor, "N c h w"]:
        """Classifier-free guided noise ``eps_u + s (eps_c - eps_u)`` from one batched UNet call.

        ``guidance_scale`` defaults to ``config.guidance_scale``. See :meth:`noise_predictions` for the inputs.
        """
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        eps_uncond, eps_cond = self.noise_predictions(latents_noisy, t, text_emb, uncond_emb, controlnet_cond)
        return eps_uncond + scale * (eps_cond - eps_uncond)


def _broadcast_batch(x: Tensor, n: int, name: str) -> Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {n}")
