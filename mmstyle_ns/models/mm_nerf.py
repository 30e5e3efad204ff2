"""``mm-nerf``: MM-NeRF (multimodal-guided 3D multi-style transfer, arXiv 2309.13607) on the dense-grid base.

Training has two stages in one run:

1. Reconstruction (steps ``< reconstruction_steps``): the photorealistic base field of ``mmstyle-base``. Skipped
   when a trained base (or mm-nerf) checkpoint is loaded with ``--load-dir``: nerfstudio resumes at its step.
2. Stylization: geometry and base colour are frozen; the samples and rendering weights of every training pixel
   are computed once and cached, so a step only evaluates the shared style feature grid and one style's colour
   head (its parameters predicted by that style's head, see :mod:`mmstyle_ns.fields.style_field`). One style
   is trained per step (round robin), so the cost of a step does not grow with the number of styles.

Supervision is 2D stylization of the training views (Magenta arbitrary style transfer by default), produced once
and cached on disk, plus the multi-view style-consistent term (see :mod:`mmstyle_ns.style.targets`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nerfacc
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int, UInt8
from nerfstudio.viewer.viewer_elements import ViewerDropdown, ViewerSlider
from rich.progress import track
from torch import Tensor, nn
from torch.nn import Parameter

from mmstyle_ns.fields.grid_field import trilinear_lookup
from mmstyle_ns.fields.occupancy import PackedSamples
from mmstyle_ns.fields.style_field import ColorHeadSpec, FeatureGrid, StyleHead
from mmstyle_ns.models.base import MMStyleBaseModel, MMStyleBaseModelConfig
from mmstyle_ns.style.cache import StylizedViewCache
from mmstyle_ns.style.extractor import StyleExtractorConfig, most_similar

_PENDING_STYLES: contextvars.ContextVar[tuple[list[str], Tensor] | None] = contextvars.ContextVar(
    "mmstyle_pending_styles", default=None
)


@contextlib.contextmanager
def pending_styles(names: list[str], embeddings: Float[Tensor, "S D"]) -> Iterator[None]:
    """Styles a model built inside this block creates its heads for (the pipeline prepares them first)."""
    token = _PENDING_STYLES.set((list(names), embeddings))
    try:
        yield
    finally:
        _PENDING_STYLES.reset(token)


SAMPLE_STORE_VERSION = "1"
"""Bumped whenever the stored samples' format or how they are computed changes (the code of
:class:`~mmstyle_ns.fields.occupancy.OccupancySampler` and ``packed_weights`` included)."""


def _tensor_bytes(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor, prefixed with its dtype and shape (for hashing)."""
    data = tensor.detach().cpu().contiguous()
    return f"{data.dtype}|{tuple(data.shape)}|".encode() + data.view(-1).view(torch.uint8).numpy().tobytes()


ORIGINAL = "original"
"""Output name (and viewer choice) of the unstylized, photorealistic render."""


@dataclass
class MMNeRFModelConfig(MMStyleBaseModelConfig):
    """MM-NeRF: the base field's options plus the multi-style ones."""

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
    consistency_weight: float = 1.0
    """Weight of the multi-view style-consistent loss (agreement with the stylized neighbouring views)."""
    consistency_neighbors: int = 4
    """Nearest stylized views each view is checked against for the multi-view style-consistent loss."""
    cache_min_weight: float = 1e-2
    """Samples whose rendering weight is below this are left out of the stylization cache (and its renders)."""
    style_extractor: StyleExtractorConfig = field(default_factory=StyleExtractorConfig)
    """Multimodal style feature extractor: embeddings of image, text and audio styles."""


