"""Multi-view consistency of rendered views: warp one view into another with rendered depth and compare.

Video and 3D stylization papers measure consistency by warping view ``i`` into view ``j = i + gap`` and
comparing it with view ``j`` on the pixels where the warp is valid (short range: ``gap = 1``, long range: e.g.
``gap = 7``); they estimate the warp with optical flow (RAFT) and an occlusion mask from forward-backward
checks. A radiance field knows its cameras and renders depth, so here the warp is exact geometry: every pixel of
the target view is lifted to 3D with the target's depth, projected into the source view, and the source colour
is sampled there. A geometry-consistent renderer (one radiance field seen from several poses) gives an error
near zero; per-view stylization that flickers gives a clearly larger one. Lower is better.

Conventions (those of nerfstudio and :mod:`mmstyle_ns.fields.carving`): camera-to-world poses ``[R | t]``,
OpenGL axes (x right, y up, the camera looks along its ``-z`` axis); intrinsics ``(fx, fy, cx, cy)`` in pixels
with pixel centres at half-integers (pixel ``(row i, column j)`` is centred at ``u = j + 1/2, v = i + 1/2``).
Depth maps are nerfstudio's rendered ``"depth"`` by default, the DISTANCE ALONG THE UNIT RAY
(``depth_kind="ray"``); z-depth along the camera's viewing axis is ``depth_kind="z"`` (e.g. the embedded scene
generator's ground truth). For a pixel with camera-space direction ``d = ((u - cx) / fx, -(v - cy) / fy, -1)``
the two are related by ``ray = z * ||d||``.

Everything runs in float32 on the device of the source image; numpy arrays and torch tensors are accepted.
"""

from __future__ import annotations

import math
from typing import Any, Literal, TypedDict

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mmstyle_ns.fields.carving import project_points

Array = Tensor | np.ndarray
"""Inputs may be torch tensors or numpy arrays; results are tensors."""

DepthKind = Literal["ray", "z"]
"""``"ray"``: distance along the unit ray (nerfstudio's rendered depth); ``"z"``: depth along the view axis."""

DEFAULT_OCCLUSION_TOLERANCE = 0.05
"""Relative depth disagreement above which a warped point counts as hidden in the source view."""

_MIN_DEPTH = 1e-6
"""Points closer to (or behind) a camera's image plane than this are not projected."""

_EDGE_SLACK = 1e-3
"""Pixels of slack at the source's outermost pixel centres (float round-off of an identity warp)."""

_MIN_WEIGHT = 1e-3
"""Source pixels with a smaller bilinear weight do not take part in the validity and occlusion tests."""


def _tensor(array: Any, device: torch.device | None = None) -> Tensor:
    """A float32 tensor (on ``device`` when given) from a numpy array, a tensor or a nested sequence."""
    tensor = array.detach() if isinstance(array, Tensor) else torch.as_tensor(np.asarray(array))
    return tensor.to(device=device, dtype=torch.float32)


def _image(array: Any, device: torch.device | None = None) -> Tensor:
    """An RGB image (or batch) as float32: uint8 is scaled by 1/255, floats are taken as they are."""
    is_uint8 = array.dtype == torch.uint8 if isinstance(array, Tensor) else np.asarray(array).dtype == np.uint8
    tensor = _tensor(array, device)
    return tensor / 255.0 if is_uint8 else tensor


def _mask(array: Any, device: torch.device | None = None) -> Tensor:
    """A boolean tensor from a numpy array or a tensor."""
    tensor = array.detach() if isinstance(array, Tensor) else torch.as_tensor(np.asarray(array))
    return tensor.to(device=device, dtype=torch.bool)


def as_poses(c2w: Any, device: torch.device | None = None) -> Float[Tensor, "*b 3 4"]:
    """Camera-to-world poses ``[..., 3, 4]`` from ``[..., 3, 4]`` or homogeneous ``[..., 4, 4]`` matrices."""
    poses = _tensor(c2w, device)
    if poses.shape[-2:] == (4, 4):
        poses = poses[..., :3, :]
    if poses.ndim < 2 or poses.shape[-2:] != (3, 4):
        raise ValueError(f"camera-to-world poses must be [..., 3, 4] or [..., 4, 4], got {tuple(poses.shape)}")
    return poses


