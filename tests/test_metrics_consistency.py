"""Unit tests of depth-based warping and the warped error (mmstyle_ns.metrics.consistency).

Geometry is checked against independent numpy code (written here, not shared with the module), nerfstudio's own
ray generation and the projection of mmstyle_ns.fields.carving.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mmstyle_ns.data import cameras as cam
from mmstyle_ns.metrics.consistency import (
    DepthKind,
    as_intrinsics,
    as_poses,
    camera_arrays,
    convert_depth,
    project,
    unproject,
    warp,
    warped_error,
)

torch.set_num_threads(1)


def _random_pose(rng: np.random.Generator) -> np.ndarray:
    """A random rotation (det +1) and centre, as a [3, 4] camera-to-world matrix."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return np.concatenate([q, rng.normal(size=(3, 1))], axis=1)


def _pixel_dirs(height: int, width: int, k: np.ndarray) -> np.ndarray:
    """Camera-space directions (x right, y up, -z forward) with z = -1 of every pixel centre, [H, W, 3]."""
    fx, fy, cx, cy = k
    v, u = np.mgrid[0:height, 0:width] + 0.5
    return np.stack([(u - cx) / fx, -(v - cy) / fy, -np.ones_like(u)], axis=-1)


def _np_project(points: np.ndarray, c2w: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(u, v, z) of world points in a camera, float64."""
    fx, fy, cx, cy = k
    local = (points - c2w[:3, 3]) @ c2w[:3, :3]
    z = -local[..., 2]
    return cx + fx * local[..., 0] / z, cy - fy * local[..., 1] / z, z


def _plane_view(c2w: np.ndarray, k: np.ndarray, height: int, width: int, colour) -> tuple[np.ndarray, np.ndarray]:
    """Ray-traces the textured plane z = 0: colour [H, W, 3] and ray depth [H, W] (0 where the ray misses)."""
    dirs = _pixel_dirs(height, width, k) @ c2w[:3, :3].T
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    t = -c2w[2, 3] / dirs[..., 2]
    t = np.where(t > 0, t, 0.0)
    points = c2w[:3, 3] + t[..., None] * dirs
    return colour(points).astype(np.float32), t.astype(np.float32)


def _smooth_colour(points: np.ndarray) -> np.ndarray:
    x, y = points[..., 0], points[..., 1]
    return np.stack(
        [0.5 + 0.3 * np.sin(1.3 * x + 0.4), 0.5 + 0.3 * np.cos(0.9 * y - 0.2), 0.5 + 0.2 * np.sin(0.7 * (x + y))], -1
    )


# ----------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("kind", ["z", "ray"])
def test_unproject_then_project_returns_pixel_centres(kind: DepthKind):
    rng = np.random.default_rng(0)
    pose, k = _random_pose(rng), np.array([30.0, 24.0, 11.0, 9.5])
    depth = rng.uniform(0.5, 4.0, size=(18, 22)).astype(np.float32)
    points = unproject(torch.from_numpy(depth), pose, k, depth_kind=kind)
    assert points.shape == (18, 22, 3) and points.dtype == torch.float32
    u, v, z = _np_project(points.double().numpy(), pose, k)
    np.testing.assert_allclose(u, np.mgrid[0:18, 0:22][1] + 0.5, atol=1e-3)
    np.testing.assert_allclose(v, np.mgrid[0:18, 0:22][0] + 0.5, atol=1e-3)
    distance = np.linalg.norm(points.double().numpy() - pose[:, 3], axis=-1)
    np.testing.assert_allclose(z if kind == "z" else distance, depth, rtol=1e-5)
    if kind == "ray":  # the two kinds really differ away from the image centre
        assert np.abs(z - depth).max() > 0.1
    # The module's own projection agrees.
    mu, mv, mz, mdist = project(points, pose, k)
    np.testing.assert_allclose(mu.numpy(), u, atol=1e-3)
    np.testing.assert_allclose(mv.numpy(), v, atol=1e-3)
    np.testing.assert_allclose(mz.numpy(), z, rtol=1e-5)
    np.testing.assert_allclose(mdist.numpy(), distance, rtol=1e-5)


def test_projection_matches_carving_convention():
    from mmstyle_ns.fields.carving import project_points

    rng = np.random.default_rng(1)
    pose = torch.from_numpy(_random_pose(rng)).float()
    k = torch.tensor([40.0, 38.0, 20.0, 14.0])
    points = torch.from_numpy(rng.normal(size=(200, 3))).float() * 3
    u, v, z, _ = project(points, pose, k)
    cu, cv, cz = project_points(points, pose[None], k[None])
    front = z > 1e-3
    torch.testing.assert_close(z, cz[0])
    torch.testing.assert_close(u[front], cu[0, front], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(v[front], cv[0, front], rtol=1e-4, atol=1e-3)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_ray_depth_is_nerfstudio_distance_along_unit_rays():
    from nerfstudio.cameras.cameras import Cameras

    rng = np.random.default_rng(2)
    pose = torch.from_numpy(_random_pose(rng)).float()
    cameras = Cameras(camera_to_worlds=pose[None], fx=20.0, fy=17.0, cx=9.0, cy=7.5, width=16, height=12)
    c2w, k = camera_arrays(cameras)
    torch.testing.assert_close(c2w[0], pose)
    torch.testing.assert_close(k[0], torch.tensor([20.0, 17.0, 9.0, 7.5]))
    rays = cameras.generate_rays(camera_indices=0)
    torch.testing.assert_close(rays.directions.norm(dim=-1), torch.ones(12, 16))
    depth = torch.from_numpy(rng.uniform(1.0, 3.0, size=(12, 16))).float()
    expected = rays.origins + rays.directions * depth[..., None]  # nerfstudio: point = origin + t * unit direction
    torch.testing.assert_close(unproject(depth, c2w[0], k[0], depth_kind="ray"), expected, atol=1e-5, rtol=1e-5)
    assert (unproject(depth, c2w[0], k[0], depth_kind="z") - expected).abs().max() > 0.05
    distorted = Cameras(
        camera_to_worlds=pose[None],
        fx=20.0,
        fy=17.0,
        cx=9.0,
        cy=7.5,
        distortion_params=torch.tensor([[0.1, 0, 0, 0, 0, 0]]),
    )
    with pytest.raises(ValueError, match="undistorted"):
        camera_arrays(distorted)


def test_convert_depth_matches_generator_rays():
    k = cam.intrinsics_from_fov(20, 14, 70.0)
    _, _, z_per_t = cam.camera_rays(np.eye(4), k, 20, 14)
    z = np.random.default_rng(3).uniform(1, 2, size=(14, 20)).astype(np.float32)
    ray = convert_depth(torch.from_numpy(z), k, "z", "ray")
    np.testing.assert_allclose(ray.numpy(), z / z_per_t.reshape(14, 20), rtol=1e-5)
    np.testing.assert_allclose(convert_depth(ray, k, "ray", "z").numpy(), z, rtol=1e-5)
    torch.testing.assert_close(convert_depth(ray, k, "ray", "ray"), ray)
    with pytest.raises(ValueError, match="depth_kind"):
        convert_depth(ray, k, "ray", "disparity")  # type: ignore[arg-type]


def test_pose_and_intrinsics_formats():
    pose = np.eye(4)
    pose[:3, 3] = [1, 2, 3]
    assert as_poses(pose).shape == (3, 4) and as_poses(np.stack([pose, pose])).shape == (2, 3, 4)
    matrix = np.array([[10.0, 0, 4], [0, 11, 5], [0, 0, 1]])
    np.testing.assert_allclose(as_intrinsics(matrix).numpy(), [10, 11, 4, 5])
    with pytest.raises(ValueError, match="poses"):
        as_poses(np.eye(3))
    with pytest.raises(ValueError, match="intrinsics"):
        as_intrinsics([1.0, 2.0, 3.0])


# ----------------------------------------------------------------------------------------------- warp


@pytest.mark.parametrize("kind", ["z", "ray"])
def test_warp_into_itself_is_identity_with_full_mask(kind: DepthKind):
    rng = np.random.default_rng(4)
    pose, k = _random_pose(rng), np.array([25.0, 28.0, 13.0, 9.0])
    image = torch.from_numpy(rng.uniform(size=(20, 24, 3))).float()
    v, u = np.mgrid[0:20, 0:24]
    depth = torch.from_numpy(2.0 + 0.5 * np.sin(u / 3.0) * np.cos(v / 4.0)).float()
    warped, mask = warp(image, depth, pose, k, pose, k, source_depth=depth, depth_kind=kind)
    assert warped.shape == (20, 24, 3) and mask.shape == (20, 24) and mask.dtype == torch.bool
    assert bool(mask.all())
    torch.testing.assert_close(warped, image, atol=2e-4, rtol=0)
    # uint8 colours are scaled to [0, 1]; pixels marked invalid in the target drop out of the mask.
    as_uint8 = (image * 255).round().to(torch.uint8)
    invalid = torch.zeros(20, 24, dtype=torch.bool)
    invalid[:5] = True
    warped8, mask8 = warp(as_uint8, depth, pose, k, pose, k, depth_kind=kind, target_valid=~invalid)
    assert bool((mask8 == ~invalid).all())
    torch.testing.assert_close(warped8[~invalid], as_uint8[~invalid].float() / 255, atol=2e-4, rtol=0)
    assert bool((warped8[invalid] == 0).all())


def test_warp_resamples_a_different_camera_exactly():
    """A smooth textured plane seen by two cameras of different sizes: the warp reproduces the target."""
    target_pose = cam.look_at(np.array([0.4, -2.5, 3.0]), np.array([0.0, 0.0, 0.0]))
    source_pose = cam.look_at(np.array([-1.2, -1.8, 2.6]), np.array([0.3, 0.2, 0.0]))
    k_t, k_s = np.array([30.0, 30.0, 16.0, 12.0]), np.array([44.0, 40.0, 21.0, 17.5])
    target_rgb, target_depth = _plane_view(target_pose, k_t, 24, 32, _smooth_colour)
    source_rgb, source_depth = _plane_view(source_pose, k_s, 36, 40, _smooth_colour)
    assert (target_depth > 0).all() and (source_depth > 0).all()
    warped, mask = warp(source_rgb, target_depth, target_pose, k_t, source_pose, k_s, source_depth)
    assert 0.3 < mask.float().mean() < 0.95  # part of the target lies outside the source
    error = (warped - torch.from_numpy(target_rgb)).abs()[mask]
    assert error.max() < 5e-3
    # A half-pixel shift of the pixel-centre convention or a flipped row axis is clearly visible.
    shifted = k_s + np.array([0.0, 0.0, 0.5, 0.5])
    warped_b, mask_b = warp(source_rgb, target_depth, target_pose, k_t, source_pose, shifted, None)
    assert (warped_b - torch.from_numpy(target_rgb)).abs()[mask_b].mean() > 10 * error.mean()
    warped_c, mask_c = warp(source_rgb[::-1].copy(), target_depth, target_pose, k_t, source_pose, k_s, None)
    assert (warped_c - torch.from_numpy(target_rgb)).abs()[mask_c].mean() > 100 * error.mean()


def test_points_behind_or_outside_the_source_are_masked():
    size, k = 32, np.array([16.0, 16.0, 16.0, 16.0])  # 90 degree field of view
    target_pose = np.eye(4)
    depth = np.full((size, size), 4.0, dtype=np.float32)  # the plane z = -4 seen head-on
    rgb = np.full((size, size, 3), 0.5, dtype=np.float32)
    points = _pixel_dirs(size, size, k) * 4.0

    # Looking back at the target camera from between it and the plane: every point is behind the source,
    # although half of them would land inside its image if the sign of the depth were ignored.
    facing_back = cam.look_along(np.array([0.0, 0.0, -2.0]), np.array([0.0, 0.0, 1.0]), up=np.array([0, 1.0, 0]))
    u, v, z = _np_project(points, facing_back, k)
    assert (z < 0).all()
    naive_u, naive_v = 2 * k[2] - u, 2 * k[3] - v  # the projection with |z| in place of z
    assert ((naive_u >= 0) & (naive_u < size) & (naive_v >= 0) & (naive_v < size)).mean() > 0.2
    _, mask = warp(rgb, depth, target_pose, k, facing_back, k, depth_kind="z")
    assert not bool(mask.any())

    # Closer to the plane and facing it: only the central part of the target falls inside the source image.
    closer = np.eye(4)
    closer[2, 3] = -2.0
    u, v, z = _np_project(points, closer, k)
    # Inside means inside the grid of pixel centres (bilinear interpolation without extrapolation).
    expected = (z > 0) & (u >= 0.5) & (u <= size - 0.5) & (v >= 0.5) & (v <= size - 0.5)
    assert 0.1 < expected.mean() < 0.5
    _, mask = warp(rgb, depth, target_pose, k, closer, k, depth_kind="z")
    np.testing.assert_array_equal(mask.numpy(), expected)

    # The source image size bounds the mask, not the target's.
    _, mask_small = warp(rgb[:, :20], depth, target_pose, k, closer, k, depth_kind="z")
    np.testing.assert_array_equal(mask_small.numpy(), expected & (u <= 19.5))


def _occluder_scene(eye_x: float, k: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Ray depth of a camera at (eye_x, 0, 0) looking along -z at the plane z = -4 with a card at z = -2."""
    dirs = _pixel_dirs(size, size, k)
    unit = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    t_plane = 4.0 / -unit[..., 2]
    t_card = 2.0 / -unit[..., 2]
    hit = t_card[..., None] * unit + np.array([eye_x, 0.0, 0.0])
    on_card = (hit[..., 0] >= 0.0) & (hit[..., 0] <= 0.8) & (np.abs(hit[..., 1]) <= 0.5)
    return np.where(on_card, t_card, t_plane).astype(np.float32), on_card


def test_occlusion_test_masks_points_hidden_in_the_source():
    size, k = 40, np.array([20.0, 20.0, 20.0, 20.0])
    target_pose, source_pose = np.eye(4), np.eye(4)
    target_pose[0, 3], source_pose[0, 3] = -1.0, 1.0
    target_depth, target_on_card = _occluder_scene(-1.0, k, size)
    source_depth, _ = _occluder_scene(1.0, k, size)
    rgb = np.full((size, size, 3), 0.5, dtype=np.float32)

    # Ground truth: a back-plane point P is hidden from the source when the segment source -> P crosses the card
    # (at its midpoint, z = -2). Margins of about 1.5 pixel footprints keep pixel quantisation out of the test.
    dirs = _pixel_dirs(size, size, k)
    points = target_depth[..., None] * dirs / np.linalg.norm(dirs, axis=-1, keepdims=True) + np.array([-1.0, 0, 0])
    mid = (points + np.array([1.0, 0.0, 0.0])) / 2
    u, v, z = _np_project(points, source_pose, k)
    inside = (z > 0) & (u >= 1) & (u < size - 1) & (v >= 1) & (v < size - 1)

    def in_card(margin: float) -> np.ndarray:
        return (mid[..., 0] >= -margin) & (mid[..., 0] <= 0.8 + margin) & (np.abs(mid[..., 1]) <= 0.5 + margin)

    back = ~target_on_card
    hidden = back & inside & in_card(-0.15)
    visible = inside & ((back & ~in_card(0.15)) | target_on_card)
    visible &= ~_near(target_on_card, 2)  # the card's own silhouette in the target
    assert hidden.sum() > 20 and visible.sum() > 500

    _, mask = warp(rgb, target_depth, target_pose, k, source_pose, k, source_depth, depth_kind="ray")
    assert not mask.numpy()[hidden].any()
    assert mask.numpy()[visible].mean() > 0.98
    # Without the source depth there is no occlusion test: the hidden points are kept.
    _, unchecked = warp(rgb, target_depth, target_pose, k, source_pose, k, depth_kind="ray")
    assert unchecked.numpy()[hidden].all()
    # Reading the ray depths as z-depths puts the points at wrong depths: the test rejects most of them.
    _, wrong_kind = warp(rgb, target_depth, target_pose, k, source_pose, k, source_depth, depth_kind="z")
    assert wrong_kind.numpy()[visible].mean() < 0.8 * mask.numpy()[visible].mean()


def _near(region: np.ndarray, radius: int) -> np.ndarray:
    """Pixels within ``radius`` (Chebyshev) of the border of a boolean region."""
    padded = np.pad(region, radius, mode="edge")
    grown = np.zeros_like(region)
    shrunk = np.ones_like(region)
    h, w = region.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            window = padded[dy : dy + h, dx : dx + w]
            grown |= window
            shrunk &= window
    return grown & ~shrunk


def test_warp_masks_invalid_source_pixels_and_rejects_bad_input():
    k = np.array([10.0, 10.0, 8.0, 8.0])
    pose = np.eye(4)
    depth = np.full((16, 16), 2.0, dtype=np.float32)
    rgb = np.random.default_rng(5).uniform(size=(16, 16, 3)).astype(np.float32)
    source_depth = depth.copy()
    source_depth[4, 6] = 0.0  # background
    source_depth[10, 3] = np.inf
    _, mask = warp(rgb, depth, pose, k, pose, k, source_depth)
    assert (~mask).sum() == 2 and not mask[4, 6] and not mask[10, 3]
    nan_target = depth.copy()
    nan_target[0, 0] = np.nan
    warped, mask = warp(rgb, nan_target, pose, k, pose, k)
    assert not mask[0, 0] and mask.sum() == 255 and torch.isfinite(warped).all()
    with pytest.raises(ValueError, match="depth_kind"):
        warp(rgb, depth, pose, k, pose, k, depth_kind="disparity")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="source_rgb"):
        warp(rgb[..., 0], depth, pose, k, pose, k)
    with pytest.raises(ValueError, match="source_depth"):
        warp(rgb, depth, pose, k, pose, k, source_depth[:8])
    with pytest.raises(ValueError, match="occlusion_tolerance"):
        warp(rgb, depth, pose, k, pose, k, source_depth, occlusion_tolerance=-1.0)


