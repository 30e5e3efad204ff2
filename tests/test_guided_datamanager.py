"""GuidedDataManager: whole views, patches, k×k view sets and mirrored pairs through nerfstudio's contract."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import tyro
import yaml
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from torch import Tensor

from mmstyle_ns.data.datamanagers import (
    GuidedDataManager,
    GuidedDataManagerConfig,
    MirroredPairSampling,
    MirroredPairSamplingConfig,
    PatchSamplingConfig,
    SamplingConfig,
    ViewSamplingConfig,
    ViewSetSamplingConfig,
    mirror_camera_to_worlds,
    mirror_cameras,
    step_views,
)


def make_manager(scene: Path, sampling: SamplingConfig | None = None, **kwargs: Any) -> GuidedDataManager:
    config = GuidedDataManagerConfig(
        data=scene,
        dataparser=NerfstudioDataParserConfig(),
        sampling=sampling if sampling is not None else ViewSamplingConfig(),
        **kwargs,
    )
    manager = config.setup(device="cpu")
    assert isinstance(manager, GuidedDataManager)
    return manager


def reflect_points(points: Tensor, normal: Tensor, point: Tensor) -> Tensor:
    """Reference reflection ``x - 2 ((x - p) . n) n`` of points ``[..., 3]``."""
    n = normal / normal.norm()
    return points - 2.0 * ((points - point) @ n)[..., None] * n


def project(camera: Cameras, points: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel coordinates ``(u, v)`` of world points ``[P, 3]`` in one camera (nerfstudio's pinhole convention,
    the inverse of ``generate_rays``: direction ``((u - cx) / fx, -(v - cy) / fy, -1)``)."""
    c2w = camera.camera_to_worlds.reshape(3, 4).double()
    local = (points.double() - c2w[:, 3]) @ c2w[:, :3]  # [P, 3] camera coordinates
    depth = -local[:, 2]
    assert (depth > 0).all(), "points must lie in front of the camera"
    u = float(camera.cx) + float(camera.fx) * local[:, 0] / depth
    v = float(camera.cy) - float(camera.fy) * local[:, 1] / depth
    return u, v


