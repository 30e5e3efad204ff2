"""A dense voxel-grid radiance field that trains fast on CPUs.

Density and a small feature vector live in dense voxel grids over an axis-aligned box; colour comes from a
tiny MLP over the interpolated features and spherical-harmonic encoded view directions, so it is view
dependent. Trilinear interpolation is one fused ``embedding_bag`` call (eight corner rows weighted by their
trilinear weights), which on CPU is several times faster than 3-D ``grid_sample`` in both directions.

The grids grow coarse-to-fine: :meth:`DenseGridField.regrid` resamples them to a new resolution over a new
(usually tighter) box, which is how the model crops the grid to the occupied part of the scene.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from nerfstudio.field_components.encodings import SHEncoding
from nerfstudio.fields.base_field import Field
from torch import Tensor, nn

_CORNERS = torch.tensor([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=torch.long)


def grid_shape_for(aabb: Float[Tensor, "2 3"], resolution: int) -> tuple[int, int, int]:
    """Vertex counts per axis so that the longest side of ``aabb`` gets ``resolution`` vertices (cubic voxels)."""
    extent = (aabb[1] - aabb[0]).tolist()
    voxel = max(extent) / resolution
    return tuple(max(2, int(math.ceil(e / voxel))) for e in extent)  # type: ignore[return-value]


def voxel_size_for(aabb: Float[Tensor, "2 3"], resolution: int) -> float:
    """Edge length of one voxel of a grid with ``resolution`` vertices along the longest side of ``aabb``."""
    dims = torch.tensor(grid_shape_for(aabb, resolution), dtype=aabb.dtype)
    return float(((aabb[1] - aabb[0]) / (dims - 1)).max())


def trilinear_corners(
    points: Float[Tensor, "N 3"], aabb: Float[Tensor, "2 3"], shape: tuple[int, int, int]
) -> tuple[Int[Tensor, "N 8"], Float[Tensor, "N 8"]]:
    """Row indices of the eight grid vertices around each point and their trilinear weights.

    The grid has ``shape`` vertices per axis spanning ``aabb`` (vertex-aligned, like ``align_corners=True``);
    points outside are clamped to the box.
    """
    dims = torch.tensor(shape, device=points.device)
    x = (points - aabb[0]) / (aabb[1] - aabb[0]) * (dims - 1)
    x = torch.minimum(x.clamp_min(0.0), (dims - 1).to(x.dtype))
    base = torch.minimum(x.floor(), (dims - 2).to(x.dtype))
    frac = x - base
    corners = base.long()[:, None, :] + _CORNERS.to(points.device)[None]  # [N, 8, 3]
    index = (corners[..., 0] * shape[1] + corners[..., 1]) * shape[2] + corners[..., 2]
    upper = _CORNERS.to(points.device).bool()[None]  # [1, 8, 3]
    weights = torch.where(upper, frac[:, None, :], 1.0 - frac[:, None, :]).prod(-1)
    return index, weights


def trilinear_lookup(
    table: Float[Tensor, "V C"], index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"]
) -> Float[Tensor, "N C"]:
    """Trilinear interpolation of grid rows ``table`` (one row per vertex) with precomputed corners."""
    return F.embedding_bag(index, table, per_sample_weights=weights, mode="sum")


class DenseGridField(Field):
    """Density + feature voxel grids with a tiny view-dependent colour MLP.

    Args:
        aabb: box the grids span, ``[2, 3]`` (min corner, max corner).
        resolution: grid vertices along the longest side of the box.
        feature_dim: channels of the feature grid.
        hidden_dim: width of the colour MLP.
        sh_levels: spherical-harmonic levels for the view direction (``levels**2`` coefficients).
        density_init: initial density (per unit length) of every voxel.
    """

    aabb: Tensor
    grid_dims: Tensor

    def __init__(
        self,
        aabb: Float[Tensor, "2 3"],
        resolution: int = 64,
        feature_dim: int = 12,
        hidden_dim: int = 64,
        sh_levels: int = 3,
        density_init: float = 0.1,
    ) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.register_buffer("aabb", aabb.clone().float())
        self.register_buffer("grid_dims", torch.tensor(grid_shape_for(self.aabb, resolution)))
        vertices = int(self.grid_dims.prod())
        # softplus(raw + shift) == density_init when raw == 0
        self.density_shift = math.log(math.expm1(density_init))
        self.density_grid = nn.Parameter(torch.zeros(vertices, 1))
        self.feature_grid = nn.Parameter(torch.randn(vertices, feature_dim) * 0.1)
        self.direction_encoding = SHEncoding(levels=sh_levels, implementation="torch")
        self.color_mlp = nn.Sequential(
            nn.Linear(feature_dim + self.direction_encoding.get_out_dim(), hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, 3),
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Vertices per axis."""
        dims = self.grid_dims.tolist()
        return (int(dims[0]), int(dims[1]), int(dims[2]))

    def voxel_size(self) -> float:
        """Edge length of one (cubic) voxel in world units."""
        return float(((self.aabb[1] - self.aabb[0]) / (self.grid_dims - 1).float()).max())

    def corners(self, positions: Float[Tensor, "N 3"]) -> tuple[Int[Tensor, "N 8"], Float[Tensor, "N 8"]]:
        """Interpolation corners of world-space positions (share them between density and features)."""
        return trilinear_corners(positions, self.aabb, self.shape)

    def density_from_corners(self, index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"]) -> Float[Tensor, "N 1"]:
        """Density (per unit length) from precomputed interpolation corners."""
        return F.softplus(trilinear_lookup(self.density_grid, index, weights) + self.density_shift)

    def density_at(self, positions: Float[Tensor, "N 3"]) -> Float[Tensor, "N 1"]:
        """Density (per unit length) at world-space positions."""
        return self.density_from_corners(*self.corners(positions))

    def color_from_corners(
        self, index: Int[Tensor, "N 8"], weights: Float[Tensor, "N 8"], directions: Float[Tensor, "N 3"]
    ) -> Float[Tensor, "N 3"]:
        """View-dependent RGB in [0, 1] from interpolation corners and unit view directions."""
        features = trilinear_lookup(self.feature_grid, index, weights)
        encoded = self.direction_encoding((directions + 1.0) / 2.0)  # SHEncoding takes directions in [0, 1]
        return torch.sigmoid(self.color_mlp(torch.cat([features, encoded], dim=-1)))

    def vertex_densities(self) -> Float[Tensor, "X Y Z"]:
        """Density at every grid vertex."""
        return F.softplus(self.density_grid.detach()[:, 0] + self.density_shift).view(self.shape)

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
        return {FieldHeadNames.RGB: rgb.view(*density_embedding.shape[:-1], 3)}

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
        points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
        index, weights = self.corners(points)
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
        self.aabb.copy_(aabb)
        self.grid_dims.copy_(torch.tensor(new_shape))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        # A trained field has a different grid size than a freshly built one: adopt the checkpoint's shapes.
        for name in ("density_grid", "feature_grid"):
            saved = state_dict.get(prefix + name)
            param = getattr(self, name)
            if saved is not None and saved.shape != param.shape:
                setattr(self, name, nn.Parameter(torch.empty(saved.shape, dtype=param.dtype, device=param.device)))
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
