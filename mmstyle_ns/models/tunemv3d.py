"""TuneMV3D: a frozen 2-D diffusion model modulated by a 3-D field that aggregates all views at every denoising step.

Supplement of "TuneMV3D: Tuning Foundational Image Diffusion Models for Generalizable and Scalable Multiview 3D
Generation" (Sec. B). For ``n`` noisy latent views ``x_i^t`` of one object:

1. :class:`~mmstyle_ns.fields.aggregation.ViewFeatureEncoder` ``E(x_i^t, t, c)`` gives per-view features;
2. :class:`~mmstyle_ns.fields.aggregation.AggregationField` aggregates, for every point, the features of the views
   it projects into and is volume-rendered into an ``x_0`` prediction for every view (and for ``n'`` novel views);
3. :class:`~mmstyle_ns.guidance.modulation.MultiViewModulator` (a trainable copy of the UNet's encoder, zero 1x1
   convolutions out) maps the rendered ``x_0`` and the raw ``x_t`` to residuals of the frozen UNet's decoder
   (:meth:`~mmstyle_ns.guidance.backbone.DiffusionBackbone.unet_with_residuals`).

Loss (Eq. 3): ``lambda_1 mean_i ||eps_hat_i - eps_i||^2 + lambda_2 mean_{n+n'} |x0_hat - x0|``. The noise
prediction loss is the ``x^{t-1}`` L2 distance of the supplement up to a per-timestep factor. Sampling
(:meth:`TuneMV3DModel.generate`) runs every view through the interactive model at every DDIM step; the field of the
last step is what the viewer and ``ns-render`` show.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.models.base_model import Model, ModelConfig
from torch import Tensor
from torch.nn import Parameter

from mmstyle_ns.fields.aggregation import AggregationField, AggregationFieldConfig, ViewFeatureEncoder, ViewSet

__all__ = ["TuneMV3DModel", "TuneMV3DModelConfig"]


@dataclass
class TuneMV3DModelConfig(ModelConfig):
    """TuneMV3D's interactive model over a frozen diffusion backbone (the pipeline injects the backbone)."""

    _target: type = field(default_factory=lambda: TuneMV3DModel)
    enable_collider: bool = False
    """nerfstudio's near/far collider stays off: rays are clipped to the scene box."""
    feature_dim: int = 16
    """Channels of the per-view features the field aggregates."""
    encoder_width: int = 32
    """Hidden width of the view encoder E (a multiple of 8)."""
    field: AggregationFieldConfig = field(default_factory=AggregationFieldConfig)
    """Sizes and point encoding of the aggregating field."""
    num_samples: int = 32
    """Samples per ray when the field is rendered."""
    raw_noise: bool = True
    """Feed the raw noisy latent x_t to the modulator through a light encoder (the supplement's default; off is its
    ablation)."""
    raw_hidden: int = 32
    """Width of the raw-noise encoder."""
    field_output: Literal["x0", "features"] = "x0"
    """What the field renders: 'x0', a low-dimensional x_0 latent that the copied encoder maps to features (the
    supplement's method, supervised by the field L1 loss); 'features', the copied encoder's first-level features
    directly (the supplement's ablation; there is no x_0 to supervise, so no field loss)."""
    denoise_weight: float = 1.0
    """lambda_1: weight of the per-view denoising loss."""
    field_weight: float = 1.0
    """lambda_2: weight of the L1 loss on the field's rendered x_0 of input and novel views."""
    uncond_prob: float = 0.1
    """Probability that a training step uses the empty prompt (so classifier-free guidance works in sampling)."""
    min_step_ratio: float = 0.02
    """Smallest training timestep, as a fraction of the schedule."""
    max_step_ratio: float = 0.98
    """Largest training timestep, as a fraction of the schedule."""
    prompt: str = "a red cube on grass"
    """Prompt of the viewer's Generate button (and the default of mmstyle-tunemv3d generate)."""
    sample_steps: int = 20
    """DDIM steps of a generation."""
    guidance_scale: float = 5.0
    """Classifier-free guidance weight in sampling."""