def as_intrinsics(intrinsics: Any, device: torch.device | None = None) -> Float[Tensor, "*b 4"]:
    """Intrinsics ``[..., 4]`` = ``(fx, fy, cx, cy)`` from ``[..., 4]`` rows or ``[..., 3, 3]`` matrices ``K``."""
    k = _tensor(intrinsics, device)
    if k.ndim >= 2 and k.shape[-2:] == (3, 3):
        k = torch.stack([k[..., 0, 0], k[..., 1, 1], k[..., 0, 2], k[..., 1, 2]], dim=-1)
    if k.ndim < 1 or k.shape[-1] != 4:
        raise ValueError(f"intrinsics must be (fx, fy, cx, cy) [..., 4] or K [..., 3, 3], got {tuple(k.shape)}")
    return k


def camera_arrays(cameras: Any) -> tuple[Float[Tensor, "N 3 4"], Float[Tensor, "N 4"]]:
    """Poses and intrinsics of nerfstudio ``Cameras`` (pinhole, undistorted) in the form this module takes.

    Args:
        cameras: a ``nerfstudio.cameras.cameras.Cameras`` (flattened to ``N`` cameras).

    Raises:
        ValueError: a camera is not a perspective camera or has non-zero distortion.
    """
    from nerfstudio.cameras.cameras import CameraType

    if (cameras.camera_type != CameraType.PERSPECTIVE.value).any():
        raise ValueError("consistency metrics support perspective (pinhole) cameras only")
    distortion = getattr(cameras, "distortion_params", None)
    if distortion is not None and bool((distortion != 0).any()):
        raise ValueError("consistency metrics support undistorted cameras only; undistort the renders first")
    c2w = cameras.camera_to_worlds.reshape(-1, 3, 4).float()
    k = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).reshape(-1, 4).float()
    return c2w, k


def ray_length_per_z(height: int, width: int, intrinsics: Float[Tensor, " 4"]) -> Float[Tensor, "H W"]:
    """``||d||`` per pixel for ``d = ((u - cx) / fx, -(v - cy) / fy, -1)``: ray distance per unit of z-depth."""
    fx, fy, cx, cy = intrinsics.unbind(-1)
    v, u = _pixel_centres(height, width, intrinsics.device)
    return torch.sqrt(((u - cx) / fx) ** 2 + ((v - cy) / fy) ** 2 + 1.0)


def convert_depth(
    depth: Float[Array, "H W"], intrinsics: Float[Array, " 4"], from_kind: DepthKind, to_kind: DepthKind
) -> Float[Tensor, "H W"]:
    """Converts a depth map between ray distance and z-depth: ``ray = z * ||d||`` (see :func:`ray_length_per_z`)."""
    for kind in (from_kind, to_kind):
        if kind not in ("ray", "z"):
            raise ValueError(f"depth_kind must be 'ray' or 'z', got {kind!r}")
    depth = _tensor(depth)
    if from_kind == to_kind:
        return depth
    norm = ray_length_per_z(depth.shape[0], depth.shape[1], as_intrinsics(intrinsics, depth.device))
    return depth * norm if to_kind == "ray" else depth / norm