@dataclass
class SampleCache:
    """Samples and rendering weights of every training pixel under the frozen geometry (packed by pixel)."""

    positions: Float[Tensor, "S 3"]
    weights: Float[Tensor, " S"]
    offsets: Int[Tensor, " P1"]
    """Pixel ``p``'s samples are ``offsets[p]:offsets[p + 1]``; pixels are ordered camera, row, column."""
    accumulation: Float[Tensor, " P"]
    depth: Float[Tensor, " P"]
    """Expected distance along the (unit) ray; meaningful where the accumulation is high."""
    image_shape: tuple[int, int, int]
    """``(cameras, height, width)``."""

    head_inputs: Float[Tensor, "S F"] | None = None
    """Inputs of the colour head at every sample (style features and base colour), when the style grid is frozen
    (see :meth:`MMNeRFModel.cache_head_inputs`); a step then only evaluates the colour heads."""

    def gather(self, pixels: Int[Tensor, " B"]) -> tuple[Int[Tensor, " S"], Int[Tensor, " S"]]:
        """Indices of the samples of the given pixels, and their (batch-local) ray index."""
        starts, ends = self.offsets[pixels], self.offsets[pixels + 1]
        counts = ends - starts
        ray_indices = torch.repeat_interleave(torch.arange(len(pixels), device=pixels.device), counts)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum()), device=pixels.device) - first[ray_indices]
        return starts[ray_indices] + within, ray_indices


@dataclass
class StyleTargets:
    """One style's supervision over the stylized training views."""

    targets: UInt8[Tensor, "V H W 3"]
    """2D-stylized views."""
    consensus: UInt8[Tensor, "V H W 3"]
    """Multi-view style-consistent targets."""
    valid: Bool[Tensor, "V H W"]
    """Pixels with a consistent target."""