class TuneMV3DModel(Model):
    """View encoder, aggregating field and modulator around an injected frozen ``DiffusionBackbone``.

    The shown state (:attr:`views` at :attr:`views_t`, set by :meth:`show`: a generation's last step, or the
    display scene the pipeline aggregates) is what ``get_outputs`` and ``get_outputs_for_camera`` render; it is
    saved with the checkpoint.
    """

    config: TuneMV3DModelConfig
    background_latent: Tensor
    """Latent of a white image (the empty space behind the field), ``[c]``."""

    def populate_modules(self) -> None:
        super().populate_modules()
        from mmstyle_ns.guidance.modulation import MultiViewModulator

        self.backbone: Any = self.kwargs.get("backbone")
        if self.backbone is None:
            raise ValueError("TuneMV3DModel needs the diffusion backbone: build it with its pipeline")
        backbone = self.backbone
        channels = int(backbone.latent_channels)
        text_dim = int(backbone.unet.config.cross_attention_dim)
        config = self.config
        self.encoder = ViewFeatureEncoder(channels, config.feature_dim, config.encoder_width, text_dim)
        features = config.field_output == "features"
        width = int(backbone.unet.config.block_out_channels[0]) if features else channels
        self.field = AggregationField(config.feature_dim, width, config.field)
        self.modulator = MultiViewModulator(
            backbone.unet, raw_noise=config.raw_noise, raw_hidden=config.raw_hidden, takes_features=features
        )
        with torch.no_grad():
            white = torch.ones(1, 3, 8 * backbone.vae_scale_factor, 8 * backbone.vae_scale_factor)
            background = torch.zeros(width) if features else backbone.encode_images(white).mean(dim=(0, 2, 3))
        self.register_buffer("background_latent", background, persistent=False)
        # the shown state (saved with checkpoints, so ns-render of a run or of a generation renders it)
        self.register_buffer("shown_features", torch.zeros(0, config.feature_dim, 1, 1))
        self.register_buffer("shown_camera_to_worlds", torch.zeros(0, 3, 4))
        self.register_buffer("shown_intrinsics", torch.zeros(0, 4))
        self.register_buffer("shown_t", torch.zeros((), dtype=torch.long))
        self.generation_cameras: Cameras | None = None
        """Cameras of the viewer's Generate button (set by the pipeline: the display scene's)."""
        self.showing_generation = False
        """Set by the viewer's Generate button: the pipeline then stops refreshing the shown display scene."""
        self.setup_viewer_controls()

    def setup_viewer_controls(self) -> None:
        """A Prompt field and a Generate button in the viewer: a multi-view generation of the prompt replaces the
        shown field (it blocks training while it samples)."""
        from nerfstudio.viewer.viewer_elements import ViewerButton, ViewerText

        self.viewer_prompt = ViewerText(
            "Prompt", self.config.prompt, cb_hook=self.set_prompt_from_viewer, hint="what Generate samples"
        )
        self.viewer_generate = ViewerButton("Generate", cb_hook=self.generate_from_viewer)

    def set_prompt_from_viewer(self, element: Any) -> None:
        """Viewer callback of the Prompt field (an empty text is ignored)."""
        text = str(element.value).strip()
        if text:
            self.config.prompt = text

    def generate_from_viewer(self, element: Any = None) -> None:
        """Viewer callback of the Generate button: samples ``config.prompt`` from :attr:`generation_cameras` (or,
        in a run opened for viewing only, from the shown state's cameras)."""
        cameras = self.generation_cameras if self.generation_cameras is not None else self.shown_cameras()
        if cameras is None:
            return
        was_training = self.training
        self.eval()
        self.generate(cameras, self.config.prompt, generator=torch.Generator().manual_seed(0))
        self.showing_generation = True
        self.train(was_training)

    def shown_cameras(self) -> Cameras | None:
        """The cameras of the shown state at image size (None when nothing is shown)."""
        if self.views is None:
            return None
        factor = int(self.backbone.vae_scale_factor)
        height, width = (int(x) * factor for x in self.shown_features.shape[-2:])
        fx, fy, cx, cy = (self.shown_intrinsics[:, i : i + 1] * factor for i in range(4))
        return Cameras(camera_to_worlds=self.shown_camera_to_worlds, fx=fx, fy=fy, cx=cx, cy=cy, width=width,
                       height=height)  # fmt: skip

    @property
    def views(self) -> ViewSet | None:
        """The aggregated views the viewer, ``ns-render`` and evaluation render (None before any is set)."""
        if self.shown_features.shape[0] == 0:
            return None
        return ViewSet(self.shown_features, self.shown_camera_to_worlds, self.shown_intrinsics)

    @property
    def views_t(self) -> int:
        """Timestep of :attr:`views`."""
        return int(self.shown_t)

    def show(self, views: ViewSet, t: int) -> None:
        """Makes ``views`` (at timestep ``t``) the shown state."""
        self.shown_features = views.features.detach().clone()
        self.shown_camera_to_worlds = views.camera_to_worlds.detach().clone()
        self.shown_intrinsics = views.intrinsics.detach().clone()
        self.shown_t = torch.tensor(int(t), device=self.shown_t.device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the shown state has the size of whatever was shown when the checkpoint was saved
        for name in ("shown_features", "shown_camera_to_worlds", "shown_intrinsics"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.empty_like(saved, device=self.background_latent.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        return {
            "interaction": [*self.encoder.parameters(), *self.field.parameters()],
            "modulator": list(self.modulator.parameters()),
        }

    # ---- cameras and rays -------------------------------------------------------------------------------

    def latent_cameras(self, cameras: Cameras) -> Cameras:
        """The cameras at their images' latent size (1 / ``vae_scale_factor``)."""
        from mmstyle_ns.data.datamanagers import cameras_at_size
        from mmstyle_ns.data.latents import vae_input_size

        factor = int(self.backbone.vae_scale_factor)
        height, width = int(cameras.height.reshape(-1)[0]), int(cameras.width.reshape(-1)[0])
        vae_h, vae_w = vae_input_size(height, width, factor)
        return cameras_at_size(cameras, vae_h // factor, vae_w // factor)

    @staticmethod
    def view_set(features: Tensor, cameras: Cameras) -> ViewSet:
        """A :class:`ViewSet` of feature maps and the (latent-size) cameras they were computed for."""
        intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).to(features)
        return ViewSet(features, cameras.camera_to_worlds.to(features), intrinsics)

    def _collide(self, rays: RayBundle) -> RayBundle:
        from nerfstudio.model_components.scene_colliders import AABBBoxCollider

        return AABBBoxCollider(self.scene_box, near_plane=0.05)(rays)

    def render_views(
        self, views: ViewSet, cameras: Cameras, t: int, chunk: int = 1 << 14
    ) -> dict[str, Float[Tensor, "V C h w"]]:
        """Renders the field of ``views`` from latent-size ``cameras``: ``x0`` ``[V, c, h, w]``, ``depth`` and
        ``accumulation`` ``[V, 1, h, w]`` (with gradients)."""
        device = views.features.device
        cameras = cameras.to(device)
        height, width = int(cameras.height.reshape(-1)[0]), int(cameras.width.reshape(-1)[0])
        bundle = cameras.generate_rays(camera_indices=torch.arange(len(cameras), device=device)[:, None])  # [h, w, V]
        flat = self._collide(bundle.flatten())  # rays [h*w*V], pixel-major
        parts: dict[str, list[Tensor]] = {"values": [], "depth": [], "accumulation": []}
        for start in range(0, len(flat), chunk):
            out = self.field.render(
                flat[start : start + chunk], views, t, self.config.num_samples, self.background_latent
            )
            for key in parts:
                parts[key].append(out[key])
        images = {key: torch.cat(value).reshape(height, width, len(cameras), -1) for key, value in parts.items()}
        return {  # [V, C, h, w]
            "x0": images["values"].permute(2, 3, 0, 1),
            "depth": images["depth"].permute(2, 3, 0, 1),
            "accumulation": images["accumulation"].permute(2, 3, 0, 1),
        }

    # ---- the interactive model -------------------------------------------------------------------------

    def interact(
        self,
        noisy: Float[Tensor, "V c h w"],
        t: int,
        text_emb: Float[Tensor, "1 L D"],
        cameras: Cameras,
        novel: Cameras | None = None,
        guidance_scale: float | None = None,
        uncond_emb: Float[Tensor, "1 L D"] | None = None,
    ) -> dict[str, Any]:
        """One pass of the interactive model over ``V`` noisy views of one object at timestep ``t``.

        Args:
            noisy: the views' noisy latents ``x_t``.
            t: the timestep (shared by the views).
            text_emb: the prompt's token embeddings.
            cameras: the views' cameras (any resolution; rendered at the latent size).
            novel: extra cameras the field also renders (the ``n'`` novel views of the field loss).
            guidance_scale: classifier-free guidance of the frozen UNet (None: the conditional prediction).
            uncond_emb: the empty prompt's embeddings (for guidance).

        Returns:
            ``eps`` ``[V, c, h, w]`` (the modulated UNet's noise prediction), ``x0`` (the field's rendering of the
            views, then of ``novel``), ``depth``, ``accumulation`` and ``views`` (the aggregated :class:`ViewSet`).
        """
        conditional = self._interact(noisy, t, text_emb, cameras, novel)
        if guidance_scale is None:
            return conditional
        # the whole interactive model runs on the empty prompt too: prompt drop-out trained it that way
        empty = self.backbone.text_embeddings("")[:1] if uncond_emb is None else uncond_emb
        unconditional = self._interact(noisy, t, empty, cameras)
        return {**conditional, "eps": guided(unconditional["eps"], conditional["eps"], guidance_scale)}

    def _interact(
        self,
        noisy: Float[Tensor, "V c h w"],
        t: int,
        text_emb: Float[Tensor, "1 L D"],
        cameras: Cameras,
        novel: Cameras | None = None,
    ) -> dict[str, Any]:
        v = noisy.shape[0]
        steps = torch.full((v,), int(t), device=noisy.device, dtype=torch.long)
        emb = text_emb.to(noisy).expand(v, -1, -1)
        latent = self.latent_cameras(cameras)
        views = self.view_set(self.encoder(noisy, steps, emb), latent)
        render = latent if novel is None else _concat(latent, self.latent_cameras(novel))
        rendered = self.render_views(views, render, int(t))
        down, mid = self.modulator(rendered["x0"][:v], noisy, steps, emb)
        eps = self.backbone.unet_with_residuals(noisy, steps, emb, down, mid)
        return {"eps": eps, **rendered, "views": views}

    def frozen_prediction(
        self, noisy: Float[Tensor, "V c h w"], t: int, text_emb: Float[Tensor, "1 L D"], guidance_scale: float,
        uncond_emb: Float[Tensor, "1 L D"],
    ) -> Float[Tensor, "V c h w"]:  # fmt: skip
        """The frozen UNet alone, guided the same way as :meth:`interact` (independent sampling of each view)."""
        v = noisy.shape[0]
        steps = torch.full((v,), int(t), device=noisy.device, dtype=torch.long)
        unet = self.backbone.unet_with_residuals
        conditional = unet(noisy, steps, text_emb.to(noisy).expand(v, -1, -1))
        unconditional = unet(noisy, steps, uncond_emb.to(noisy).expand(v, -1, -1))
        return guided(unconditional, conditional, guidance_scale)

    def training_losses(
        self,
        latents: Float[Tensor, "V c h w"],
        cameras: Cameras,
        novel_latents: Float[Tensor, "N c h w"] | None,
        novel: Cameras | None,
        prompt: str,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Eq. 3 for one object: the denoising loss of its ``V`` input views and the field's L1 loss on input and
        novel views; the timestep, the noise and the prompt drop-out are drawn from ``generator``."""
        backbone = self.backbone
        device = latents.device
        gen_device = generator.device if generator is not None else torch.device("cpu")
        drop = bool(torch.rand((), generator=generator, device=gen_device) < self.config.uncond_prob)
        text = backbone.text_embeddings("" if drop else prompt)[:1]
        t = backbone.sample_timesteps(
            1, generator=generator, min_step_ratio=self.config.min_step_ratio, max_step_ratio=self.config.max_step_ratio
        )
        noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(device)
        noisy = backbone.add_noise(latents, noise, t.to(device).expand(latents.shape[0]))
        out = self.interact(noisy, int(t.item()), text, cameras, novel)
        losses = {"denoise_loss": self.config.denoise_weight * F.mse_loss(out["eps"], noise)}
        if self.config.field_output == "x0":
            target = latents if novel_latents is None else torch.cat([latents, novel_latents])
            losses["field_loss"] = self.config.field_weight * (out["x0"] - target).abs().mean()
        return losses

    @torch.no_grad()
    def generate(
        self,
        cameras: Cameras,
        prompt: str,
        steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | None = None,
        modulate: bool = True,
        callback: Callable[[int, int, dict[str, Tensor]], None] | None = None,
    ) -> dict[str, Tensor]:
        """Multi-view DDIM sampling: every view goes through the interactive model at every step.

        Args:
            cameras: the ``V`` cameras to generate.
            prompt: the text prompt.
            steps: DDIM steps (default ``config.sample_steps``).
            guidance_scale: classifier-free guidance (default ``config.guidance_scale``).
            generator: source of the initial noise.
            modulate: False samples every view independently with the frozen UNet (the baseline).
            callback: called after every step with ``(index, timestep, state)``; ``state`` holds ``latents``
                (``x_t`` after the step) and, with ``modulate``, the field's ``x0``, ``depth`` and ``accumulation``.

        Returns:
            ``latents`` ``[V, c, h, w]`` (the final ``x_0``), ``images`` ``[V, 3, H, W]`` (decoded), and with
            ``modulate`` the field's last ``x0`` rendering and ``depth`` ``[V, 1, h, w]``; the last aggregated
            views become the shown state (:meth:`show`).
        """
        from diffusers import DDIMScheduler

        backbone = self.backbone
        device = self.background_latent.device
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        text = backbone.text_embeddings(prompt)[:1]
        uncond = backbone.text_embeddings("")[:1]
        latent = self.latent_cameras(cameras)
        height, width = int(latent.height.reshape(-1)[0]), int(latent.width.reshape(-1)[0])
        # the backbone returns noise whatever the model predicts (v-prediction is converted)
        scheduler: Any = DDIMScheduler.from_config(
            backbone.scheduler.config, clip_sample=False, prediction_type="epsilon"
        )
        scheduler.set_timesteps(self.config.sample_steps if steps is None else steps)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        shape = (len(cameras), int(backbone.latent_channels), height, width)
        x = torch.randn(shape, generator=generator, device=gen_device).to(device)
        out: dict[str, Any] = {}
        for index, t in enumerate(scheduler.timesteps):
            step = int(t)
            if modulate:
                out = self.interact(x, step, text, cameras, guidance_scale=scale, uncond_emb=uncond)
                eps = out["eps"]
                self.show(out["views"], step)
            else:
                eps = self.frozen_prediction(x, step, text, scale, uncond)
            x = scheduler.step(eps, t, x).prev_sample
            if callback is not None:
                callback(index, step, {"latents": x, **{k: v for k, v in out.items() if isinstance(v, Tensor)}})
        result = {"latents": x, "images": backbone.decode_latents(x)}
        if modulate:
            result |= {"x0": out["x0"], "depth": out["depth"], "accumulation": out["accumulation"]}
        return result

    # ---- nerfstudio rendering (viewer, ns-render, evaluation) --------------------------------------------

    def field_pictures(self, rendered: Float[Tensor, "V C h w"]) -> Float[Tensor, "V 3 H W"]:
        """RGB pictures of the field's renderings: decoded x_0 latents, or (field_output 'features') the first
        three feature channels, each scaled to [0, 1], at the image size."""
        if self.config.field_output == "x0":
            return self.backbone.decode_latents(rendered)
        shown = rendered[:, :3]
        lo, hi = shown.amin(dim=(0, 2, 3), keepdim=True), shown.amax(dim=(0, 2, 3), keepdim=True)
        scale = int(self.backbone.vae_scale_factor)
        return F.interpolate((shown - lo) / (hi - lo).clamp_min(1e-6), scale_factor=scale, mode="nearest")

    def get_outputs(self, ray_bundle: RayBundle) -> dict[str, Tensor]:  # type: ignore[override]
        """Latent values, depth and accumulation of rays through the current aggregated field."""
        if self.views is None:
            zeros = torch.zeros((*ray_bundle.shape, 1), device=self.background_latent.device)
            return {
                "latent": zeros.expand(*ray_bundle.shape, self.background_latent.shape[0]),
                "depth": zeros,
                "accumulation": zeros,
            }
        out = self.field.render(
            self._collide(ray_bundle), self.views, self.views_t, self.config.num_samples, self.background_latent
        )
        return {"latent": out["values"], "depth": out["depth"], "accumulation": out["accumulation"]}

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Any = None) -> dict[str, Tensor]:
        """Decoded RGB of the current field's ``x_0`` at the camera's resolution, with depth and accumulation."""
        height, width = int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0])
        device = self.background_latent.device
        if self.views is None:
            blank = torch.ones(height, width, 3, device=device)
            return {
                "rgb": blank,
                "depth": torch.zeros(height, width, 1, device=device),
                "accumulation": torch.zeros(height, width, 1, device=device),
            }
        rendered = self.render_views(self.views, self.latent_cameras(camera[:1]), self.views_t)
        rgb = self.field_pictures(rendered["x0"])

        def full(x: Tensor, mode: str = "bilinear") -> Tensor:
            return F.interpolate(x, size=(height, width), mode=mode)[0].permute(1, 2, 0)

        return {
            "rgb": full(rgb),
            "depth": full(rendered["depth"], "nearest"),
            "accumulation": full(rendered["accumulation"], "nearest"),
        }

    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        return {}

    def get_loss_dict(
        self, outputs: dict[str, Tensor], batch: dict[str, Any], metrics_dict: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        return {key: value for key, value in outputs.items() if key.endswith("_loss")}

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        from nerfstudio.utils import colormaps

        image = batch["image"].to(outputs["rgb"])
        if image.shape[-1] == 4:  # over white, as the views' latents were encoded
            image = image[..., :3] * image[..., 3:] + (1.0 - image[..., 3:])
        rgb = outputs["rgb"]
        mse = F.mse_loss(rgb, image)
        psnr = float(-10.0 * torch.log10(mse.clamp_min(1e-10)))
        return {"psnr": psnr}, {
            "img": torch.cat([image, rgb], dim=1),
            "accumulation": colormaps.apply_colormap(outputs["accumulation"]),
        }


def guided(unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``eps_u + s (eps_c - eps_u)``."""
    return unconditional + scale * (conditional - unconditional)


def _concat(a: Cameras, b: Cameras) -> Cameras:
    from mmstyle_ns.data.datamanagers import concat_cameras

    return concat_cameras(a, b)
