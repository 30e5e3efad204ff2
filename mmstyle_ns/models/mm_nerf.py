"""``mm-nerf``: MM-NeRF (multimodal-guided 3D multi-style transfer, arXiv 2309.13607) on the dense-grid base.

Training has two stages in one run:

1. Reconstruction (steps ``< reconstruction_steps``): the photorealistic base field of ``mmstyle-base``. Skipped
   when a trained base (or mm-nerf) checkpoint is loaded with ``--load-dir``: nerfstudio resumes at its step.
2. Stylization: geometry and base colour are frozen; the samples and rendering weights of every training pixel
   are computed once and cached (:mod:`mmstyle_ns.models.frozen`), so a step only evaluates the shared style
   feature grid and one style's colour head (its parameters predicted by that style's head, see
   :mod:`mmstyle_ns.fields.style_field`). One style is trained per step (round robin), so the cost of a step does
   not grow with the number of styles.

Supervision (:data:`ObjectiveConfig`). By default a perceptual style loss on rendered square patches of the
training views (Gram matrices of Magenta style-predictor features plus a content term,
:mod:`mmstyle_ns.style.perceptual`), as MM-NeRF trains with a style and a content loss: it grows texture in the
field instead of averaging the views' misaligned strokes into a tint. The multi-view style-consistent targets
(the 2D stylizations of the views, Magenta arbitrary style transfer by default, averaged over neighbouring views,
see :mod:`mmstyle_ns.style.targets`) anchor the colours. The ``pixel`` objective fits the 2D stylizations pixel by pixel
instead (patterns then average into a tint).

Styles added to a trained model own a residual feature grid (see :mod:`mmstyle_ns.fields.style_field`) so that
they can create texture the frozen shared grid lacks; the trained styles' renders stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

import nerfacc
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, UInt8
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.viewer.viewer_elements import ViewerDropdown, ViewerSlider
from torch import Tensor, nn
from torch.nn import Parameter

from mmstyle_ns.fields.grid_field import trilinear_lookup
from mmstyle_ns.fields.occupancy import PackedSamples
from mmstyle_ns.fields.style_field import ColorHeadSpec, FeatureGrid, StyleHead
from mmstyle_ns.models.frozen import FrozenGeometryModel, FrozenGeometryModelConfig, SampleCache
from mmstyle_ns.style.cache import StylizedViewCache
from mmstyle_ns.style.extractor import StyleExtractorConfig, most_similar
from mmstyle_ns.style.perceptual import PerceptualLossConfig, PerceptualStyleLoss, StyleReference

ORIGINAL = "original"
"""Output name (and viewer choice) of the unstylized, photorealistic render."""


@dataclass
class PatchObjectiveConfig:
    """Perceptual style loss (style + content) on rendered square patches, plus the consistent-colour anchor."""

    patch_size: int = 128
    """Side of the rendered patches (capped at the image size; a patch below the feature network's minimum side,
    32 for Magenta and 16 for VGG, is refused)."""
    loss: PerceptualLossConfig = field(default_factory=PerceptualLossConfig)
    """The perceptual loss: feature network (magenta | vgg), style rule (nnfm | gram), weights."""


@dataclass
class PixelObjectiveConfig:
    """Per-pixel fit of the 2D-stylized views, plus the consistency term (patterns average out into a tint)."""


ObjectiveConfig = Union[PatchObjectiveConfig, PixelObjectiveConfig]  # noqa: UP007 - tyro subcommands
"""What the stylization stage minimises."""


@dataclass
class MMNeRFModelConfig(FrozenGeometryModelConfig):
    """MM-NeRF: the base field's and sample cache's options plus the multi-style ones."""

    _target: type = field(default_factory=lambda: MMNeRFModel)
    reconstruction_steps: int = 600
    """Steps of photorealistic reconstruction before stylization starts (a loaded checkpoint resumes past them)."""
    style_grid_resolution: int = 96
    """Vertices along the longest side of the shared style feature grid."""
    style_feature_dim: int = 16
    """Channels of the shared style feature grid."""
    color_hidden_dim: int = 32
    """Width of the colour head whose parameters the style heads predict."""
    head_hidden_dim: int = 64
    """Width of each style's parameter-prediction head."""
    objective: ObjectiveConfig = field(default_factory=PatchObjectiveConfig)
    """Stylization objective: patch (perceptual style + content loss on rendered patches, default) or pixel."""
    consistency_weight: float = 0.3
    """Weight of the multi-view style-consistent loss (agreement with the stylized neighbouring views; with the
    patch objective it anchors the colours, a large weight averages the texture away)."""
    residual_resolution: int = 64
    """Vertices along the longest side of the residual feature grid of each style added to a trained model
    (0: none; added styles then only re-mix the frozen shared features)."""
    consistency_neighbors: int = 4
    """Nearest stylized views each view is checked against for the multi-view style-consistent loss."""
    style_extractor: StyleExtractorConfig = field(default_factory=StyleExtractorConfig)
    """Multimodal style feature extractor: embeddings of image, text and audio styles."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A config.yml written before an option existed loads with that option's default (runs stay loadable): a
        # style added to such a run trains with today's defaults (patch objective, residual grid).
        self.__dict__.update({**type(self)().__dict__, **state})


@dataclass(frozen=True)
class StyleSet:
    """The styles a model is built with, one head each: the keyword argument ``styles`` of the model's constructor
    (``MMNeRFModelConfig.setup(..., styles=...)``), which nerfstudio keeps in ``Model.kwargs``."""

    names: tuple[str, ...]
    """The styles' names (output names, viewer choices); heads load from a checkpoint by name."""
    embeddings: Float[Tensor, "S D"]
    """The styles' embeddings, the heads' inputs (zeros where a checkpoint will provide them)."""

    def __post_init__(self) -> None:
        if len(self.names) != self.embeddings.shape[0] or len(self.names) == 0:
            raise ValueError("a style set needs one embedding per style and at least one style")