def _pixel_centres(height: int, width: int, device: torch.device) -> tuple[Float[Tensor, "H W"], Float[Tensor, "H W"]]:
    """Row coordinate ``v = i + 1/2`` and column coordinate ``u = j + 1/2`` of every pixel centre."""
    rows = torch.arange(height, device=device, dtype=torch.float32) + 0.5
    cols = torch.arange(width, device=device, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(rows, cols, indexing="ij")
    return v, u


def unproject(
    depth: Float[Array, "H W"],
    c2w: Float[Array, "3 4"],
    intrinsics: Float[Array, " 4"],
    depth_kind: DepthKind = "ray",
) -> Float[Tensor, "H W 3"]:
    """World point of every pixel centre at its depth.

    With ``d = ((u - cx) / fx, -(v - cy) / fy, -1)`` the camera-space point is ``X = z d``, where ``z = depth`` for
    ``"z"`` and ``z = depth / ||d||`` for ``"ray"``; the world point is ``R X + t`` for ``c2w = [R | t]``.

    Args:
        depth: per-pixel depth (numpy or torch).
        c2w: camera-to-world pose ``[3, 4]`` or ``[4, 4]``, OpenGL convention.
        intrinsics: ``(fx, fy, cx, cy)`` or ``K``.
        depth_kind: what ``depth`` measures.
    """
    if depth_kind not in ("ray", "z"):
        raise ValueError(f"depth_kind must be 'ray' or 'z', got {depth_kind!r}")
    depth = _tensor(depth)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {tuple(depth.shape)}")
    pose = as_poses(c2w, depth.device)
    k = as_intrinsics(intrinsics, depth.device)
    if pose.shape != (3, 4) or k.shape != (4,):
        raise ValueError(f"unproject takes one camera, got poses {tuple(pose.shape)} and intrinsics {tuple(k.shape)}")
    fx, fy, cx, cy = k.unbind(-1)
    v, u = _pixel_centres(depth.shape[0], depth.shape[1], depth.device)
    direction = torch.stack([(u - cx) / fx, -(v - cy) / fy, -torch.ones_like(u)], dim=-1)  # [H, W, 3]
    z = depth if depth_kind == "z" else depth / direction.norm(dim=-1)
    local = direction * z[..., None]
    return local @ pose[:, :3].T + pose[:, 3]


def project(
    points: Float[Array, "*bs 3"], c2w: Float[Array, "3 4"], intrinsics: Float[Array, " 4"]
) -> tuple[Float[Tensor, "*bs"], Float[Tensor, "*bs"], Float[Tensor, "*bs"], Float[Tensor, "*bs"]]:
    """Projects world points into one pinhole camera.

    ``X = R^T (p - t)``; ``z = -X_z``; ``u = cx + fx X_x / z``; ``v = cy - fy X_y / z``.

    Returns:
        Column ``u`` and row ``v`` in pixels (``floor`` gives the pixel index), the z-depth ``z`` (not positive
        behind the camera; ``u``, ``v`` are meaningless there) and the distance ``||X||`` to the camera centre.
    """
    points = _tensor(points)
    pose = as_poses(c2w, points.device)
    flat = points.reshape(-1, 3)
    u, v, z = project_points(flat, pose[None], as_intrinsics(intrinsics, points.device)[None])
    shape = points.shape[:-1]
    distance = (flat - pose[:, 3]).norm(dim=-1)
    return u[0].view(shape), v[0].view(shape), z[0].view(shape), distance.view(shape)


def warp(
    source_rgb: Float[Array, "Hs Ws 3"],
    target_depth: Float[Array, "H W"],
    target_c2w: Float[Array, "3 4"],
    target_intrinsics: Float[Array, " 4"],
    source_c2w: Float[Array, "3 4"],
    source_intrinsics: Float[Array, " 4"],
    source_depth: Float[Array, "Hs Ws"] | None = None,
    occlusion_tolerance: float = DEFAULT_OCCLUSION_TOLERANCE,
    *,
    depth_kind: DepthKind = "ray",
    target_valid: Bool[Array, "H W"] | None = None,
    source_valid: Bool[Array, "Hs Ws"] | None = None,
) -> tuple[Float[Tensor, "H W 3"], Bool[Tensor, "H W"]]:
    """Backward-warps a source view into a target view through the target's depth.

    For every target pixel ``p``: ``X = unproject_target(p, D_t(p))``; ``(u, v, z_s) = project_source(X)``;
    ``W(p) = bilinear(I_s, u, v)``. The mask is true where

    * the target depth is valid: finite, ``> 0`` and ``target_valid`` (e.g. ``accumulation > 0.5`` for nerfstudio
      renders, whose background depth is not 0);
    * ``X`` is in front of the source camera (``z_s > 0``) and inside its grid of pixel centres
      (``1/2 <= u <= Ws - 1/2``, ``1/2 <= v <= Hs - 1/2``), so the colour is interpolated, never extrapolated;
    * every source pixel ``q`` the bilinear sample uses (weight ``> 1e-3``) is valid: ``source_valid`` and, when
      ``source_depth`` is given, finite depth ``> 0``;
    * with ``source_depth``: ``X`` is what each of those pixels sees (occlusion test),
      ``|D_s(q) - d_s(X)| <= occlusion_tolerance * d_s(X)`` with ``d_s(X)`` the point's z-depth or ray distance
      in the source camera (matching ``depth_kind``). Testing every contributing pixel, rather than the
      interpolated depth, keeps colours of two surfaces from being mixed at depth edges.

    Args:
        source_rgb: colours of the source view (float in ``[0, 1]`` or uint8).
        target_depth: rendered depth of the target view.
        target_c2w: target camera-to-world pose ``[3, 4]`` or ``[4, 4]``.
        target_intrinsics: target ``(fx, fy, cx, cy)`` or ``K``.
        source_c2w: source camera-to-world pose.
        source_intrinsics: source intrinsics.
        source_depth: rendered depth of the source view, for the occlusion test; ``None`` skips the test.
        occlusion_tolerance: relative depth tolerance of the occlusion test.
        depth_kind: whether both depth maps hold ray distances (nerfstudio) or z-depths.
        target_valid: pixels of the target view with content.
        source_valid: pixels of the source view with content.

    Returns:
        The warped source colours (0 where the mask is false) and the mask.
    """
    if depth_kind not in ("ray", "z"):
        raise ValueError(f"depth_kind must be 'ray' or 'z', got {depth_kind!r}")
    if occlusion_tolerance < 0:
        raise ValueError(f"occlusion_tolerance must be non-negative, got {occlusion_tolerance}")
    device = source_rgb.device if isinstance(source_rgb, Tensor) else None
    rgb = _image(source_rgb, device)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"source_rgb must be [H, W, 3], got {tuple(rgb.shape)}")
    device = rgb.device
    depth_t = _tensor(target_depth, device)
    if depth_t.ndim != 2:
        raise ValueError(f"target_depth must be [H, W], got {tuple(depth_t.shape)}")
    height_s, width_s = rgb.shape[:2]

    valid_t = torch.isfinite(depth_t) & (depth_t > 0)
    if target_valid is not None:
        valid_t &= _mask(target_valid, device)
    depth_t = torch.where(valid_t, depth_t, torch.ones_like(depth_t))
    points = unproject(depth_t, target_c2w, as_intrinsics(target_intrinsics, device), depth_kind)  # [H, W, 3]
    u, v, z, distance = project(points, source_c2w, source_intrinsics)
    lo, hi_u, hi_v = 0.5 - _EDGE_SLACK, width_s - 0.5 + _EDGE_SLACK, height_s - 0.5 + _EDGE_SLACK
    mask = valid_t & (z > _MIN_DEPTH) & (u >= lo) & (u <= hi_u) & (v >= lo) & (v <= hi_v)

    depth_s = None if source_depth is None else _tensor(source_depth, device)
    if depth_s is not None and depth_s.shape != (height_s, width_s):
        raise ValueError(f"source_depth must be [{height_s}, {width_s}], got {tuple(depth_s.shape)}")
    valid_s = None if source_valid is None else _mask(source_valid, device)
    if valid_s is not None and valid_s.shape != (height_s, width_s):
        raise ValueError(f"source_valid must be [{height_s}, {width_s}], got {tuple(valid_s.shape)}")
    if depth_s is not None:
        finite = torch.isfinite(depth_s) & (depth_s > 0)
        valid_s = finite if valid_s is None else valid_s & finite

    # Bilinear interpolation between the four pixel centres around (u, v), written out so that each of them can
    # be tested: index coordinates x = u - 1/2, y = v - 1/2; weights (1 - a)(1 - b), a(1 - b), (1 - a)b, ab.
    x = torch.where(mask, u - 0.5, torch.zeros_like(u))  # masked-out points (maybe NaN/inf) read pixel (0, 0)
    y = torch.where(mask, v - 0.5, torch.zeros_like(v))
    x0 = x.floor().clamp(0, width_s - 1)
    y0 = y.floor().clamp(0, height_s - 1)
    a, b = (x - x0).clamp(0, 1), (y - y0).clamp(0, 1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=width_s - 1), (y0 + 1).clamp(max=height_s - 1)
    corners = [(y0, x0, (1 - a) * (1 - b)), (y0, x1, a * (1 - b)), (y1, x0, (1 - a) * b), (y1, x1, a * b)]
    point_depth = z if depth_kind == "z" else distance
    warped = torch.zeros(*u.shape, 3, device=device)
    for row, col, weight in corners:
        warped += weight[..., None] * rgb[row, col]
        used = weight > _MIN_WEIGHT
        if valid_s is not None:
            mask &= ~used | valid_s[row, col]
        if depth_s is not None:
            agrees = (depth_s[row, col] - point_depth).abs() <= occlusion_tolerance * point_depth
            mask &= ~used | agrees
    warped = torch.where(mask[..., None], warped, torch.zeros_like(warped))
    return warped, mask


