"""Camera-visibility and silhouette carving against the scene's ground-truth surface."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F

from mmstyle_ns.fields.carving import project_points, sweep_points, view_support


def _train_split(scene_dir: Path):
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    outputs = NerfstudioDataParserConfig(data=scene_dir).setup().get_dataparser_outputs("train")
    return outputs, InputDataset(outputs)


def _surface_points(outputs, cameras) -> torch.Tensor:  # noqa: ANN001 - nerfstudio types
    """Unprojects every ground-truth depth pixel into the dataparser's (scaled) world frame."""
    points = []
    for i, name in enumerate(outputs.image_filenames):
        depth = iio.imread(Path(str(name)).parent.parent / "depths" / Path(name).name).astype(np.float32) / 1000.0
        depth *= outputs.dataparser_scale
        rows, cols = np.nonzero(depth > 0)
        d = depth[rows, cols]
        cam = cameras[i]
        fx, fy, cx, cy = float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy)
        local = np.stack([(cols + 0.5 - cx) / fx * d, -(rows + 0.5 - cy) / fy * d, -d], axis=-1)
        c2w = cam.camera_to_worlds.numpy()
        points.append(local @ c2w[:, :3].T + c2w[:, 3])
    return torch.from_numpy(np.concatenate(points)).float()


def test_projection_round_trips_pixel_centres(tiny_scene: Path) -> None:
    outputs, dataset = _train_split(tiny_scene)
    cameras = dataset.cameras
    cam = cameras[0]
    # the pixel centre (column 5, row 9) at distance 1.5 along -z of camera 0
    fx, fy, cx, cy = float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy)
    local = torch.tensor([(5.5 - cx) / fx * 1.5, -(9.5 - cy) / fy * 1.5, -1.5])
    c2w = cam.camera_to_worlds
    world = c2w[:, :3] @ local + c2w[:, 3]
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1)
    u, v, depth = project_points(world[None], cameras.camera_to_worlds[:1], intrinsics[:1])
    torch.testing.assert_close(torch.stack([u[0, 0], v[0, 0], depth[0, 0]]), torch.tensor([5.5, 9.5, 1.5]))


def test_surface_is_never_carved_and_most_of_the_box_is(tiny_scene: Path) -> None:
    outputs, dataset = _train_split(tiny_scene)
    cameras = dataset.cameras
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1)
    sizes = torch.cat([cameras.height, cameras.width], dim=-1)
    alphas = [dataset.get_image_float32(i)[..., 3] for i in range(len(dataset))]
    surface = _surface_points(outputs, cameras)
    seen, carved = view_support(surface, cameras.camera_to_worlds, intrinsics, sizes, alphas=alphas)
    assert not bool(carved.any()), "a ground-truth surface point was carved away"
    assert float(seen.min()) >= 0.5 * len(dataset), "the content is seen by most cameras"

    aabb = outputs.scene_box.aabb
    grid = torch.stack(
        torch.meshgrid(*[torch.linspace(float(aabb[0, i]), float(aabb[1, i]), 24) for i in range(3)], indexing="ij"),
        dim=-1,
    ).reshape(-1, 3)
    box_seen, box_carved = view_support(grid, cameras.camera_to_worlds, intrinsics, sizes, alphas=alphas)
    supported = (box_seen >= 0.5 * len(dataset)) & ~box_carved
    assert float(supported.float().mean()) < 0.1, "views and silhouettes rule out most of the (loose) scene box"
    assert float(box_carved.float().mean()) > 0.2
    _, nothing_carved = view_support(grid, cameras.camera_to_worlds, intrinsics, sizes, alphas=None)
    assert not bool(nothing_carved.any()), "without alpha nothing is carved"


def _textured_plane_views(depth: float, count: int = 9, size: int = 40) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Views of a fronto-parallel textured plane ``depth`` in front of a 3 x 3 grid of forward-facing cameras
    (looking along -z): poses, intrinsics and images, each pixel coloured by where its ray meets the plane."""
    generator = torch.Generator().manual_seed(0)
    texture = torch.rand(1, 3, 48, 48, generator=generator)  # a random pattern over the plane, about 2 px a texel
    focal = size / (2 * np.tan(np.radians(20)))
    offsets = [(x, y) for y in (-0.3, 0.0, 0.3) for x in (-0.3, 0.0, 0.3)][:count]
    poses, images = [], []
    rows = torch.arange(size, dtype=torch.float32) + 0.5
    v, u = torch.meshgrid(rows, rows, indexing="ij")
    for x, y in offsets:
        pose = torch.eye(4)[:3]
        pose[:, 3] = torch.tensor([x, y, 0.0])
        hit_x = x + (u - size / 2) / focal * depth
        hit_y = y - (v - size / 2) / focal * depth
        extent = 0.8 * depth  # the pattern spans [-extent, extent]^2, wider than any view
        grid = torch.stack([hit_x / extent, -hit_y / extent], dim=-1)[None]
        image = F.grid_sample(texture, grid, mode="bilinear", align_corners=False)[0].permute(1, 2, 0)
        poses.append(pose)
        images.append(image)
    intrinsics = torch.tensor([[focal, focal, size / 2, size / 2]]).expand(len(offsets), 4)
    return torch.stack(poses), intrinsics, images


def test_the_plane_sweep_finds_a_surface_at_its_depth_and_nothing_on_a_plain_image() -> None:
    for depth in (2.0, 12.0):
        poses, intrinsics, images = _textured_plane_views(depth)
        points = sweep_points(poses, intrinsics, images, depth_range=(0.1, 500.0), num_references=3, num_neighbours=4)
        assert points.shape[0] > 0.5 * 3 * 40 * 40, "most pixels of a textured surface are confident"
        found = -points[:, 2]  # z-depth of the points in front of the cameras
        assert abs(float(found.median()) - depth) < 0.05 * depth
        assert float(((found - depth).abs() < 0.1 * depth).float().mean()) > 0.9
    plain = [torch.full((40, 40, 3), 0.7) for _ in range(9)]
    assert sweep_points(poses, intrinsics, plain, depth_range=(0.1, 500.0), num_references=3).shape[0] == 0
