"""Stylization supervision of MM-NeRF: 2D-stylized training views and the multi-view style-consistent targets.

Stylized views. Every training view is stylized once per style by the 2D stylizer (Magenta arbitrary style
transfer by default; cached on disk by :class:`~mmstyle_ns.style.cache.StylizedViewCache`). Transparent parts
of views with alpha stay background (white), so the stylizer never paints empty space.

Multi-view style-consistent targets. A 2D stylizer paints every view independently, so the same surface
point gets different colours in different views; fitting them all at once blurs. For the pixel ``p`` of view
``i`` whose surface point (from the frozen geometry's depth) is ``x_p``, let ``N(i)`` be the ``K`` training views
nearest to ``i`` and ``V(p) ⊆ N(i)`` those that see ``x_p`` (it projects inside them and their own depth at that
pixel agrees with the distance to ``x_p``). The consistent target is the mean stylized colour of ``x_p`` over
the views that see it,

    ``cbar(p) = (S_i(p) + sum_{j in V(p)} S_j(pi_j(x_p))) / (1 + |V(p)|)``,

and the multi-view style-consistent loss is ``sum_p [|V(p)| > 0] ||C(p) - cbar(p)||^2`` over the rendered colours
``C``. It pulls each surface point towards what its neighbouring stylized views agree on, which tracks (and
averages out) the inconsistency of the multi-view supervision instead of fitting each view's own strokes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, UInt8
from rich.progress import track
from torch import Tensor

from mmstyle_ns.fields.carving import project_points
from mmstyle_ns.style.cache import StylizedViewCache, view_key_for


def composite_white(image: Float[np.ndarray, "H W C"]) -> Float[np.ndarray, "H W 3"]:
    """RGB over white (images without alpha are returned as they are)."""
    if image.shape[-1] == 4:
        return image[..., :3] * image[..., 3:] + (1.0 - image[..., 3:])
    return image[..., :3]


def stylized_views(
    views: Sequence[Float[np.ndarray, "H W C"]],
    style_key: str,
    stylize: Callable[[Float[np.ndarray, "H W 3"]], Float[np.ndarray, "H W 3"]],
    cache: StylizedViewCache | None,
    description: str = "Stylizing views",
) -> UInt8[Tensor, "N H W 3"]:
    """Stylizes every view once (from the cache when possible); alpha, if present, keeps the background white.

    Args:
        views: training images in ``[0, 1]``, RGB or RGBA.
        style_key: cache key of the style (see :func:`~mmstyle_ns.style.cache.style_key_for`).
        stylize: the 2D stylizer for this style (one RGB image in, one out).
        cache: the on-disk cache (``None`` stylizes every time).
        description: progress-bar label.
    """
    out = []
    for view in track(views, description=description, transient=True):
        content = composite_white(view)

        def compute(content: np.ndarray = content) -> np.ndarray:
            return stylize(content)

        if cache is None:
            styled = compute()
        else:
            styled = cache.get_or_compute(
                style_key, view_key_for(content, (content.shape[0], content.shape[1])), compute
            )
        if view.shape[-1] == 4:
            styled = styled * view[..., 3:] + (1.0 - view[..., 3:])
        out.append(torch.from_numpy(np.round(np.clip(styled, 0.0, 1.0) * 255.0).astype(np.uint8)))
    return torch.stack(out)


@torch.no_grad()
def consistent_targets(
    targets: UInt8[Tensor, "N H W 3"],
    depth: Float[Tensor, "N H W"],
    accumulation: Float[Tensor, "N H W"],
    origins: Float[Tensor, "N H W 3"],
    directions: Float[Tensor, "N H W 3"],
    camera_to_worlds: Float[Tensor, "N 3 4"],
    intrinsics: Float[Tensor, "N 4"],
    neighbors: int = 4,
    depth_tolerance: float = 0.03,
    min_accumulation: float = 0.5,
) -> tuple[UInt8[Tensor, "N H W 3"], Bool[Tensor, "N H W"]]:
    """Multi-view style-consistent targets ``cbar`` (see the module docstring) and where they are defined.

    Args:
        targets: one style's stylized views.
        depth: expected distance along each pixel's unit ray under the frozen geometry.
        accumulation: opacity of each pixel.
        origins: ray origins of each pixel.
        directions: unit ray directions of each pixel.
        camera_to_worlds: poses of the views (nerfstudio convention).
        intrinsics: ``(fx, fy, cx, cy)`` per view.
        neighbors: ``K``, nearest views (by camera centre) each view is compared with.
        depth_tolerance: relative depth agreement that counts as "sees the point".
        min_accumulation: pixels less opaque than this get no consistent target (background).

    Returns:
        The consistent targets (uint8) and the mask of pixels with at least one agreeing neighbour view.
    """
    num, height, width, _ = targets.shape
    centres = camera_to_worlds[:, :, 3]
    distances = torch.cdist(centres, centres)
    distances.fill_diagonal_(float("inf"))
    k = min(neighbors, num - 1)
    nearest = distances.topk(k, largest=False).indices if k > 0 else torch.zeros(num, 0, dtype=torch.long)
    colors = targets.float()
    out = colors.clone()
    valid = torch.zeros(num, height, width, dtype=torch.bool)
    for i in range(num):
        solid = accumulation[i] >= min_accumulation
        rows, cols = solid.nonzero(as_tuple=True)
        if rows.numel() == 0 or k == 0:
            continue
        points = origins[i, rows, cols] + directions[i, rows, cols] * depth[i, rows, cols, None]
        total = colors[i, rows, cols].clone()
        count = torch.ones(rows.numel())
        js = nearest[i]
        u, v, _ = project_points(points, camera_to_worlds[js], intrinsics[js])
        col_j, row_j = u.floor().long(), v.floor().long()
        inside = (col_j >= 0) & (row_j >= 0) & (col_j < width) & (row_j < height)
        for slot, j in enumerate(js.tolist()):
            ok = inside[slot]
            r, c = row_j[slot].clamp(0, height - 1), col_j[slot].clamp(0, width - 1)
            distance = (points - centres[j]).norm(dim=-1)
            seen = ok & (accumulation[j, r, c] >= min_accumulation)
            seen &= (depth[j, r, c] - distance).abs() <= depth_tolerance * distance
            total[seen] += colors[j, r[seen], c[seen]]
            count[seen] += 1
        out[i, rows, cols] = total / count[:, None]
        valid[i, rows, cols] = count > 1
    return out.round().clamp(0, 255).to(torch.uint8), valid
