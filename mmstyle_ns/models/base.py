"""``mmstyle-base``: the photorealistic base method that the stylization methods start from.

A subclass of nerfstudio's nerfacto model whose field is a CPU-fast dense voxel grid
(:class:`~mmstyle_ns.fields.grid_field.DenseGridField`) sampled by plain-PyTorch empty-space skipping
(:class:`~mmstyle_ns.fields.occupancy.OccupancySampler`), in the spirit of DVGO (Sun et al., CVPR 2022):
grids grow coarse-to-fine and, at every growth step, are cropped to the part of the scene box that is
occupied, so the voxels are spent on the content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import nerfacc
import torch
from jaxtyping import Float
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.model_components.losses import MSELoss
from nerfstudio.model_components.renderers import RGBRenderer
from nerfstudio.models.base_model import Model
from nerfstudio.models.nerfacto import NerfactoModel, NerfactoModelConfig
from nerfstudio.utils import colormaps
from torch import Tensor
from torch.nn import Parameter
from torchmetrics.functional import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from mmstyle_ns.compat.checkpoints import register_safe_globals
from mmstyle_ns.fields.grid_field import DenseGridField, replace_parameters, voxel_size_for
from mmstyle_ns.fields.occupancy import OccupancySampler, packed_weights

register_safe_globals()


@dataclass
class MMStyleBaseModelConfig(NerfactoModelConfig):
    """Configuration of the dense-grid base model (nerfacto's options plus the grid's)."""

    _target: type = field(default_factory=lambda: MMStyleBaseModel)
    background_color: Literal["black", "white"] = "white"
    """Colour shown behind the content (renders, viewer, evaluation)."""
    random_background_training: bool = True
    """Composite training images that have an alpha channel over random colours (teaches empty space)."""
    near_plane: float = 0.05
    """Samples closer to the camera than this are skipped."""
    eval_num_rays_per_chunk: int = 1 << 14
    """Rays rendered at once at evaluation time (memory vs. speed)."""
    camera_optimizer: CameraOptimizerConfig = field(default_factory=lambda: CameraOptimizerConfig(mode="off"))
    """Pose refinement; 'off' for exact (synthetic) poses, 'SO3xR3' for captured data."""
    grid_resolutions: tuple[int, ...] = (32, 96, 160)
    """Grid vertices along the longest side of the grid box at each coarse-to-fine stage."""
    regrid_steps: tuple[int, ...] = (100, 400)
    """Training steps at which the grid moves to the next resolution (one fewer than the resolutions)."""
    crop_to_occupied: bool = True
    """At each regrid, shrink the grid box to the occupied region (plus a margin)."""
    feature_dim: int = 12
    """Channels of the feature grid fed to the colour MLP."""
    hidden_dim: int = 64
    """Width of the colour MLP."""
    sh_levels: int = 3
    """Spherical-harmonic levels of the view-direction encoding (view-dependent colour)."""
    initial_alpha: float = 1e-2
    """Opacity of one voxel of the coarsest grid at initialisation."""
    occupancy_alpha: float = 2e-3
    """A voxel whose opacity (density times voxel size) is below this is treated as empty."""
    occupancy_warmup_steps: int = 16
    """Every sample is evaluated until this step; empty-space skipping starts afterwards."""
    occupancy_update_every: int = 8
    """Steps between occupancy refreshes."""
    step_ratio: float = 0.5
    """Ray-marching step as a fraction of the voxel size."""
    compute_lpips: bool = False
    """Report LPIPS in evaluations (needs torchvision's AlexNet weights in the torch hub cache)."""


class MMStyleBaseModel(NerfactoModel):
    """Photorealistic dense-grid NeRF that trains in seconds to minutes on a CPU.

    Reuses nerfacto's configuration, RGB renderer, loss and camera optimizer; replaces the hash-grid field and
    proposal sampler.
    """

    config: MMStyleBaseModelConfig

    def populate_modules(self) -> None:
        # nerfacto's populate_modules builds its hash-grid field, proposal networks and an LPIPS network whose
        # weights download at construction; only the generic part of model set-up is wanted here.
        Model.populate_modules(self)
        if len(self.config.regrid_steps) != len(self.config.grid_resolutions) - 1:
            raise ValueError("regrid_steps needs exactly one entry fewer than grid_resolutions")
        aabb = self.scene_box.aabb.float()
        coarse_voxel = voxel_size_for(aabb, self.config.grid_resolutions[0])
        density_init = -torch.log1p(torch.tensor(-self.config.initial_alpha)).item() / coarse_voxel
        self.field = DenseGridField(
            aabb,
            resolution=self.config.grid_resolutions[0],
            feature_dim=self.config.feature_dim,
            hidden_dim=self.config.hidden_dim,
            sh_levels=self.config.sh_levels,
            density_init=density_init,
        )
        self.sampler = OccupancySampler(step_ratio=self.config.step_ratio, alpha_threshold=self.config.occupancy_alpha)
        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        train_background = "random" if self.config.random_background_training else self.config.background_color
        self.renderer_rgb = RGBRenderer(background_color=train_background)
        self.rgb_loss = MSELoss()
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        self.lpips = None
        if self.config.compute_lpips:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(normalize=True)
        self.step = 0

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = {
            "grid": [self.field.density_grid, self.field.feature_grid],
            "fields": list(self.field.color_mlp.parameters()),
        }
        self.camera_optimizer.get_param_groups(param_groups=groups)
        return groups

    # ---- coarse-to-fine schedule -------------------------------------------------------------------------

    def _occupied_box(self, occupied: Tensor) -> Float[Tensor, "2 3"]:
        """Box around the occupied vertices, grown by two voxels, inside the current grid box."""
        aabb = self.field.aabb
        if not bool(occupied.any()):
            return aabb.clone()
        dims = self.field.grid_dims.to(aabb)
        idx = occupied.nonzero().to(aabb)
        lo = aabb[0] + (idx.amin(0) - 2).clamp_min(0) / (dims - 1) * (aabb[1] - aabb[0])
        hi = aabb[0] + (idx.amax(0) + 2).minimum(dims - 1) / (dims - 1) * (aabb[1] - aabb[0])
        return torch.stack([lo, hi])

    @torch.no_grad()
    def regrid(self, resolution: int, optimizers: object | None = None) -> None:
        """Moves the grids to ``resolution`` (cropping them to the occupied box if configured)."""
        occupied = self.sampler.update(self.field)
        box = self._occupied_box(occupied) if self.config.crop_to_occupied else self.field.aabb.clone()
        old = (self.field.density_grid, self.field.feature_grid)
        self.field.regrid(box, resolution)
        if optimizers is not None:
            replace_parameters(
                optimizers, dict(zip(old, (self.field.density_grid, self.field.feature_grid), strict=True))
            )
        self.sampler.update(self.field)

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> list[TrainingCallback]:
        optimizers = training_callback_attributes.optimizers

        def after_step(step: int) -> None:
            self.step = step
            done = step + 1
            for regrid_step, resolution in zip(self.config.regrid_steps, self.config.grid_resolutions[1:], strict=True):
                if done == regrid_step:
                    self.regrid(resolution, optimizers)
                    return
            warm = self.config.occupancy_warmup_steps
            if done >= warm and (done - warm) % self.config.occupancy_update_every == 0:
                self.sampler.update(self.field)

        return [TrainingCallback(where_to_run=[TrainingCallbackLocation.AFTER_TRAIN_ITERATION], func=after_step)]

    # ---- rendering ---------------------------------------------------------------------------------------

    def get_outputs(self, ray_bundle: RayBundle) -> dict[str, Tensor]:  # type: ignore[override]
        if self.training:
            self.camera_optimizer.apply_to_raybundle(ray_bundle)
        batch_shape = ray_bundle.origins.shape[:-1]
        origins = ray_bundle.origins.reshape(-1, 3)
        directions = ray_bundle.directions.reshape(-1, 3)
        num_rays = origins.shape[0]
        samples = self.sampler(self.field, origins, directions, near=self.config.near_plane, jitter=self.training)
        index, corner_weights = self.field.corners(samples.positions)
        sigmas = self.field.density_from_corners(index, corner_weights)[:, 0]
        colors = self.field.color_from_corners(index, corner_weights, samples.directions)
        weights, _, _ = packed_weights(samples.t_starts, samples.t_ends, sigmas, samples.ray_indices)
        rgb = self.renderer_rgb(
            rgb=colors,
            weights=weights[:, None],
            ray_indices=samples.ray_indices,
            num_rays=num_rays,
            background_color=None if self.training else self.config.background_color,
        )
        accumulation = nerfacc.accumulate_along_rays(weights, None, ray_indices=samples.ray_indices, n_rays=num_rays)
        t_mid = (samples.t_starts + samples.t_ends)[:, None] / 2
        depth = nerfacc.accumulate_along_rays(weights, t_mid, ray_indices=samples.ray_indices, n_rays=num_rays)
        depth = depth / accumulation.clamp_min(1e-6)
        outputs = {
            "rgb": rgb.view(*batch_shape, 3),
            "accumulation": accumulation.view(*batch_shape, 1),
            "depth": depth.view(*batch_shape, 1),
            "expected_depth": depth.view(*batch_shape, 1),
        }
        if self.training:
            outputs["num_samples_per_ray"] = torch.tensor(samples.ray_indices.numel() / max(num_rays, 1))
        return outputs

    def get_metrics_dict(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        pred_rgb, gt_rgb = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"],
            pred_accumulation=outputs["accumulation"],
            gt_image=batch["image"].to(self.device),
        )
        metrics = {"psnr": self.psnr(pred_rgb, gt_rgb)}
        if "num_samples_per_ray" in outputs:
            metrics["num_samples_per_ray"] = outputs["num_samples_per_ray"]
        self.camera_optimizer.get_metrics_dict(metrics)
        return metrics

    def get_loss_dict(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], metrics_dict: dict[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        pred_rgb, gt_rgb = self.renderer_rgb.blend_background_for_loss_computation(
            pred_image=outputs["rgb"],
            pred_accumulation=outputs["accumulation"],
            gt_image=batch["image"].to(self.device),
        )
        loss_dict = {"rgb_loss": self.rgb_loss(gt_rgb, pred_rgb)}
        if self.training:
            self.camera_optimizer.get_loss_dict(loss_dict)
        return loss_dict

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        gt_rgb = self.renderer_rgb.blend_background(batch["image"].to(self.device), self.config.background_color)
        predicted = outputs["rgb"]
        acc = colormaps.apply_colormap(outputs["accumulation"])
        depth = colormaps.apply_depth_colormap(outputs["depth"], accumulation=outputs["accumulation"])
        gt_nchw = torch.moveaxis(gt_rgb, -1, 0)[None]
        pred_nchw = torch.moveaxis(predicted, -1, 0)[None]
        metrics = {
            "psnr": float(self.psnr(gt_nchw, pred_nchw).item()),
            "ssim": float(self.ssim(gt_nchw, pred_nchw)),  # type: ignore[arg-type]
        }
        if self.lpips is not None:
            metrics["lpips"] = float(self.lpips(pred_nchw.clamp(0, 1), gt_nchw.clamp(0, 1)))
        images = {"img": torch.cat([gt_rgb, predicted], dim=1), "accumulation": acc, "depth": depth}
        return metrics, images
