"""A map of what lies beyond everything, by direction: the sky of an unbounded scene.

Light from infinitely far away (a sky, distant clouds, the horizon) depends only on the direction it arrives
from, so a 2-D map over directions describes it exactly and the same way for every camera; a 3-D grid has to
place it at some finite depth, where each view's rays put it somewhere else. :class:`SkyMap` is an
equirectangular texture (longitude around the world's ``+z`` axis, latitude from it), read bilinearly and
continuous across the seam at longitude +-pi.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn


class SkyMap(nn.Module):
    """Outputs (RGB, or e.g. Stable Diffusion latents) by direction, from an equirectangular texture.

    Args:
        channels: outputs per direction.
        rows: texels from the nadir to the zenith (the map has twice as many around the horizon).
        activation: ``"sigmoid"`` maps outputs to [0, 1] (RGB); ``"none"`` leaves them unbounded (latents).
    """

    def __init__(self, channels: int, rows: int, activation: Literal["sigmoid", "none"] = "sigmoid") -> None:
        super().__init__()
        if channels < 1 or rows < 1:
            raise ValueError(f"a sky map needs at least one channel and one row, got {channels} and {rows}")
        if activation not in ("sigmoid", "none"):
            raise ValueError(f"unknown activation {activation!r}; expected sigmoid or none")
        self.activation = activation
        self.table = nn.Parameter(torch.zeros(1, channels, rows, 2 * rows))
        """Raw texels ``[1, C, rows, 2 rows]``: row 0 at the zenith, column 0 at longitude -pi."""

    def forward(self, directions: Float[Tensor, "N 3"]) -> Float[Tensor, "N C"]:
        """Outputs for (not necessarily unit) directions."""
        unit = F.normalize(directions, dim=-1)
        longitude = torch.atan2(unit[:, 1], unit[:, 0]) / math.pi  # [-1, 1] across the columns
        latitude = torch.asin(unit[:, 2].clamp(-1.0, 1.0)) / (math.pi / 2)  # +1 at the zenith (row 0)
        width = self.table.shape[-1]
        # one column from the other side on each edge, so that bilinear reads wrap around the seam
        table = torch.cat([self.table[..., -1:], self.table, self.table[..., :1]], dim=-1)
        grid = torch.stack([longitude * width / (width + 2), -latitude], dim=-1)[None, None]
        raw = F.grid_sample(table, grid.to(table), mode="bilinear", padding_mode="border", align_corners=False)
        raw = raw[0, :, 0].T  # [N, C]
        return torch.sigmoid(raw) if self.activation == "sigmoid" else raw
