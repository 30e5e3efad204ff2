"""Warped-error consistency on the embedded scene generator's datasets (ground-truth poses and z-depth).

The dataset is read the way a nerfstudio-data loader reads it: ``transform_matrix`` poses used as they are
(camera-to-world, OpenGL), intrinsics from ``fl_x``/``fl_y``/``cx``/``cy``, depth PNGs times the depth unit,
RGBA composited over the scene background.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmstyle_ns.data import cameras as cam
from mmstyle_ns.data.scene import DEPTH_UNIT, generate_scene
from mmstyle_ns.metrics.consistency import warped_error

torch.set_num_threads(1)

VIEWS = 16
RES = 48


class Views:
    """Frames, z-depths, poses and intrinsics of a generated dataset."""

    def __init__(self, root: Path) -> None:
        meta = json.loads((root / "transforms.json").read_text())
        scene = json.loads((root / "scene.json").read_text())
        assert scene["camera_convention"] == "opengl" and scene["depth_type"] == "z"
        self.k = np.array([meta["fl_x"], meta["fl_y"], meta["cx"], meta["cy"]])
        self.poses = np.stack([np.asarray(frame["transform_matrix"]) for frame in meta["frames"]])
        background = np.asarray(scene["background"], dtype=np.float32)
        rgb, depth = [], []
        for frame in meta["frames"]:
            rgba = np.asarray(Image.open(root / frame["file_path"])).astype(np.float32) / 255.0
            alpha = rgba[..., 3:]
            rgb.append(rgba[..., :3] * alpha + background * (1.0 - alpha))
            depth.append(np.asarray(Image.open(root / frame["depth_file_path"])).astype(np.float32) * DEPTH_UNIT)
        self.rgb, self.z = np.stack(rgb), np.stack(depth)

    def ray_depth(self) -> np.ndarray:
        """Distance along the unit ray (nerfstudio's rendered depth), through the generator's own ray code."""
        _, _, z_per_t = cam.camera_rays(np.eye(4), self.k, RES, RES)
        return self.z / z_per_t.reshape(RES, RES).astype(np.float32)

    def surface_colours(self) -> np.ndarray:
        """Frames whose colour is a smooth function of the visible 3D point: exactly view-consistent."""
        frames = np.ones_like(self.rgb)
        v, u = np.mgrid[0:RES, 0:RES] + 0.5
        fx, fy, cx, cy = self.k
        for i, (pose, z) in enumerate(zip(self.poses, self.z, strict=True)):
            local = np.stack([(u - cx) / fx * z, -(v - cy) / fy * z, -z], axis=-1)
            p = local @ pose[:3, :3].T + pose[:3, 3]
            colour = np.stack(
                [np.sin(2 * p[..., 0]), np.cos(2.5 * p[..., 1]), np.sin(1.5 * (p[..., 2] + p[..., 0]))], -1
            )
            frames[i] = np.where((z > 0)[..., None], 0.5 + 0.35 * colour, 1.0)
        return frames


@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> Views:
    root = generate_scene(
        "object360", tmp_path_factory.mktemp("metrics") / "o360", num_views=VIEWS, resolution=RES, specular=False
    )
    return Views(root)


def _flicker(frames: np.ndarray, seed: int, shift: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """Per-view independent perturbations: a colour shift per frame and channel, and per-pixel noise."""
    rng = np.random.default_rng(seed)
    out = frames + rng.uniform(-shift, shift, size=(len(frames), 1, 1, 3)) + rng.normal(0, 1, frames.shape) * noise
    return np.clip(out, 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("gap", [1, 4])
def test_view_consistent_colours_give_near_zero_error(views: Views, gap: int):
    frames = views.surface_colours()
    result = warped_error(frames, views.z, views.poses, views.k, gap=gap, depth_kind="z")
    assert len(result["pairs"]) == VIEWS - gap
    assert result["mean_coverage"] > 0.2
    assert max(result["rmse"]) < 0.01
    # nerfstudio-style ray depth with depth_kind="ray" is the same measurement.
    ray = warped_error(frames, views.ray_depth(), views.poses, views.k, gap=gap, depth_kind="ray")
    np.testing.assert_allclose(ray["rmse"], result["rmse"], atol=2e-3)
    np.testing.assert_allclose(ray["coverage"], result["coverage"], atol=0.01)
    # Per-view flicker is clearly measured.
    for flickering in (_flicker(frames, 0, shift=0.1), _flicker(frames, 1, noise=0.05)):
        perturbed = warped_error(flickering, views.z, views.poses, views.k, gap=gap, depth_kind="z")
        assert perturbed["mean_rmse"] > 5 * result["mean_rmse"] and perturbed["mean_rmse"] > 0.04


def test_depth_kind_and_pose_convention_matter(views: Views):
    frames = views.surface_colours()
    right = warped_error(frames, views.z, views.poses, views.k, gap=1, depth_kind="z")
    wrong_kind = warped_error(frames, views.ray_depth(), views.poses, views.k, gap=1, depth_kind="z")
    assert (
        wrong_kind["mean_coverage"] < 0.9 * right["mean_coverage"] or wrong_kind["mean_rmse"] > 3 * right["mean_rmse"]
    )
    # The written poses are nerfstudio (OpenGL) camera-to-world matrices: reading them as OpenCV (y down,
    # looking along +z) or as world-to-camera breaks the correspondence.
    opencv = views.poses.copy()
    opencv[:, :3, 1:3] *= -1
    inverted = np.linalg.inv(views.poses)
    for wrong in (opencv, inverted):
        result = warped_error(frames, views.z, wrong, views.k, gap=1, depth_kind="z")
        broken = result["mean_coverage"] < 0.5 * right["mean_coverage"]
        assert broken or result["mean_rmse"] > 5 * right["mean_rmse"]


@pytest.mark.parametrize("gap", [1, 4])
def test_rendered_scene_is_more_consistent_than_per_view_flicker(views: Views, gap: int):
    """The textured renders themselves: their error floor comes from resampling fine textures at 48 pixels."""
    consistent = warped_error(views.rgb, views.z, views.poses, views.k, gap=gap, depth_kind="z")
    assert consistent["mean_coverage"] > 0.2
    assert consistent["mean_rmse"] < 0.09
    for flickering in (_flicker(views.rgb, 2, shift=0.15), _flicker(views.rgb, 3, noise=0.08)):
        perturbed = warped_error(flickering, views.z, views.poses, views.k, gap=gap, depth_kind="z")
        assert perturbed["mean_rmse"] > 1.4 * consistent["mean_rmse"]
        assert all(p > c for p, c in zip(perturbed["rmse"], consistent["rmse"], strict=True))
