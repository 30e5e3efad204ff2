"""``mmstyle-base``: the photorealistic base method that the stylization methods start from.

A nerfstudio ``Model`` whose field is a CPU-fast dense voxel grid
(:class:`~mmstyle_ns.fields.grid_field.DenseGridField`) sampled by plain-PyTorch empty-space skipping
(:class:`~mmstyle_ns.fields.occupancy.OccupancySampler`), in the spirit of DVGO (Sun et al., CVPR 2022):
grids grow coarse-to-fine and, at every growth step, are cropped to the part of the scene box that is
occupied, so the voxels are spent on the content. A distortion loss (mip-NeRF 360) keeps surfaces sharp, which
also leaves fewer samples per ray to march.

The model is the shared base of every method of the package: its field outputs any number of channels
(:meth:`MMStyleBaseModel.field_output`; RGB by default, Stable-Diffusion latents in ED-NeRF), composited over a
background of that many channels, and :meth:`MMStyleBaseModel.render_camera` renders whole images or patches of
a camera, at a scale, with gradients (nerfstudio's own ``get_outputs_for_camera`` runs without them).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nerfacc
import torch
import torch.nn.functional as F
import tyro
from jaxtyping import Float
from nerfstudio.cameras.camera_optimizers import CameraOptimizerConfig
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.cameras.rays import RayBundle
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.model_components.losses import MSELoss
from nerfstudio.model_components.renderers import RGBRenderer
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.utils import colormaps
from torch import Tensor
from torch.nn import Parameter
from torchmetrics.functional import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio

from mmstyle_ns.compat.checkpoints import register_safe_globals
from mmstyle_ns.distributed import broadcast_module
from mmstyle_ns.fields.carving import sweep_points, view_support
from mmstyle_ns.fields.grid_field import DenseGridField, replace_parameters, sync_optimizer_parameters, voxel_size_for
from mmstyle_ns.fields.nerfacto_geometry import NerfactoGeometry, is_nerfacto_state
from mmstyle_ns.fields.occupancy import OccupancySampler, PackedSamples, packed_weights
from mmstyle_ns.losses import packed_distortion_loss

register_safe_globals()


@dataclass
class MMStyleBaseModelConfig(ModelConfig):
    """Configuration of the dense-grid base model (nerfstudio's model options plus the grid's)."""

    _target: type = field(default_factory=lambda: MMStyleBaseModel)
    # nerfstudio's generic model options that this field does not use: hidden from --help (the sampler marches
    # from near_plane to the grid's far side; the loss weights are the fields below).
    enable_collider: tyro.conf.Suppress[bool] = False
    collider_params: tyro.conf.Suppress[dict[str, float] | None] = None
    loss_coefficients: tyro.conf.Suppress[dict[str, float]] = field(default_factory=dict)
    prompt: tyro.conf.Suppress[str | None] = None
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
    grid_resolutions: tuple[int, ...] = (32, 96, 176)
    """Grid vertices along the longest side of the grid box at each coarse-to-fine stage."""
    regrid_steps: tuple[int, ...] = (30, 150)
    """Training steps at which the grid moves to the next resolution (one fewer than the resolutions)."""
    crop_to_occupied: bool = True
    """At each regrid, shrink the grid box to the occupied region (plus a margin)."""
    init_from_views: bool = True
    """Before the first step, crop the grid to the region the training cameras see and, when the images have
    an alpha channel, start it empty outside the visual hull of the silhouettes."""
    unbounded: Literal["auto", "on", "off"] = "auto"
    """Model space beyond the scene box with scene contraction (mip-NeRF 360's, L-infinity norm): the scene box
    keeps contraction_inner_share of the grid's extent and all space around it (a ground to the horizon, a sky) is
    squeezed into the rest. 'auto' contracts when the training images are full frames (no alpha channel, or one without
    transparent pixels) and keeps the bounded grid for object captures with alpha."""
    contraction_inner_share: float = 0.3
    """Share of a contracted grid's extent given to the scene box (mip-NeRF 360's contraction gives it 0.5; the
    rest holds all space beyond it). Captures whose cameras stand at the edge of the box, looking at a ground that
    starts right beside them, need resolution just outside it: 0.3 measured best of 0.75, 0.5, 0.4 and 0.3."""
    far_background: bool = True
    """In a contracted grid, from the first regrid on, end every ray on an opaque sample at the far radius, coloured by
    the sky map (sky_rows): what lies beyond everything (a sky, a plain backdrop) is seen there alike from every
    camera, instead of forming wherever each ray happens to become opaque. At that regrid the grid's density beyond
    far_background_clear_radius goes back to its initial opacity, clearing the sky that the coarse stage formed at
    finite depths."""
    sky_rows: int = 64
    """Rows of the equirectangular sky map (twice as many columns) that colours the far background; 0 colours it by
    the grid's outer face."""
    far_background_clear_radius: float = 1.08
    """L-infinity radius, in half-sizes of the contraction box, beyond which the grid's density is reset (to
    initial_alpha per voxel) when the far background starts; 0 keeps it. On the unbounded kind at 120 s: 1.08 22.6 dB,
    1.5 22.4, 0 (no reset) 21.7 (one run each)."""
    fit_contraction_box: bool = True
    """When contracting, first find the content with a plane sweep over the training views and, if less than a
    third of it lies in the scene box, contract around the box of the content and the cameras instead (with
    fitted_inner_share). nerfstudio's dataparsers scale poses by the cameras' spread, so a forward-facing capture
    puts its content far outside the scene box; 360-degree captures keep the scene box."""
    fitted_inner_share: float = 0.4
    """Share of the grid's extent given to a fitted contraction box. On the forward-facing scene at 60 s: 0.9 23.0 dB,
    0.75 24.0, 0.6 24.6, 0.5 25.1, 0.4 25.6, 0.3 25.2 (the shell keeps detail of the content near the box's edge)."""
    min_view_fraction: float = 0.25
    """A point seen by fewer than this fraction of the training cameras starts empty (with init_from_views)."""
    color_mode: Literal["sh", "mlp"] = "sh"
    """Colour representation: RGB spherical harmonics stored in the grid ('sh', fastest to learn) or a feature
    grid decoded by a small view-conditioned MLP ('mlp')."""
    feature_dim: int = 12
    """Channels of the feature grid fed to the colour MLP (color_mode 'mlp')."""
    hidden_dim: int = 64
    """Width of the colour MLP (color_mode 'mlp')."""
    sh_levels: int = 2
    """Spherical-harmonic levels of the view dependence (levels**2 coefficients per colour channel)."""
    initial_alpha: float = 1e-2
    """Opacity of one voxel of the coarsest grid at initialisation."""
    occupancy_alpha: float = 2e-3
    """A voxel whose opacity (density times voxel size) is below this is treated as empty."""
    early_stop_eps: float = 1e-3
    """Samples behind which less than this much light gets through are skipped (early ray termination)."""
    occupancy_warmup_steps: int = 16
    """Every sample is evaluated until this step; empty-space skipping starts afterwards."""
    occupancy_update_every: int = 8
    """Steps between occupancy refreshes."""
    step_ratio: float = 0.5
    """Ray-marching step as a fraction of the voxel size."""
    distortion_loss_mult: float = 0.03
    """Weight of the distortion loss (mip-NeRF 360), here on metric distances along the ray: it pulls each ray's
    weight into one short stretch, i.e. sharp surfaces. 0 turns it off."""
    contracted_distortion_loss_mult: float = 0.003
    """Weight of the distortion loss when space is contracted (on marching distances: contracted ones beyond the
    box; a weaker pull measured better there)."""
    compute_lpips: bool = False
    """Report LPIPS in evaluations (needs torchvision's AlexNet weights in the torch hub cache)."""
    geometry_from: Path | None = None
    """Reuse the geometry of a run trained on the same data, frozen (its folder, its nerfstudio_models folder or a
    checkpoint). An mmstyle_ns run: its density grid and box, resampled to this model's final grid; the appearance
    is learned afresh. A nerfacto run: its proposal sampler and field place every ray's samples and give their
    weights, with its colours as the photorealistic content (it is rebuilt from the run's config.yml, which must stay
    where it is). Read when the model is built; only the appearance is trained."""