@dataclass
class StyleSampleCache(SampleCache):
    """The frozen geometry's sample cache, and the colour heads' inputs at its samples once they are frozen."""

    base_colors: Float[Tensor, "S 3"] | None = None
    """The photorealistic colour at every sample (:meth:`MMNeRFModel.base_diffuse_color`), evaluated once: the geometry
    is frozen, and on a nerfacto run's geometry it costs a network evaluation per sample."""
    head_inputs: Float[Tensor, "S F"] | None = None
    """Inputs of the colour head at every sample (style features and base colour), when the style grid is frozen
    (see :meth:`MMNeRFModel.cache_head_inputs`); a step then only evaluates the colour heads."""


@dataclass
class StyleTargets:
    """One style's supervision over the stylized training views."""

    targets: UInt8[Tensor, "V H W 3"]
    """2D-stylized views."""
    consensus: UInt8[Tensor, "V H W 3"]
    """Multi-view style-consistent targets."""
    valid: Bool[Tensor, "V H W"]
    """Pixels with a consistent target."""
    reference: StyleReference | None = None
    """The style image as the perceptual loss sees it (patch objective)."""


class StyleControls(nn.Module):
    """The viewer's style controls: pick one style (or ``original``), or blend two.

    A module without parameters, so that the viewer, which collects its elements from the pipeline's module
    attributes, finds them; the pipeline shows them as the panel :data:`STYLE_PANEL`.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        choices = [*names, ORIGINAL]
        self.style = ViewerDropdown("Style", names[0], choices)
        self.blend_with = ViewerDropdown("Blend with", ORIGINAL, choices)
        self.blend = ViewerSlider("Blend", 0.0, 0.0, 1.0, 0.05)


STYLE_PANEL = "Styles"
"""Name of the viewer panel of the style controls (under nerfstudio's "Custom Elements")."""


class MMNeRFModel(FrozenGeometryModel):
    """Multi-style NeRF: shared geometry and style features, one parameter-prediction head per style.

    Built with the keyword argument ``styles`` (a :class:`StyleSet`, see :class:`~mmstyle_ns.pipelines.mm_nerf.
    MMNeRFPipeline`); without it the model has no style heads and renders the photorealistic colours only.
    """

    keeps_source_appearance = True
    """Styles are learned on top of a nerfacto run's own colours (``geometry_from``): nothing is reconstructed."""

    config: MMNeRFModelConfig
    style_embeddings: Tensor
    sample_cache: StyleSampleCache | None

    def populate_modules(self) -> None:
        super().populate_modules()
        self.color_spec = ColorHeadSpec(self.config.style_feature_dim + 3, self.config.color_hidden_dim)
        self.style_grid = FeatureGrid(self.scene_box.aabb.float(), resolution=8, channels=self.config.style_feature_dim)
        self.heads = nn.ModuleList()
        self.style_names: list[str] = []
        self.register_buffer("style_embeddings", torch.zeros(0, 1))
        self.register_buffer("style_grid_ready", torch.tensor(False))
        self.trained_styles: set[str] = set()
        """Styles whose heads came trained from a checkpoint and stay frozen: a stylization with new styles only
        trains those (the others are new, or resumed)."""
        self.stylized: set[str] = set()
        """Styles whose heads took a stylization step in this run (saved as trained with :meth:`get_extra_state`)."""
        self.resumed_styles: set[str] = set()
        """Styles a checkpoint was in the middle of training, for the same styles as configured now: their heads
        and residuals are kept, and they train on (a resumed run, see :meth:`initialise_new_heads`)."""
        self.trainable: list[int] = []
        """Indices of the styles trained in the stylization stage."""
        self.style_views: Tensor | None = None
        """Index of each stylized view in the sample cache ``[V]``."""
        self.cached_cameras: Tensor | None = None
        """Training-camera index of each view in the sample cache ``[C]``."""
        self.style_targets: dict[int, StyleTargets] = {}
        """Supervision of each trainable style over ``style_views``."""
        self.content_views: Tensor | None = None
        """Unstylized training images of ``style_views`` over white, uint8 ``[V, H, W, 3]`` (content term)."""
        self.residuals = nn.ModuleList()
        # The heads are created while the model is built, not added by the pipeline afterwards: the pipeline copies
        # rank 0's parameters to the other processes as soon as the model is built (multi-device training), and the
        # trainer's optimizers take their parameter groups from the model as built.
        styles: StyleSet | None = self.kwargs.get("styles")
        if styles is not None:
            self._create_style_heads(styles)

    # ---- styles ------------------------------------------------------------------------------------------

    def _create_style_heads(self, styles: StyleSet) -> None:
        """Creates one head per style and the viewer controls (at construction, from the ``styles`` argument)."""
        names, embeddings = styles.names, styles.embeddings
        self.style_names = list(names)
        self.style_embeddings = embeddings.float().to(self.style_embeddings.device)
        # one shared starting colour head: heads begin at the same parameters, so blends between them stay
        # between the styles (independently initialised MLPs would average into an unrelated one)
        initial = self.color_spec.default_parameters()
        self.heads = nn.ModuleList(
            StyleHead(embeddings.shape[1], self.config.head_hidden_dim, self.color_spec, initial) for _ in names
        )
        aabb = self.scene_box.aabb.float()
        self.residuals = nn.ModuleList(FeatureGrid.empty(aabb, self.config.style_feature_dim) for _ in names)
        self.style_controls = StyleControls(tuple(names))

    def get_extra_state(self) -> dict[str, Any]:
        # A checkpoint saved during reconstruction holds untrained heads: only stylized ones count as trained. The
        # stage (which styles stay frozen, which train) lets a resumed run go on with the same split.
        training = [self.style_names[i] for i in self.trainable]
        frozen = sorted(n for n in self.trained_styles if n not in training)
        stage = {"frozen": frozen, "training": training} if training else None
        return {
            "style_names": list(self.style_names),
            "trained": sorted(self.trained_styles | self.stylized),
            "stage": stage,
        }

    def set_extra_state(self, state: Any) -> None:
        pass  # names are consumed in _load_from_state_dict, where heads are matched by name

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Heads are matched by style name: a checkpoint trained with styles [a, b] loads into a model configured
        # with [b, a, c] (c then is a new style, trained incrementally). Runs before the children load, so
        # renaming the head keys here is what they see.
        if not any(key.startswith(prefix) for key in state_dict):  # nerfstudio's pipeline-level second pass
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            return
        extra = state_dict.get(prefix + "_extra_state")
        saved_names = list(extra["style_names"]) if isinstance(extra, dict) else []
        trained = extra.get("trained", saved_names) if isinstance(extra, dict) else []  # older runs: all of them
        stage = extra.get("stage") if isinstance(extra, dict) else None
        self.trained_styles = {name for name in trained if name in self.style_names}
        self.resumed_styles = set()
        if stage and set(stage["frozen"]) | set(stage["training"]) == set(self.style_names):  # same styles: resume
            self.trained_styles, self.resumed_styles = set(stage["frozen"]), set(stage["training"])
        for part in ("heads.", "residuals."):  # per-style modules, by name
            part_prefix = prefix + part
            saved = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(part_prefix)}
            for old_index, name in enumerate(saved_names):
                if name not in self.style_names:
                    continue
                new_index = self.style_names.index(name)
                for key, value in saved.items():
                    rest = key[len(part_prefix) :]
                    if rest.split(".", 1)[0] == str(old_index):
                        state_dict[f"{part_prefix}{new_index}.{rest.split('.', 1)[1]}"] = value
        saved_embeddings = state_dict.get(prefix + "style_embeddings")
        if saved_embeddings is not None:  # by name too: the configured order wins
            merged = self.style_embeddings.clone()
            if saved_embeddings.ndim == 2 and saved_embeddings.shape[1] == merged.shape[1]:
                for old_index, name in enumerate(saved_names):
                    if name in self.style_names:
                        merged[self.style_names.index(name)] = saved_embeddings[old_index].to(merged)
            state_dict[prefix + "style_embeddings"] = merged
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def style_parameters(self, index: int) -> Float[Tensor, " P"]:
        """Colour-head parameters predicted by style ``index``'s head."""
        return self.heads[index](self.style_embeddings[index])

    @torch.no_grad()
    def initialise_new_heads(self) -> list[int]:
        """Copies, into every new style (neither trained nor resumed), the head of the most similar trained style.

        Returns the indices of the new styles (all styles that are not resumed when none is trained yet).
        """
        trained = [i for i, n in enumerate(self.style_names) if n in self.trained_styles]
        new = [
            i for i, n in enumerate(self.style_names) if n not in self.trained_styles and n not in self.resumed_styles
        ]
        if not trained:
            return new
        for index in new:
            nearest = trained[most_similar(self.style_embeddings[index], self.style_embeddings[trained])]
            self.heads[index].load_state_dict(self.heads[nearest].state_dict())
        return new

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = super().get_param_groups()
        residuals = [self.residual_grid(i).table for i in range(len(self.residuals))]
        groups["style_grid"] = [self.style_grid.table, *residuals]
        groups["style_heads"] = list(self.heads.parameters())
        return groups

    # ---- stylization stage ---------------------------------------------------------------------------------

    def in_style_stage(self, step: int) -> bool:
        """Whether ``step`` belongs to the stylization stage (every step on a nerfacto run's geometry and colours)."""
        return step >= self.config.reconstruction_steps or self.external_geometry is not None

    def build_sample_cache(
        self, cameras: Cameras, store: StylizedViewCache | None = None, chunk: int = 1 << 14
    ) -> StyleSampleCache:
        """:meth:`FrozenGeometryModel.build_sample_cache`, in a cache that can also hold the colour heads' inputs."""
        cache = StyleSampleCache(**vars(super().build_sample_cache(cameras, store, chunk)))
        with torch.no_grad():
            cache.base_colors = torch.cat([self.base_diffuse_color(p) for p in cache.positions.split(1 << 16)])
        self.sample_cache = cache
        return cache

    @torch.no_grad()
    def prepare_style_grid(self) -> bool:
        """Fits the style grid to the field's (cropped) box once; returns whether it was (re)created."""
        if bool(self.style_grid_ready):
            return False
        self.style_grid.reset(self.field.aabb.clone(), self.config.style_grid_resolution)
        self.style_grid_ready.fill_(True)
        return True

    def head_inputs(
        self, positions: Float[Tensor, "S 3"], base_colors: Float[Tensor, "S 3"] | None = None
    ) -> Float[Tensor, "S F"]:
        """What the colour head sees at each sample: the shared style features and the photorealistic colour
        (``base_colors`` when already known, e.g. from the sample cache)."""
        grid_positions = self.field.to_grid(positions)  # the style grids share the field's (contracted) coordinates
        if base_colors is None:
            base_colors = self.base_diffuse_color(positions)
        return torch.cat([self.style_grid(grid_positions), base_colors], dim=-1)

    def with_residual(
        self, inputs: Float[Tensor, "S F"], positions: Float[Tensor, "S 3"], style: int, scale: float = 1.0
    ) -> Float[Tensor, "S F"]:
        """``inputs`` with style ``style``'s residual features (times ``scale``) added to the shared ones; the
        same tensor when the style has no residual (its render is then exactly the shared-grid one)."""
        grid = self.residual_grid(style)
        if not grid.active:
            return inputs
        residual = grid(self.field.to_grid(positions)) * scale
        return inputs + F.pad(residual, (0, inputs.shape[-1] - residual.shape[-1]))

    def residual_grid(self, style: int) -> FeatureGrid:
        """Style ``style``'s residual feature grid (empty, :attr:`FeatureGrid.active` false, when it has none)."""
        grid = self.residuals[style]
        assert isinstance(grid, FeatureGrid)
        return grid

    def style_inputs(
        self, positions: Float[Tensor, "S 3"], style: int, base_colors: Float[Tensor, "S 3"] | None = None
    ) -> Float[Tensor, "S F"]:
        """The colour head's inputs for style ``style`` (shared features plus its residual, base colour)."""
        return self.with_residual(self.head_inputs(positions, base_colors), positions, style)

    def stylized_colors(
        self,
        positions: Float[Tensor, "S 3"],
        params: Float[Tensor, " P"],
        style: int | None = None,
        base_colors: Float[Tensor, "S 3"] | None = None,
    ) -> Float[Tensor, "S 3"]:
        """Colours of samples under the colour head ``params`` (with style ``style``'s residual features)."""
        if style is None:
            inputs = self.head_inputs(positions, base_colors)
        else:
            inputs = self.style_inputs(positions, style, base_colors)
        return self.color_spec.apply(params, inputs)

    @torch.no_grad()
    def prepare_residuals(self, styles: list[int]) -> dict[Parameter, Parameter]:
        """Gives each of ``styles`` a zero residual feature grid over the field's box (no change to its render
        yet); returns the replaced parameters (old -> new) for the optimizers."""
        replaced: dict[Parameter, Parameter] = {}
        if self.config.residual_resolution <= 0:
            return replaced
        for index in styles:
            grid = self.residual_grid(index)
            old = grid.table
            grid.reset(self.field.aabb.clone(), self.config.residual_resolution)
            replaced[old] = grid.table
        return replaced

    @torch.no_grad()
    def cache_head_inputs(self, chunk: int = 1 << 16) -> None:
        """Evaluates the colour head's inputs at every cached sample once. Only valid while the style grid is
        frozen (incremental styles): each step then evaluates the new heads alone."""
        cache = self.sample_cache
        assert cache is not None, "build_sample_cache() first"
        positions = cache.positions.split(chunk)
        base = cache.base_colors.split(chunk) if cache.base_colors is not None else (None,) * len(positions)
        cache.head_inputs = torch.cat([self.head_inputs(p, b) for p, b in zip(positions, base, strict=True)])

    def base_diffuse_color(self, positions: Float[Tensor, "S 3"]) -> Float[Tensor, "S 3"]:
        """View-independent photorealistic colour (the content the style heads see)."""
        if self.external_geometry is not None:
            return self.external_geometry.diffuse_color(positions)
        index, corner_weights = self.field.corners(positions)
        if self.field.color_mlp is None:  # SH grid: the constant (degree-0) term
            coefficients = trilinear_lookup(self.field.feature_grid, index, corner_weights)
            coefficients = coefficients.view(-1, 3, self.field.sh_coefficients)[..., 0]
            colors = torch.sigmoid(coefficients * 0.28209479177387814)
        else:
            colors = self.field.color_from_corners(index, corner_weights, torch.zeros_like(positions))
        return self.field.with_sky(colors, positions).detach()  # the sky map is view-independent already

    def render_cached(self, pixels: Int[Tensor, " B"], style: int) -> Float[Tensor, "B 3"]:
        """Stylized colours of training pixels from the sample cache (white background)."""
        assert self.sample_cache is not None, "build_sample_cache() first"
        cache = self.sample_cache
        sample_ids, ray_indices = cache.gather(pixels)
        params = self.style_parameters(style)
        positions = cache.positions[sample_ids]
        if cache.head_inputs is not None:
            inputs = self.with_residual(cache.head_inputs[sample_ids], positions, style)
            colors = self.color_spec.apply(params, inputs)
        else:
            base = None if cache.base_colors is None else cache.base_colors[sample_ids]
            colors = self.stylized_colors(positions, params, style, base)
        return self._composite_white(colors, cache.weights[sample_ids], ray_indices, len(pixels))

    def render_uncached(self, origins: Float[Tensor, "B 3"], directions: Float[Tensor, "B 3"], style: int) -> Tensor:
        """The same as :meth:`render_cached`, marching the rays live (reference path; slower)."""
        samples, weights = self.march_weights(origins, directions)
        keep = weights >= self.config.cache_min_weight
        colors = self.stylized_colors(samples.positions[keep], self.style_parameters(style), style)
        return self._composite_white(colors, weights[keep], samples.ray_indices[keep], len(origins))

    @staticmethod
    def _composite_white(colors: Tensor, weights: Tensor, ray_indices: Tensor, num_rays: int) -> Float[Tensor, "B 3"]:
        rgb = nerfacc.accumulate_along_rays(weights, colors, ray_indices=ray_indices, n_rays=num_rays)
        acc = nerfacc.accumulate_along_rays(weights, None, ray_indices=ray_indices, n_rays=num_rays)
        return rgb + (1.0 - acc)

    def style_loss(
        self, view: Int[Tensor, " B"], rows: Int[Tensor, " B"], cols: Int[Tensor, " B"], style: int
    ) -> dict[str, Tensor]:
        """Stylization losses of one style on training pixels (``view`` indexes :attr:`style_views`)."""
        assert self.sample_cache is not None and self.style_views is not None, "prepare the stylization first"
        _, height, width = self.sample_cache.image_shape
        pixels = (self.style_views[view] * height + rows) * width + cols
        rgb = self.render_cached(pixels, style)
        data = self.style_targets[style]
        target = data.targets[view, rows, cols].float() / 255.0
        losses = {"style_loss": F.mse_loss(rgb, target)}
        if self.config.consistency_weight > 0:
            losses["consistency_loss"] = self.consistency_loss(rgb, data, view, rows, cols)
        return losses

    def consistency_loss(
        self,
        rgb: Float[Tensor, "B 3"],
        data: StyleTargets,
        view: Int[Tensor, " B"],
        rows: Int[Tensor, " B"],
        cols: Int[Tensor, " B"],
    ) -> Float[Tensor, ""]:
        """The weighted multi-view style-consistent term: squared distance of rendered pixels to their consistent
        targets, over the pixels that have one."""
        consensus = data.consensus[view, rows, cols].float() / 255.0
        valid = data.valid[view, rows, cols].float()[:, None]
        error = ((rgb - consensus) ** 2 * valid).sum() / (3 * valid.sum()).clamp_min(1.0)
        return self.config.consistency_weight * error

    def patch_loss(
        self, view: int, top: int, left: int, size: int, style: int, criterion: PerceptualStyleLoss
    ) -> dict[str, Tensor]:
        """Perceptual losses of one rendered ``size`` x ``size`` patch of view ``view`` (of :attr:`style_views`)
        at ``(top, left)``, plus the consistent-colour term over its pixels.

        Args:
            criterion: the perceptual loss (built once by the pipeline and passed in).
        """
        cache, views = self.sample_cache, self.style_views
        assert cache is not None and views is not None and self.content_views is not None, "prepare stylization"
        _, height, width = cache.image_shape
        rows = torch.arange(top, top + size, device=views.device)
        cols = torch.arange(left, left + size, device=views.device)
        grid_rows, grid_cols = (r.reshape(-1) for r in torch.meshgrid(rows, cols, indexing="ij"))
        pixels = (views[view] * height + grid_rows) * width + grid_cols
        rgb = self.render_cached(pixels, style)
        data = self.style_targets[style]
        assert data.reference is not None, "the style's perceptual reference is prepared with the stylization"
        render = rgb.view(1, size, size, 3).permute(0, 3, 1, 2)  # [1, 3, P, P]
        content = self.content_views[view, top : top + size, left : left + size].float() / 255.0
        mask = cache.accumulation[pixels].view(1, 1, size, size)
        losses = criterion(render, content.permute(2, 0, 1)[None], data.reference, mask)
        if self.config.consistency_weight > 0:
            losses["consistency_loss"] = self.consistency_loss(
                rgb, data, torch.full_like(grid_rows, view), grid_rows, grid_cols
            )
        return losses

    # ---- rendering ---------------------------------------------------------------------------------------

    def blend_inputs(
        self, inputs: Float[Tensor, "S F"], positions: Float[Tensor, "S 3"], first: int, second: int, t: float
    ) -> Float[Tensor, "S F"]:
        """The colour head's inputs between two styles: their residual features blended like their parameters."""
        return self.with_residual(self.with_residual(inputs, positions, first, 1.0 - t), positions, second, t)

    def blend_parameters(self, first: int, second: int, t: float) -> Float[Tensor, " P"]:
        """Colour-head parameters between two styles: ``(1 - t) theta_first + t theta_second``."""
        return (1.0 - t) * self.style_parameters(first) + t * self.style_parameters(second)

    def extra_outputs(
        self,
        samples: PackedSamples,
        weights: Float[Tensor, " S"],
        colors: Float[Tensor, "S 3"],
        num_rays: int,
        batch_shape: tuple[int, ...],
    ) -> dict[str, Tensor]:
        if self.training or not self.style_names:
            return {}
        keep = weights >= self.config.cache_min_weight
        positions, w, rays = samples.positions[keep], weights[keep], samples.ray_indices[keep]
        inputs = self.head_inputs(positions)  # shared by every style's colour head
        outputs: dict[str, Tensor] = {}
        original = self.composite(colors, weights, samples.ray_indices, num_rays, self.config.background_color)
        outputs[ORIGINAL] = original.view(*batch_shape, 3)
        for index, name in enumerate(self.style_names):
            own = self.with_residual(inputs, positions, index)
            rgb = self._composite_white(self.color_spec.apply(self.style_parameters(index), own), w, rays, num_rays)
            outputs[name] = rgb.view(*batch_shape, 3)
        selection = self.viewer_selection(outputs, inputs, w, rays, num_rays, positions)
        outputs["rgb"] = selection.view(*batch_shape, 3)
        return outputs

    def viewer_selection(
        self,
        outputs: dict[str, Tensor],
        inputs: Float[Tensor, "S F"],
        weights: Tensor,
        ray_indices: Tensor,
        num_rays: int,
        positions: Float[Tensor, "S 3"],
    ) -> Float[Tensor, "R 3"]:
        """The render chosen in the viewer: one style, or two blended (parameters blended when both are styles)."""
        controls = self.style_controls
        first, second = controls.style.value, controls.blend_with.value
        t = float(controls.blend.value)
        if t <= 0.0 or first == second:
            return outputs[first].reshape(-1, 3)
        if t >= 1.0:
            return outputs[second].reshape(-1, 3)
        if ORIGINAL in (first, second):  # no parameters for the photorealistic colour: blend the images
            return ((1.0 - t) * outputs[first] + t * outputs[second]).reshape(-1, 3)
        a, b = self.style_names.index(first), self.style_names.index(second)
        params = self.blend_parameters(a, b, t)
        inputs = self.blend_inputs(inputs, positions, a, b, t)
        return self._composite_white(self.color_spec.apply(params, inputs), weights, ray_indices, num_rays)

    def get_image_metrics_and_images(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        # Photometric metrics compare the unstylized render with the ground truth.
        photoreal = dict(outputs, rgb=outputs.get(ORIGINAL, outputs["rgb"]))
        metrics, images = super().get_image_metrics_and_images(photoreal, batch)
        for name in self.style_names:
            if name in outputs:
                images[f"style_{name}"] = outputs[name]
        return metrics, images
