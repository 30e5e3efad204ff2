"""``head-stylize``: identity-preserving head stylization (Bilecen et al., `arXiv 2411.13536
<https://arxiv.org/abs/2411.13536>`_) of a trained base field's colours by likelihood distillation.

A step of the guided stage, over what :class:`~mmstyle_ns.data.datamanagers.GuidedDataManager` draws (by default
``sampling:mirrored-view-set``: ``k x k`` training cameras and their mirror cameras about the head's symmetry plane):

* every camera is rendered with gradients at the tile size: the ``k x k`` tiles together are the teacher's input
  size (its UNet's ``sample_size`` latents), so one grid is one diffusion input;
* the renders are encoded by the frozen VAE, the views' latents tiled into one grid
  (:func:`~mmstyle_ns.guidance.scores.pack_grid`) and scored once by the rule, rank-weighted likelihood
  distillation by default (:class:`~mmstyle_ns.guidance.rules.LDConfig`: ``s (eps_c - eps_u)`` weighted by
  ``sqrt(alpha_bar_t)``, SVD rank weights, per-channel statistics restored), with the rendered silhouette (the
  accumulation) as the mask;
* each tile's latent gradient ``g`` reaches its render through the VAE decoder (``gradient_path: decoder``, the
  default): the render's gradient is the image-space step ``(D(z) - D(z - g)) / 2`` (``D`` the decoder, output in
  [-1, 1]; its reconstruction error cancels), masked by the silhouette at full resolution. Backpropagation
  through the encoder instead (``gradient_path: encoder``, ``J_E^T g``) is the textbook route, but an encoder's
  transposed Jacobian need not look like an image: the toy teacher's (examples/toy-teacher) turns a smooth latent
  step into stripes along rows at the latent period, and as the cameras all sit near one height every view puts
  them at the same heights of the head — horizontal bands and speckle instead of a style;
* each tile's gradient goes to its view and, flipped, to its mirror view
  (:func:`~mmstyle_ns.guidance.scores.mirror_pair_loss`, weights 0.75 / 0.25);
* with a ControlNet loaded (``--pipeline.guidance.controlnet-path``), the score is conditioned on the views'
  rendered depth, tiled like the views (``depth_condition``).

The density stays frozen (``freeze_geometry``). Stage 1 (``reconstruction_steps``, 0 by default: start from a
trained ``mmstyle-base`` run with ``--load-dir``) fits the views at the tile size with the base model's losses.
Viewer, ``ns-render`` and evaluation render the RGB field as the base model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

from mmstyle_ns.data.datamanagers import cameras_at_size
from mmstyle_ns.guidance.rules import LDConfig, ScoreInputs, ScoreRuleConfig, SDSConfig
from mmstyle_ns.guidance.scores import depth_control_image, mirror_pair_loss, pack_grid, surrogate_loss, unpack_grid
from mmstyle_ns.models.guided import GuidedModel, GuidedModelConfig


@dataclass
class HeadStylizeModelConfig(GuidedModelConfig):
    """Head stylization: grid-packed views and mirror gradients scored by rank-weighted likelihood distillation."""

    _target: type = field(default_factory=lambda: HeadStylizeModel)
    reconstruction_steps: int = 0
    """Steps of stage 1 (fitting the views) before the stylization; 0 when --load-dir starts from a trained
    mmstyle-base run."""
    rule: ScoreRuleConfig = field(default_factory=LDConfig)
    """Score rule: rule:ld (rank-weighted likelihood distillation, the paper's) or rule:sds."""
    prompt: str = ""
    """What the stylized head should look like, e.g. "a cartoon of a red sphere on a plain floor" (toy teacher)."""
    negative_prompt: str = ""
    """Prompt of classifier-free guidance's unconditional branch (empty: the empty prompt)."""
    mirror_weights: tuple[float, float] = (0.75, 0.25)
    """Shares of a view's gradient that go to the view and, flipped, to its mirror view (with mirrored sampling)."""
    tile_latents: int | None = None
    """Side of each view's tile in latents; None: the teacher's sample size divided by the grid side k (rounded)."""
    silhouette_mask: bool = True
    """Multiply the score's gradient by the rendered silhouette (accumulation): nothing changes off the head."""
    score_mult: float = 1.0
    """Weight of the score's loss."""
    gradient_path: Literal["decoder", "encoder"] = "decoder"
    """How a tile's latent gradient g reaches its render: 'decoder' the image-space step (D(z) - D(z - g)) / 2
    through the VAE decoder D (no encoder backward); 'encoder' backpropagation through the VAE encoder (J_E^T g:
    horizontal bands with examples/toy-teacher, whose encoder Jacobian is striped along rows)."""
    depth_condition: bool = True
    """When the guidance loads a ControlNet (--pipeline.guidance.controlnet-path, a depth ControlNet), condition
    every score on the views' rendered depth (guidance.depth_control_image: inverse depth over the head, near
    bright, empty space black), tiled like the views; False scores without a condition."""

    def __post_init__(self) -> None:
        if min(self.mirror_weights) < 0:
            raise ValueError(f"mirror_weights must not be negative, got {self.mirror_weights}")
        if self.tile_latents is not None and self.tile_latents < 1:
            raise ValueError(f"tile_latents must be >= 1, got {self.tile_latents}")


class HeadStylizeModel(GuidedModel):
    """The base RGB field stylized by grid-packed, mirrored likelihood distillation (see the module docstring)."""

    config: HeadStylizeModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.viewer_prompt = self.prompt_field(
            "Prompt", "prompt", "What the head should look like; the stylization follows it from the next step"
        )

    def start_guided_stage(self) -> None:
        """Freezes the geometry (if configured); from now on training renders are composited over background_color,
        as the teacher is to see them (stage 1 may have used random backgrounds)."""
        super().start_guided_stage()
        self.renderer_rgb.background_color = self.config.background_color

    def tile_side(self, k: int) -> int:
        """Pixels per side of one view's render in a ``k x k`` grid (a multiple of the VAE's factor)."""
        latents = self.config.tile_latents
        if latents is None:
            sample = self.backbone.unet.config.sample_size
            sample = min(sample) if isinstance(sample, list | tuple) else int(sample)
            latents = max(1, round(sample / k))
        return latents * int(self.backbone.vae_scale_factor)

    def guided_outputs(self, camera: Cameras, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        """Renders of the step's views (and, in the guided stage, their mirrors) at the tile size, ``[n, 3, s, s]``.

        ``camera`` holds ``V = k*k`` views (``batch["image"]`` ``[V, H, W, C]``; one view: ``[H, W, C]``), followed
        by their ``V`` mirror cameras when ``batch["mirrored"]``.
        """
        views = batch["image"].shape[0] if batch["image"].ndim == 4 else 1
        k = math.isqrt(views)
        if k * k != views:
            raise ValueError(f"{views} views per step do not fill a k x k grid")
        mirrored = bool(batch.get("mirrored", False))
        count = 2 * views if mirrored and self.guided_stage else views
        side = self.tile_side(k)
        cameras = cameras_at_size(camera.flatten(), side, side)
        renders = [self.render_camera(cameras[i : i + 1]) for i in range(count)]
        rgb = torch.stack([r["rgb"] for r in renders])  # [n, s, s, 3]
        accumulation = torch.stack([r["accumulation"] for r in renders])
        depth = torch.stack([r["depth"] for r in renders[:views]])
        outputs = {
            "rgb": rgb[:views],
            "accumulation": accumulation[:views],
            "renders": rgb.permute(0, 3, 1, 2),
            "silhouette": accumulation[:views].detach().permute(0, 3, 1, 2),
            "view_depth": depth.detach().permute(0, 3, 1, 2),
        }
        for name in ("distortion_loss", "num_samples_per_ray"):
            if name in renders[0]:
                outputs[name] = torch.stack([r[name] for r in renders]).mean()
        return outputs

    @staticmethod
    def tile_batch(batch: dict[str, Any], side: int) -> dict[str, Any]:
        """The batch with its images ``[V, s, s, C]`` at the tile size (area-averaged), to compare with renders."""
        image = batch["image"] if batch["image"].ndim == 4 else batch["image"][None]
        tiles = F.interpolate(image.permute(0, 3, 1, 2).float(), size=(side, side), mode="area")
        return {**batch, "image": tiles.permute(0, 2, 3, 1)}

    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        """The base model's metrics against the views at the tile size (in the guided stage: distance to the
        photos)."""
        detached = {**outputs, "rgb": outputs["rgb"].detach()}
        return super().get_metrics_dict(detached, self.tile_batch(batch, outputs["rgb"].shape[1]))

    def get_loss_dict(
        self, outputs: dict[str, Tensor], batch: dict[str, Any], metrics_dict: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        if not self.guided_stage or not self.training:  # stage 1, and evaluation: the distance to the photos
            return super().get_loss_dict(outputs, self.tile_batch(batch, outputs["rgb"].shape[1]), metrics_dict)
        views = outputs["rgb"].shape[0]
        k = math.isqrt(views)
        through_decoder = self.config.gradient_path == "decoder"
        with torch.set_grad_enabled(not through_decoder):
            latents = self.backbone.encode_images(outputs["renders"])  # [n, c, h, w]
        mask = None
        if self.config.silhouette_mask:
            mask = pack_grid(F.interpolate(outputs["silhouette"], size=latents.shape[-2:], mode="area"))
        inputs = ScoreInputs(
            latents=pack_grid(latents[:views]),
            target_text=self.config.prompt,
            mask=None if isinstance(self.config.rule, SDSConfig) else mask,  # SDS takes no mask: applied below
            negative_text=self.config.negative_prompt or None,
            controlnet_cond=self.control_condition(outputs),
        )
        step, max_steps = self.guided_progress()
        score = self.rule.loss(self.backbone, inputs, step=step, max_steps=max_steps)
        grad = score.grad if mask is None or inputs.mask is not None else score.grad * mask
        tiles = unpack_grid(grad, k)  # each view's share of the grid's gradient
        targets = latents
        if through_decoder:
            tiles = self.image_step(latents[:views], tiles)
            if self.config.silhouette_mask:
                tiles = tiles * outputs["silhouette"]
            targets = outputs["renders"]
        if targets.shape[0] == views:
            loss = surrogate_loss(targets, tiles)
        else:
            weight, mirror_weight = self.config.mirror_weights
            loss = mirror_pair_loss(targets[:views], targets[views:], tiles, weight, mirror_weight)
        return {"score_loss": self.config.score_mult * loss}

    def control_condition(self, outputs: dict[str, Tensor]) -> Tensor | None:
        """The grid of the views' depth conditions ``[1, 1, k*s, k*s]`` when a ControlNet is loaded and
        ``depth_condition`` is on, else None."""
        if self.backbone.controlnet is None or not self.config.depth_condition:
            return None
        return pack_grid(depth_control_image(outputs["view_depth"], outputs["silhouette"]))

    @torch.no_grad()
    def image_step(self, latents: Tensor, grad: Tensor) -> Tensor:
        """The image-space gradient of renders encoded as ``latents`` for the latent gradient ``grad`` (both
        ``[V, c, h, w]``): ``(D(z) - D(z - g)) / 2``, ``D`` the VAE decoder (output in [-1, 1], not clamped), i.e.
        the change of the decoded picture when the latents take the step ``-g``, in the renders' [0, 1] units."""
        vae = self.backbone.vae
        scale = float(vae.config.scaling_factor)
        z = latents.detach().to(self.backbone.device, self.backbone.dtype)
        g = grad.detach().to(z.device, z.dtype)
        decoded = vae.decode(torch.cat([z, z - g]) / scale).sample.float()
        before, after = decoded.chunk(2)
        return ((before - after) / 2).to(latents.device)