# ---------------------------------------------------------------------- the view cycle
@pytest.mark.parametrize(("num_views", "per_step"), [(21, 1), (21, 4), (21, 9), (6, 6)])
def test_step_views_are_distinct_and_even(num_views: int, per_step: int) -> None:
    per_round = num_views // math.gcd(num_views, per_step)
    counts = torch.zeros(num_views, dtype=torch.int64)
    for draw in range(2 * per_round):
        views = step_views(num_views, per_step, draw, seed=3)
        assert views.shape == (per_step,) and len(set(views.tolist())) == per_step
        counts += torch.bincount(views, minlength=num_views)
        if draw == per_round - 1:  # every round uses every view equally often
            assert (counts == counts[0]).all()
    assert (counts == 2 * per_round * per_step // num_views).all()
    assert torch.equal(step_views(num_views, per_step, 5, seed=3), step_views(num_views, per_step, 5, seed=3))
    with pytest.raises(ValueError, match="different views"):
        step_views(num_views, num_views + 1, 0, seed=3)


# ---------------------------------------------------------------------- whole views
def test_view_mode_returns_the_dataset_view_and_visits_every_view(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene)
    dataset = manager.train_dataset
    seen = []
    for step in range(len(dataset)):
        camera, batch = manager.next_train(step)
        assert camera.shape == (1,)
        index = camera.metadata["cam_idx"] if camera.metadata else None
        assert isinstance(index, int) and batch["image_idx"] == index
        torch.testing.assert_close(batch["image"], dataset.get_image_float32(index), atol=0, rtol=0)
        torch.testing.assert_close(camera.camera_to_worlds[0], dataset.cameras.camera_to_worlds[index])
        assert batch["scale"] == 1.0
        seen.append(index)
    assert sorted(seen) == list(range(len(dataset)))
    assert manager.get_train_rays_per_batch() == 32 * 32


def test_scale_is_passed_on_and_images_keep_their_size(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene, scale=1 / 8)
    _, batch = manager.next_train(0)
    assert batch["scale"] == 1 / 8 and batch["image"].shape[:2] == (32, 32)
    assert manager.get_train_rays_per_batch() == 4 * 4


def test_cpu_caching_works_without_cuda(tiny_scene: Path) -> None:
    # nerfstudio pins "cpu" caches, which needs CUDA; on a CPU device the manager caches unpinned instead
    manager = make_manager(tiny_scene, cache_images="cpu")
    camera, batch = manager.next_train(0)
    assert batch["image"].device.type == "cpu" and camera.camera_to_worlds.device.type == "cpu"


# ---------------------------------------------------------------------- patches
def test_patch_pixels_are_the_dataset_pixels(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene, PatchSamplingConfig(patch_size=8))
    dataset = manager.train_dataset
    places = set()
    for step in range(10):
        camera, batch = manager.next_train(step)
        index = camera.metadata["cam_idx"] if camera.metadata else None
        assert isinstance(index, int)
        top, left, height, width = batch["patch"]
        assert (height, width) == (8, 8) and 0 <= top <= 24 and 0 <= left <= 24
        full = dataset.get_image_float32(index)
        torch.testing.assert_close(batch["image"], full[top : top + 8, left : left + 8], atol=0, rtol=0)
        assert (int(camera.width), int(camera.height)) == (32, 32), "the camera stays whole"
        torch.testing.assert_close(camera.camera_to_worlds[0], dataset.cameras.camera_to_worlds[index])
        places.add((top, left))
    assert len(places) > 5, "patches are placed at random"
    assert manager.get_train_rays_per_batch() == 64


def test_patch_at_a_scale_crops_the_matching_full_resolution_region(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene, PatchSamplingConfig(patch_size=4), scale=0.5)
    for step in range(5):
        camera, batch = manager.next_train(step)
        index = camera.metadata["cam_idx"] if camera.metadata else None
        assert isinstance(index, int)
        top, left, height, width = batch["patch"]  # pixels of the 16x16 rendered image
        assert (height, width) == (4, 4) and 0 <= top <= 12 and 0 <= left <= 12
        full = manager.train_dataset.get_image_float32(index)
        expected = full[2 * top : 2 * top + 8, 2 * left : 2 * left + 8]
        torch.testing.assert_close(batch["image"], expected, atol=0, rtol=0)


def test_patch_errors(tiny_scene: Path) -> None:
    with pytest.raises(ValueError, match="does not fit"):
        make_manager(tiny_scene, PatchSamplingConfig(patch_size=33)).next_train(0)
    with pytest.raises(ValueError, match="1/integer"):
        make_manager(tiny_scene, PatchSamplingConfig(patch_size=4), scale=0.3).next_train(0)
    with pytest.raises(ValueError, match="patch_size"):
        make_manager(tiny_scene, PatchSamplingConfig(patch_size=0))


# ---------------------------------------------------------------------- view sets
def test_view_sets_hold_k_squared_distinct_views(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene, ViewSetSamplingConfig(grid_k=3))
    dataset = manager.train_dataset
    counts = torch.zeros(len(dataset), dtype=torch.int64)
    per_round = len(dataset) // 3  # gcd(21, 9) = 3
    for step in range(per_round):
        cameras, batch = manager.next_train(step)
        assert cameras.shape == (9,) and batch["image"].shape == (9, 32, 32, 4)
        indices = batch["image_idx"]
        assert isinstance(indices, Tensor) and indices.shape == (9,) and len(set(indices.tolist())) == 9
        for i, index in enumerate(indices.tolist()):
            torch.testing.assert_close(batch["image"][i], dataset.get_image_float32(index), atol=0, rtol=0)
            torch.testing.assert_close(cameras.camera_to_worlds[i], dataset.cameras.camera_to_worlds[index])
        counts += torch.bincount(indices, minlength=len(dataset))
    assert (counts == 3).all(), "a round uses every view equally often"
    assert manager.get_train_rays_per_batch() == 9 * 32 * 32
    with pytest.raises(ValueError, match="different views"):
        make_manager(tiny_scene, ViewSetSamplingConfig(grid_k=5))  # 25 > 21 training views


# ---------------------------------------------------------------------- mirrored pairs
def test_mirrored_pair(tiny_scene: Path) -> None:
    manager = make_manager(tiny_scene, MirroredPairSamplingConfig())
    sampler = manager.sampler
    assert isinstance(sampler, MirroredPairSampling)
    outputs = manager.train_dataparser_outputs
    rotation = outputs.dataparser_transform[:3, :3].float()
    torch.testing.assert_close(sampler.normal, rotation @ torch.tensor([0.0, 1.0, 0.0]))  # input-frame y-axis
    torch.testing.assert_close(sampler.point, outputs.scene_box.get_center().float())

    cameras, batch = manager.next_train(0)
    assert cameras.shape == (2,) and batch["mirrored"] is True
    index = batch["image_idx"]
    torch.testing.assert_close(batch["image"], manager.train_dataset.get_image_float32(index), atol=0, rtol=0)
    original, mirrored = cameras.camera_to_worlds[0], cameras.camera_to_worlds[1]
    torch.testing.assert_close(original, manager.train_dataset.cameras.camera_to_worlds[index])
    assert torch.linalg.det(mirrored[:, :3].double()).item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(mirrored[:, 3], reflect_points(original[:, 3], sampler.normal, sampler.point))
    twice = mirror_camera_to_worlds(mirrored, sampler.normal, sampler.point)
    assert (twice - original).abs().max().item() < 1e-6
    assert float(cameras.cx[1]) == 32 - float(cameras.cx[0])
    assert manager.get_train_rays_per_batch() == 2 * 32 * 32


def test_mirror_plane_in_the_dataparser_frame(tiny_scene: Path) -> None:
    manager = make_manager(
        tiny_scene, MirroredPairSamplingConfig(normal=(2.0, 0.0, 0.0), point=(0.1, 0, 0), frame="dataparser")
    )
    assert isinstance(manager.sampler, MirroredPairSampling)
    torch.testing.assert_close(manager.sampler.normal, torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(manager.sampler.point, torch.tensor([0.1, 0.0, 0.0]))


@pytest.mark.parametrize("cx", [16.0, 11.5])
def test_the_reflection_of_a_point_lands_on_the_flipped_pixel(cx: float) -> None:
    """The render convention without a NeRF: what the mirror camera sees of the reflected scene is the camera's
    view flipped left-right -- for projected points and for the rays of every pixel."""
    torch.manual_seed(0)
    c2w = torch.tensor([[0.0, -0.6, 0.8, 2.4], [1.0, 0.0, 0.0, 0.3], [0.0, 0.8, 0.6, 1.2]])  # looks at ~(0, 0.3, 0)
    camera = Cameras(camera_to_worlds=c2w[None], fx=30.0, fy=30.0, cx=cx, cy=14.0, width=32, height=28)
    normal, point = torch.tensor([0.3, 1.0, 0.1]), torch.tensor([0.1, 0.2, -0.1])
    mirror = mirror_cameras(camera, normal, point)

    points = torch.randn(50, 3) * 0.3  # around the origin, in front of the camera
    u, v = project(camera, points)
    u_m, v_m = project(mirror, reflect_points(points, normal, point))
    torch.testing.assert_close(u_m, 32 - u, atol=1e-4, rtol=0)  # pixel column i <-> 31 - i (float32 poses)
    torch.testing.assert_close(v_m, v, atol=1e-4, rtol=0)

    rays = camera.generate_rays(camera_indices=0, keep_shape=True)  # [H, W]
    mirror_rays = mirror.generate_rays(camera_indices=0, keep_shape=True)
    n = normal / normal.norm()
    reflect = torch.eye(3) - 2 * torch.outer(n, n)
    torch.testing.assert_close(mirror_rays.directions.flip(1), rays.directions @ reflect, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirror_rays.origins.flip(1), reflect_points(rays.origins, normal, point))


def test_mirrored_pose_is_a_proper_rotation_and_an_involution() -> None:
    torch.manual_seed(1)
    rotations = torch.linalg.qr(torch.randn(8, 3, 3, dtype=torch.float64)).Q
    rotations = rotations * torch.linalg.det(rotations).sign()[:, None, None]  # proper rotations
    c2w = torch.cat([rotations, torch.randn(8, 3, 1, dtype=torch.float64)], dim=-1)
    normal, point = torch.tensor([1.0, -2.0, 0.5]).double(), torch.tensor([0.3, 0.0, 1.0]).double()
    mirrored = mirror_camera_to_worlds(c2w, normal, point)
    torch.testing.assert_close(torch.linalg.det(mirrored[..., :3]), torch.ones(8).double())
    eye = torch.eye(3).double().expand(8, 3, 3)
    torch.testing.assert_close(mirrored[..., :3].transpose(-1, -2) @ mirrored[..., :3], eye)
    assert (mirror_camera_to_worlds(mirrored, normal, point) - c2w).abs().max().item() < 1e-12
    with pytest.raises(ValueError, match="normal"):
        mirror_camera_to_worlds(c2w, torch.zeros(3).double(), point)


# ---------------------------------------------------------------------- reproducibility, config
def _trace(manager: GuidedDataManager, steps: range) -> list[tuple[int, tuple[int, ...]]]:
    out = []
    for step in steps:
        camera, batch = manager.next_train(step)
        index = camera.metadata["cam_idx"] if camera.metadata else -1
        out.append((index, batch["patch"]))
    return out


def test_draws_are_reproducible_and_resume_at_a_step(tiny_scene: Path) -> None:
    sampling = PatchSamplingConfig(patch_size=8)
    first = _trace(make_manager(tiny_scene, sampling), range(6))
    assert first == _trace(make_manager(tiny_scene, sampling), range(6))
    assert _trace(make_manager(tiny_scene, sampling), range(4, 6)) == first[4:], "a resumed run gets the same draws"
    assert first != _trace(make_manager(tiny_scene, sampling, train_cameras_sampling_seed=7), range(6))
    again = make_manager(tiny_scene, sampling)
    twice = _trace(again, range(1)) + _trace(again, range(1))  # a second call in one step takes the next draw
    assert twice == first[:2]


def test_config_errors(tiny_scene: Path) -> None:
    with pytest.raises(ValueError, match="fps"):
        make_manager(tiny_scene, train_cameras_sampling_strategy="fps")
    with pytest.raises(ValueError, match="scale"):
        make_manager(tiny_scene, scale=0.0)
    with pytest.raises(ValueError, match="normal"):
        make_manager(tiny_scene, MirroredPairSamplingConfig(normal=(0.0, 0.0, 0.0)))


def test_sampling_is_a_tyro_subcommand_and_survives_the_saved_config() -> None:
    config = tyro.cli(GuidedDataManagerConfig, args=["--scale", "0.125", "sampling:view-set", "--sampling.grid-k", "3"])
    assert isinstance(config.sampling, ViewSetSamplingConfig) and config.sampling.grid_k == 3
    assert config.scale == 0.125
    config = tyro.cli(GuidedDataManagerConfig, args=["sampling:mirrored-pair", "--sampling.normal", "1", "0", "0"])
    assert isinstance(config.sampling, MirroredPairSamplingConfig) and config.sampling.normal == (1.0, 0.0, 0.0)
    assert yaml.load(yaml.dump(config), Loader=yaml.Loader) == config  # nerfstudio's config.yml round trip
