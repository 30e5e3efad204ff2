"""A dense voxel-grid radiance field that trains fast on CPUs.

Density and a small feature vector live in dense voxel grids over an axis-aligned box; colour comes from a
tiny MLP over the interpolated features and spherical-harmonic encoded view directions, so it is view
dependent. Trilinear interpolation is one fused ``embedding_bag`` call (eight corner rows weighted by their
trilinear weights), which on CPU is several times faster than 3-D ``grid_sample`` in both directions.

The grids grow coarse-to-fine: :meth:`DenseGridField.regrid` resamples them to a new resolution over a new
(usually tighter) box, which is how the model crops the grid to the occupied part of the scene.

For scenes that extend beyond the box (a ground to the horizon, a sky), :meth:`DenseGridField.contract_space`
switches the grids to mip-NeRF 360's scene contraction with the L-infinity norm (as nerfacto uses it): an inner box
keeps its linear coordinates and everything outside it is squeezed into a shell around it, so one dense grid over
``[-2, 2]^3`` covers all of space, with voxels that grow with the distance. The grids then live in these
*grid coordinates* (:meth:`DenseGridField.to_grid`); for a bounded field they are world coordinates. What lies
beyond :data:`SKY_RADIUS` (the sky) is coloured by direction from a :class:`~mmstyle_ns.fields.sky.SkyMap` instead of
the grid's outer face, when the field has one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from nerfstudio.field_components.activations import trunc_exp
from nerfstudio.field_components.encodings import SHEncoding
from nerfstudio.fields.base_field import Field
from torch import Tensor, nn

from mmstyle_ns.fields.sky import SkyMap

SKY_RADIUS = 500.0
"""L-infinity radius, in half-sizes of the contraction box, beyond which a contracted field with a sky map is the
sky: its outputs there come from the map, by direction from the box's centre (a sampler's far samples lie beyond
it; its marching samples stay well inside it)."""


def grid_shape_for(aabb: Float[Tensor, "2 3"], resolution: int) -> tuple[int, int, int]:
    """Vertex counts per axis so that the longest side of ``aabb`` gets ``resolution`` vertices (cubic voxels)."""
    extent = (aabb[1] - aabb[0]).tolist()
    voxel = max(extent) / resolution
    return tuple(max(2, int(math.ceil(e / voxel))) for e in extent)  # type: ignore[return-value]


def voxel_size_for(aabb: Float[Tensor, "2 3"], resolution: int) -> float:
    """Edge length of one voxel of a grid with ``resolution`` vertices along the longest side of ``aabb``."""
    dims = torch.tensor(grid_shape_for(aabb, resolution), dtype=aabb.dtype)
    return float(((aabb[1] - aabb[0]) / (dims - 1)).max())


def contract(x: Float[Tensor, "N 3"], inner: float = 1.0) -> Float[Tensor, "N 3"]:
    """Scene contraction with the L-infinity norm into ``[-2, 2]^3``.

    With ``inner = 1`` this is mip-NeRF 360's (nerfstudio's ``SceneContraction(order=inf)``): identity inside
    ``[-1, 1]^3`` and ``(2 - 1/|x|) x/|x|`` outside. A larger ``inner`` (below 2) gives the box ``[-1, 1]^3`` more of
    the grid: it is scaled to ``[-inner, inner]^3`` and the rest of space fills the shell out to 2,
    ``(inner + (2 - inner)(1 - 1/|x|)) x/|x|``.
    """
    norm = x.abs().amax(-1, keepdim=True).clamp_min(1.0)
    outer = (inner + (2.0 - inner) * (1.0 - 1.0 / norm)) * (x / norm)
    return torch.where(norm > 1.0, outer, inner * x)


def uncontract(y: Float[Tensor, "N 3"], inner: float = 1.0, max_radius: float = 1e4) -> Float[Tensor, "N 3"]:
    """Inverse of :func:`contract`; points on the outer boundary (infinitely far) map to ``max_radius``."""
    rho = y.abs().amax(-1, keepdim=True)
    shell = ((rho - inner) / (2.0 - inner)).clamp(0.0, 1.0 - 1.0 / max_radius)
    radius = 1.0 / (1.0 - shell)
    return torch.where(rho > inner, y / rho.clamp_min(1e-12) * radius, y / inner)


def trilinear_corners(
    points: Float[Tensor, "N 3"], aabb: Float[Tensor, "2 3"], shape: tuple[int, int, int]
) -> tuple[Int[Tensor, "N 8"], Float[Tensor, "N 8"]]:
    """Row indices of the eight grid vertices around each point and their trilinear weights.

    The grid has ``shape`` vertices per axis spanning ``aabb`` (vertex-aligned, like ``align_corners=True``);
    points outside are clamped to the box. Corner ``c = 4i + 2j + k`` is vertex ``(x0 + i, y0 + j, z0 + k)``.
    """
    dims = torch.tensor(shape, device=points.device, dtype=points.dtype)
    x = (points - aabb[0]) * ((dims - 1) / (aabb[1] - aabb[0]))
    x = torch.minimum(x.clamp_min(0.0), dims - 1)
    base = torch.minimum(x.floor(), dims - 2)
    frac = x - base
    base_index = base.long()
    flat = (base_index[:, 0] * shape[1] + base_index[:, 1]) * shape[2] + base_index[:, 2]
    offsets = torch.tensor(
        [(i * shape[1] + j) * shape[2] + k for i in (0, 1) for j in (0, 1) for k in (0, 1)], device=points.device
    )
    index = flat[:, None] + offsets
    pairs = torch.stack([1.0 - frac, frac], dim=1)  # [N, 2, 3]: weight of the lower / upper vertex per axis
    weights = pairs[:, :, None, None, 0] * pairs[:, None, :, None, 1] * pairs[:, None, None, :, 2]
    return index, weights.reshape(-1, 8)


class _TrilinearLookup(torch.autograd.Function):
    """Weighted sum of eight table rows per point; the backward scatters with ``index_add_``.

    ``F.embedding_bag`` computes the same forward, but its CPU backward sorts the indices and is 5-15x slower than
    a direct scatter-add for the small row widths of a radiance grid.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, index: Tensor, weights: Tensor) -> Tensor:
        ctx.save_for_backward(index, weights)
        ctx.num_rows = table.shape[0]
        return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor) -> tuple[Tensor | None, None, None]:
        (grad_out,) = grad_outputs
        index, weights = ctx.saved_tensors
        channels = grad_out.shape[-1]
        grad_table = grad_out.new_zeros(ctx.num_rows, channels)
        contributions = (weights[:, :, None] * grad_out[:, None, :]).reshape(-1, channels)
        grad_table.index_add_(0, index.reshape(-1), contributions)
        return grad_table, None, None


