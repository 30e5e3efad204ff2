"""MM-NeRF's Multi-Head Learning Scheme: per-style heads that predict the parameters of the colour head.

The stylized colour of a sample is ``c = g(f(x), c0(x); theta_s)``: a small MLP ``g`` (the colour head) applied to
the interpolated features of a shared, style-agnostic feature grid ``f`` and to the sample's photorealistic
base colour ``c0`` (content). The colour head has no weights of its own: its parameters ``theta_s`` are predicted
by the head of style ``s`` from that style's embedding, ``theta_s = H_s(e_s)`` (one small MLP per style). Each
style's head only sees that style's (view-inconsistent) supervision, which is how MM-NeRF splits one hard
multi-style problem into per-style sub-problems; the feature grid is shared by all styles.

Blending two styles interpolates their predicted parameters, ``theta = (1 - t) theta_a + t theta_b``.

A style added to a trained model may also own a residual feature grid ``r_s``: its colour head then sees
``f(x) + r_s(x)``, so it can paint texture the shared grid does not hold, while every other style's input (and
render) stays exactly what it was. Styles without a residual hold an empty one (:attr:`FeatureGrid.active`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mmstyle_ns.fields.grid_field import grid_shape_for, trilinear_corners, trilinear_lookup


class FeatureGrid(nn.Module):
    """A dense trilinear feature grid over a box (the shared style features).

    Args:
        aabb: box the grid spans, ``[2, 3]``.
        resolution: vertices along the longest side.
        channels: features per vertex.
        init_scale: standard deviation of the random initial features.
    """

    aabb: Tensor
    grid_dims: Tensor

    def __init__(self, aabb: Float[Tensor, "2 3"], resolution: int, channels: int, init_scale: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.init_scale = init_scale
        self.register_buffer("aabb", aabb.clone().float())
        self.register_buffer("grid_dims", torch.tensor(grid_shape_for(self.aabb, resolution)))
        self.table = nn.Parameter(torch.randn(int(self.grid_dims.prod()), channels) * init_scale)

    @classmethod
    def empty(cls, aabb: Float[Tensor, "2 3"], channels: int) -> FeatureGrid:
        """A grid without vertices (inactive) until :meth:`reset` gives it some, or a checkpoint loads them."""
        grid = cls(aabb, resolution=2, channels=channels, init_scale=0.0)
        grid.table = nn.Parameter(torch.zeros(0, channels))
        return grid

    @property
    def active(self) -> bool:
        """Whether the grid has vertices (an :meth:`empty` grid contributes nothing and must not be evaluated)."""
        return self.table.shape[0] > 0

    @property
    def shape(self) -> tuple[int, int, int]:
        """Vertices per axis."""
        dims = self.grid_dims.tolist()
        return (int(dims[0]), int(dims[1]), int(dims[2]))

    def forward(self, positions: Float[Tensor, "N 3"]) -> Float[Tensor, "N C"]:
        return trilinear_lookup(self.table, *trilinear_corners(positions, self.aabb, self.shape))

    @torch.no_grad()
    def reset(self, aabb: Float[Tensor, "2 3"], resolution: int) -> None:
        """Re-creates the grid (fresh random features, zeros when ``init_scale`` is 0) over a new box; the table
        becomes a new Parameter."""
        self.aabb.copy_(aabb)
        self.grid_dims.copy_(torch.tensor(grid_shape_for(self.aabb, resolution)))
        table = torch.randn(int(self.grid_dims.prod()), self.channels, device=self.aabb.device) * self.init_scale
        self.table = nn.Parameter(table)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "table")
        if saved is not None and saved.shape != self.table.shape:  # a trained grid has its own size
            self.table = nn.Parameter(torch.empty(saved.shape, dtype=self.table.dtype, device=self.table.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ColorHeadSpec:
    """Layout of the colour head's flat parameter vector: ``in -> hidden -> 3`` with ReLU, sigmoid output."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.shapes = [(hidden_dim, in_dim), (hidden_dim,), (3, hidden_dim), (3,)]
        self.num_params = sum(math.prod(s) for s in self.shapes)

    def default_parameters(self) -> Float[Tensor, " P"]:
        """A standard (PyTorch ``nn.Linear``-style) random initialisation of the colour head, flattened."""
        first, second = nn.Linear(self.in_dim, self.hidden_dim), nn.Linear(self.hidden_dim, 3)
        return torch.cat([p.detach().flatten() for p in (first.weight, first.bias, second.weight, second.bias)])

    def apply(self, params: Float[Tensor, " P"], inputs: Float[Tensor, "N I"]) -> Float[Tensor, "N 3"]:
        """Runs the colour head with the flat parameters ``params``."""
        w1, b1, w2, b2 = (
            part.view(shape)
            for part, shape in zip(params.split([math.prod(s) for s in self.shapes]), self.shapes, strict=True)
        )
        return torch.sigmoid(F.linear(F.relu(F.linear(inputs, w1, b1)), w2, b2))


class StyleHead(nn.Module):
    """One style's parameter-prediction head: style embedding -> colour-head parameters.

    The last layer starts with small weights and a bias equal to a standard colour-head initialisation
    (``initial``, shared by all heads of a model), so a fresh head predicts a sensible colour head; a head added
    incrementally is instead copied from the head of
    the most similar existing style.
    """

    def __init__(self, embedding_dim: int, hidden_dim: int, spec: ColorHeadSpec, initial: Tensor | None = None) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(embedding_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, spec.num_params)
        )
        last = self.layers[2]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():
            last.weight.mul_(1e-2)
            last.bias.copy_(spec.default_parameters() if initial is None else initial)

    def forward(self, embedding: Float[Tensor, " D"]) -> Float[Tensor, " P"]:
        return self.layers(embedding)
