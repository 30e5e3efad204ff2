"""Where can content be? Camera visibility and silhouette carving of a grid before training starts.

Two facts about the training views bound the region a field has to model:

* A point seen by few training cameras cannot be reconstructed, and for an object-centric capture the
  content sits where the cameras' views overlap (the idea of DVGO's frustum-based bounding box, made
  stricter by requiring a fraction of the cameras).
* When the images carry an alpha channel (synthetic and masked captures), a point that projects onto a
  transparent pixel of any view is empty: the visual hull of the silhouettes contains all content
  (classic space carving).

:func:`view_support` evaluates both for a set of points; the base model uses it once, before its first
training step, to crop its grid box and to start the grid empty outside the supported region.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor


def project_points(
    points: Float[Tensor, "P 3"],
    camera_to_worlds: Float[Tensor, "N 3 4"],
    intrinsics: Float[Tensor, "N 4"],
) -> tuple[Float[Tensor, "N P"], Float[Tensor, "N P"], Float[Tensor, "N P"]]:
    """Projects world points into nerfstudio (OpenGL-convention) pinhole cameras.

    Args:
        points: world positions.
        camera_to_worlds: camera poses; the camera looks along its -z axis, +y is up.
        intrinsics: ``(fx, fy, cx, cy)`` per camera, in pixels (pixel centres at half-integers).

    Returns:
        Column ``u`` and row ``v`` in pixels (``floor`` gives the pixel index) and the depth in front of each
        camera (negative behind it).
    """
    rotation = camera_to_worlds[:, :, :3]  # [N, 3, 3]
    translation = camera_to_worlds[:, :, 3]  # [N, 3]
    local = torch.einsum("nji,npj->npi", rotation, points[None] - translation[:, None])  # R^T (p - t)
    depth = -local[..., 2]
    safe = torch.where(depth.abs() < 1e-8, torch.full_like(depth, 1e-8), depth)
    fx, fy, cx, cy = (intrinsics[:, i : i + 1] for i in range(4))
    u = cx + fx * local[..., 0] / safe
    v = cy - fy * local[..., 1] / safe
    return u, v, depth


@torch.no_grad()
def view_support(
    points: Float[Tensor, "P 3"],
    camera_to_worlds: Float[Tensor, "N 3 4"],
    intrinsics: Float[Tensor, "N 4"],
    image_sizes: Int[Tensor, "N 2"],
    alphas: Sequence[Float[Tensor, "H W"]] | None = None,
    alpha_threshold: float = 0.5,
    silhouette_dilation: int = 2,
    chunk: int = 1 << 16,
) -> tuple[Int[Tensor, " P"], Bool[Tensor, " P"]]:
    """How many training cameras see each point, and whether a silhouette carves it away.

    Args:
        points: world positions to test.
        camera_to_worlds: training camera poses (nerfstudio convention).
        intrinsics: ``(fx, fy, cx, cy)`` per camera.
        image_sizes: ``(height, width)`` per camera.
        alphas: per-camera opacity images (coverage in [0, 1]); ``None`` skips carving.
        alpha_threshold: pixels with (dilated) alpha below this are empty space.
        silhouette_dilation: silhouettes grow by this many pixels first, so that the carving stays
            conservative at object borders and under small pose errors.
        chunk: points processed at once (memory bound).

    Returns:
        ``seen``: number of cameras with the point in front of them and inside their image;
        ``carved``: the point falls on an empty pixel of at least one view.
    """
    num_cameras = camera_to_worlds.shape[0]
    empties: list[Bool[Tensor, "H W"]] = []
    if alphas is not None:
        if len(alphas) != num_cameras:
            raise ValueError(f"got {len(alphas)} alpha images for {num_cameras} cameras")
        size = 2 * silhouette_dilation + 1
        for alpha in alphas:
            grown = F.max_pool2d(alpha[None, None].float(), size, stride=1, padding=silhouette_dilation)[0, 0]
            empties.append(grown < alpha_threshold)
    heights = image_sizes[:, 0:1].to(points.device)
    widths = image_sizes[:, 1:2].to(points.device)
    seen_parts, carved_parts = [], []
    for part in points.split(chunk):
        u, v, depth = project_points(part, camera_to_worlds, intrinsics)
        col, row = u.floor().long(), v.floor().long()
        inside = (depth > 0) & (col >= 0) & (row >= 0) & (col < widths) & (row < heights)
        seen_parts.append(inside.sum(0))
        carved = torch.zeros(part.shape[0], dtype=torch.bool, device=points.device)
        for cam, empty in enumerate(empties):
            ok = inside[cam]
            idx = ok.nonzero()[:, 0]
            carved[idx] |= empty[row[cam, idx], col[cam, idx]]
        carved_parts.append(carved)
    return torch.cat(seen_parts), torch.cat(carved_parts)