class WarpedError(TypedDict):
    """Result of :func:`warped_error`; per-pair lists follow ``pairs``."""

    gap: int
    """Frame distance of the compared pairs."""
    pairs: list[tuple[int, int]]
    """``(source i, target i + gap)`` per pair."""
    rmse: list[float]
    """Warped RMSE per pair (NaN where the mask is empty)."""
    mae: list[float]
    """Masked mean absolute error per pair (NaN where the mask is empty)."""
    coverage: list[float]
    """Fraction of the target's pixels in the mask per pair."""
    mean_rmse: float
    """Mean of ``rmse`` over pairs with a non-empty mask (NaN if there is none)."""
    mean_mae: float
    """Mean of ``mae`` over pairs with a non-empty mask."""
    mean_coverage: float
    """Mean of ``coverage`` over all pairs."""


@torch.no_grad()
def warped_error(
    frames: Float[Array, "N H W 3"],
    depths: Float[Array, "N H W"],
    c2ws: Float[Array, "N 3 4"],
    intrinsics: Float[Array, "N 4"],
    gap: int = 1,
    valid: Bool[Array, "N H W"] | None = None,
    *,
    depth_kind: DepthKind = "ray",
    occlusion_tolerance: float | None = DEFAULT_OCCLUSION_TOLERANCE,
) -> WarpedError:
    """Warped error between frames ``gap`` apart: frame ``i`` is warped into frame ``j = i + gap`` and compared.

    With ``M`` the mask of :func:`warp` (source ``i``, target ``j``) and ``W`` the warped frame ``i``:
    ``RMSE_ij = sqrt(sum_{p in M} ||I_j(p) - W(p)||^2 / (3 |M|))``,
    ``MAE_ij = sum_{p in M} ||I_j(p) - W(p)||_1 / (3 |M|)`` and ``coverage_ij = |M| / (H W)``; colours are in
    ``[0, 1]`` (uint8 frames are divided by 255). ``gap = 1`` is the short-range and e.g. ``gap = 7`` the
    long-range consistency of stylization papers, here with rendered depth instead of optical flow. Lower is
    better; compare methods on the same cameras and depths (e.g. those of the unstylized field).

    Args:
        frames: rendered colours along a camera path.
        depths: rendered depths of the same views.
        c2ws: camera-to-world poses ``[N, 3, 4]`` or ``[N, 4, 4]``.
        intrinsics: ``(fx, fy, cx, cy)`` per view ``[N, 4]``, shared ``[4]``, or ``K`` matrices.
        gap: frame distance of the pairs ``(i, i + gap)``.
        valid: pixels with content (e.g. ``accumulation > 0.5``); by default, finite depth ``> 0``.
        depth_kind: ``"ray"`` for nerfstudio's rendered depth, ``"z"`` for z-depth.
        occlusion_tolerance: relative tolerance of the occlusion test; ``None`` disables the test.
    """
    device = frames.device if isinstance(frames, Tensor) else None
    images = _image(frames, device)
    device = images.device
    depth = _tensor(depths, device)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got {tuple(images.shape)}")
    num = images.shape[0]
    if depth.shape != images.shape[:3]:
        raise ValueError(f"depths must be {list(images.shape[:3])}, got {list(depth.shape)}")
    poses = as_poses(c2ws, device)
    k = as_intrinsics(intrinsics, device)
    if k.ndim == 1:
        k = k.expand(num, 4)
    if poses.shape != (num, 3, 4) or k.shape != (num, 4):
        raise ValueError(f"need {num} poses and intrinsics, got {tuple(poses.shape)} and {tuple(k.shape)}")
    masks = torch.isfinite(depth) & (depth > 0) if valid is None else _mask(valid, device)
    if masks.shape != depth.shape:
        raise ValueError(f"valid must be {list(depth.shape)}, got {list(masks.shape)}")
    if gap < 1 or gap >= num:
        raise ValueError(f"gap must be between 1 and the number of frames - 1 ({num - 1}), got {gap}")

    pairs: list[tuple[int, int]] = []
    rmse: list[float] = []
    mae: list[float] = []
    coverage: list[float] = []
    for i in range(num - gap):
        j = i + gap
        warped, mask = warp(
            images[i],
            depth[j],
            poses[j],
            k[j],
            poses[i],
            k[i],
            source_depth=None if occlusion_tolerance is None else depth[i],
            occlusion_tolerance=0.0 if occlusion_tolerance is None else occlusion_tolerance,
            depth_kind=depth_kind,
            target_valid=masks[j],
            source_valid=masks[i],
        )
        count = int(mask.sum())
        diff = (images[j] - warped)[mask]  # [M, 3]
        pairs.append((i, j))
        coverage.append(count / mask.numel())
        rmse.append(float(diff.square().mean().sqrt()) if count else math.nan)
        mae.append(float(diff.abs().mean()) if count else math.nan)

    def mean(values: list[float]) -> float:
        finite = [x for x in values if not math.isnan(x)]
        return sum(finite) / len(finite) if finite else math.nan

    return WarpedError(
        gap=gap,
        pairs=pairs,
        rmse=rmse,
        mae=mae,
        coverage=coverage,
        mean_rmse=mean(rmse),
        mean_mae=mean(mae),
        mean_coverage=mean(coverage),
    )
