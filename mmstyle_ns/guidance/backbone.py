"""One frozen text-conditioned latent diffusion model (Stable Diffusion layout) shared by every score rule.

:class:`DiffusionBackbone` loads the UNet, VAE, CLIP text encoder, tokenizer and noise schedule of a model in the
diffusers folder layout (a local directory or a hub id already in the local cache), optionally a depth
ControlNet, freezes them and offers the few operations score distillation needs: encode images to latents,
decode latents, embed prompts (cached), add noise, sample (annealed) timesteps and predict noise with
classifier-free guidance in one batched UNet call. The score rules themselves live in
:mod:`mmstyle_ns.guidance.scores` (pure functions) and :mod:`mmstyle_ns.guidance.rules` (their typed configs).

Noise prediction for score distillation runs without an autograd graph; :meth:`DiffusionBackbone.unet_with_residuals`
is the one path that differentiates through the frozen UNet, for trainable adapters that add residuals to its
skip connections and mid block (the frozen weights still never receive gradients).

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
        self._residual_shapes: dict[tuple[int, int], tuple[list[tuple[int, ...]], tuple[int, ...]]] = {}
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
    def timestep_range(
        self,
        step: int | None = None,
        max_steps: int | None = None,
        min_step_ratio: float | None = None,
        max_step_ratio: float | None = None,
    ) -> tuple[int, int]:
        """Inclusive ``(lowest, highest)`` timestep sampled at training ``step`` of ``max_steps``.

        ``min_step_ratio``/``max_step_ratio`` override the config's range (a score rule's own range, e.g. DDS's
        ``[0.05, 0.95]``). With ``anneal='linear'`` the highest ratio moves linearly from the (given or configured)
        ``max_step_ratio`` at step 0 to ``anneal_final_max_step_ratio`` at step ``max_steps``, never below the
        lowest; without a step it is not annealed.

        Raises:
            ValueError: the ratios do not satisfy ``0 <= min_step_ratio < max_step_ratio <= 1``.
        """
        config = self.config
        low_ratio = config.min_step_ratio if min_step_ratio is None else min_step_ratio
        high_ratio = config.max_step_ratio if max_step_ratio is None else max_step_ratio
        if not 0.0 <= low_ratio < high_ratio <= 1.0:
            raise ValueError(f"Need 0 <= min_step_ratio < max_step_ratio <= 1, got {low_ratio}, {high_ratio}")
        if config.anneal == "linear" and step is not None and max_steps:
            progress = min(max(step / max_steps, 0.0), 1.0)
            high_ratio += (config.anneal_final_max_step_ratio - high_ratio) * progress
        last = self.num_train_timesteps - 1
        low = int(round(low_ratio * last))
        high = max(int(round(high_ratio * last)), low)
        return low, high

    def sample_timesteps(
        self,
        batch: int,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
        min_step_ratio: float | None = None,
        max_step_ratio: float | None = None,
    ) -> Int[Tensor, " B"]:
        """Uniform integer timesteps in :meth:`timestep_range` (annealed by ``step``/``max_steps``, range optionally
        overridden by ``min_step_ratio``/``max_step_ratio``)."""
        low, high = self.timestep_range(step, max_steps, min_step_ratio, max_step_ratio)
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

    def _controlnet_residuals(
        self, x: Tensor, t: Tensor, emb: Tensor, control: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        if self.controlnet is None:
            raise GuidanceModelError(
                f"controlnet_cond was given but no ControlNet is loaded; set {self.config.flag('controlnet_path')}"
            )
        down, mid = self.controlnet(
            x,
            t,
            encoder_hidden_states=emb,
            controlnet_cond=control,
            conditioning_scale=self.config.controlnet_scale,
            return_dict=False,
        )
        return tuple(down), mid

    def _unet_epsilon(
        self,
        x: Tensor,
        t: Tensor,
        emb: Tensor,
        control: Tensor | None = None,
        down: Sequence[Tensor] | None = None,
        mid: Tensor | None = None,
    ) -> Tensor:
        """One UNet call on assembled backbone-device batches; ControlNet residuals are added to ``down``/``mid``.

        ``down`` and ``mid`` come together or not at all (diffusers reads ``down`` alone as T2I-Adapter input).
        Returns the noise prediction on the backbone's device; differentiable unless the caller disables grad.
        """
        if control is not None:
            control_down, control_mid = self._controlnet_residuals(x, t, emb, control)
            if down is None or mid is None:
                down, mid = control_down, control_mid
            else:
                down = [a + b for a, b in zip(control_down, down, strict=True)]
                mid = control_mid + mid
        extra: dict[str, Any] = {}
        if down is not None and mid is not None:
            extra = {"down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}
        out = self.unet(x, t, encoder_hidden_states=emb, return_dict=False, **extra)[0]
        return self.epsilon_from_model_output(out, x, t)

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
        control = None
        if controlnet_cond is not None:
            control = self._prepare_control(controlnet_cond, n, (x.shape[-2], x.shape[-1]))
            control = torch.cat([control, control])
        eps = self._unet_epsilon(x2, t2, emb2, control).to(latents_noisy.device, latents_noisy.dtype)
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

    # ------------------------------------------------------------------ differentiable UNet path (adapters)
    @torch.no_grad()
    def unet_residual_shapes(self, height: int, width: int) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Per-sample shapes ``(C, h, w)`` of the residuals :meth:`unet_with_residuals` accepts for ``h x w`` latents.

        Returns ``(down, mid)``: one shape per UNet skip connection (the ``conv_in`` output, then every resnet and
        downsampler output of the down blocks, in order; the decoder consumes them in reverse) and the shape of the
        mid-block output. Read from one no-grad UNet call on zeros with forward hooks, cached per latent size.
        """
        key = (int(height), int(width))
        if key not in self._residual_shapes:
            down: list[tuple[int, ...]] = []
            mid: list[tuple[int, ...]] = []

            def per_sample(x: Tensor) -> tuple[int, ...]:
                return tuple(int(d) for d in x.shape[1:])

            def record_down_block(_module: Any, _args: Any, out: Any) -> None:
                hidden, res_samples = out  # the last hidden state feeds the mid block
                down.extend(per_sample(r) for r in res_samples)
                mid.append(per_sample(hidden))

            unet = self.unet
            hooks = [unet.conv_in.register_forward_hook(lambda _m, _a, out: down.append(per_sample(out)))]
            hooks += [block.register_forward_hook(record_down_block) for block in unet.down_blocks]
            if unet.mid_block is not None:
                hooks.append(unet.mid_block.register_forward_hook(lambda _m, _a, out: mid.append(per_sample(out))))
            try:
                x = torch.zeros(1, self.latent_channels, *key, device=self.device, dtype=self.dtype)
                emb = torch.zeros(1, 1, int(unet.config.cross_attention_dim), device=self.device, dtype=self.dtype)
                unet(x, torch.zeros(1, dtype=torch.long, device=self.device), encoder_hidden_states=emb)
            finally:
                for hook in hooks:
                    hook.remove()
            self._residual_shapes[key] = (down, mid[-1])
        down_shapes, mid_shape = self._residual_shapes[key]
        return list(down_shapes), mid_shape

    def _prepare_residuals(
        self,
        down: Sequence[Tensor] | None,
        mid: Tensor | None,
        n: int,
        latent_hw: tuple[int, int],
    ) -> tuple[list[Tensor] | None, Tensor | None]:
        if down is None and mid is None:
            return None, None
        down_shapes, mid_shape = self.unet_residual_shapes(*latent_hw)
        zero = torch.zeros((), device=self.device, dtype=self.dtype)  # broadcasts: adds nothing
        if down is None:
            prepared_down = [zero] * len(down_shapes)
        else:
            if len(down) != len(down_shapes):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down)} tensors; this UNet has {len(down_shapes)} skip "
                    f"connections (shapes from unet_residual_shapes: {down_shapes})"
                )
            prepared_down = []
            for i, (residual, shape) in enumerate(zip(down, down_shapes, strict=True)):
                name = f"down_block_additional_residuals[{i}]"
                if residual.ndim != 4 or tuple(residual.shape[1:]) != shape:
                    raise ValueError(f"{name} has shape {tuple(residual.shape)}, expected [N, *{shape}]")
                prepared_down.append(_broadcast_batch(residual.to(self.device, self.dtype), n, name))
        if mid is None:
            prepared_mid = zero
        else:
            if mid.ndim != 4 or tuple(mid.shape[1:]) != mid_shape:
                raise ValueError(
                    f"mid_block_additional_residual has shape {tuple(mid.shape)}, expected [N, *{mid_shape}]"
                )
            prepared_mid = _broadcast_batch(mid.to(self.device, self.dtype), n, "mid_block_additional_residual")
        return prepared_down, prepared_mid

    def unet_with_residuals(
        self,
        latents_noisy: Float[Tensor, "N c h w"],
        t: Int[Tensor, " N"] | int,
        text_emb: Float[Tensor, "N L D"],
        down_block_additional_residuals: Sequence[Float[Tensor, "N ..."]] | None = None,
        mid_block_additional_residual: Float[Tensor, "N ..."] | None = None,
        *,
        guidance_scale: float | None = None,
        uncond_emb: Float[Tensor, "N L D"] | None = None,
        controlnet_cond: Float[Tensor, "N 3 H W"] | None = None,
    ) -> Float[Tensor, "N c h w"]:
        """Noise prediction through the frozen UNet WITH autograd, with residuals added to its decoder inputs.

        ``down_block_additional_residuals`` (one tensor per skip connection) and ``mid_block_additional_residual``
        are added to the UNet's skip connections and mid-block output, as a ControlNet's are; shapes are given by
        :meth:`unet_residual_shapes`. Either may be omitted (zeros). Gradients reach ``latents_noisy``,
        ``text_emb`` and the residuals (e.g. trainable adapters); the frozen weights have ``requires_grad=False``
        and never receive any. Runs under the caller's grad mode.

        ``guidance_scale`` None: the conditional prediction alone (one UNet pass over ``N``, e.g. a denoising loss
        for adapters). A number: classifier-free guidance ``eps_u + s (eps_c - eps_u)`` from one batched call of
        ``2N``, the residuals (and ControlNet condition) added to both halves; ``uncond_emb`` defaults to the empty
        prompt. ``text_emb``, ``uncond_emb``, residuals and ``controlnet_cond`` may have batch 1; ControlNet
        residuals, if a condition is given, are summed with the given ones. Returned in ``latents_noisy``'s device
        and dtype (differentiably, so gradients cross devices).

        Raises:
            ValueError: a residual's count or per-sample shape does not match the UNet, or a batch mismatches.
            GuidanceModelError: ``controlnet_cond`` without a loaded ControlNet.
        """
        if latents_noisy.ndim != 4:
            raise ValueError(f"Expected latents_noisy [N, c, h, w], got {tuple(latents_noisy.shape)}")
        n = latents_noisy.shape[0]
        hw = (latents_noisy.shape[-2], latents_noisy.shape[-1])
        x = latents_noisy.to(self.device, self.dtype)
        steps = _broadcast_batch(torch.as_tensor(t, device=self.device).long().reshape(-1), n, "t")
        emb = _broadcast_batch(text_emb.to(self.device, self.dtype), n, "text_emb")
        down, mid = self._prepare_residuals(down_block_additional_residuals, mid_block_additional_residual, n, hw)
        control = None if controlnet_cond is None else self._prepare_control(controlnet_cond, n, hw)
        if guidance_scale is not None:
            uncond = self.text_embeddings("") if uncond_emb is None else uncond_emb
            uncond = _broadcast_batch(uncond.to(self.device, self.dtype), n, "uncond_emb")
            x, steps, emb = torch.cat([x, x]), torch.cat([steps, steps]), torch.cat([uncond, emb])
            if down is not None and mid is not None:
                down = [r if r.ndim == 0 else torch.cat([r, r]) for r in down]
                mid = mid if mid.ndim == 0 else torch.cat([mid, mid])
            if control is not None:
                control = torch.cat([control, control])
        eps = self._unet_epsilon(x, steps, emb, control, down, mid).to(latents_noisy.device, latents_noisy.dtype)
        if guidance_scale is None:
            return eps
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def _broadcast_batch(x: Tensor, n: int, name: str) -> Tensor:
    if x.shape[0] == n:
        return x
    if x.shape[0] == 1:
        return x.expand(n, *x.shape[1:])
    raise ValueError(f"{name} has batch {x.shape[0]}, expected 1 or {n}")