class MMNeRFModel(MMStyleBaseModel):
    """Multi-style NeRF: shared geometry and style features, one parameter-prediction head per style."""

    config: MMNeRFModelConfig
    style_embeddings: Tensor

    def populate_modules(self) -> None:
        super().populate_modules()
        self.color_spec = ColorHeadSpec(self.config.style_feature_dim + 3, self.config.color_hidden_dim)
        self.style_grid = FeatureGrid(self.scene_box.aabb.float(), resolution=8, channels=self.config.style_feature_dim)
        self.heads = nn.ModuleList()
        self.style_names: list[str] = []
        self.register_buffer("style_embeddings", torch.zeros(0, 1))
        self.register_buffer("style_grid_ready", torch.tensor(False))
        self.trained_styles: set[str] = set()
        """Styles whose heads came from a checkpoint (the others are new)."""
        self.trainable: list[int] = []
        """Indices of the styles trained in the stylization stage."""
        self.sample_cache: SampleCache | None = None
        self.sample_store_hits = 0
        """Views the last :meth:`build_sample_cache` read from its on-disk store instead of marching them."""
        self.style_views: Tensor | None = None
        """Index of each stylized view in the sample cache ``[V]``."""
        self.cached_cameras: Tensor | None = None
        """Training-camera index of each view in the sample cache ``[C]``."""
        self.style_targets: dict[int, StyleTargets] = {}
        """Supervision of each trainable style over ``style_views``."""
        pending = _PENDING_STYLES.get()
        if pending is not None:
            self.set_styles(*pending)

    # ---- styles ------------------------------------------------------------------------------------------

    def set_styles(self, names: list[str], embeddings: Float[Tensor, "S D"]) -> None:
        """Creates one head per style and the viewer controls (at construction, see :func:`pending_styles`)."""
        if len(names) != embeddings.shape[0] or len(names) == 0:
            raise ValueError("set_styles needs one embedding per style and at least one style")
        self.style_names = list(names)
        self.style_embeddings = embeddings.float().to(self.style_embeddings.device)
        # one shared starting colour head: heads begin at the same parameters, so blends between them stay
        # between the styles (independently initialised MLPs would average into an unrelated one)
        initial = self.color_spec.default_parameters()
        self.heads = nn.ModuleList(
            StyleHead(embeddings.shape[1], self.config.head_hidden_dim, self.color_spec, initial) for _ in names
        )
        choices = [*names, ORIGINAL]
        self.viewer_style = ViewerDropdown("Style", names[0], choices)
        self.viewer_blend_with = ViewerDropdown("Blend with", ORIGINAL, choices)
        self.viewer_blend = ViewerSlider("Blend", 0.0, 0.0, 1.0, 0.05)

    def get_extra_state(self) -> dict[str, Any]:
        return {"style_names": list(self.style_names)}

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
        head_prefix = prefix + "heads."
        saved_heads = {k: state_dict.pop(k) for k in list(state_dict) if k.startswith(head_prefix)}
        self.trained_styles = set()
        for old_index, name in enumerate(saved_names):
            if name not in self.style_names:
                continue
            new_index = self.style_names.index(name)
            self.trained_styles.add(name)
            for key, value in saved_heads.items():
                rest = key[len(head_prefix) :]
                if rest.split(".", 1)[0] == str(old_index):
                    state_dict[f"{head_prefix}{new_index}.{rest.split('.', 1)[1]}"] = value
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
        """Copies, into every style without trained head, the head of the most similar trained style.

        Returns the indices of the new styles (all styles when none is trained yet).
        """
        trained = [i for i, n in enumerate(self.style_names) if n in self.trained_styles]
        new = [i for i in range(len(self.style_names)) if i not in trained]
        if not trained:
            return new
        for index in new:
            nearest = trained[most_similar(self.style_embeddings[index], self.style_embeddings[trained])]
            self.heads[index].load_state_dict(self.heads[nearest].state_dict())
        return new

    def get_param_groups(self) -> dict[str, list[Parameter]]:
        groups = super().get_param_groups()
        groups["style_grid"] = [self.style_grid.table]
        groups["style_heads"] = list(self.heads.parameters())
        return groups

    # ---- stylization stage ---------------------------------------------------------------------------------

    def in_style_stage(self, step: int) -> bool:
        """Whether ``step`` belongs to the stylization stage."""
        return step >= self.config.reconstruction_steps

    def freeze_geometry(self) -> None:
        """Stops gradients into the density and base-colour grids, regrids and occupancy refreshes."""
        self.field.density_grid.requires_grad_(False)
        self.field.feature_grid.requires_grad_(False)
        self.geometry_frozen = True

    def geometry_key(self) -> str:
        """Hash of everything the samples and weights of a ray depend on under the frozen geometry: the density
        grid and its box, the occupancy grid, and the sampler's and cache's settings."""
        field, sampler = self.field, self.sampler
        digest = hashlib.sha256(
            f"samples|v{SAMPLE_STORE_VERSION}|{type(field).__name__}|{field.density_shift!r}|"
            f"{sampler.step_ratio!r}|{sampler.alpha_threshold!r}|{sampler.early_stop_eps!r}|"
            f"{sampler.max_samples_per_ray}|{sampler.SEGMENT}|{self.config.near_plane!r}|"
            f"{self.config.cache_min_weight!r}|".encode()
        )
        for tensor in (field.density_grid, field.aabb, field.grid_dims, field.density_scale, sampler.occupancy):
            digest.update(_tensor_bytes(tensor))
        digest.update(str(bool(sampler.initialized)).encode())
        return digest.hexdigest()

    @torch.no_grad()
    def _march_view(
        self, origins: Float[Tensor, "P 3"], directions: Float[Tensor, "P 3"], chunk: int
    ) -> tuple[Float[Tensor, " S"], Float[Tensor, " S"], Int[Tensor, " P"]]:
        """Distances, weights and per-pixel counts of the kept samples of one view's rays (sorted by pixel)."""
        t_mids, weights, counts = [], [], []
        for o, d in zip(origins.split(chunk), directions.split(chunk), strict=True):
            samples, w = self.march_weights(o, d)
            keep = w >= self.config.cache_min_weight
            t_mids.append(((samples.t_starts + samples.t_ends) / 2)[keep])
            weights.append(w[keep])
            counts.append(torch.bincount(samples.ray_indices[keep], minlength=len(o)))
        return torch.cat(t_mids), torch.cat(weights), torch.cat(counts)

    @torch.no_grad()
    def build_sample_cache(
        self, cameras: Any, store: StylizedViewCache | None = None, chunk: int = 1 << 14
    ) -> SampleCache:
        """Marches every pixel of ``cameras`` once through the frozen field and keeps the weighted samples.

        Args:
            cameras: the views to cache (all of the same size).
            store: on-disk store of the marched samples, keyed by :meth:`geometry_key` and each view's rays;
                a view found there is not marched again (the samples are bit-identical), a marched one is added.
            chunk: rays marched at once.
        """
        was_training = self.training
        self.eval()
        positions, weights, counts, accumulation, depth = [], [], [], [], []
        height, width = int(cameras.height[0]), int(cameras.width[0])
        geometry = self.geometry_key() if store is not None else ""
        hits = 0
        for i in track(range(len(cameras)), description="Caching ray samples", transient=True):
            bundle = cameras.generate_rays(camera_indices=i, keep_shape=True)
            origins = bundle.origins.reshape(-1, 3).to(self.device)
            directions = bundle.directions.reshape(-1, 3).to(self.device)
            num = origins.shape[0]
            if store is None:
                t_mid, w, count = self._march_view(origins, directions, chunk)
            else:
                # the chunk too: a chunk's longest ray can set the marching step (see OccupancySampler)
                rays = hashlib.sha256(f"{chunk}|".encode() + _tensor_bytes(origins) + _tensor_bytes(directions))
                rays = rays.hexdigest()
                packed = store.load(geometry, rays)
                if packed is None:
                    t_mid, w, count = self._march_view(origins, directions, chunk)
                    store.store(geometry, rays, torch.cat([count.float(), t_mid, w]).cpu().numpy())
                else:  # counts (exact in float32), then distances, then weights
                    hits += 1
                    flat = torch.from_numpy(packed).to(self.device)
                    count = flat[:num].long()
                    t_mid, w = flat[num:].view(2, -1)
            ray_indices = torch.repeat_interleave(torch.arange(num, device=origins.device), count)
            acc = torch.zeros(num, device=origins.device).index_add_(0, ray_indices, w)
            dep = torch.zeros(num, device=origins.device).index_add_(0, ray_indices, w * t_mid)
            positions.append(origins[ray_indices] + directions[ray_indices] * t_mid[:, None])
            weights.append(w)
            counts.append(count)
            accumulation.append(acc)
            depth.append(dep / acc.clamp_min(1e-6))
        if was_training:
            self.train()
        self.sample_store_hits = hits
        all_counts = torch.cat(counts)
        offsets = torch.zeros(len(all_counts) + 1, dtype=torch.long, device=all_counts.device)
        offsets[1:] = torch.cumsum(all_counts, 0)
        self.sample_cache = SampleCache(
            positions=torch.cat(positions),
            weights=torch.cat(weights),
            offsets=offsets,
            accumulation=torch.cat(accumulation),
            depth=torch.cat(depth),
            image_shape=(len(cameras), height, width),
        )
        return self.sample_cache

    @torch.no_grad()
    def prepare_style_grid(self) -> bool:
        """Fits the style grid to the field's (cropped) box once; returns whether it was (re)created."""
        if bool(self.style_grid_ready):
            return False
        self.style_grid.reset(self.field.aabb.clone(), self.config.style_grid_resolution)
        self.style_grid_ready.fill_(True)
        return True

    def head_inputs(self, positions: Float[Tensor, "S 3"]) -> Float[Tensor, "S F"]:
        """What the colour head sees at each sample: the shared style features and the photorealistic colour."""
        return torch.cat([self.style_grid(positions), self.base_diffuse_color(positions)], dim=-1)

    def stylized_colors(self, positions: Float[Tensor, "S 3"], params: Float[Tensor, " P"]) -> Float[Tensor, "S 3"]:
        """Colours of samples under the colour head ``params``."""
        return self.color_spec.apply(params, self.head_inputs(positions))

    @torch.no_grad()
    def cache_head_inputs(self, chunk: int = 1 << 16) -> None:
        """Evaluates the colour head's inputs at every cached sample once. Only valid while the style grid is
        frozen (incremental styles): each step then evaluates the new heads alone."""
        cache = self.sample_cache
        assert cache is not None, "build_sample_cache() first"
        cache.head_inputs = torch.cat([self.head_inputs(p) for p in cache.positions.split(chunk)])

    def base_diffuse_color(self, positions: Float[Tensor, "S 3"]) -> Float[Tensor, "S 3"]:
        """View-independent photorealistic colour (the content the style heads see)."""
        index, corner_weights = self.field.corners(positions)
        if self.field.color_mlp is None:  # SH grid: the constant (degree-0) term
            coefficients = trilinear_lookup(self.field.feature_grid, index, corner_weights)
            coefficients = coefficients.view(-1, 3, self.field.sh_coefficients)[..., 0]
            return torch.sigmoid(coefficients * 0.28209479177387814).detach()
        return self.field.color_from_corners(index, corner_weights, torch.zeros_like(positions)).detach()

    def render_cached(self, pixels: Int[Tensor, " B"], style: int) -> Float[Tensor, "B 3"]:
        """Stylized colours of training pixels from the sample cache (white background)."""
        assert self.sample_cache is not None, "build_sample_cache() first"
        cache = self.sample_cache
        sample_ids, ray_indices = cache.gather(pixels)
        params = self.style_parameters(style)
        if cache.head_inputs is not None:
            colors = self.color_spec.apply(params, cache.head_inputs[sample_ids])
        else:
            colors = self.stylized_colors(cache.positions[sample_ids], params)
        return self._composite_white(colors, cache.weights[sample_ids], ray_indices, len(pixels))

    def render_uncached(self, origins: Float[Tensor, "B 3"], directions: Float[Tensor, "B 3"], style: int) -> Tensor:
        """The same as :meth:`render_cached`, marching the rays live (reference path; slower)."""
        samples, weights = self.march_weights(origins, directions)
        keep = weights >= self.config.cache_min_weight
        colors = self.stylized_colors(samples.positions[keep], self.style_parameters(style))
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
            consensus = data.consensus[view, rows, cols].float() / 255.0
            valid = data.valid[view, rows, cols].float()[:, None]
            error = ((rgb - consensus) ** 2 * valid).sum() / (3 * valid.sum()).clamp_min(1.0)
            losses["consistency_loss"] = self.config.consistency_weight * error
        return losses

    # ---- rendering ---------------------------------------------------------------------------------------

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
            rgb = self._composite_white(self.color_spec.apply(self.style_parameters(index), inputs), w, rays, num_rays)
            outputs[name] = rgb.view(*batch_shape, 3)
        outputs["rgb"] = self.viewer_selection(outputs, inputs, w, rays, num_rays).view(*batch_shape, 3)
        return outputs

    def viewer_selection(
        self,
        outputs: dict[str, Tensor],
        inputs: Float[Tensor, "S F"],
        weights: Tensor,
        ray_indices: Tensor,
        num_rays: int,
    ) -> Float[Tensor, "R 3"]:
        """The render chosen in the viewer: one style, or two blended (parameters blended when both are styles)."""
        first, second = self.viewer_style.value, self.viewer_blend_with.value
        t = float(self.viewer_blend.value)
        if t <= 0.0 or first == second:
            return outputs[first].reshape(-1, 3)
        if t >= 1.0:
            return outputs[second].reshape(-1, 3)
        if ORIGINAL in (first, second):  # no parameters for the photorealistic colour: blend the images
            return ((1.0 - t) * outputs[first] + t * outputs[second]).reshape(-1, 3)
        params = self.blend_parameters(self.style_names.index(first), self.style_names.index(second), t)
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
