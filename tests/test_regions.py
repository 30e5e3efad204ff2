"""3-D edit regions from a rendered depth: surface points, boxes from a screen rectangle, points inside a box."""

from __future__ import annotations

import torch
from nerfstudio.cameras.cameras import Cameras

from mmstyle_ns.data.regions import box_from_screen_rect, inside_box, surface_points


def _camera_looking_down_minus_z(size: int = 32) -> Cameras:
    """A pinhole camera at (0, 0, 5) looking along -z (nerfstudio's OpenGL convention), 90 degrees of view."""
    c2w = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 5.0]])[None]
    half = size / 2
    return Cameras(camera_to_worlds=c2w, fx=half, fy=half, cx=half, cy=half, width=size, height=size)


def _plane_depth(camera: Cameras, plane_z: float) -> torch.Tensor:
    """Depth along each unit ray to the plane z = plane_z."""
    rays = camera.generate_rays(camera_indices=0, keep_shape=True)
    return ((plane_z - rays.origins[..., 2:]) / rays.directions[..., 2:]).float()


def test_surface_points_lie_on_the_rendered_plane() -> None:
    camera = _camera_looking_down_minus_z()
    points = surface_points(camera, _plane_depth(camera, 1.0))
    torch.testing.assert_close(points[..., 2], torch.ones(32, 32), atol=1e-5, rtol=0)
    # the image's top-left pixel looks at -x, +y (screen y points down)
    assert float(points[0, 0, 0]) < 0 < float(points[0, 0, 1])


def test_a_rectangle_selects_the_surface_under_it_and_extends_away_from_the_camera() -> None:
    camera = _camera_looking_down_minus_z()
    points = surface_points(camera, _plane_depth(camera, 1.0))  # the plane spans x, y in [-4, 4] at z = 1
    solid = torch.ones(32, 32, 1)
    box = box_from_screen_rect(points, solid, camera.camera_to_worlds[0, :, 3], (0.5, 0.5), (0.75, 0.75), margin=0.0)
    assert box is not None
    lower, upper = torch.tensor(box[:3]), torch.tensor(box[3:])
    # the bottom-right quarter of the screen right of and below the centre: x in [0, 2], y in [-2, 0]
    assert 0.0 <= float(lower[0]) < 0.3 and 1.7 < float(upper[0]) <= 2.0
    assert -2.0 <= float(lower[1]) < -1.7 and -0.3 < float(upper[1]) <= 0.0
    # seen from above, the box reaches down (away from the camera) by its width, not up towards the camera
    assert float(upper[2]) == 1.0 and float(lower[2]) < 1.0 - 1.5
    selected = inside_box(points, box)
    assert bool(selected[20, 20]) and not bool(selected[4, 4]) and not bool(selected[20, 4])


def test_a_rectangle_over_empty_space_gives_no_box_and_background_pixels_do_not_count() -> None:
    camera = _camera_looking_down_minus_z()
    points = surface_points(camera, _plane_depth(camera, 1.0))
    empty = torch.zeros(32, 32, 1)
    assert box_from_screen_rect(points, empty, camera.camera_to_worlds[0, :, 3], (0.0, 0.0), (1.0, 1.0)) is None
    solid_left = empty.clone()
    solid_left[:, :16] = 1.0
    box = box_from_screen_rect(points, solid_left, camera.camera_to_worlds[0, :, 3], (0.0, 0.0), (1.0, 1.0), margin=0)
    assert box is not None and box[3] <= 0.0  # only the left half (x < 0) is solid


def test_inside_box_includes_its_bounds() -> None:
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.01, 0.5, 0.5], [-0.5, 0.5, 0.5]])
    assert inside_box(points, (0.0, 0.0, 0.0, 1.0, 1.0, 1.0)).tolist() == [True, True, False, False]
