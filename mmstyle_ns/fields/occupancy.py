"""Ray marching with empty-space skipping and early termination, in plain PyTorch (CPU and GPU alike).

nerfstudio's ``VolumetricSampler`` wraps nerfacc's CUDA occupancy grid; this is the same idea for a
:class:`~mmstyle_ns.fields.grid_field.DenseGridField`, whose density is explicit: the occupancy of a voxel
is read straight off the density grid (trilinear interpolation never exceeds its largest corner, so a
dilated vertex mask is a conservative occupancy test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mmstyle_ns.fields.grid_field import DenseGridField


@dataclass
class PackedSamples:
    """Samples of many rays in one flat list, sorted by ray."""

    t_starts: Float[Tensor, " S"]
    """Start of each sample's interval along its ray."""
    t_ends: Float[Tensor, " S"]
    """End of each sample's interval along its ray."""
    ray_indices: Int[Tensor, " S"]
    """Index of the ray each sample belongs to."""
    positions: Float[Tensor, "S 3"]
    """World-space midpoint of each interval."""
    directions: Float[Tensor, "S 3"]
    """Unit direction of each sample's ray."""


def packed_weights(
    t_starts: Float[Tensor, " S"],
    t_ends: Float[Tensor, " S"],
    sigmas: Float[Tensor, " S"],
    ray_indices: Int[Tensor, " S"],
) -> tuple[Float[Tensor, " S"], Float[Tensor, " S"], Float[Tensor, " S"]]:
    """Volume-rendering weights of packed samples (sorted by ray), differentiable w.r.t. ``sigmas``.

    ``w_i = T_i * (1 - exp(-sigma_i * delta_i))`` with ``T_i = exp(-sum_{j<i} sigma_j * delta_j)`` over the samples of
    the same ray. The per-ray exclusive sum is a global cumulative sum (in float64) minus its value at the
    ray's first sample.

    Returns:
        weights, transmittances, alphas.
    """
    optical = sigmas * (t_ends - t_starts)
    if optical.numel() == 0:
        return optical, optical, optical
    exclusive = torch.cumsum(optical.double(), dim=0) - optical.double()
    is_first = torch.ones_like(ray_indices, dtype=torch.bool)
    is_first[1:] = ray_indices[1:] != ray_indices[:-1]
    first_index = torch.cummax(torch.where(is_first, torch.arange(len(ray_indices), device=ray_indices.device), 0), 0)[
        0
    ]
    trans = torch.exp(-(exclusive - exclusive[first_index])).to(sigmas.dtype)
    alphas = 1.0 - torch.exp(-optical)
    return trans * alphas, trans, alphas


def ray_aabb(
    origins: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"], aabb: Float[Tensor, "2 3"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"]]:
    """Entry and exit distances of rays through a box (exit < entry when a ray misses it)."""
    inv = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


