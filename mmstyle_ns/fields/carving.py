"""Where can content be? Camera visibility, silhouette carving and a plane sweep, before training starts.

Three facts about the training views bound the region a field has to model:

* A point seen by few training cameras cannot be reconstructed, and for an object-centric capture the
  content sits where the cameras' views overlap (the idea of DVGO's frustum-based bounding box, made
  stricter by requiring a fraction of the cameras).
* When the images carry an alpha channel (synthetic and masked captures), a point that projects onto a
  transparent pixel of any view is empty: the visual hull of the silhouettes contains all content
  (classic space carving).
* Where neighbouring views agree on a textured patch, there is a surface: a plane sweep (Collins, CVPR 1996)
  tries depths along each pixel's ray and keeps the one at which the other views see the same colours. Its
  confident points tell how far the content is; nerfstudio's dataparsers scale poses by the cameras' spread, so a
  forward-facing capture puts its content far outside the scene box, where the contracted grid is coarse.

:func:`view_support` evaluates the first two for a set of points; the base model uses it once, before its first
training step, to crop its grid box and to start the grid empty outside the supported region.
:func:`sweep_points` gives the surface points of the third; the base model fits its contraction box to them.
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


def _neighbours(camera_to_worlds: Float[Tensor, "N 3 4"], reference: int, count: int, max_angle_deg: float) -> Tensor:
    """Cameras that look the same way as ``reference`` (optical axes within ``max_angle_deg``): the ``count``
    farthest of its ``2 count`` nearest such cameras (a wider baseline resolves depth better, a nearer camera
    sees more of the same surfaces)."""
    centres = camera_to_worlds[:, :, 3]
    axes = -camera_to_worlds[:, :, 2]
    axes = axes / axes.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    similar = (axes @ axes[reference]) >= torch.cos(torch.deg2rad(torch.tensor(max_angle_deg)))
    similar[reference] = False
    candidates = similar.nonzero()[:, 0]
    distance = (centres[candidates] - centres[reference]).norm(dim=-1)
    nearest = candidates[distance.argsort()[: 2 * count]]
    near_distance = (centres[nearest] - centres[reference]).norm(dim=-1)
    return nearest[near_distance.argsort(descending=True)[:count]]


@torch.no_grad()
def sweep_points(
    camera_to_worlds: Float[Tensor, "N 3 4"],
    intrinsics: Float[Tensor, "N 4"],
    images: Sequence[Float[Tensor, "H W 3"]],
    depth_range: tuple[float, float],
    num_references: int = 8,
    num_neighbours: int = 6,
    num_planes: int = 128,
    max_side: int = 64,
    patch: int = 5,
    min_confidence: float = 0.3,
    max_angle_deg: float = 30.0,
) -> Float[Tensor, "P 3"]:
    """Surface points of a plane sweep over the training views: where on each pixel's ray of a few reference
    views the neighbouring views agree.

    Each reference image (downscaled to ``max_side`` pixels) is compared with its neighbours at ``num_planes``
    z-depths spaced evenly in log depth over ``depth_range``: the mean absolute colour difference over a
    ``patch`` x ``patch`` window, averaged over the neighbours that see the point. A pixel keeps its best depth
    when it is confident, ``(median - best) / (median + 0.02) >= min_confidence`` over the depths (textureless
    regions such as a sky or a plain background are not), and the best depth is not one of the range's ends.

    Args:
        camera_to_worlds: camera poses (nerfstudio convention).
        intrinsics: ``(fx, fy, cx, cy)`` per camera, for each image's own size.
        images: RGB images in ``[0, 1]``, one per camera (read only for the views the sweep uses).
        depth_range: nearest and farthest z-depth tried, in world units.
        num_references: views the sweep runs from (spread evenly over the cameras).
        num_neighbours: views each reference is compared with (see :func:`_neighbours`).
        num_planes: depths tried.
        max_side: the images' longest side during the sweep.
        patch: side of the matching window, in pixels of the downscaled images.
        min_confidence: pixels less confident than this are dropped.
        max_angle_deg: a neighbour's optical axis is within this angle of the reference's.

    Returns:
        World positions of the confident pixels' surfaces (possibly none).
    """
    num_cameras = camera_to_worlds.shape[0]
    if len(images) != num_cameras:
        raise ValueError(f"got {len(images)} images for {num_cameras} cameras")
    poses = camera_to_worlds.float()
    scaled = intrinsics.float().clone()
    small: dict[int, Tensor] = {}

    def view(index: int) -> Tensor:
        """Image ``index`` downscaled, ``[3, h, w]`` (``scaled`` holds its intrinsics); only the views the sweep
        uses are read."""
        if index not in small:
            image = images[index]
            height, width = image.shape[:2]
            factor = min(1.0, max_side / max(height, width))
            size = (max(1, round(height * factor)), max(1, round(width * factor)))
            chw = image[..., :3].permute(2, 0, 1)[None].float()
            small[index] = F.interpolate(chw, size=size, mode="area")[0] if factor < 1.0 else chw[0]
            scaled[index, 0::2] *= size[1] / width
            scaled[index, 1::2] *= size[0] / height
        return small[index]

    near, far = depth_range
    depths = torch.logspace(torch.log10(torch.tensor(near)), torch.log10(torch.tensor(far)), num_planes)
    references = sorted({round(i * (num_cameras - 1) / max(num_references - 1, 1)) for i in range(num_references)})
    found: list[Tensor] = []
    for reference in references[: min(num_references, num_cameras)]:
        neighbours = _neighbours(poses, reference, num_neighbours, max_angle_deg)
        if neighbours.numel() < 2:
            continue
        image = view(reference)
        for other in neighbours.tolist():
            view(other)
        height, width = image.shape[1:]
        fx, fy, cx, cy = scaled[reference].tolist()
        rows = torch.arange(height, dtype=torch.float32) + 0.5
        cols = torch.arange(width, dtype=torch.float32) + 0.5
        v, u = torch.meshgrid(rows, cols, indexing="ij")
        local = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], dim=-1).reshape(-1, 3)
        rays = local @ poses[reference, :, :3].T  # world direction per unit of z-depth
        origin = poses[reference, :, 3]
        costs = torch.empty(num_planes, height, width)
        for plane, depth in enumerate(depths.tolist()):
            points = origin + depth * rays
            u_n, v_n, z_n = project_points(points, poses[neighbours], scaled[neighbours])
            total = torch.zeros(height, width)
            seen = torch.zeros(height, width)
            for k, other in enumerate(neighbours.tolist()):
                target = small[other]
                th, tw = target.shape[1:]
                grid = torch.stack([2.0 * u_n[k] / tw - 1.0, 2.0 * v_n[k] / th - 1.0], dim=-1).view(1, height, width, 2)
                sampled = F.grid_sample(target[None], grid, padding_mode="border", align_corners=False)[0]
                valid = ((z_n[k] > 0) & (grid.abs() <= 1.0).all(-1).reshape(-1)).view(height, width).float()
                difference = (sampled - image).abs().mean(0) * valid
                window = F.avg_pool2d(
                    torch.stack([difference, valid])[None],
                    patch,
                    stride=1,
                    padding=patch // 2,
                    count_include_pad=False,
                )[0]
                usable = window[1] > 0.5  # the neighbour sees most of the window
                total += torch.where(usable, window[0] / window[1].clamp_min(1e-6), 0.0)
                seen += usable.float()
            costs[plane] = torch.where(seen >= 2, total / seen.clamp_min(1.0), torch.inf)
        finite = torch.isfinite(costs)
        best_cost, best = torch.where(finite, costs, torch.inf).min(0)
        median = torch.where(finite, costs, torch.nan).nanmedian(0).values
        confidence = (median - best_cost) / (median + 0.02)
        keep = (finite.sum(0) >= num_planes // 4) & (confidence >= min_confidence)
        keep &= (best > 0) & (best < num_planes - 1)
        chosen = depths[best.reshape(-1)][keep.reshape(-1)]
        found.append(origin + chosen[:, None] * rays[keep.reshape(-1)])
    return torch.cat(found) if found else torch.zeros(0, 3)
