"""``ed-nerf``: ED-NeRF (Park et al., `arXiv 2310.02712 <https://arxiv.org/abs/2310.02712>`_), a NeRF in Stable
Diffusion's latent space edited with Delta Denoising Score.

* The field renders the VAE's latent channels (no activation) at latent resolution (``1 / vae_scale_factor`` of
  the images), composited over the latent of a white picture; a refinement layer (ResNet blocks + self-attention,
  Sec. 3.2; :class:`~mmstyle_ns.fields.refinement.RefinementLayer`, the identity at initialisation) runs over the
  rendered latent image.
* Stage 1 fits the refined latent renders of whole training views to the views' VAE latents (encoded once by the
  pipeline, cached on disk): ``L = ||R(z_render) - E(x)||^2``, plus optionally ``||D(R(z_render)) - x||^2`` through
  the frozen decoder.
* Stage 2 edits with the configured score rule (DDS by default, Sec. 3.3): the source branch sees the view's
  original latent and the source prompt, the target branch the refined render and the target prompt. With a mask
  (nerfstudio's per-frame ``mask_path``), the score acts inside it and outside it the stage-1 reconstruction loss
  keeps the scene as it was (``masked_reconstruction_mult``).
* Renders for the viewer and ``ns-render``: ``rgb`` (refined latents decoded at full resolution), ``latent`` (the
  first three latent channels, normalised for display), ``latent_0`` ... ``latent_{c-1}`` (each channel, shown
  with a colormap), ``depth`` and ``accumulation``.
* The edit region: the dataset's masks, a box on the command line, or a rectangle drawn in the viewer ("Draw edit
  box") turned into a box with the rendered depth (:mod:`mmstyle_ns.data.regions`) and projected into every view.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tyro
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor
from torch.nn import Parameter

from mmstyle_ns.fields.refinement import RefinementLayer, RefinementLayerConfig
from mmstyle_ns.guidance.rules import ScoreInputs
from mmstyle_ns.models.guided import GuidedModel, GuidedModelConfig


@dataclass
class EDNeRFModelConfig(GuidedModelConfig):
    """ED-NeRF: latent field, refinement layer, DDS editing."""

    _target: type = field(default_factory=lambda: EDNeRFModel)
    # RGB options of the base model that a latent field does not use (its background is the latent of white).
    background_color: tyro.conf.Suppress[Literal["black", "white"]] = "white"
    random_background_training: tyro.conf.Suppress[bool] = False
    compute_lpips: tyro.conf.Suppress[bool] = False
    refinement: RefinementLayerConfig = field(
        default_factory=lambda: RefinementLayerConfig(hidden_channels=32, num_res_blocks=2, num_groups=8)
    )
    """The refinement layer over rendered latent images (its channels follow the VAE)."""
    use_refinement: bool = True
    """Apply the refinement layer (off: the plain latent NeRF, the paper's ablation)."""
    rgb_loss_mult: float = 0.0
    """Weight of an RGB loss through the frozen VAE decoder in stage 1 (0: latents only)."""
    source_prompt: str = ""
    """What the scene shows, e.g. "a red cube on a wooden floor" (DDS's source branch)."""
    target_prompt: str = ""
    """What it should show after the edit, e.g. "a blue cube on a wooden floor"."""
    score_mult: float = 1.0
    """Weight of the score rule's loss in stage 2."""
    masked_reconstruction_mult: float = 1.0
    """Weight of the reconstruction loss outside the mask during editing (only with masks):
    ``0.5 * sum_outside ||R(z) - E(x)||^2`` per view, so that its gradient per latent is on the scale of the score's."""
    edit_refinement: bool = False
    """Also train the refinement layer during the edit. Off by default: the layer acts on the whole image, so a
    masked edit that changes it repaints the unmasked parts too; the edit then goes through the field alone."""
    use_masks: bool = True
    """Edit only inside the dataset's per-frame masks (nerfstudio's mask_path) when it has them."""
    edit_box: tuple[float, float, float, float, float, float] | None = None
    """A 3-D edit region instead of the masks: x0 y0 z0 x1 y1 z1 in nerfstudio's coordinates (those the viewer
    shows). Each step edits the pixels whose rendered surface point (from the rendered depth) lies inside it. In the
    viewer, "Draw edit box" and a rectangle drawn over the scene set it from the rendered depth."""
    box_selection_resolution: int = 96
    """Height of the depth render of the viewer's camera that turns a rectangle drawn in the viewer into a box."""


class EDNeRFModel(GuidedModel):
    """Latent-space NeRF with a refinement layer, edited by a score rule (DDS)."""

    config: EDNeRFModelConfig
    background_latent: Tensor

    def field_output(self) -> tuple[int, Any]:
        return int(self.backbone.latent_channels), "none"

    def populate_modules(self) -> None:
        super().populate_modules()
        channels = int(self.backbone.latent_channels)
        refinement = RefinementLayerConfig(**{**vars(self.config.refinement), "channels": channels})
        self.refinement: RefinementLayer = refinement.setup()
        size = int(self.backbone.vae_scale_factor) * 4
        with torch.no_grad():  # the latent of a white picture: what empty space renders as
            white = self.backbone.encode_images(torch.ones(1, 3, size, size))
        self.register_buffer("background_latent", white.mean(dim=(0, 2, 3)).float(), persistent=False)
        self.viewer_target_prompt = self.prompt_field(
            "Target prompt", "target_prompt", "What the scene should show; the edit follows it from the next step"
        )
        self.setup_box_selection()

    def setup_box_selection(self) -> None:
        """Viewer elements of the edit region: "Draw edit box" (then a rectangle drawn over the scene) and the
        "Edit box" text field (x0 y0 z0 x1 y1 z1; empty: the dataset's masks)."""
        from nerfstudio.viewer.viewer_elements import ViewerButton, ViewerControl, ViewerText

        self.viewer_control = ViewerControl()
        self.viewer_draw_box = ViewerButton("Draw edit box", cb_hook=self.arm_box_selection)
        self.viewer_edit_box = ViewerText(
            "Edit box",
            _format_box(self.config.edit_box),
            cb_hook=self.set_edit_box_text,
            hint="x0 y0 z0 x1 y1 z1: the edit acts on what lies inside (empty: the dataset's masks)",
        )

    def arm_box_selection(self, element: Any = None) -> None:
        """Viewer button: the next rectangle drawn over the scene becomes the edit box."""
        self.viewer_control.register_pointer_cb("rect-select", self.select_box_from_rect)

    def select_box_from_rect(self, event: Any) -> None:
        """Viewer rect-select callback: the box around the surface inside the rectangle, seen by the user's camera."""
        self.viewer_control.unregister_pointer_cb()
        clients = self.viewer_control.viser_server.get_clients()
        if not clients:
            return
        aspect = float(next(iter(clients.values())).camera.aspect)
        height = self.config.box_selection_resolution
        camera = self.viewer_control.get_camera(height, max(1, round(height * aspect)))
        if camera is None:
            return
        box = self.box_from_view(camera, tuple(event.min_bounds), tuple(event.max_bounds))
        if box is not None:
            self.config.edit_box = box
            self.viewer_edit_box.value = _format_box(box)

    @torch.no_grad()
    def box_from_view(
        self, camera: Cameras, min_bounds: tuple[float, float], max_bounds: tuple[float, float]
    ) -> tuple[float, float, float, float, float, float] | None:
        """The edit box around the surface that ``camera`` sees inside a screen rectangle (normalised bounds)."""
        from mmstyle_ns.data.regions import box_from_screen_rect, surface_points

        camera = camera.reshape((1,)).to(self.device) if camera.shape == () else camera.to(self.device)
        out = self.render_camera(camera)
        points = surface_points(camera, out["depth"])
        origin = camera.camera_to_worlds.reshape(-1, 3, 4)[0, :, 3]
        return box_from_screen_rect(points, out["accumulation"], origin, min_bounds, max_bounds)

    def set_edit_box_text(self, element: Any) -> None:
        """Viewer callback of the "Edit box" field: six numbers set the box, an empty text clears it."""
        text = str(element.value).replace(",", " ").split()
        if not text:
            self.config.edit_box = None
            return
        try:
            values = [float(x) for x in text]
        except ValueError:
            return
        if len(values) == 6:
            low, high = values[:3], values[3:]
            corners = [min(a, b) for a, b in zip(low, high, strict=True)] + [
                max(a, b) for a, b in zip(low, high, strict=True)
            ]
            self.config.edit_box = (corners[0], corners[1], corners[2], corners[3], corners[4], corners[5])

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = super().get_param_groups()
        groups["refinement"] = list(self.refinement.parameters())
        return groups

    # ---- rendering ---------------------------------------------------------------------------------------

    def composite(self, colors: Tensor, weights: Tensor, ray_indices: Tensor, num_rays: int, background: Any) -> Tensor:
        return super().composite(colors, weights, ray_indices, num_rays, self.background_latent)

    def refine(self, latents: Tensor) -> Tensor:
        """The refinement layer over latent images ``[B, c, h, w]`` (or nothing, with use_refinement off)."""
        return self.refinement(latents) if self.config.use_refinement else latents

    def latent_camera(self, camera: Cameras) -> Cameras:
        """The camera at the latent size of its image: the VAE's input side is the nearest multiple of its
        downsampling factor (:func:`~mmstyle_ns.data.latents.vae_input_size`), intrinsics scaled per axis."""
        from mmstyle_ns.data.datamanagers import cameras_at_size
        from mmstyle_ns.data.latents import vae_input_size

        factor = int(self.backbone.vae_scale_factor)
        height, width = int(camera.height.reshape(-1)[0]), int(camera.width.reshape(-1)[0])
        vae_h, vae_w = vae_input_size(height, width, factor)
        return cameras_at_size(camera, vae_h // factor, vae_w // factor)

    def latent_views(self, camera: Cameras, patch: tuple[int, int, int, int] | None = None) -> dict[str, Tensor]:
        """Rendered and refined latent image ``[1, c, h, w]`` of a camera at latent resolution (with gradients)."""
        out = self.render_camera(self.latent_camera(camera), patch=patch)
        raw = out["rgb"].permute(2, 0, 1)[None]  # [1, c, h, w]
        views = {"raw": raw, "refined": self.refine(raw), "accumulation": out["accumulation"], "depth": out["depth"]}
        if "distortion_loss" in out:
            views["distortion_loss"] = out["distortion_loss"]
        return views

    def guided_outputs(self, camera: Cameras, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        views = self.latent_views(camera)
        outputs = {"latent_raw": views["raw"], "latent": views["refined"], "accumulation": views["accumulation"]}
        if self.config.edit_box is not None:
            outputs["edit_mask"] = self.box_mask(camera, views["depth"], views["accumulation"])
        if "distortion_loss" in views:
            outputs["distortion_loss"] = views["distortion_loss"]
        return outputs

    @torch.no_grad()
    def get_outputs_for_camera(self, camera: Cameras, obb_box: Any = None) -> dict[str, Tensor]:
        """Decoded RGB at the camera's resolution (for the viewer, ns-render and evaluation)."""
        height, width = int(camera.height[0, 0]), int(camera.width[0, 0])
        views = self.latent_views(camera)
        rgb = self.backbone.decode_latents(views["refined"])  # [1, 3, 8h, 8w]
        if rgb.shape[-2:] != (height, width):
            rgb = F.interpolate(rgb, size=(height, width), mode="bilinear", align_corners=False)
        latent = views["refined"][0, :3]
        lo, hi = latent.amin(dim=(1, 2), keepdim=True), latent.amax(dim=(1, 2), keepdim=True)

        def full(x: Tensor) -> Tensor:  # [h, w, C] at latent resolution -> camera resolution
            return F.interpolate(x.permute(2, 0, 1)[None], size=(height, width), mode="nearest")[0].permute(1, 2, 0)

        outputs = {
            "rgb": rgb[0].permute(1, 2, 0),
            "latent": full(((latent - lo) / (hi - lo).clamp_min(1e-6)).permute(1, 2, 0)),
            "accumulation": full(views["accumulation"]),
            "depth": full(views["depth"]),
        }
        for channel, values in enumerate(views["refined"][0]):  # every latent channel, shown with a colormap
            outputs[f"latent_{channel}"] = full(values[..., None])
        return outputs

    # ---- losses ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def box_mask(self, camera: Cameras, depth: Tensor, accumulation: Tensor) -> Tensor:
        """``[1, 1, h, w]``: 1 where the rendered surface point of a latent pixel lies inside ``edit_box``."""
        from mmstyle_ns.data.regions import inside_box, surface_points

        assert self.config.edit_box is not None
        points = surface_points(self.latent_camera(camera), depth)
        inside = inside_box(points, self.config.edit_box) & (accumulation[..., 0] > 0.5)
        return inside.to(depth.dtype)[None, None]

    def _mask(self, batch: dict[str, Any], like: Tensor) -> Tensor | None:
        mask = batch.get("mask")
        if mask is None or not self.config.use_masks:
            return None
        m = mask.to(like).reshape(1, 1, *mask.shape[:2]).float()
        return F.interpolate(m, size=like.shape[-2:], mode="area")  # [1, 1, h, w] share of masked pixels

    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Any]) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        target = batch.get("latent_target")
        if target is not None and "latent" in outputs:
            metrics["latent_mse"] = F.mse_loss(outputs["latent"].detach(), target.to(outputs["latent"]))
        return metrics

    def get_loss_dict(
        self, outputs: dict[str, Tensor], batch: dict[str, Any], metrics_dict: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        latent = outputs["latent"]
        target = batch["latent_target"].to(latent)
        mask = outputs.get("edit_mask", self._mask(batch, latent))
        losses: dict[str, Tensor] = {}
        if not self.guided_stage:
            losses["latent_loss"] = F.mse_loss(latent, target)
            if "distortion_loss" in outputs and self.distortion_weight() > 0:
                losses["distortion_loss"] = self.distortion_weight() * outputs["distortion_loss"]
            if self.config.rgb_loss_mult > 0:
                rgb = self.backbone.decode_latents(latent)
                image = batch["image"][..., :3].to(rgb).permute(2, 0, 1)[None]
                image = F.interpolate(image, size=rgb.shape[-2:], mode="area")
                losses["rgb_loss"] = self.config.rgb_loss_mult * F.mse_loss(rgb, image)
            return losses
        # the score reaches the latents inside the mask only (for every rule: the gradient of the detached part is 0)
        scored = latent if mask is None else mask * latent + (1.0 - mask) * latent.detach()
        inputs = ScoreInputs(
            latents=scored,
            target_text=self.config.target_prompt,
            source_text=self.config.source_prompt,
            source_latents=target,
        )
        step, max_steps = self.guided_progress()
        score = self.rule.loss(self.backbone, inputs, step=step, max_steps=max_steps)
        losses["score_loss"] = self.config.score_mult * score.loss
        if mask is not None and self.config.masked_reconstruction_mult > 0:
            error = 0.5 * ((latent - target) ** 2 * (1.0 - mask)).sum() / latent.shape[0]
            losses["masked_reconstruction"] = self.config.masked_reconstruction_mult * error
        return losses

    def start_guided_stage(self) -> None:
        super().start_guided_stage()
        self.refinement.requires_grad_(self.config.edit_refinement)

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        image = self.renderer_rgb.blend_background(batch["image"].to(outputs["rgb"]), "white")  # as encoded
        predicted = outputs["rgb"]
        gt = torch.moveaxis(image, -1, 0)[None]
        pred = torch.moveaxis(predicted, -1, 0)[None]
        metrics = {"psnr": float(self.psnr(gt, pred).item()), "ssim": float(self.ssim(gt, pred))}  # type: ignore[arg-type]
        return metrics, {"img": torch.cat([image, predicted], dim=1), "latent": outputs["latent"]}


def _format_box(box: tuple[float, ...] | None) -> str:
    return "" if box is None else " ".join(f"{x:.3f}" for x in box)
