"""The evaluation orbit of mmstyle-head-eval: cameras at yaws about the face, mirror images at opposite yaws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mmstyle_ns.scripts.head_eval import HeadEvalArgs, Orbit, main


def _orbit() -> Orbit:
    return Orbit(
        centre=np.array([0.1, -0.2, 0.3]),
        up=np.array([0.0, 0.0, 1.0]),
        front=np.array([1.0, 0.0, 0.0]),
        height=0.2,
        radius=2.0,
    )


def test_yaw_zero_looks_at_the_face_from_the_front() -> None:
    orbit = _orbit()
    pose = orbit.pose(0.0)
    np.testing.assert_allclose(pose[:, 3], orbit.centre + [2.0, 0.0, 0.2], atol=1e-9)
    looking = -pose[:, 2]  # nerfstudio cameras look along -z
    to_centre = orbit.centre - pose[:, 3]
    np.testing.assert_allclose(looking, to_centre / np.linalg.norm(to_centre), atol=1e-9)
    np.testing.assert_allclose(orbit.pose(180.0)[:, 3], orbit.centre + [-2.0, 0.0, 0.2], atol=1e-9)


@pytest.mark.parametrize("yaw", [10.0, 45.0, 90.0, 135.0])
def test_opposite_yaws_are_mirror_cameras_about_the_face_plane(yaw: float) -> None:
    """Mirroring the camera at +yaw about the plane through the centre spanned by front and up (normal: y) gives
    the camera at -yaw with its image flipped left-right (its x axis reversed)."""
    orbit = _orbit()
    mirror = np.diag([1.0, -1.0, 1.0])
    plus, minus = orbit.pose(yaw), orbit.pose(-yaw)
    reflected_centre = mirror @ (plus[:, 3] - orbit.centre) + orbit.centre
    np.testing.assert_allclose(reflected_centre, minus[:, 3], atol=1e-9)
    reflected_axes = mirror @ plus[:, :3] @ np.diag([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(reflected_axes, minus[:, :3], atol=1e-9)


def test_bad_inputs_are_one_message(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="labels"):
        main(HeadEvalArgs(source_config=tmp_path / "a.yml", stylized_configs=(tmp_path / "b.yml",), labels=("x", "y")))
    with pytest.raises(ValueError, match="config.yml"):
        main(HeadEvalArgs(source_config=tmp_path / "missing.yml"))