def has_transparent_pixels(dataset: object, num_images: int = 8, min_fraction: float = 1e-3) -> bool:
    """Whether a nerfstudio dataset's images are an object capture with alpha: an alpha channel with transparent
    pixels (alpha below one half) in at least ``min_fraction`` of the pixels of up to ``num_images`` images spread
    over the dataset. Full frames (RGB, or RGBA that is opaque everywhere) are not."""
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        return False
    picks = sorted({round(i * (count - 1) / max(num_images - 1, 1)) for i in range(min(num_images, count))})
    transparent = total = 0
    for index in picks:
        image = dataset.get_image_float32(index)  # type: ignore[attr-defined]
        if image.shape[-1] != 4:
            return False
        transparent += int((image[..., 3] < 0.5).sum())
        total += image[..., 3].numel()
    return transparent >= min_fraction * total


class _DatasetImages(Sequence[Tensor]):
    """A nerfstudio dataset's images as a sequence, each read when it is indexed."""

    def __init__(self, dataset: object) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tensor:  # type: ignore[override]
        return self.dataset.get_image_float32(index)  # type: ignore[attr-defined]


class MMStyleBaseModel(Model):
    """Photorealistic dense-grid NeRF that trains in seconds to minutes on a CPU.

    Uses nerfstudio's RGB renderer, MSE loss and camera optimizer with its own field and empty-space-skipping
    sampler.
    """

    config: MMStyleBaseModelConfig
    views_initialized: Tensor
    keeps_source_appearance = False
    """Whether a nerfacto run given as ``geometry_from`` also gives the photorealistic colours (a model that learns
    styles on top of them); otherwise this model's own appearance grid is trained on the nerfacto samples."""

    def field_output(self) -> tuple[int, Literal["sigmoid", "none"]]:
        """Channels and activation of the field's view-dependent output: RGB (3, sigmoid) here; a subclass that
        renders other quantities (e.g. VAE latents: their channel count, no activation) overrides this."""
        return 3, "sigmoid"

    def populate_modules(self) -> None:
        super().populate_modules()
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
            color_mode=self.config.color_mode,
            out_channels=self.field_output()[0],
            activation=self.field_output()[1],
            sky_rows=self.config.sky_rows if self.config.far_background else 0,
        )
        self.sampler = OccupancySampler(
            step_ratio=self.config.step_ratio,
            alpha_threshold=self.config.occupancy_alpha,
            early_stop_eps=self.config.early_stop_eps,
        )
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
        self.register_buffer("views_initialized", torch.tensor(False))
        self.geometry_frozen = False
        """Set by stylization stages: no more regrids or occupancy refreshes."""
        self.external_geometry: NerfactoGeometry | None = None
        """The frozen nerfacto run that samples the rays (``geometry_from`` a nerfacto run), else None."""
        if self.config.geometry_from is not None:
            self.take_geometry(Path(self.config.geometry_from))

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = {"grid": [self.field.density_grid, self.field.feature_grid]}
        if self.field.sky is not None:
            groups["grid"].append(self.field.sky.table)
        if self.field.color_mlp is not None:
            groups["fields"] = list(self.field.color_mlp.parameters())
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
        crop = self.config.crop_to_occupied and not bool(self.field.contracted)  # a contracted grid spans all space
        box = self._occupied_box(occupied) if crop else self.field.aabb.clone()
        old = (self.field.density_grid, self.field.feature_grid)
        starts_far_background = not self.far_background_active()
        self.field.regrid(box, resolution)
        if starts_far_background and self.far_background_active() and self.config.far_background_clear_radius > 0:
            self.field.reset_beyond(self.config.far_background_clear_radius, self.config.initial_alpha)
        if optimizers is not None:
            replace_parameters(
                optimizers, dict(zip(old, (self.field.density_grid, self.field.feature_grid), strict=True))
            )
        self.sampler.update(self.field)
        broadcast_module(self)

    def _support_mask(self, points: Float[Tensor, "P 3"], dataset: object) -> Tensor:
        cameras = dataset.cameras  # type: ignore[attr-defined]
        intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).to(points)
        sizes = torch.cat([cameras.height, cameras.width], dim=-1)
        alphas = None
        first = dataset.get_image_float32(0)  # type: ignore[attr-defined]
        if first.shape[-1] == 4:
            alphas = [dataset.get_image_float32(i)[..., 3] for i in range(len(cameras))]  # type: ignore[attr-defined]
        seen, carved = view_support(
            points.cpu(), cameras.camera_to_worlds.float(), intrinsics.cpu(), sizes, alphas=alphas
        )
        return ((seen >= self.config.min_view_fraction * len(cameras)) & ~carved).to(points.device)

    def wants_contraction(self, dataset: object) -> bool:
        """Whether this model contracts space for ``dataset`` (nerfstudio's training dataset): the ``unbounded``
        setting, and under 'auto' whether its images are full frames (see :func:`has_transparent_pixels`)."""
        if self.config.unbounded != "auto":
            return self.config.unbounded == "on"
        return not has_transparent_pixels(dataset)

    @torch.no_grad()
    def prepare_space(self, dataset: object, optimizers: object | None = None) -> None:
        """Before the first step: contracts space for full-frame captures, or crops and carves the bounded grid
        to what the views support (``init_from_views``). Runs once per model (a buffer remembers it)."""
        if bool(self.views_initialized):
            return
        if self.wants_contraction(dataset):
            self.contract_space(optimizers, dataset)
        elif self.config.init_from_views:
            self.initialize_from_views(dataset, optimizers)
        self.views_initialized.fill_(True)

    @torch.no_grad()
    def contract_space(self, optimizers: object | None = None, dataset: object | None = None) -> None:
        """Switches the field to scene contraction around the scene box (nerfstudio's dataparsers scale the
        cameras into it), or around the box fitted to the content when ``dataset`` is given and the content lies
        outside it (:meth:`fitted_contraction_box`), at the first grid resolution; see
        :meth:`DenseGridField.contract_space`."""
        box, share = self.scene_box.aabb.to(self.field.aabb), self.config.contraction_inner_share
        if dataset is not None and self.config.fit_contraction_box:
            fitted = self.fitted_contraction_box(dataset)
            if fitted is not None:
                box, share = fitted.to(box), self.config.fitted_inner_share
        old = (self.field.density_grid, self.field.feature_grid)
        self.field.contract_space(box, self.config.grid_resolutions[0], inner=2.0 * share)
        if optimizers is not None:
            replace_parameters(
                optimizers, dict(zip(old, (self.field.density_grid, self.field.feature_grid), strict=True))
            )
        if dataset is not None and self.config.init_from_views:
            # Inside the box, what few cameras see (the space around the cameras themselves) starts empty: that
            # is where a full-frame capture otherwise grows floaters. Beyond it everything is kept (the sky in
            # one direction is seen only by the cameras looking that way).
            vertices = self.field.vertex_positions()
            inner = self.field.vertex_grid_positions().abs().amax(-1) < float(self.field.contraction_inner)
            supported = self._support_mask(vertices[inner], dataset)
            empty_rows = inner.nonzero()[:, 0][~supported]
            self.field.density_grid[empty_rows] = self.field.raw_density_for(1e-5 * float(self.field.density_scale))
        self.sampler.update(self.field)
        self.views_initialized.fill_(True)
        broadcast_module(self)

    @torch.no_grad()
    def fitted_contraction_box(self, dataset: object) -> Float[Tensor, "2 3"] | None:
        """The contraction box fitted to the content (see ``fit_contraction_box``), or None to keep the scene box:
        the 2-98 % quantiles per axis of the plane sweep's surface points (:func:`sweep_points`) and the camera
        centres, grown by a twentieth of its size on each side."""
        cameras = dataset.cameras  # type: ignore[attr-defined]
        box = self.scene_box.aabb.float().cpu()
        half = float((box[1] - box[0]).max()) / 2
        images = _DatasetImages(dataset)
        intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).float()
        points = sweep_points(
            cameras.camera_to_worlds.float().cpu(), intrinsics.cpu(), images, depth_range=(0.01 * half, 500.0 * half)
        )
        if points.shape[0] < 100:
            return None
        inside = ((points >= box[0]) & (points <= box[1])).all(-1).float().mean()
        if float(inside) >= 1.0 / 3.0:
            return None
        centres = cameras.camera_to_worlds[:, :, 3].float().cpu()
        quantiles = torch.quantile(points, torch.tensor([0.02, 0.98]), dim=0)
        lo = torch.minimum(quantiles[0], centres.amin(0))
        hi = torch.maximum(quantiles[1], centres.amax(0))
        margin = (hi - lo) / 20
        return torch.stack([lo - margin, hi + margin])

    @torch.no_grad()
    def initialize_from_views(self, dataset: object, optimizers: object | None = None) -> None:
        """Crops the grid box to what the training views support and empties the rest of the grid.

        ``dataset`` is nerfstudio's training dataset (its cameras, and its images' alpha channel if present).
        Runs once per model (a buffer remembers it, so resuming from a checkpoint does not repeat it).
        """
        aabb = self.field.aabb
        probe_res = 64
        axes = [torch.linspace(float(aabb[0, i]), float(aabb[1, i]), probe_res) for i in range(3)]
        probe = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3).to(aabb)
        allowed = self._support_mask(probe, dataset).view(probe_res, probe_res, probe_res)
        if not bool(allowed.any()):
            self.views_initialized.fill_(True)
            return
        idx = allowed.nonzero()
        step = (aabb[1] - aabb[0]) / (probe_res - 1)
        lo = torch.maximum(aabb[0] + (idx.amin(0) - 2) * step, aabb[0])
        hi = torch.minimum(aabb[0] + (idx.amax(0) + 2) * step, aabb[1])
        old = (self.field.density_grid, self.field.feature_grid)
        self.field.regrid(torch.stack([lo, hi]), self.config.grid_resolutions[0])
        if optimizers is not None:
            replace_parameters(
                optimizers, dict(zip(old, (self.field.density_grid, self.field.feature_grid), strict=True))
            )
        vertices = self.field.vertex_positions()
        inside = self._support_mask(vertices, dataset).view(self.field.shape)
        inside = F.max_pool3d(inside[None, None].float(), kernel_size=3, stride=1, padding=1)[0, 0] > 0
        empty = self.field.raw_density_for(1e-5 * float(self.field.density_scale))  # 1e-5 opacity per voxel
        self.field.density_grid[~inside.reshape(-1)] = empty
        self.sampler.update(self.field)
        self.views_initialized.fill_(True)
        broadcast_module(self)

    def take_geometry(self, path: Path) -> None:
        """Adopts the frozen geometry of the run at ``path``: a nerfacto run (:meth:`adopt_nerfacto`) or a run of
        this model family (:meth:`adopt_geometry`)."""
        from mmstyle_ns.compat.checkpoints import load_pipeline_state

        state = load_pipeline_state(path)
        if is_nerfacto_state(state):
            self.adopt_nerfacto(NerfactoGeometry.from_run(path, state))
        else:
            self.adopt_geometry(state)

    @torch.no_grad()
    def adopt_nerfacto(self, geometry: NerfactoGeometry) -> None:
        """Samples rays with a frozen nerfacto model from now on. The field's grids switch to scene contraction
        (nerfacto's space is unbounded), at the first grid resolution when the nerfacto colours are the content
        (:attr:`keeps_source_appearance`), else at the final one (this model learns its appearance there)."""
        self.external_geometry = geometry
        if not bool(self.field.contracted):
            resolution = self.config.grid_resolutions[0 if self.keeps_source_appearance else -1]
            self.field.contract_space(
                self.scene_box.aabb.to(self.field.aabb), resolution, inner=2.0 * self.config.contraction_inner_share
            )
        self.field.density_grid.requires_grad_(False)
        self.views_initialized.fill_(True)
        self.geometry_frozen = True

    @torch.no_grad()
    def adopt_geometry(self, state: dict[str, Tensor]) -> None:
        """Takes the geometry of another run of this model family: the density grid and the box it spans, from a
        pipeline state dict (a nerfstudio checkpoint's ``"pipeline"``), resampled to this model's final grid
        resolution (``grid_resolutions[-1]``). The appearance grid starts afresh (its channels may differ, e.g. RGB
        vs. latents), the occupancy follows the density, and the geometry stays frozen."""

        def pick(name: str) -> Tensor:
            found = [value for key, value in state.items() if key.endswith(name)]
            if len(found) != 1:
                raise ValueError(f"the checkpoint holds no single {name} (not a run of an mmstyle_ns method?)")
            return found[0]

        field = self.field
        contracted = [value for key, value in state.items() if key.endswith("field.contracted")]
        if contracted and bool(contracted[0]) and not bool(field.contracted):
            # the source run contracted space: so does this field, the same way, before the scales are compared
            field.contract_space(
                pick("field.contraction_box").to(field.aabb),
                self.config.grid_resolutions[0],
                inner=float(pick("field.contraction_inner")),
            )
        scale = pick("field.density_scale").to(field.density_scale)
        if not torch.allclose(scale, field.density_scale, rtol=1e-5):
            raise ValueError(
                "the checkpoint's grid starts from another coarse resolution: give this run the same first "
                "--pipeline.model.grid-resolutions entry (and data) as the run whose geometry it reuses"
            )
        density = pick("field.density_grid").to(field.density_grid)
        field.aabb.copy_(pick("field.aabb"))
        field.grid_dims.copy_(pick("field.grid_dims"))
        field.density_grid = Parameter(density.contiguous(), requires_grad=False)
        field.feature_grid = Parameter(torch.randn(density.shape[0], field.feature_dim, device=density.device) * 0.1)
        field.regrid(field.aabb.clone(), self.config.grid_resolutions[-1])
        field.density_grid.requires_grad_(False)
        self.sampler.update(field)
        self.views_initialized.fill_(True)
        self.geometry_frozen = True

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> list[TrainingCallback]:
        optimizers = training_callback_attributes.optimizers
        dataset = training_callback_attributes.pipeline.datamanager.train_dataset  # type: ignore[union-attr]
        if optimizers is not None:  # callbacks are set up after a checkpoint load, which may resize the grids
            sync_optimizer_parameters(optimizers, self.get_param_groups())

        def before_first_step(step: int) -> None:
            self.prepare_space(dataset, optimizers)

        def after_step(step: int) -> None:
            self.step = step
            if self.geometry_frozen:
                return
            done = step + 1
            for regrid_step, resolution in zip(self.config.regrid_steps, self.config.grid_resolutions[1:], strict=True):
                if done == regrid_step:
                    self.regrid(resolution, optimizers)
                    return
            warm = self.config.occupancy_warmup_steps
            if done >= warm and (done - warm) % self.config.occupancy_update_every == 0:
                self.sampler.update(self.field)

        return [
            TrainingCallback(where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], func=before_first_step),
            TrainingCallback(where_to_run=[TrainingCallbackLocation.AFTER_TRAIN_ITERATION], func=after_step),
        ]

    # ---- rendering ---------------------------------------------------------------------------------------

    def march(
        self, origins: Float[Tensor, "R 3"], directions: Float[Tensor, "R 3"]
    ) -> tuple[PackedSamples, Float[Tensor, " S"], Float[Tensor, "S 3"]]:
        """Samples rays through the field: packed samples, their rendering weights and their base colours."""
        if self.external_geometry is not None and self.keeps_source_appearance:
            return self.external_geometry.march(origins, directions)
        samples, weights, (index, corner_weights) = self._march(origins, directions)
        colors = self.field.color_from_corners(index, corner_weights, samples.directions)
        return samples, weights, self.field.with_sky(colors, samples.positions)

    def march_weights(
        self, origins: Float[Tensor, "R 3"], directions: Float[Tensor, "R 3"]
    ) -> tuple[PackedSamples, Float[Tensor, " S"]]:
        """Samples rays through the field: packed samples and their rendering weights (no colours)."""
        samples, weights, _ = self._march(origins, directions)
        return samples, weights

    def _march(
        self, origins: Float[Tensor, "R 3"], directions: Float[Tensor, "R 3"]
    ) -> tuple[PackedSamples, Float[Tensor, " S"], tuple[Tensor, Tensor]]:
        if self.external_geometry is not None:
            samples, weights, _ = self.external_geometry.march(origins, directions)
            return samples, weights, self.field.corners(samples.positions)
        samples = self.sampler(
            self.field, origins, directions, self.config.near_plane, self.training, self.far_background_active()
        )
        index, corner_weights = self.field.corners(samples.positions)
        sigmas = self.field.density_from_corners(index, corner_weights)[:, 0]
        weights, _, _ = packed_weights(samples.t_starts, samples.t_ends, sigmas, samples.ray_indices, samples.far)
        return samples, weights, (index, corner_weights)

    def far_background_active(self) -> bool:
        """Whether rays end on the far background sample (``far_background``): in a contracted grid, once it has
        grown past its first resolution. During the coarse stage the random background makes the rays opaque on
        the content; an opaque far sample from the start lets it paint the whole scene onto the far background instead
        (measured, with the outer face and with the sky map: the objects vanished)."""
        field = self.field
        return (
            self.config.far_background
            and bool(field.contracted)
            and int(field.grid_dims.max()) > self.config.grid_resolutions[0]
        )

    def distortion_weight(self) -> float:
        """Weight of the distortion loss for this field (bounded or contracted)."""
        if bool(self.field.contracted):
            return self.config.contracted_distortion_loss_mult
        return self.config.distortion_loss_mult

    def composite(
        self,
        colors: Float[Tensor, "S C"],
        weights: Float[Tensor, " S"],
        ray_indices: Tensor,
        num_rays: int,
        background: Literal["random", "black", "white"] | Float[Tensor, " C"] | None,
    ) -> Float[Tensor, "R C"]:
        """Volume-renders per-sample outputs ``sum_i w_i c_i + (1 - sum_i w_i) b`` over a background ``b``.

        ``background`` is a named RGB background (``None``: the training background) or a tensor of the outputs'
        channel count (e.g. the VAE latent of a white picture).
        """
        if isinstance(background, Tensor):
            if background.shape != (colors.shape[-1],):
                raise ValueError(f"background must have {colors.shape[-1]} channels, got {tuple(background.shape)}")
            accumulated = nerfacc.accumulate_along_rays(weights, colors, ray_indices=ray_indices, n_rays=num_rays)
            opacity = nerfacc.accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=num_rays)
            return accumulated + (1.0 - opacity) * background.to(colors)
        return self.renderer_rgb(
            rgb=colors,
            weights=weights[:, None],
            ray_indices=ray_indices,
            num_rays=num_rays,
            background_color=background,
        )

    def render_camera(
        self,
        camera: Cameras,
        scale: float = 1.0,
        patch: tuple[int, int, int, int] | None = None,
        chunk: int | None = None,
    ) -> dict[str, Tensor]:
        """Renders one camera (a whole image or a patch of it) WITH gradients, unlike nerfstudio's
        ``get_outputs_for_camera``.

        Args:
            camera: one camera (``Cameras`` of shape ``[1]``).
            scale: output resolution factor; intrinsics are scaled as ``Cameras.rescale_output_resolution`` does
                (e.g. 1/8 renders at Stable Diffusion's latent size).
            patch: ``(top, left, height, width)`` in pixels of the scaled image; None renders all of it.
            chunk: rays per forward pass (default ``config.eval_num_rays_per_chunk``).

        Returns:
            Per-pixel outputs ``[h, w, C]``; scalar outputs (training-only losses, statistics) averaged over chunks.
        """
        if camera.shape != (1,) and camera.shape != ():
            raise ValueError(f"render_camera takes one camera, got cameras of shape {tuple(camera.shape)}")
        camera = camera.reshape((1,)) if camera.shape == () else camera
        if scale != 1.0:
            camera = copy.deepcopy(camera)
            camera.rescale_output_resolution(scale)
        bundle = camera.to(self.device).generate_rays(camera_indices=0, keep_shape=True)  # [H, W]
        index = (camera.metadata or {}).get("cam_idx")
        if index is not None and bundle.camera_indices is not None:  # a training view: its own pose refinement
            bundle.camera_indices = torch.full_like(bundle.camera_indices, int(index))
        if patch is not None:
            top, left, height, width = patch
            full_h, full_w = bundle.shape
            if top < 0 or left < 0 or height < 1 or width < 1 or top + height > full_h or left + width > full_w:
                raise ValueError(f"patch {patch} does not lie inside the {full_h}x{full_w} image")
            bundle = bundle[top : top + height, left : left + width]
        h, w = bundle.shape
        flat = bundle.reshape((-1,))
        step = chunk or self.config.eval_num_rays_per_chunk
        pieces: dict[str, list[Tensor]] = {}
        scalars: dict[str, Tensor] = {}
        for start in range(0, len(flat), step):
            part = flat[start : start + step]
            outputs = self.forward(ray_bundle=part)
            for name, value in outputs.items():
                if not isinstance(value, Tensor):
                    continue
                if value.ndim >= 1 and value.shape[0] == len(part):
                    pieces.setdefault(name, []).append(value)
                elif value.numel() == 1:
                    share = value.reshape(()) * (len(part) / len(flat))
                    scalars[name] = scalars[name] + share if name in scalars else share
        result = {name: torch.cat(parts).view(h, w, -1) for name, parts in pieces.items()}
        return result | scalars

    def get_outputs(self, ray_bundle: RayBundle) -> dict[str, Tensor]:  # type: ignore[override]
        if self.training:
            self.camera_optimizer.apply_to_raybundle(ray_bundle)
        batch_shape = ray_bundle.origins.shape[:-1]
        origins = ray_bundle.origins.reshape(-1, 3)
        directions = ray_bundle.directions.reshape(-1, 3)
        num_rays = origins.shape[0]
        samples, weights, colors = self.march(origins, directions)
        background = None if self.training else self.config.background_color
        rgb = self.composite(colors, weights, samples.ray_indices, num_rays, background)
        accumulation = nerfacc.accumulate_along_rays(weights, None, ray_indices=samples.ray_indices, n_rays=num_rays)
        t_mid = (samples.t_starts + samples.t_ends)[:, None] / 2
        depth = nerfacc.accumulate_along_rays(weights, t_mid, ray_indices=samples.ray_indices, n_rays=num_rays)
        depth = depth / accumulation.clamp_min(1e-6)
        outputs = {
            "rgb": rgb.view(*batch_shape, rgb.shape[-1]),
            "accumulation": accumulation.view(*batch_shape, 1),
            "depth": depth.view(*batch_shape, 1),
            "expected_depth": depth.view(*batch_shape, 1),
        }
        if self.training:
            outputs["num_samples_per_ray"] = torch.tensor(samples.ray_indices.numel() / max(num_rays, 1))
            if self.distortion_weight() > 0 and self.external_geometry is None:
                outputs["distortion_loss"] = packed_distortion_loss(
                    weights, samples.marching_starts, samples.marching_ends, samples.ray_indices, num_rays
                )
        outputs.update(self.extra_outputs(samples, weights, colors, num_rays, batch_shape))
        return outputs

    def extra_outputs(
        self,
        samples: PackedSamples,
        weights: Float[Tensor, " S"],
        colors: Float[Tensor, "S 3"],
        num_rays: int,
        batch_shape: tuple[int, ...],
    ) -> dict[str, Tensor]:
        """Further outputs computed from the same samples (none here; subclasses add e.g. stylized colours)."""
        return {}

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
        if "distortion_loss" in outputs:
            loss_dict["distortion_loss"] = self.distortion_weight() * outputs["distortion_loss"]
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
