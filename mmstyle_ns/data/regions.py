"""3-D edit regions: axis-aligned boxes in nerfstudio's world coordinates, made from a camera's rendered depth.

A region is drawn once (on the command line as ``x0 y0 z0 x1 y1 z1``, or as a rectangle in the viewer) and then
projected into every view: a pixel belongs to the region when the surface point it renders (ray origin + depth
times the unit ray direction) lies inside the box.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool, Float
from nerfstudio.cameras.cameras import Cameras
from torch import Tensor

Box = tuple[float, float, float, float, float, float]
"""``(x0, y0, z0, x1, y1, z1)``: the lower and upper corners of an axis-aligned box."""


def surface_points(camera: Cameras, depth: Float[Tensor, "h w 1"]) -> Float[Tensor, "h w 3"]:
    """The rendered surface point of every pixel of a single camera whose ``depth`` (nerfstudio's expected depth
    along the unit ray direction) was rendered at the camera's resolution."""
    rays = camera.to(depth.device).generate_rays(camera_indices=0, keep_shape=True)
    return rays.origins + rays.directions * depth


def inside_box(points: Float[Tensor, "*bs 3"], box: Box | Sequence[float]) -> Bool[Tensor, "*bs"]:
    """Whether each point lies inside the box (bounds included)."""
    corners = torch.as_tensor(tuple(box), device=points.device, dtype=points.dtype).view(2, 3)
    return ((points >= corners[0]) & (points <= corners[1])).all(dim=-1)


def box_from_screen_rect(
    points: Float[Tensor, "h w 3"],
    accumulation: Float[Tensor, "h w 1"],
    origin: Float[Tensor, "3"],
    min_bounds: tuple[float, float],
    max_bounds: tuple[float, float],
    *,
    margin: float = 0.1,
    quantile: float = 0.02,
) -> Box | None:
    """The box around the surface seen inside a screen rectangle (bounds as nerfstudio's viewer gives them: x then
    y, normalised to [0, 1], origin at the top left).

    The box spans the solid pixels' surface points (accumulation > 0.5) between the ``quantile`` and
    ``1 - quantile`` of each axis, so a few background pixels at the rectangle's edge do not stretch it. The camera
    (at ``origin``) sees only the front of what it selects, so along each axis the box is extended away from the
    camera to at least its largest side (an object is taken to be about as deep as it is wide), then grown by
    ``margin`` of that side on every side. Returns ``None`` when no solid pixel lies inside the rectangle.
    """
    height, width = points.shape[:2]
    (u0, v0), (u1, v1) = min_bounds, max_bounds
    x0, x1 = sorted((u0, u1))
    y0, y1 = sorted((v0, v1))
    cols = (torch.arange(width, device=points.device, dtype=points.dtype) + 0.5) / width
    rows = (torch.arange(height, device=points.device, dtype=points.dtype) + 0.5) / height
    in_rect = ((rows >= y0) & (rows <= y1))[:, None] & ((cols >= x0) & (cols <= x1))[None, :]
    selected = in_rect & (accumulation[..., 0] > 0.5)
    if not bool(selected.any()):
        return None
    chosen = points[selected].float()  # [N, 3]
    low = torch.quantile(chosen, quantile, dim=0)
    high = torch.quantile(chosen, 1.0 - quantile, dim=0)
    side = float((high - low).max().clamp_min(1e-3))
    away = (chosen.mean(dim=0) - origin.to(chosen)) >= 0  # per axis: does the view look towards +axis?
    high = torch.where(away, torch.maximum(high, low + side), high)
    low = torch.where(away, low, torch.minimum(low, high - side))
    lower, upper = (low - margin * side).tolist(), (high + margin * side).tolist()
    return (lower[0], lower[1], lower[2], upper[0], upper[1], upper[2])
