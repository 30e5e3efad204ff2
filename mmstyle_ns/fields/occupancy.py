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
    s_starts: Float[Tensor, " S"] | None = None
    """Start of each interval in marching distance (None: the same as ``t_starts``). In a contracted field it is
    the metric distance inside the contraction box and the contracted-space distance (in the box's units) beyond
    it, where metric distances grow without bound: losses over the ray's weight distribution use it."""
    s_ends: Float[Tensor, " S"] | None = None
    """End of each interval in marching distance (None: the same as ``t_ends``)."""
    far: Bool[Tensor, " S"] | None = None
    """Samples that stand for all space beyond the far radius (the last sample of a ray of a contracted field; see
    ``OccupancySampler.far_samples``): opaque, whatever their density. None: there are none."""

    @property
    def marching_starts(self) -> Float[Tensor, " S"]:
        """Interval starts in marching distance (see :attr:`s_starts`)."""
        return self.t_starts if self.s_starts is None else self.s_starts

    @property
    def marching_ends(self) -> Float[Tensor, " S"]:
        """Interval ends in marching distance (see :attr:`s_ends`)."""
        return self.t_ends if self.s_ends is None else self.s_ends


def packed_weights(
    t_starts: Float[Tensor, " S"],
    t_ends: Float[Tensor, " S"],
    sigmas: Float[Tensor, " S"],
    ray_indices: Int[Tensor, " S"],
    opaque: Bool[Tensor, " S"] | None = None,
) -> tuple[Float[Tensor, " S"], Float[Tensor, " S"], Float[Tensor, " S"]]:
    """Volume-rendering weights of packed samples (sorted by ray), differentiable w.r.t. ``sigmas``.

    ``w_i = T_i * (1 - exp(-sigma_i * delta_i))`` with ``T_i = exp(-sum_{j<i} sigma_j * delta_j)`` over the samples of
    the same ray. The per-ray exclusive sum is a global cumulative sum (in float64) minus its value at the
    ray's first sample. Samples marked ``opaque`` (a ray's last, see :attr:`PackedSamples.far`) have alpha 1.

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
    if opaque is not None:
        alphas = torch.where(opaque, torch.ones_like(alphas), alphas)
    return trans * alphas, trans, alphas


def ray_aabb(
    origins: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"], aabb: Float[Tensor, "2 3"]
) -> tuple[Float[Tensor, " N"], Float[Tensor, " N"]]:
    """Entry and exit distances of rays through a box (exit < entry when a ray misses it)."""
    inv = 1.0 / torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    t0 = (aabb[0] - origins) * inv
    t1 = (aabb[1] - origins) * inv
    return torch.minimum(t0, t1).amax(-1), torch.maximum(t0, t1).amin(-1)


@dataclass
class _Marching:
    """Where the marching steps of each ray lie: step ``u`` (fractional) sits at :meth:`t_at` ``(u)``.

    Inside the field's box (the contraction box of a contracted field) steps are ``step`` apart in world units.
    Beyond the contraction box, the L-infinity radius ``r`` (in box units) grows by one grid step of contracted
    space per step, ``d(1/r) = -radial_step``, i.e. ``r(s) = 1 / (1/r0 - s * radial_step)``, up to ``far_radius``;
    the distance follows from ``r`` growing at most ``rate`` per unit of ``t`` (the largest component of the
    direction in box units), so the steps stay at most one contracted voxel apart along the ray's radial motion.
    """

    t_near: Float[Tensor, " N"]
    step: float
    total: Float[Tensor, " N"]
    """Steps of each ray (``u < total``); 0 for rays that miss the field."""
    inner: Float[Tensor, " N"] | None = None
    """Steps inside the contraction box (contracted fields only)."""
    rate: Float[Tensor, " N"] | None = None
    start_radius: Float[Tensor, " N"] | None = None
    radial_step: float = 0.0
    """Change of ``1/r`` per step beyond the contraction box (one grid step of the contracted shell)."""

    def t_at(self, u: Tensor, rays: Tensor) -> Tensor:
        """Distance along the ray of (fractional) step ``u`` of ray ``rays``."""
        linear = self.t_near[rays] + u * self.step
        if self.inner is None:
            return linear
        assert self.rate is not None and self.start_radius is not None
        inner = self.inner[rays]
        r0 = self.start_radius[rays]
        beyond = (u - inner).clamp_min(0.0)
        radius = 1.0 / (1.0 / r0 - beyond * self.radial_step).clamp_min(1e-6)
        outer = self.t_near[rays] + inner * self.step + (radius - r0) / self.rate[rays]
        return torch.where(u <= inner, linear, outer)


class OccupancySampler(nn.Module):
    """Marches rays at a fixed step through the field's box, keeping samples in occupied voxels only.

    Args:
        step_ratio: marching step as a fraction of the field's voxel size.
        alpha_threshold: a vertex is occupied when a ray crossing one voxel at its density would be at least
            this opaque; samples less opaque than this are dropped too.
        early_stop_eps: samples behind which the transmittance has fallen below this are dropped.
        max_samples_per_ray: cap on the marching steps per ray (the step grows when the box needs more).
        far_radius: how far a contracted field's rays are marched, in half-sizes of its contraction box (the
            contracted coordinate reaches ``2 - 1/far_radius``).
        far_samples: in a contracted field, end every ray that is not yet opaque on one more sample at the far
            radius, opaque whatever its density (:attr:`PackedSamples.far`): its colour, the field's sky map (the
            far radius lies beyond :data:`~mmstyle_ns.fields.grid_field.SKY_RADIUS`) or else the grid's on its
            outer face, is what lies beyond everything (a sky), seen alike from every camera.
    """

    occupancy: Tensor
    initialized: Tensor

    def __init__(
        self,
        step_ratio: float = 0.5,
        alpha_threshold: float = 1e-2,
        early_stop_eps: float = 1e-4,
        max_samples_per_ray: int = 1024,
        far_radius: float = 1000.0,
        far_samples: bool = False,
    ) -> None:
        super().__init__()
        self.far_radius = far_radius
        self.far_samples = far_samples
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
        alpha = 1.0 - torch.exp(-field.vertex_densities() * field.voxel_size() * field.vertex_length_scale())
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
        rel = (field.to_grid(positions) - field.aabb[0]) / (field.aabb[1] - field.aabb[0])
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
        marching: _Marching,
        steps: int,
        offset: Float[Tensor, "N 1"],
        first: int = 0,
        last: int | None = None,
        rays: Int[Tensor, " A"] | None = None,
    ) -> tuple[Int[Tensor, " M"], Float[Tensor, " M"]]:
        """Ray index and (fractional) step ``u`` of the marching steps ``first <= j < last`` of ``rays`` (default:
        all steps of all rays) inside the field, sorted by ray, skipping empty blocks of steps first.

        Step ``j`` of a ray sits at ``u = j + offset``. Steps are grouped in blocks of ``BLOCK``; a block is dropped
        when the occupancy grid dilated by two more voxels is empty at its centre (every step of the block lies
        within about one voxel of it), so no occupied step is lost, and far fewer are generated.
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
            inside = (block_ids[None, :] * block).float() < marching.total[rays, None]
            local, which = torch.nonzero(inside, as_tuple=True)
            u_centre = (block_ids[which] * block + block / 2).to(origins.dtype)
            t_block = marching.t_at(u_centre, rays[local])
            centres = origins[rays[local]] + directions[rays[local]] * t_block[:, None]
            keep = self._lookup(field, centres, self._block_grid())
            local, which = local[keep], which[keep]
            step_ids = ((block_ids[which])[:, None] * block + torch.arange(block, device=device)[None, :]).reshape(-1)
            ray_ids = rays[local][:, None].expand(-1, block).reshape(-1)
        else:
            span = torch.arange(first, last, device=device)
            ray_ids = rays[:, None].expand(-1, span.numel()).reshape(-1)
            step_ids = span[None, :].expand(rays.numel(), -1).reshape(-1)
        u = step_ids + offset[ray_ids, 0]
        valid = (u < marching.total[ray_ids]) & (step_ids >= first) & (step_ids < last)
        return ray_ids[valid], u[valid]

    def _marching(
        self, field: DenseGridField, origins: Float[Tensor, "N 3"], directions: Float[Tensor, "N 3"], near: float
    ) -> tuple[_Marching, int]:
        """Each ray's marching steps and the number of steps of the longest ray."""
        step = self.step_ratio * field.voxel_size()
        if not bool(field.contracted):
            t_near, t_far = ray_aabb(origins, directions, field.aabb)
            t_near = t_near.clamp_min(near)
            hit = t_far > t_near
            span = float((t_far - t_near)[hit].max()) if bool(hit.any()) else 0.0
            steps = int(span / step) + 1
            if steps > self.max_samples_per_ray:
                step = span / self.max_samples_per_ray
                steps = self.max_samples_per_ray
            total = torch.where(hit, (t_far - t_near) / step, 0.0)
            return _Marching(t_near=t_near, step=step, total=total), steps
        box = field.contraction_box
        centre, half = (box[0] + box[1]) / 2, (box[1] - box[0]) / 2
        t_near = torch.full_like(origins[:, 0], near)
        _, t_exit = ray_aabb(origins, directions, box)
        start = (origins + near * directions - centre) / half
        start_radius = start.abs().amax(-1)
        inside = start_radius < 1.0
        t_exit = torch.where(inside, t_exit.clamp_min(near), t_near)
        start_radius = start_radius.clamp_min(1.0)
        rate = (directions / half).abs().amax(-1).clamp_min(1e-6)
        scale = 1.0
        for _ in range(2):  # a second pass when the cap on steps per ray coarsens the steps
            # a grid step of the shell changes 1/r by grid_step / (2 - inner share)
            radial_step = step * scale / field.contraction_half_size() / (2.0 - float(field.contraction_inner))
            inner = (t_exit - t_near) / (step * scale)
            outer = ((1.0 / start_radius - 1.0 / self.far_radius) / radial_step).clamp_min(0.0)
            total = inner + outer
            steps = int(float(total.max())) + 1 if total.numel() else 1
            if steps <= self.max_samples_per_ray:
                break
            scale *= steps / self.max_samples_per_ray
        steps = min(steps, self.max_samples_per_ray)
        marching = _Marching(
            t_near=t_near,
            step=step * scale,
            total=total.clamp_max(float(steps)),
            inner=inner,
            rate=rate,
            start_radius=start_radius,
            radial_step=radial_step,
        )
        return marching, steps

    @torch.no_grad()
    def forward(
        self,
        field: DenseGridField,
        origins: Float[Tensor, "N 3"],
        directions: Float[Tensor, "N 3"],
        near: float = 0.0,
        jitter: bool = False,
        far_samples: bool | None = None,
    ) -> PackedSamples:
        """Samples rays; densities used for culling are computed without gradients (``far_samples``: override of the
        setting of the same name for this call).

        Rays are marched ``SEGMENT`` steps at a time, carrying each ray's optical depth from segment to segment,
        so the samples are those of one pass over the whole ray while rays that became opaque stop early.
        """
        num_rays = origins.shape[0]
        device = origins.device
        marching, steps = self._marching(field, origins, directions, near)
        offset = torch.rand(num_rays, 1, device=device) if jitter else torch.full((num_rays, 1), 0.5, device=device)
        depth = torch.zeros(num_rays, dtype=torch.float64, device=device)  # optical depth marched so far
        opaque = -math.log(self.early_stop_eps)
        kept_rays, kept_u = [], []
        for first in range(0, steps, self.SEGMENT):
            active = (depth < opaque) & (marching.total > first)
            rays = active.nonzero()[:, 0]
            if rays.numel() == 0:
                break
            ray_indices, u = self._candidates(
                field, origins, directions, marching, steps, offset, first, first + self.SEGMENT, rays
            )
            t_mid = marching.t_at(u, ray_indices)
            positions = origins[ray_indices] + directions[ray_indices] * t_mid[:, None]
            keep = self._lookup(field, positions)
            ray_indices, u, positions = ray_indices[keep], u[keep], positions[keep]
            if ray_indices.numel() == 0:
                continue
            t_starts, t_ends = self._interval(marching, u, ray_indices)
            sigmas = field.density_at(positions)[:, 0]
            _, trans, alphas = packed_weights(t_starts, t_ends, sigmas, ray_indices)
            trans = trans * torch.exp(-depth[ray_indices]).to(trans.dtype)
            depth.index_add_(0, ray_indices, (sigmas * (t_ends - t_starts)).double())
            keep = trans > self.early_stop_eps
            if bool(self.initialized):
                keep &= alphas > self.alpha_threshold * self.step_ratio
            kept_rays.append(ray_indices[keep])
            kept_u.append(u[keep])
        add_far = (self.far_samples if far_samples is None else far_samples) and marching.inner is not None
        if add_far:  # one sample at the far end of every ray that is still not opaque, after its others
            far_rays = ((depth < opaque) & (marching.total > 0)).nonzero()[:, 0]
            kept_rays.append(far_rays)
            kept_u.append(marching.total[far_rays])
        is_far = None
        if kept_rays:
            if add_far:
                is_far = torch.cat(
                    [torch.zeros_like(r, dtype=torch.bool) for r in kept_rays[:-1]]
                    + [torch.ones_like(kept_rays[-1], dtype=torch.bool)]
                )
            ray_indices, u = torch.cat(kept_rays), torch.cat(kept_u)
            order = torch.argsort(ray_indices, stable=True)  # segments come in order along each ray
            ray_indices, u = ray_indices[order], u[order]
            is_far = None if is_far is None else is_far[order]
        else:
            ray_indices = torch.zeros(0, dtype=torch.long, device=device)
            u = torch.zeros(0, device=device)
        t_starts, t_ends = self._interval(marching, u, ray_indices)
        t_mid = marching.t_at(u, ray_indices)
        positions = origins[ray_indices] + directions[ray_indices] * t_mid[:, None]
        s_starts = s_ends = None
        if marching.inner is not None:
            s_starts, s_ends = (u - 0.5) * marching.step, (u + 0.5) * marching.step
        if is_far is not None:  # starts at the far radius and spans no marching distance (it is not marched)
            t_starts = torch.where(is_far, t_mid, t_starts)
            t_ends = torch.where(is_far, 2.0 * t_mid, t_ends)
            assert s_starts is not None and s_ends is not None
            s_starts = torch.where(is_far, u * marching.step, s_starts)
            s_ends = torch.where(is_far, u * marching.step, s_ends)
        return PackedSamples(
            t_starts=t_starts,
            t_ends=t_ends,
            ray_indices=ray_indices,
            positions=positions,
            directions=directions[ray_indices],
            s_starts=s_starts,
            s_ends=s_ends,
            far=is_far,
        )

    @staticmethod
    def _interval(marching: _Marching, u: Tensor, rays: Tensor) -> tuple[Tensor, Tensor]:
        """Start and end distance of the steps ``u`` of ``rays``."""
        if marching.inner is None:
            t_mid = marching.t_at(u, rays)
            return t_mid - 0.5 * marching.step, t_mid + 0.5 * marching.step
        # the last step ends at the far radius (beyond it the radius of u + 1/2 would run off to infinity)
        end = torch.minimum(u + 0.5, marching.total[rays])
        return marching.t_at(u - 0.5, rays), marching.t_at(end, rays)