class OccupancySampler(nn.Module):
    """Marches rays at a fixed step through the field's box, keeping samples in occupied voxels only.

    Args:
        step_ratio: marching step as a fraction of the field's voxel size.
        alpha_threshold: a vertex is occupied when a ray crossing one voxel at its density would be at least
            this opaque; samples less opaque than this are dropped too.
        early_stop_eps: samples behind which the transmittance has fallen below this are dropped.
        max_samples_per_ray: cap on the marching steps per ray (the step grows when the box needs more).
    """

    occupancy: Tensor
    initialized: Tensor

    def __init__(
        self,
        step_ratio: float = 0.5,
        alpha_threshold: float = 1e-2,
        early_stop_eps: float = 1e-4,
        max_samples_per_ray: int = 1024,
    ) -> None:
        super().__init__()
        self.step_ratio = step_ratio
        self.alpha_threshold = alpha_threshold
        self.early_stop_eps = early_stop_eps
        self.max_samples_per_ray = max_samples_per_ray
        self.register_buffer("occupancy", torch.ones(1, 1, 1, dtype=torch.bool))
        self.register_buffer("initialized", torch.tensor(False))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "occupancy")
        if saved is not None and saved.shape != self.occupancy.shape:  # a trained grid has its own size
            self.occupancy = torch.empty_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update(self, field: DenseGridField) -> Bool[Tensor, "X Y Z"]:
        """Recomputes occupancy from the field's current density grid; returns the undilated vertex mask."""
        alpha = 1.0 - torch.exp(-field.vertex_densities() * field.voxel_size())
        occupied = alpha > self.alpha_threshold
        if not bool(occupied.any()):  # nothing left to sample would freeze training: sample everything
            occupied = torch.ones_like(occupied)
        dilated = F.max_pool3d(occupied[None, None].float(), kernel_size=3, stride=1, padding=1)[0, 0] > 0
        self.occupancy = dilated
        self.initialized.fill_(True)
        return occupied

    def _lookup(
        self, field: DenseGridField, positions: Float[Tensor, "M 3"], grid: Tensor | None = None
    ) -> Bool[Tensor, " M"]:
        dims = field.grid_dims.to(positions.device)
        if not bool(self.initialized) or tuple(self.occupancy.shape) != field.shape:
            return torch.ones(positions.shape[0], dtype=torch.bool, device=positions.device)
        grid = self.occupancy if grid is None else grid
        rel = (positions - field.aabb[0]) / (field.aabb[1] - field.aabb[0])
        idx = (rel * (dims - 1)).round().long()
        idx = torch.minimum(idx.clamp_min(0), dims - 1)
        flat = (idx[:, 0] * int(dims[1]) + idx[:, 1]) * int(dims[2]) + idx[:, 2]
        return grid.reshape(-1)[flat]

    BLOCK = 4
    """Fine steps per block of the coarse skipping pass (a block spans two voxels at step_ratio 0.5)."""

    def _block_grid(self) -> Bool[Tensor, "X Y Z"]:
        """Occupancy dilated so that a block's centre sees every occupied vertex its steps could look up."""
        cached = getattr(self, "_block_cache", None)
        if cached is not None and cached[0] is self.occupancy:
            return cached[1]
        # steps lie within BLOCK/2 steps of the centre; lookups round to the nearest vertex
        radius = int(math.ceil(self.BLOCK / 2 * self.step_ratio)) + 1
        grid = self.occupancy[None, None].float()
        grid = F.max_pool3d(grid, kernel_size=2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
        self._block_cache = (self.occupancy, grid)
        return grid

    SEGMENT = 64
    """Fine steps marched at once (a multiple of ``BLOCK``); rays whose transmittance has fallen below
    ``early_stop_eps`` are not marched into the next segment."""

    def _candidates(
        self,
        field: DenseGridField,
        origins: Float[Tensor, "N 3"],
        directions: Float[Tensor, "N 3"],
        t_near: Float[Tensor, " N"],
        t_far: Float[Tensor, " N"],
        hit: Bool[Tensor, " N"],
        offset: Float[Tensor, "N 1"],
        step: float,
        steps: int,
        first: int = 0,
        last: int | None = None,
        rays: Int[Tensor, " A"] | None = None,
    ) -> tuple[Int[Tensor, " M"], Float[Tensor, " M"]]:
        """Ray index and distance of the marching steps ``first <= j < last`` of ``rays`` (default: all steps of
        all rays) inside the box, sorted by ray, skipping empty blocks of steps first.

        Step ``j`` of a ray sits at ``t_near + (j + offset) * step``. Steps are grouped in blocks of ``BLOCK``; a
        block is dropped when the occupancy grid dilated by two more voxels is empty at its centre (every step
        of the block lies within one voxel of it), so no occupied step is lost, and far fewer are generated.
        """
        device = origins.device
        block = self.BLOCK
        last = steps if last is None else min(last, steps)
        if rays is None:
            rays = torch.arange(origins.shape[0], device=device)
        usable = bool(self.initialized) and tuple(self.occupancy.shape) == field.shape
        first_block, end_block = first // block, (last + block - 1) // block
        if usable and end_block - first_block > 0 and steps > block:
            block_ids = torch.arange(first_block, end_block, device=device)
            t_block = t_near[rays, None] + (block_ids[None, :] * block + block / 2) * step
            inside = hit[rays, None] & (t_block - block / 2 * step < t_far[rays, None])
            local, which = torch.nonzero(inside, as_tuple=True)
            centres = origins[rays[local]] + directions[rays[local]] * t_block[local, which][:, None]
            keep = self._lookup(field, centres, self._block_grid())
            local, which = local[keep], which[keep]
            step_ids = ((block_ids[which])[:, None] * block + torch.arange(block, device=device)[None, :]).reshape(-1)
            ray_ids = rays[local][:, None].expand(-1, block).reshape(-1)
        else:
            span = torch.arange(first, last, device=device)
            ray_ids = rays[:, None].expand(-1, span.numel()).reshape(-1)
            step_ids = span[None, :].expand(rays.numel(), -1).reshape(-1)
        t_mid = t_near[ray_ids] + (step_ids + offset[ray_ids, 0]) * step
        valid = hit[ray_ids] & (t_mid < t_far[ray_ids]) & (step_ids >= first) & (step_ids < last)
        return ray_ids[valid], t_mid[valid]

    @torch.no_grad()
    def forward(
        self,
        field: DenseGridField,
        origins: Float[Tensor, "N 3"],
        directions: Float[Tensor, "N 3"],
        near: float = 0.0,
        jitter: bool = False,
    ) -> PackedSamples:
        """Samples rays; densities used for culling are computed without gradients.

        Rays are marched ``SEGMENT`` steps at a time, carrying each ray's optical depth from segment to segment,
        so the samples are those of one pass over the whole ray while rays that became opaque stop early.
        """
        num_rays = origins.shape[0]
        device = origins.device
        t_near, t_far = ray_aabb(origins, directions, field.aabb)
        t_near = t_near.clamp_min(near)
        hit = t_far > t_near
        step = self.step_ratio * field.voxel_size()
        span = float((t_far - t_near)[hit].max()) if bool(hit.any()) else 0.0
        steps = int(span / step) + 1
        if steps > self.max_samples_per_ray:
            step = span / self.max_samples_per_ray
            steps = self.max_samples_per_ray
        offset = torch.rand(num_rays, 1, device=device) if jitter else torch.full((num_rays, 1), 0.5, device=device)
        depth = torch.zeros(num_rays, dtype=torch.float64, device=device)  # optical depth marched so far
        opaque = -math.log(self.early_stop_eps)
        kept_rays, kept_t = [], []
        for first in range(0, steps, self.SEGMENT):
            active = hit & (depth < opaque) & (t_near + first * step < t_far)
            rays = active.nonzero()[:, 0]
            if rays.numel() == 0:
                break
            ray_indices, t_mid = self._candidates(
                field, origins, directions, t_near, t_far, hit, offset, step, steps, first, first + self.SEGMENT, rays
            )
            positions = origins[ray_indices] + directions[ray_indices] * t_mid[:, None]
            keep = self._lookup(field, positions)
            ray_indices, t_mid, positions = ray_indices[keep], t_mid[keep], positions[keep]
            if ray_indices.numel() == 0:
                continue
            sigmas = field.density_at(positions)[:, 0]
            _, trans, alphas = packed_weights(t_mid - 0.5 * step, t_mid + 0.5 * step, sigmas, ray_indices)
            trans = trans * torch.exp(-depth[ray_indices]).to(trans.dtype)
            depth.index_add_(0, ray_indices, (sigmas * step).double())
            keep = trans > self.early_stop_eps
            if bool(self.initialized):
                keep &= alphas > self.alpha_threshold * self.step_ratio
            kept_rays.append(ray_indices[keep])
            kept_t.append(t_mid[keep])
        if kept_rays:
            ray_indices, t_mid = torch.cat(kept_rays), torch.cat(kept_t)
            order = torch.argsort(ray_indices, stable=True)  # segments come in order along each ray
            ray_indices, t_mid = ray_indices[order], t_mid[order]
        else:
            ray_indices = torch.zeros(0, dtype=torch.long, device=device)
            t_mid = torch.zeros(0, device=device)
        positions = origins[ray_indices] + directions[ray_indices] * t_mid[:, None]
        return PackedSamples(
            t_starts=t_mid - 0.5 * step,
            t_ends=t_mid + 0.5 * step,
            ray_indices=ray_indices,
            positions=positions,
            directions=directions[ray_indices],
        )
