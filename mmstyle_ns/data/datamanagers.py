"""Whole views, patches, k×k view sets and mirrored pairs for diffusion-guided training.

Guided methods (ED-NeRF, arXiv 2310.02712; head stylization; TuneMV3D) score whole rendered views or patches
with a diffusion model, not random rays. :class:`GuidedDataManager` keeps nerfstudio's whole-image contract
(:class:`~nerfstudio.data.datamanagers.full_images_datamanager.FullImageDatamanager`, used by splatfacto):
``next_train(step)`` returns ``(Cameras, batch)``, images cached once (undistorted where needed) on the device
named by ``cache_images``. What one step yields is a typed config (:data:`SamplingConfig`), shown by tyro as a
subcommand (``sampling:view``, ``sampling:patch``, ``sampling:view-set``, ``sampling:mirrored-pair``,
``sampling:mirrored-view-set``):

========================  ==========================  =====================================================
sampling                  cameras                     batch
========================  ==========================  =====================================================
``view``                  ``[1]``                     ``image`` ``[H, W, C]`` (as the parent)
``patch``                 ``[1]`` (unchanged)         ``image`` cropped to ``patch = (top, left, h, w)``
``view-set``              ``[V]``, ``V = k*k``        ``image`` ``[V, H, W, C]``, ``image_idx`` ``[V]``
``mirrored-pair``         ``[2]``: camera, mirror     ``image`` ``[H, W, C]`` of the camera, ``mirrored``
``mirrored-view-set``     ``[2V]``: views, mirrors    as ``view-set`` (of the ``V`` views), ``mirrored``
========================  ==========================  =====================================================

The mirror plane of ``mirrored-view-set`` may be estimated from the training views
(:func:`estimate_symmetry_plane`): through the cameras' look-at centre, containing their mean up direction, turned
so that the views best mirror each other.

Every batch carries ``scale``: the resolution factor the model renders at (``render_camera(camera,
scale=batch["scale"], patch=batch.get("patch"))``, e.g. 1/8 for Stable Diffusion latents). Images are NOT
rescaled here: they stay at the dataset's resolution, for the VAE to encode or the model to resize.

Draws are reproducible: draw ``d`` is a pure function of ``(train_cameras_sampling_seed, d)`` and ``d`` is the
step (a second call at the same step takes the next draw number: ``d = max(step, previous d + 1)``), so a run
resumed at step ``s`` receives the batches a fresh run receives there. Views cycle evenly (:func:`step_views`).
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import tyro
from jaxtyping import Float, Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.configs.base_config import InstantiateConfig
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.base_dataparser import DataparserOutputs
from torch import Tensor

__all__ = [
    "GuidedDataManager",
    "GuidedDataManagerConfig",
    "GuidedSampler",
    "MirroredPairSampling",
    "MirroredPairSamplingConfig",
    "MirroredViewSetSampling",
    "MirroredViewSetSamplingConfig",
    "PatchSampling",
    "PatchSamplingConfig",
    "SamplingConfig",
    "ViewSampling",
    "ViewSamplingConfig",
    "ViewSetSampling",
    "ViewSetSamplingConfig",
    "cameras_at_size",
    "concat_cameras",
    "estimate_symmetry_plane",
    "look_at_centre",
    "mirror_camera_to_worlds",
    "mirror_cameras",
    "seeded_generator",
    "step_views",
]


# ---------------------------------------------------------------------- seeded, even view cycling
def seeded_generator(seed: int, *keys: int | str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` (hashed, so nearby seeds or keys give unrelated streams)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def step_views(num_views: int, per_step: int, draw: int, seed: int) -> Int[Tensor, " V"]:
    """The ``per_step`` distinct view indices of draw ``draw``, a pure function of its arguments.

    Draws come in rounds of ``L = num_views / gcd(num_views, per_step)`` draws. Round ``r`` shuffles the views
    once (a seeded permutation ``P_r``) and draw ``j`` of it takes ``P_r`` at the cyclic positions
    ``j*V, ..., j*V + V - 1 (mod num_views)``: V different views, and over the round these windows tile
    ``P_r`` exactly ``V / gcd`` times, so every view is used equally often in every round. With ``per_step = 1``
    a round is one pass over all views in a fresh random order (as nerfstudio's own cycling).

    Args:
        num_views: Number of training views ``N``.
        per_step: Views per draw ``V`` (``1 <= V <= N``).
        draw: Draw number (the training step), ``>= 0``.
        seed: Sampling seed.

    Returns:
        Indices ``[V]`` (int64), all different.
    """
    if not 1 <= per_step <= num_views:
        raise ValueError(f"cannot draw {per_step} different views out of {num_views}")
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}")
    per_round = num_views // math.gcd(num_views, per_step)
    round_index, position = divmod(draw, per_round)
    order = torch.randperm(num_views, generator=seeded_generator(seed, "round", round_index))
    return order[(position * per_step + torch.arange(per_step)) % num_views]


# ---------------------------------------------------------------------- mirroring
def mirror_camera_to_worlds(
    c2w: Float[Tensor, "*V 3 4"], normal: Float[Tensor, "3"], point: Float[Tensor, "3"]
) -> Float[Tensor, "*V 3 4"]:
    """Mirrors camera-to-world poses about the plane through ``point`` with normal ``normal``.

    With the reflection ``M = I - 2 n n^T`` (``n`` the unit normal, ``det M = -1``) the centre goes to
    ``p + M (t - p)`` and the rotation to ``M R F`` with ``F = diag(-1, 1, 1)``: reflecting the camera axes
    alone would give a left-handed frame, so the camera's x-axis is negated as well, which makes the result a
    proper rotation (``det = +1``) and mirrors the image left-right. A point ``X`` seen by the camera at camera
    coordinates ``(x, y, z)`` has its reflection seen by the mirrored camera at ``(-x, y, z)``. The map is an
    involution: mirroring twice gives back the pose.

    Args:
        c2w: Camera-to-world poses ``[*V, 3, 4]`` (nerfstudio / OpenGL axes: x right, y up, looking along -z).
        normal: Plane normal ``[3]`` (any length but zero).
        point: A point of the plane ``[3]``.

    Returns:
        Mirrored poses ``[*V, 3, 4]``.
    """
    length = torch.linalg.norm(normal)
    if not length > 0:
        raise ValueError("the mirror plane's normal must not be zero")
    n = (normal / length).to(c2w)
    reflect = torch.eye(3, dtype=c2w.dtype, device=c2w.device) - 2.0 * torch.outer(n, n)  # [3, 3], symmetric
    flip_x = torch.tensor([-1.0, 1.0, 1.0], dtype=c2w.dtype, device=c2w.device)
    rotation = (reflect @ c2w[..., :3, :3]) * flip_x  # M R F: F scales the columns (camera axes)
    p = point.to(c2w)
    centre = p + (c2w[..., :3, 3] - p) @ reflect  # reflect is symmetric: row-vector form of M (t - p)
    return torch.cat([rotation, centre[..., None]], dim=-1)


def mirror_cameras(cameras: Cameras, normal: Float[Tensor, "3"], point: Float[Tensor, "3"]) -> Cameras:
    """The mirror images of ``cameras`` about a plane (:func:`mirror_camera_to_worlds`).

    Besides the pose, the principal point moves to ``cx' = W - cx`` and the tangential distortion ``p2`` changes
    sign (OpenCV order ``k1 k2 k3 k4 p1 p2``), so that the mirrored camera's image is EXACTLY the horizontal flip
    (pixel column ``i`` <-> ``W - 1 - i``) of what the camera would see of the reflected scene. The render of a
    mirrored camera must therefore be flipped horizontally (``image.flip(-2)`` for ``[H, W, C]``) to line up
    with the camera's view. Metadata (e.g. ``cam_idx``) is dropped: a mirrored camera is no training camera.
    """
    distortion = cameras.distortion_params
    if distortion is not None:
        distortion = distortion.clone()
        distortion[..., 5] = -distortion[..., 5]
    return Cameras(
        camera_to_worlds=mirror_camera_to_worlds(cameras.camera_to_worlds, normal, point),
        fx=cameras.fx,
        fy=cameras.fy,
        cx=cameras.width.to(cameras.cx) - cameras.cx,
        cy=cameras.cy,
        width=cameras.width,
        height=cameras.height,
        distortion_params=distortion,
        camera_type=cameras.camera_type,
        times=cameras.times,
    )


def concat_cameras(*cameras: Cameras) -> Cameras:
    """One ``Cameras`` of shape ``[sum N_i]`` from flat camera sets ``[N_i]`` (metadata dropped)."""
    if not cameras or any(len(c.shape) != 1 for c in cameras):
        raise ValueError("concat_cameras takes one or more flat camera sets [N]")

    def cat(name: str) -> Tensor | None:
        values = [getattr(c, name) for c in cameras]
        return None if any(v is None for v in values) else torch.cat(values)

    return Cameras(
        camera_to_worlds=torch.cat([c.camera_to_worlds for c in cameras]),
        fx=torch.cat([c.fx for c in cameras]),
        fy=torch.cat([c.fy for c in cameras]),
        cx=torch.cat([c.cx for c in cameras]),
        cy=torch.cat([c.cy for c in cameras]),
        width=torch.cat([c.width for c in cameras]),
        height=torch.cat([c.height for c in cameras]),
        distortion_params=cat("distortion_params"),
        camera_type=torch.cat([c.camera_type for c in cameras]),
        times=cat("times"),
    )


def cameras_at_size(cameras: Cameras, height: int, width: int) -> Cameras:
    """The cameras with images of exactly ``height x width`` pixels: focal lengths and principal points scaled per
    axis (``width / W`` and ``height / H``), so the picture covers the same field of view (squeezed when the aspect
    ratio changes). Unlike ``Cameras.rescale_output_resolution``, no rounding can miss the size."""
    sx = width / cameras.width.to(cameras.fx)
    sy = height / cameras.height.to(cameras.fy)
    return Cameras(
        camera_to_worlds=cameras.camera_to_worlds,
        fx=cameras.fx * sx,
        fy=cameras.fy * sy,
        cx=cameras.cx * sx,
        cy=cameras.cy * sy,
        width=torch.full_like(cameras.width, width),
        height=torch.full_like(cameras.height, height),
        distortion_params=cameras.distortion_params,
        camera_type=cameras.camera_type,
        times=cameras.times,
        metadata=cameras.metadata,
    )


def look_at_centre(c2w: Float[Tensor, "N 3 4"]) -> Float[Tensor, "3"]:
    """The point nearest (least squares) to every camera's optical axis: the centre an inward-facing rig looks at.

    Raises:
        ValueError: the optical axes are (nearly) parallel, so they have no common centre.
    """
    poses = c2w.double()
    origins = poses[:, :3, 3]
    forward = -poses[:, :3, 2] / torch.linalg.norm(poses[:, :3, 2], dim=-1, keepdim=True)
    projections = torch.eye(3, dtype=poses.dtype) - forward[:, :, None] * forward[:, None, :]  # [N, 3, 3]
    lhs = projections.sum(0)
    rhs = (projections @ origins[..., None]).sum(0)[:, 0]
    eigenvalues = torch.linalg.eigvalsh(lhs)
    if not eigenvalues[0] > 1e-3 * eigenvalues[-1]:
        raise ValueError("the cameras' optical axes are (nearly) parallel: they look at no common centre")
    return torch.linalg.solve(lhs, rhs).to(c2w.dtype)


def estimate_symmetry_plane(
    c2w: Float[Tensor, "N 3 4"],
    images: Float[Tensor, "N C H W"],
    point: Float[Tensor, "3"] | None = None,
    num_candidates: int = 180,
) -> tuple[Float[Tensor, "3"], Float[Tensor, "3"]]:
    """The mirror-symmetry plane of a subject (e.g. a head) from its captured views.

    The plane passes through ``point`` (default :func:`look_at_centre`) and contains the cameras' mean up direction;
    of ``num_candidates`` turns of it about that axis (over 180 degrees), the one is chosen under which the views
    best mirror each other: camera ``i``'s mirror camera (:func:`mirror_camera_to_worlds`) is matched to the
    nearest training camera ``j`` (centre and viewing direction), and the mean of ``|flip(image_i) - image_j|`` is
    lowest. This needs cameras dense enough that a mirrored pose has a neighbour, as in 360-degree captures.

    Args:
        c2w: Training camera-to-world poses ``[N, 3, 4]``.
        images: Their images ``[N, C, H, W]`` (small thumbnails are enough), one size.
        point: A point of the plane; None: the cameras' look-at centre.
        num_candidates: Plane orientations tried.

    Returns:
        The plane's unit normal ``[3]`` and a point of it ``[3]``, in the poses' frame.
    """
    if images.ndim != 4 or images.shape[0] != c2w.shape[0]:
        raise ValueError(f"need one image [C, H, W] per camera, got {tuple(images.shape)} for {c2w.shape[0]} cameras")
    poses = c2w.double()
    centre = look_at_centre(poses) if point is None else point.double()
    up = poses[:, :3, 1].mean(0)
    up = up / torch.linalg.norm(up)
    helper = torch.eye(3, dtype=poses.dtype)[int(torch.argmin(up.abs()))]
    first = torch.linalg.cross(up, helper)
    first = first / torch.linalg.norm(first)
    second = torch.linalg.cross(up, first)
    origins, forward = poses[:, :3, 3], -poses[:, :3, 2]
    radius = torch.linalg.norm(origins - centre, dim=-1).mean().clamp_min(1e-6)
    pictures, flipped = images.float(), images.float().flip(-1)
    errors = []
    for angle in torch.arange(num_candidates, dtype=poses.dtype) * (math.pi / num_candidates):
        normal = torch.cos(angle) * first + torch.sin(angle) * second
        mirrored = mirror_camera_to_worlds(poses, normal, centre)
        centres = (torch.cdist(mirrored[:, :3, 3], origins) / radius) ** 2  # [N, N]: mirror i to camera j
        directions = torch.cdist(-mirrored[:, :3, 2], forward) ** 2
        errors.append((flipped - pictures[(centres + directions).argmin(-1)]).abs().mean())
    best = float(torch.stack(errors).argmin()) * math.pi / num_candidates
    normal = math.cos(best) * first + math.sin(best) * second
    return normal.to(c2w.dtype), centre.to(c2w.dtype)


# ---------------------------------------------------------------------- what one step yields
class GuidedSampler(ABC):
    """Turns the views drawn for one step into nerfstudio's ``(Cameras, batch)`` pair."""

    views_per_step: int = 1
    """Distinct training views each step uses."""

    def __init__(self, config: InstantiateConfig, **kwargs: Any) -> None:
        del kwargs
        self.config = config

    @abstractmethod
    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        """Builds one step's output.

        Args:
            cameras: The drawn training cameras ``[V]`` (``V = views_per_step``), on the training device.
            views: Their cached data (``image`` ``[H, W, C]`` on the training device, ``image_idx``, ...), copies.
            generator: This draw's own generator (for random choices such as a patch's place).
            scale: The resolution the model renders at.
        """

    def rays_per_step(self, height: int, width: int, scale: float) -> int:
        """Pixels the model renders per step for ``height x width`` views at ``scale``."""
        return self.views_per_step * int(height * scale) * int(width * scale)


@dataclass
class ViewSamplingConfig(InstantiateConfig):
    """One whole view per step."""

    _target: type = field(default_factory=lambda: ViewSampling)


class ViewSampling(GuidedSampler):
    """One training camera ``[1]`` and its cached data, as nerfstudio's ``FullImageDatamanager`` gives them."""

    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        return cameras, views[0]


@dataclass
class PatchSamplingConfig(InstantiateConfig):
    """One square patch of one view per step."""

    _target: type = field(default_factory=lambda: PatchSampling)
    patch_size: int = 64
    """Patch side in pixels of the RENDERED image (at the datamanager's ``scale``; e.g. 64 latents at 1/8)."""


class PatchSampling(GuidedSampler):
    """One camera ``[1]`` (unchanged) and ``batch["patch"] = (top, left, h, w)``, placed uniformly at random.

    ``patch`` is in pixels of the image rendered at ``scale`` (what ``render_camera(camera, scale, patch)``
    takes); ``batch["image"]`` (and any other per-pixel entry: ``mask``, ``depth_image``) is cropped to the same
    region at the dataset's resolution, rows ``top/scale .. (top+h)/scale``. So ``1/scale`` must be an integer.
    """

    config: PatchSamplingConfig

    def __init__(self, config: PatchSamplingConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if config.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {config.patch_size}")

    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        factor = round(1.0 / scale)
        if abs(factor * scale - 1.0) > 1e-6:
            raise ValueError(f"patches need scale = 1/integer (pixels of the image per rendered pixel), got {scale}")
        data = views[0]
        full_h, full_w = data["image"].shape[:2]
        height, width = full_h // factor, full_w // factor  # Cameras.rescale_output_resolution floors too
        size = self.config.patch_size
        if size > min(height, width):
            raise ValueError(f"patch_size {size} does not fit the {height}x{width} rendered image")
        top = int(torch.randint(height - size + 1, (), generator=generator))
        left = int(torch.randint(width - size + 1, (), generator=generator))
        rows = slice(top * factor, (top + size) * factor)
        cols = slice(left * factor, (left + size) * factor)
        for key, value in data.items():
            if isinstance(value, Tensor) and value.ndim >= 2 and tuple(value.shape[:2]) == (full_h, full_w):
                data[key] = value[rows, cols]
        data["patch"] = (top, left, size, size)
        return cameras, data

    def rays_per_step(self, height: int, width: int, scale: float) -> int:
        return self.config.patch_size**2


@dataclass
class ViewSetSamplingConfig(InstantiateConfig):
    """k×k different views per step (e.g. tiled into one grid image by ``guidance.pack_grid``)."""

    _target: type = field(default_factory=lambda: ViewSetSampling)
    grid_k: int = 2
    """Grid side k: each step yields ``k*k`` different views, in row-major grid order."""


class ViewSetSampling(GuidedSampler):
    """Cameras ``[V]`` (``V = k*k``, all different) and ``image`` ``[V, H, W, C]``, ``image_idx`` ``[V]``.

    Every tensor entry of the views is stacked along a new first axis (the views must share one size), every
    number becomes an int64 tensor ``[V]``; no ``cam_idx`` metadata is set on a set of cameras.
    """

    config: ViewSetSamplingConfig

    def __init__(self, config: ViewSetSamplingConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if config.grid_k < 1:
            raise ValueError(f"grid_k must be >= 1, got {config.grid_k}")
        self.views_per_step = config.grid_k**2

    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        sizes = {tuple(view["image"].shape) for view in views}
        if len(sizes) > 1:
            raise ValueError(f"a view set needs views of one size, got {sorted(sizes)}")
        batch: dict[str, Any] = {}
        for key, first in views[0].items():
            values = [view[key] for view in views]
            if isinstance(first, Tensor):
                batch[key] = torch.stack(values)  # [V, ...]
            elif isinstance(first, int):
                batch[key] = torch.tensor(values, dtype=torch.int64)
            else:
                batch[key] = values
        return cameras, batch


@dataclass
class MirroredPairSamplingConfig(InstantiateConfig):
    """One view and its mirror camera about a symmetry plane per step."""

    _target: type = field(default_factory=lambda: MirroredPairSampling)
    normal: tuple[float, float, float] = (0.0, 1.0, 0.0)
    """Normal of the symmetry plane (default the world y-axis: the plane ``y = const``), in ``frame``."""
    point: tuple[float, float, float] | None = None
    """A point of the plane, in ``frame``; None: the scene centre (the centre of the dataparser's scene box)."""
    frame: Literal["input", "dataparser"] = "input"
    """Frame of ``normal`` and ``point``: "input", the poses as given (transforms.json), mapped through the
    dataparser's transform and scale; or "dataparser", nerfstudio's normalised world frame (the viewer's)."""


class MirroredPairSampling(GuidedSampler):
    """Cameras ``[2]``: a training camera and its mirror camera (:func:`mirror_cameras`), the camera's data, and
    ``batch["mirrored"] = True``: the render of camera 1 must be flipped horizontally to match camera 0's view
    (exactly, for a scene symmetric about the plane).

    Attributes:
        normal: The plane's unit normal ``[3]`` in nerfstudio's world frame.
        point: A point of the plane ``[3]`` in nerfstudio's world frame.
    """

    config: MirroredPairSamplingConfig

    def __init__(
        self, config: MirroredPairSamplingConfig, dataparser_outputs: DataparserOutputs | None = None, **kwargs: Any
    ) -> None:
        super().__init__(config, **kwargs)
        normal = torch.tensor(config.normal, dtype=torch.float32)
        if not torch.linalg.norm(normal) > 0:
            raise ValueError("the mirror plane's normal must not be zero")
        centre = torch.zeros(3) if dataparser_outputs is None else dataparser_outputs.scene_box.get_center().float()
        point = None if config.point is None else torch.tensor(config.point, dtype=torch.float32)
        if config.frame == "input" and dataparser_outputs is not None:
            transform = dataparser_outputs.dataparser_transform.float()  # x_ns = s * (R x + t)
            normal = transform[:3, :3] @ normal
            if point is not None:
                point = dataparser_outputs.dataparser_scale * (transform[:3, :3] @ point + transform[:3, 3])
        self.normal = normal / torch.linalg.norm(normal)
        self.point = centre if point is None else point

    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        mirror = mirror_cameras(cameras, self.normal, self.point)
        pair = Cameras(
            camera_to_worlds=torch.cat([cameras.camera_to_worlds, mirror.camera_to_worlds]),
            fx=torch.cat([cameras.fx, mirror.fx]),
            fy=torch.cat([cameras.fy, mirror.fy]),
            cx=torch.cat([cameras.cx, mirror.cx]),
            cy=torch.cat([cameras.cy, mirror.cy]),
            width=torch.cat([cameras.width, mirror.width]),
            height=torch.cat([cameras.height, mirror.height]),
            distortion_params=None
            if cameras.distortion_params is None or mirror.distortion_params is None
            else torch.cat([cameras.distortion_params, mirror.distortion_params]),
            camera_type=torch.cat([cameras.camera_type, mirror.camera_type]),
            times=None if cameras.times is None or mirror.times is None else torch.cat([cameras.times, mirror.times]),
        )
        data = views[0]
        data["mirrored"] = True
        return pair, data

    def rays_per_step(self, height: int, width: int, scale: float) -> int:
        return 2 * int(height * scale) * int(width * scale)


@dataclass
class MirroredViewSetSamplingConfig(InstantiateConfig):
    """k×k different views per step, each with its mirror camera about the subject's symmetry plane."""

    _target: type = field(default_factory=lambda: MirroredViewSetSampling)
    grid_k: int = 2
    """Grid side k: each step yields ``k*k`` different views, in row-major grid order, and their mirror cameras."""
    normal: tuple[float, float, float] | None = None
    """Normal of the symmetry plane, in ``frame``; None: estimated from the training views (the plane through
    ``point`` and the cameras' mean up direction under which the views best mirror each other)."""
    point: tuple[float, float, float] | None = None
    """A point of the plane, in ``frame``; None: the point the training cameras look at (least squares)."""
    frame: Literal["input", "dataparser"] = "input"
    """Frame of ``normal`` and ``point``: "input", the poses as given (transforms.json), mapped through the
    dataparser's transform and scale; or "dataparser", nerfstudio's normalised world frame (the viewer's)."""


class MirroredViewSetSampling(GuidedSampler):
    """Cameras ``[2V]``: the ``V = k*k`` views of :class:`ViewSetSampling` followed by their mirror cameras in the
    same order (:func:`mirror_cameras`); the batch is the view set's plus ``mirrored = True``. The render of camera
    ``V + i`` flipped horizontally lines up with camera ``i``'s view (exactly, for a scene symmetric about the plane).

    Attributes:
        normal: The plane's unit normal ``[3]`` in nerfstudio's world frame.
        point: A point of the plane ``[3]`` in nerfstudio's world frame.
    """

    config: MirroredViewSetSamplingConfig

    def __init__(
        self,
        config: MirroredViewSetSamplingConfig,
        dataparser_outputs: DataparserOutputs | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, **kwargs)
        self.view_set = ViewSetSampling(ViewSetSamplingConfig(grid_k=config.grid_k))
        self.views_per_step = self.view_set.views_per_step
        normal = None if config.normal is None else torch.tensor(config.normal, dtype=torch.float32)
        point = None if config.point is None else torch.tensor(config.point, dtype=torch.float32)
        if normal is not None and not torch.linalg.norm(normal) > 0:
            raise ValueError("the mirror plane's normal must not be zero")
        if config.frame == "input" and dataparser_outputs is not None:
            transform = dataparser_outputs.dataparser_transform.float()  # x_ns = s * (R x + t)
            normal = None if normal is None else transform[:3, :3] @ normal
            if point is not None:
                point = dataparser_outputs.dataparser_scale * (transform[:3, :3] @ point + transform[:3, 3])
        if normal is None or point is None:
            if dataparser_outputs is None:
                raise ValueError("estimating the mirror plane needs the training views: give normal and point")
            c2w = dataparser_outputs.cameras.camera_to_worlds.float()
            if normal is None:
                thumbnails = _thumbnails(dataparser_outputs.image_filenames)
                normal, point = estimate_symmetry_plane(c2w, thumbnails, point)
            else:
                point = look_at_centre(c2w)
        self.normal = normal / torch.linalg.norm(normal)
        self.point = point

    def make_batch(
        self, cameras: Cameras, views: list[dict[str, Any]], generator: torch.Generator, scale: float
    ) -> tuple[Cameras, dict[str, Any]]:
        cameras, batch = self.view_set.make_batch(cameras, views, generator, scale)
        batch["mirrored"] = True
        return concat_cameras(cameras, mirror_cameras(cameras, self.normal, self.point)), batch

    def rays_per_step(self, height: int, width: int, scale: float) -> int:
        return 2 * self.view_set.rays_per_step(height, width, scale)


def _thumbnails(filenames: list[Path], size: int = 32) -> Float[Tensor, "N 3 S S"]:
    """The images at ``size x size`` pixels (box filter), RGB in [0, 1], transparent parts over white."""
    from PIL import Image

    pictures = []
    for name in filenames:
        with Image.open(name) as image:
            rgba = image.convert("RGBA").resize((size, size), Image.Resampling.BOX)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = torch.frombuffer(
            bytearray(Image.alpha_composite(white, rgba).convert("RGB").tobytes()), dtype=torch.uint8
        )
        pictures.append(rgb.view(size, size, 3).permute(2, 0, 1).float() / 255.0)
    return torch.stack(pictures)


SamplingConfig = (
    Annotated[ViewSamplingConfig, tyro.conf.subcommand(name="view")]
    | Annotated[PatchSamplingConfig, tyro.conf.subcommand(name="patch")]
    | Annotated[ViewSetSamplingConfig, tyro.conf.subcommand(name="view-set")]
    | Annotated[MirroredPairSamplingConfig, tyro.conf.subcommand(name="mirrored-pair")]
    | Annotated[MirroredViewSetSamplingConfig, tyro.conf.subcommand(name="mirrored-view-set")]
)
"""What one training step yields; tyro shows the choices as ``sampling:<name>`` subcommands."""


# ---------------------------------------------------------------------- the datamanager
@dataclass
class GuidedDataManagerConfig(FullImageDatamanagerConfig):
    """Whole views, patches, view sets or mirrored pairs per step (see :mod:`mmstyle_ns.data.datamanagers`)."""

    _target: type = field(default_factory=lambda: GuidedDataManager)
    sampling: SamplingConfig = field(default_factory=ViewSamplingConfig)
    """What one training step yields: a view, a patch, a k×k view set or a mirrored pair."""
    scale: float = 1.0
    """Resolution factor the model renders at, passed on as ``batch["scale"]`` (e.g. 1/8 for Stable Diffusion
    latents); the images themselves stay at the dataset's resolution."""


class GuidedDataManager(FullImageDatamanager):
    """nerfstudio's whole-image datamanager with guided-training draws (:class:`GuidedDataManagerConfig`).

    Training draws are seeded by ``train_cameras_sampling_seed`` and cycle the views evenly (:func:`step_views`);
    the parent's own cycling (``train_cameras_sampling_strategy``) is replaced, so only "random" is accepted.
    Evaluation (``next_eval``, ``fixed_indices_eval_dataloader``) is the parent's, whole eval images.

    Attributes:
        sampler: Builds each step's output from the drawn views (from ``config.sampling``).
    """

    config: GuidedDataManagerConfig

    def __init__(self, config: GuidedDataManagerConfig, *args: Any, **kwargs: Any) -> None:
        if config.train_cameras_sampling_strategy != "random":
            raise ValueError(
                "GuidedDataManager cycles seeded permutations of the views; "
                f"train_cameras_sampling_strategy={config.train_cameras_sampling_strategy!r} is not supported"
            )
        if not config.scale > 0:
            raise ValueError(f"scale must be > 0, got {config.scale}")
        super().__init__(config, *args, **kwargs)
        self.sampler: GuidedSampler = config.sampling.setup(dataparser_outputs=self.train_dataparser_outputs)
        if self.sampler.views_per_step > len(self.train_dataset):
            raise ValueError(
                f"a step needs {self.sampler.views_per_step} different views; the dataset has {len(self.train_dataset)}"
            )
        self._last_draw = -1

    def _load_images(
        self, split: Literal["train", "eval"], cache_images_device: Literal["cpu", "gpu"]
    ) -> list[dict[str, Tensor]]:
        # nerfstudio pins a "cpu" cache (``pin_memory``), which fails without CUDA and buys nothing when training
        # runs on the CPU: there, cache on the training device (what "gpu" caching does), which is the CPU.
        if torch.device(self.device).type == "cpu":
            cache_images_device = "gpu"
        return super()._load_images(split, cache_images_device)

    def next_train(self, step: int) -> tuple[Cameras, dict[str, Any]]:
        """This step's cameras and batch (see the module docstring); reproducible from the seed and ``step``."""
        draw = max(step, self._last_draw + 1)
        self._last_draw = draw
        seed = self.config.train_cameras_sampling_seed
        indices = step_views(len(self.train_dataset), self.sampler.views_per_step, draw, seed)
        cached = self.cached_train  # loads the images (and sets ``train_cameras``) the first time
        views = []
        for index in indices.tolist():
            data = cached[index].copy()  # never mutate the cache (nerfstudio issue #3335)
            data["image"] = data["image"].to(self.device)
            views.append(data)
        assert len(self.train_cameras.shape) == 1, "Assumes single batch dimension"
        cameras = self.train_cameras[indices.to(self.train_cameras.device)].to(self.device)
        cameras, batch = self.sampler.make_batch(
            cameras, views, seeded_generator(seed, "draw", draw), self.config.scale
        )
        if cameras.shape == (1,):  # as the parent: the camera optimizer reads the training camera's index
            cameras.metadata = {**(cameras.metadata or {}), "cam_idx": int(indices[0])}
        batch["scale"] = self.config.scale
        return cameras, batch

    def get_train_rays_per_batch(self) -> int:
        """Pixels the model renders per training step (for the trainer's rays-per-second statistics)."""
        if len(self.cached_train) == 0:
            return super().get_train_rays_per_batch()
        height, width = self.cached_train[0]["image"].shape[:2]
        return self.sampler.rays_per_step(height, width, self.config.scale)