def trilinear_lookup(
    table: Float[Tensor, "V C"], index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"]
) -> Float[Tensor, "N C"]:
    """Trilinear interpolation of grid rows ``table`` (one row per vertex) with precomputed corners.

    Gradients flow to ``table`` only (corner weights are treated as constants).
    """
    if table.requires_grad and torch.is_grad_enabled():
        return _TrilinearLookup.apply(table, index, weights)  # type: ignore[no-any-return]
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


class DenseGridField(Field):
    """Density + feature voxel grids with a view-dependent colour of any number of channels.

    Args:
        aabb: box the grids span, ``[2, 3]`` (min corner, max corner).
        resolution: grid vertices along the longest side of the box.
        feature_dim: channels of the feature grid (with ``color_mode="sh"`` it is ``out_channels * sh_levels**2``).
        hidden_dim: width of the colour MLP (``color_mode="mlp"``).
        sh_levels: spherical-harmonic levels for the view direction (``levels**2`` coefficients).
        density_init: initial density (per unit length) of every voxel.
        color_mode: ``"sh"`` stores RGB spherical-harmonic coefficients in the grid (Plenoxels-like: every
            sample's colour is a direct parameter, which learns in few steps); ``"mlp"`` decodes the feature
            grid with a small MLP conditioned on the encoded view direction (DVGO-like).
        out_channels: channels of the view-dependent output (3 for RGB; e.g. 4 for Stable Diffusion latents).
        activation: ``"sigmoid"`` maps outputs to [0, 1] (RGB); ``"none"`` leaves them unbounded (latents).
        sky_rows: rows of the sky map (0: none; the grid's outer face then colours the far background too).
    """

    aabb: Tensor
    """Box the grids span, in grid coordinates (world coordinates unless contracted)."""
    grid_dims: Tensor
    density_scale: Tensor
    contracted: Tensor
    """Whether the grids use scene contraction (a bool buffer, so checkpoints remember it)."""
    contraction_box: Tensor
    """World box that keeps linear coordinates when contracted (``[-inner, inner]^3`` of the grid coordinates)."""
    contraction_inner: Tensor
    """Grid half-extent given to the contraction box (``inner`` of :func:`contract`)."""

    def __init__(
        self,
        aabb: Float[Tensor, "2 3"],
        resolution: int = 64,
        feature_dim: int = 12,
        hidden_dim: int = 64,
        sh_levels: int = 3,
        density_init: float = 0.1,
        color_mode: Literal["sh", "mlp"] = "mlp",
        out_channels: int = 3,
        activation: Literal["sigmoid", "none"] = "sigmoid",
        sky_rows: int = 0,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be at least 1, got {out_channels}")
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"unknown activation {activation!r}; expected sigmoid or none")
        self.color_mode = color_mode
        self.out_channels = out_channels
        self.activation = activation
        self.sh_coefficients = sh_levels**2
        if color_mode == "sh":
            feature_dim = out_channels * self.sh_coefficients
        self.feature_dim = feature_dim
        self.register_buffer("aabb", aabb.clone().float())
        self.register_buffer("contracted", torch.tensor(False))
        self.register_buffer("contraction_box", aabb.clone().float())
        self.register_buffer("contraction_inner", torch.tensor(1.0))
        self.register_buffer("grid_dims", torch.tensor(grid_shape_for(self.aabb, resolution)))
        vertices = int(self.grid_dims.prod())
        # Density is exp(raw + shift) per coarse voxel: multiplicative steps let a few optimizer steps take a
        # voxel from nearly transparent to opaque (or back); exp(shift) * scale == density_init when raw == 0.
        self.register_buffer("density_scale", torch.tensor(1.0 / self.voxel_size()))
        self.density_shift = math.log(density_init / float(self.density_scale))
        self.density_grid = nn.Parameter(torch.zeros(vertices, 1))
        self.feature_grid = nn.Parameter(torch.randn(vertices, feature_dim) * 0.1)
        self.direction_encoding = SHEncoding(levels=sh_levels, implementation="torch")
        self.color_mlp: nn.Module | None = None
        if color_mode == "mlp":
            self.color_mlp = nn.Sequential(
                nn.Linear(feature_dim + self.direction_encoding.get_out_dim(), hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, hidden_dim),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_dim, out_channels),
            )
        self.sky = SkyMap(out_channels, sky_rows, activation) if sky_rows > 0 else None

    @property
    def shape(self) -> tuple[int, int, int]:
        """Vertices per axis."""
        dims = self.grid_dims.tolist()
        return (int(dims[0]), int(dims[1]), int(dims[2]))

    def vertex_grid_positions(self) -> Float[Tensor, "V 3"]:
        """Grid coordinates of every grid vertex, in the row order of the grid tables."""
        axes = [
            torch.linspace(float(self.aabb[0, i]), float(self.aabb[1, i]), n, device=self.aabb.device)
            for i, n in enumerate(self.shape)
        ]
        return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)

    def vertex_positions(self) -> Float[Tensor, "V 3"]:
        """World position of every grid vertex, in the row order of the grid tables."""
        return self.from_grid(self.vertex_grid_positions())

    def to_grid(self, positions: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """Grid coordinates of world positions (the same positions unless the field is contracted)."""
        if not bool(self.contracted):
            return positions
        centre, half = self._contraction_frame()
        return contract((positions - centre) / half, float(self.contraction_inner))

    def from_grid(self, points: Float[Tensor, "N 3"]) -> Float[Tensor, "N 3"]:
        """World positions of grid coordinates (inverse of :meth:`to_grid`)."""
        if not bool(self.contracted):
            return points
        centre, half = self._contraction_frame()
        return uncontract(points, float(self.contraction_inner)) * half + centre

    def _contraction_frame(self) -> tuple[Float[Tensor, " 3"], Float[Tensor, " 3"]]:
        """Centre and half-size of the contraction box."""
        return (self.contraction_box[0] + self.contraction_box[1]) / 2, (
            self.contraction_box[1] - self.contraction_box[0]
        ) / 2

    def contraction_half_size(self) -> float:
        """World length of one grid-coordinate unit inside the contraction box (1 when not contracted)."""
        if not bool(self.contracted):
            return 1.0
        return float(self._contraction_frame()[1].max()) / float(self.contraction_inner)

    def vertex_length_scale(self) -> Float[Tensor, "X Y Z"]:
        """World length per voxel length at every vertex, relative to :meth:`voxel_size`: 1 everywhere for a
        bounded field; ``r**2 inner / (2 - inner)`` at L-infinity radius ``r > 1`` (in box units) of a contracted one
        (the contraction's radial squeeze), so that a far voxel's opacity accounts for the stretch of space it
        stands for."""
        if not bool(self.contracted):
            return torch.ones(self.shape, device=self.aabb.device)
        inner = float(self.contraction_inner)
        rho = self.vertex_grid_positions().abs().amax(-1)
        shell = ((rho - inner) / (2.0 - inner)).clamp(0.0, 1.0 - 1e-4)
        radius = 1.0 / (1.0 - shell)
        return torch.where(rho > inner, radius.square() * inner / (2.0 - inner), 1.0).view(self.shape)

    def voxel_size(self) -> float:
        """Edge length of one (cubic) voxel in world units (inside the contraction box when contracted)."""
        grid_voxel = float(((self.aabb[1] - self.aabb[0]) / (self.grid_dims - 1).float()).max())
        return grid_voxel * self.contraction_half_size()

    def corners(self, positions: Float[Tensor, "N 3"]) -> tuple[Int[Tensor, "N 8"], Float[Tensor, "N 8"]]:
        """Interpolation corners of world-space positions (share them between density and features)."""
        return trilinear_corners(self.to_grid(positions), self.aabb, self.shape)

    def density_from_corners(self, index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"]) -> Float[Tensor, "N 1"]:
        """Density (per unit length) from precomputed interpolation corners."""
        return self.activate_density(trilinear_lookup(self.density_grid, index, weights))

    def density_at(self, positions: Float[Tensor, "N 3"]) -> Float[Tensor, "N 1"]:
        """Density (per unit length) at world-space positions."""
        return self.density_from_corners(*self.corners(positions))

    def color_from_corners(
        self, index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"], directions: Float[Tensor, "N 3"]
    ) -> Float[Tensor, "N C"]:
        """View-dependent output (RGB in [0, 1] by default) from interpolation corners and unit view directions."""
        features = trilinear_lookup(self.feature_grid, index, weights)
        encoded = self.direction_encoding((directions + 1.0) / 2.0)  # SHEncoding takes directions in [0, 1]
        if self.color_mlp is None:  # spherical-harmonic coefficients per output channel
            coefficients = features.view(-1, self.out_channels, self.sh_coefficients)
            raw = torch.einsum("nck,nk->nc", coefficients, encoded)
        else:
            raw = self.color_mlp(torch.cat([features, encoded], dim=-1))
        return torch.sigmoid(raw) if self.activation == "sigmoid" else raw

    def sky_mask(self, positions: Float[Tensor, "N 3"]) -> Bool[Tensor, " N"]:
        """Positions whose outputs come from the sky map (beyond :data:`SKY_RADIUS` of a contracted field with one)."""
        if self.sky is None or not bool(self.contracted):
            return torch.zeros(positions.shape[0], dtype=torch.bool, device=positions.device)
        centre, half = self._contraction_frame()
        return ((positions - centre) / half).abs().amax(-1) >= SKY_RADIUS

    def with_sky(self, outputs: Float[Tensor, "N C"], positions: Float[Tensor, "N 3"]) -> Float[Tensor, "N C"]:
        """``outputs`` (the grid's, at ``positions``) with those beyond the sky radius replaced by the sky map's."""
        mask = self.sky_mask(positions)
        if self.sky is None or not bool(mask.any()):
            return outputs
        sky = self.sky(positions[mask] - self._contraction_frame()[0]).to(outputs)
        return outputs.index_put((mask.nonzero()[:, 0],), sky)

    @torch.no_grad()
    def reset_beyond(self, radius: float, opacity: float) -> None:
        """Resets a contracted field's density beyond the L-infinity ``radius`` (in half-sizes of the contraction
        box) to ``opacity`` per voxel, whatever length of space each voxel spans."""
        if not bool(self.contracted):
            raise ValueError("only a contracted field has space beyond its box")
        if not 0.0 < opacity < 1.0:
            raise ValueError(f"a voxel's opacity must lie in (0, 1), got {opacity}")
        inner = float(self.contraction_inner)
        rho = inner + (2.0 - inner) * (1.0 - 1.0 / max(radius, 1.0))  # the radius in grid coordinates
        beyond = self.vertex_grid_positions().abs().amax(-1) > rho
        density = -math.log1p(-opacity) / self.voxel_size()  # per unit length inside the box
        raw = self.raw_density_for(density) - self.vertex_length_scale().reshape(-1).log()
        self.density_grid[beyond] = raw[beyond, None]

    def vertex_densities(self) -> Float[Tensor, "X Y Z"]:
        """Density at every grid vertex."""
        return self.activate_density(self.density_grid.detach()[:, 0]).view(self.shape)

    def activate_density(self, raw: Tensor) -> Tensor:
        """Density per unit length from raw grid values."""
        return trunc_exp(raw + self.density_shift) * self.density_scale

    def raw_density_for(self, density: float) -> float:
        """Raw grid value whose density (per unit length) is ``density``."""
        return math.log(density / float(self.density_scale)) - self.density_shift

    # nerfstudio's Field interface, used by generic tools (e.g. mesh/point-cloud export).
    def get_density(self, ray_samples: Any) -> tuple[Tensor, Tensor]:
        positions = ray_samples.frustums.get_positions()
        flat = positions.reshape(-1, 3)
        index, weights = self.corners(flat)
        density = self.density_from_corners(index, weights).view(*positions.shape[:-1], 1)
        return density, torch.cat([index.float(), weights], dim=-1).view(*positions.shape[:-1], 16)

    def get_outputs(self, ray_samples: Any, density_embedding: Tensor | None = None) -> dict:
        from nerfstudio.field_components.field_heads import FieldHeadNames

        assert density_embedding is not None
        flat = density_embedding.reshape(-1, 16)
        directions = ray_samples.frustums.directions.reshape(-1, 3)
        rgb = self.color_from_corners(flat[:, :8].long(), flat[:, 8:], directions)
        return {FieldHeadNames.RGB: rgb.view(*density_embedding.shape[:-1], self.out_channels)}

    @torch.no_grad()
    def regrid(self, aabb: Float[Tensor, "2 3"], resolution: int) -> None:
        """Resamples both grids to ``resolution`` vertices (longest side) over ``aabb``.

        The grids become new ``nn.Parameter`` objects (autograd remembers a leaf's shape, so resizing one in
        place is not possible); use :func:`replace_parameters` to point optimizers at them.
        """
        aabb = aabb.to(self.aabb)
        new_shape = grid_shape_for(aabb, resolution)
        axes = [
            torch.linspace(float(aabb[0, i]), float(aabb[1, i]), n, device=aabb.device) for i, n in enumerate(new_shape)
        ]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # new grid's vertices
        self._resample(trilinear_corners(points, self.aabb, self.shape))
        self.aabb.copy_(aabb)
        self.grid_dims.copy_(torch.tensor(new_shape))

    @torch.no_grad()
    def contract_space(self, box: Float[Tensor, "2 3"], resolution: int, inner: float = 1.0) -> None:
        """Switches the grids to scene contraction around the world box ``box`` (which keeps linear coordinates):
        afterwards they span ``[-2, 2]^3`` of grid coordinates, i.e. all of space, with ``resolution`` vertices
        per side, resampled from the current grids (whose values outside their own box extend outwards), with the
        densities beyond the contraction box divided by the length of space each of their voxels spans.

        The density scale follows the new (inner) voxel size, so a raw grid value keeps its opacity per voxel.
        Like :meth:`regrid`, this replaces the grid parameters.
        """
        if bool(self.contracted):
            raise ValueError("the field is already contracted")
        if not 0.0 < inner < 2.0:
            raise ValueError(f"the contraction box's share of the grid must lie in (0, 2), got {inner}")
        box = box.to(self.aabb)
        new_aabb = torch.tensor([[-2.0] * 3, [2.0] * 3], device=self.aabb.device)
        new_shape = grid_shape_for(new_aabb, resolution)
        axes = [torch.linspace(-2.0, 2.0, n, device=self.aabb.device) for n in new_shape]
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        centre, half = (box[0] + box[1]) / 2, (box[1] - box[0]) / 2
        self._resample(trilinear_corners(uncontract(points, inner) * half + centre, self.aabb, self.shape))
        self.contraction_inner.fill_(inner)
        self.aabb.copy_(new_aabb)
        self.grid_dims.copy_(torch.tensor(new_shape))
        self.contraction_box.copy_(box)
        self.contracted.fill_(True)
        self.density_scale.fill_(1.0 / self.voxel_size())
        # A far voxel stands for a long stretch of space: divide its density by that length, so that every voxel
        # starts with the opacity it had (otherwise the far shell starts nearly opaque and learns the whole scene
        # as a backdrop before the content in the box can form).
        self.density_grid.sub_(self.vertex_length_scale().reshape(-1, 1).log())

    def _resample(self, corners: tuple[Int[Tensor, "V 8"], Float[Tensor, "V 8"]]) -> None:
        """Replaces both grids by their values at the given interpolation corners (one row per new vertex)."""
        index, weights = corners
        new_density = torch.cat(
            [
                trilinear_lookup(self.density_grid, i, w)
                for i, w in zip(index.split(1 << 18), weights.split(1 << 18), strict=True)
            ]
        )
        new_features = torch.cat(
            [
                trilinear_lookup(self.feature_grid, i, w)
                for i, w in zip(index.split(1 << 18), weights.split(1 << 18), strict=True)
            ]
        )
        self.density_grid = nn.Parameter(new_density.contiguous())
        self.feature_grid = nn.Parameter(new_features.contiguous())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # Runs saved before scene contraction existed are bounded fields.
        if prefix + "aabb" in state_dict and prefix + "contracted" not in state_dict:
            state_dict[prefix + "contracted"] = torch.tensor(False)
            state_dict[prefix + "contraction_box"] = state_dict[prefix + "aabb"].clone()
            state_dict[prefix + "contraction_inner"] = torch.tensor(1.0)
        # A trained field has a different grid size than a freshly built one: adopt the checkpoint's shapes.
        for name in ("density_grid", "feature_grid"):
            saved = state_dict.get(prefix + name)
            param = getattr(self, name)
            if saved is not None and saved.shape != param.shape:
                setattr(self, name, nn.Parameter(torch.empty(saved.shape, dtype=param.dtype, device=param.device)))
        if self.sky is not None:  # runs saved before the sky map existed, or with another size of it
            saved = state_dict.setdefault(prefix + "sky.table", self.sky.table.detach().clone())
            if saved.shape != self.sky.table.shape:
                self.sky.table = nn.Parameter(torch.empty_like(saved, device=self.sky.table.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def replace_parameters(optimizers: Any, replacements: dict[nn.Parameter, nn.Parameter]) -> None:
    """Points optimizers at new parameter objects, dropping the old ones' state (moments of another shape).

    Args:
        optimizers: a ``torch.optim.Optimizer``, or nerfstudio's ``Optimizers`` (its ``optimizers`` dict and
            ``parameters`` lists are both updated).
        replacements: old parameter -> new parameter.
    """
    optims = optimizers.optimizers.values() if hasattr(optimizers, "optimizers") else [optimizers]
    for optimizer in optims:
        for group in optimizer.param_groups:
            group["params"] = [replacements.get(p, p) for p in group["params"]]
        for old in replacements:
            optimizer.state.pop(old, None)
    for name, params in getattr(optimizers, "parameters", {}).items():
        optimizers.parameters[name] = [replacements.get(p, p) for p in params]


def sync_optimizer_parameters(optimizers: Any, groups: dict[str, list[nn.Parameter]]) -> None:
    """Points nerfstudio's optimizers at a model's current parameters (e.g. after a checkpoint load resized them).

    Loading a checkpoint can replace parameter objects (grids adopt the checkpoint's size) after the optimizers
    were built; their state, loaded by position, moves to the replacement when the shapes agree.
    """
    for name, params in groups.items():
        optimizer = optimizers.optimizers.get(name)
        if optimizer is None:
            continue
        old = optimizer.param_groups[0]["params"]
        if len(old) != len(params):
            continue
        replacements = {o: n for o, n in zip(old, params, strict=True) if o is not n}
        for o, n in replacements.items():
            state = optimizer.state.pop(o, None)
            if state is not None and all(
                not torch.is_tensor(v) or v.ndim == 0 or v.shape == n.shape for v in state.values()
            ):
                optimizer.state[n] = state
        optimizer.param_groups[0]["params"] = list(params)
        optimizers.parameters[name] = list(params)
