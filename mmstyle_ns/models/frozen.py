"""Frozen geometry: the base model with its density fixed, and the ray samples of whole views cached once.

Appearance-editing methods (MM-NeRF's styles, ED-NeRF, head stylization) keep the geometry of a trained base
model and learn colours only. Once the density is frozen, the samples of a ray and their rendering weights no
longer change, so every pixel of the views a method trains on is marched once
(:meth:`FrozenGeometryModel.build_sample_cache`) and a training step evaluates appearance at the cached samples
alone. The marched samples also go to an on-disk store (:class:`~mmstyle_ns.style.cache.StylizedViewCache`),
keyed by :meth:`FrozenGeometryModel.geometry_key` and the view's rays, so a later run on the same geometry (e.g. a
style added to a trained model) reads them instead of marching again.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from nerfstudio.cameras.cameras import Cameras
from rich.progress import track
from torch import Tensor

from mmstyle_ns.models.base import MMStyleBaseModel, MMStyleBaseModelConfig
from mmstyle_ns.style.cache import StylizedViewCache

SAMPLE_STORE_VERSION = "1"
"""Bumped whenever the stored samples' format or how they are computed changes (the code of
:class:`~mmstyle_ns.fields.occupancy.OccupancySampler` and ``packed_weights`` included)."""


def _tensor_bytes(tensor: Tensor) -> bytes:
    """The raw bytes of a tensor, prefixed with its dtype and shape (for hashing)."""
    data = tensor.detach().cpu().contiguous()
    return f"{data.dtype}|{tuple(data.shape)}|".encode() + data.view(-1).view(torch.uint8).numpy().tobytes()


@dataclass
class SampleCache:
    """Samples and rendering weights of every pixel of some views under the frozen geometry (packed by pixel)."""

    positions: Float[Tensor, "S 3"]
    weights: Float[Tensor, " S"]
    offsets: Int[Tensor, " P1"]
    """Pixel ``p``'s samples are ``offsets[p]:offsets[p + 1]``; pixels are ordered camera, row, column."""
    accumulation: Float[Tensor, " P"]
    depth: Float[Tensor, " P"]
    """Expected distance along the (unit) ray; meaningful where the accumulation is high."""
    image_shape: tuple[int, int, int]
    """``(cameras, height, width)``."""

    def gather(self, pixels: Int[Tensor, " B"]) -> tuple[Int[Tensor, " S"], Int[Tensor, " S"]]:
        """Indices of the samples of the given pixels, and their (batch-local) ray index."""
        starts, ends = self.offsets[pixels], self.offsets[pixels + 1]
        counts = ends - starts
        ray_indices = torch.repeat_interleave(torch.arange(len(pixels), device=pixels.device), counts)
        first = torch.cumsum(counts, 0) - counts
        within = torch.arange(int(counts.sum()), device=pixels.device) - first[ray_indices]
        return starts[ray_indices] + within, ray_indices


@dataclass
class FrozenGeometryModelConfig(MMStyleBaseModelConfig):
    """The base model's options plus the sample cache's."""

    _target: type = field(default_factory=lambda: FrozenGeometryModel)
    cache_min_weight: float = 1e-2
    """Samples whose rendering weight is below this are left out of the sample cache (and of the renders made from
    the cached samples)."""


class FrozenGeometryModel(MMStyleBaseModel):
    """The dense-grid base model whose geometry can be frozen and whose rays can be cached.

    A layer for appearance-editing models to subclass (it adds no modules, so a trained base checkpoint loads into
    it): :meth:`freeze_geometry`, :meth:`geometry_key` and :meth:`build_sample_cache`. It relies only on what the
    base model provides: ``field`` (a dense grid), ``sampler`` (its occupancy sampler), ``config.near_plane`` and
    :meth:`~mmstyle_ns.models.base.MMStyleBaseModel.march_weights`.
    """

    config: FrozenGeometryModelConfig

    def populate_modules(self) -> None:
        super().populate_modules()
        self.sample_cache: SampleCache | None = None
        """The last :meth:`build_sample_cache`'s samples."""
        self.sample_store_hits = 0
        """Views the last :meth:`build_sample_cache` read from its on-disk store instead of marching them."""

    def freeze_geometry(self) -> None:
        """Stops gradients into the density and base-colour grids, regrids and occupancy refreshes."""
        self.field.density_grid.requires_grad_(False)
        self.field.feature_grid.requires_grad_(False)
        self.geometry_frozen = True

    def geometry_key(self) -> str:
        """Hash of everything the samples and weights of a ray depend on under the frozen geometry: the density
        grid and its box, the occupancy grid, and the sampler's and cache's settings."""
        field, sampler = self.field, self.sampler
        if self.external_geometry is not None:  # a frozen nerfacto run samples the rays
            return hashlib.sha256(
                f"samples|v{SAMPLE_STORE_VERSION}|{self.external_geometry.key}|{self.config.cache_min_weight!r}|".encode()
            ).hexdigest()
        digest = hashlib.sha256(
            f"samples|v{SAMPLE_STORE_VERSION}|{type(field).__name__}|{field.density_shift!r}|"
            f"{sampler.step_ratio!r}|{sampler.alpha_threshold!r}|{sampler.early_stop_eps!r}|"
            f"{sampler.max_samples_per_ray}|{sampler.SEGMENT}|{self.config.near_plane!r}|"
            f"{self.config.cache_min_weight!r}|".encode()
        )
        for tensor in (
            field.density_grid,
            field.aabb,
            field.grid_dims,
            field.density_scale,
            field.contracted,
            field.contraction_box,
            sampler.occupancy,
        ):
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
        self, cameras: Cameras, store: StylizedViewCache | None = None, chunk: int = 1 << 14
    ) -> SampleCache:
        """Marches every pixel of ``cameras`` once through the frozen field and keeps the weighted samples.

        Marches in eval mode (no jitter). Sets :attr:`sample_cache` and :attr:`sample_store_hits`.

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