# ----------------------------------------------------------------------------------------------- warped_error


def test_warped_error_formulas_on_a_static_camera():
    """Same camera for every frame: the warp is the identity and the numbers follow from the colours."""
    n, h, w = 4, 8, 10
    frames = np.zeros((n, h, w, 3), dtype=np.float32)
    frames[1] = 0.1
    frames[2, :, :, 0] = 0.4  # from frame 1: +0.3, -0.1, -0.1, so RMSE = sqrt((0.3^2 + 2 * 0.1^2) / 3)
    frames[3] = frames[2]
    depths = np.full((n, h, w), 3.0, dtype=np.float32)
    valid = np.ones((n, h, w), dtype=bool)
    valid[3, :, : w // 2] = False  # half of frame 3 is empty
    poses = np.repeat(np.eye(4)[None, :3], n, axis=0)
    result = warped_error(frames, depths, poses, np.array([8.0, 8.0, 5.0, 4.0]), gap=1, valid=valid, depth_kind="z")
    assert result["gap"] == 1 and result["pairs"] == [(0, 1), (1, 2), (2, 3)]
    expected_12 = math.sqrt((0.3**2 + 2 * 0.1**2) / 3)
    np.testing.assert_allclose(result["rmse"], [0.1, expected_12, 0.0], atol=1e-5)
    np.testing.assert_allclose(result["mae"], [0.1, (0.3 + 0.2) / 3, 0.0], atol=1e-5)
    np.testing.assert_allclose(result["coverage"], [1.0, 1.0, 0.5])
    assert result["mean_rmse"] == pytest.approx((0.1 + expected_12) / 3, abs=1e-5)
    assert result["mean_coverage"] == pytest.approx(2.5 / 3)

    # A pair without any valid pixel reports NaN and is left out of the means.
    valid[2] = False
    gap2 = warped_error(frames, depths, poses, np.array([8.0, 8.0, 5.0, 4.0]), gap=2, valid=valid, depth_kind="z")
    assert gap2["pairs"] == [(0, 2), (1, 3)]
    assert math.isnan(gap2["rmse"][0]) and gap2["coverage"][0] == 0.0
    assert gap2["mean_rmse"] == pytest.approx(gap2["rmse"][1])


def test_warped_error_rejects_bad_input():
    frames = np.zeros((3, 4, 4, 3), dtype=np.float32)
    depths = np.ones((3, 4, 4), dtype=np.float32)
    poses = np.repeat(np.eye(4)[None], 3, axis=0)
    k = np.array([4.0, 4.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="gap"):
        warped_error(frames, depths, poses, k, gap=3)
    with pytest.raises(ValueError, match="gap"):
        warped_error(frames, depths, poses, k, gap=0)
    with pytest.raises(ValueError, match="depths"):
        warped_error(frames, depths[:, :2], poses, k)
    with pytest.raises(ValueError, match="poses"):
        warped_error(frames, depths, poses[:2], k)
    with pytest.raises(ValueError, match="valid"):
        warped_error(frames, depths, poses, k, valid=np.ones((3, 4, 5), dtype=bool))
