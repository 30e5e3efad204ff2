"""``mmstyle-camera-path``: writes a turntable camera path for a trained run, ready for ``ns-render camera-path``.

The orbit is fitted to the run's training cameras, so it works for any inward-facing capture: the orbit
centre is the point closest to all optical axes, the radius and height are the cameras' median ones, and
the field of view is the dataset's. Poses are mapped into the run's world frame with the run's
``dataparser_transforms.json``, as nerfstudio does when it loads the data.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tyro
import yaml

from mmstyle_ns.data.cameras import look_at


def closest_point_to_axes(c2ws: np.ndarray) -> np.ndarray:
    """Least-squares point nearest to every camera's optical axis (the look-at target of an orbit)."""
    origins, dirs = c2ws[:, :3, 3], -c2ws[:, :3, 2]
    dirs = dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)
    projectors = np.eye(3)[None] - dirs[:, :, None] * dirs[:, None, :]  # [N, 3, 3]
    return np.linalg.solve(projectors.sum(0), np.einsum("nij,nj->i", projectors, origins))


def turntable(c2ws: np.ndarray, num_frames: int, up: np.ndarray | None = None) -> np.ndarray:
    """``num_frames`` camera-to-world matrices orbiting the training cameras' common target once."""
    up = np.array([0.0, 0.0, 1.0]) if up is None else up / np.linalg.norm(up)
    target = closest_point_to_axes(c2ws)
    offsets = c2ws[:, :3, 3] - target
    height = float(np.median(offsets @ up))
    horizontal = offsets - (offsets @ up)[:, None] * up
    radius = float(np.median(np.linalg.norm(horizontal, axis=-1)))
    start = horizontal[0] / max(np.linalg.norm(horizontal[0]), 1e-8)
    side = np.cross(up, start)
    poses = []
    for i in range(num_frames):
        angle = 2 * math.pi * i / num_frames
        eye = target + up * height + radius * (math.cos(angle) * start + math.sin(angle) * side)
        poses.append(look_at(eye, target, up))
    return np.stack(poses)


def load_run_cameras(config_path: Path) -> tuple[np.ndarray, float, int, int]:
    """Training camera poses in the run's world frame, vertical field of view (degrees), width and height."""
    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    datamanager = config.pipeline.datamanager
    data = Path(datamanager.data or datamanager.dataparser.data)
    shown: Any = getattr(datamanager, "display_folder", None)
    if callable(shown):  # a collection of scenes: the one the run shows
        data = Path(str(shown()))
    meta_path = data if data.suffix == ".json" else data / "transforms.json"
    meta = json.loads(meta_path.read_text())
    c2ws = np.array([frame["transform_matrix"] for frame in meta["frames"]], dtype=np.float64)
    transforms_path = config_path.parent / "dataparser_transforms.json"
    if transforms_path.exists():
        tf = json.loads(transforms_path.read_text())
        transform = np.eye(4)
        transform[:3] = np.array(tf["transform"])
        c2ws = transform[None] @ c2ws
        c2ws[:, :3, 3] *= tf["scale"]
    height, width = int(meta.get("h", meta["frames"][0].get("h"))), int(meta.get("w", meta["frames"][0].get("w")))
    fl_y = float(meta.get("fl_y", meta["frames"][0].get("fl_y")))
    fov = math.degrees(2 * math.atan(height / (2 * fl_y)))
    return c2ws, fov, width, height


def write_turntable(config_path: Path, output: Path, num_frames: int = 60, seconds: float = 4.0) -> Path:
    """Writes a turntable camera path JSON for the run whose ``config.yml`` is ``config_path``."""
    c2ws, fov, width, height = load_run_cameras(config_path)
    poses = turntable(c2ws, num_frames)
    path = {
        "camera_type": "perspective",
        "render_height": height,
        "render_width": width,
        "seconds": seconds,
        "camera_path": [
            {"camera_to_world": pose.reshape(-1).tolist(), "fov": fov, "aspect": width / height} for pose in poses
        ],
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(path, indent=1))
    return output


@dataclass
class CameraPathArgs:
    """Write a turntable camera path for a trained run."""

    load_config: Path
    """The run's ``config.yml``."""
    output: Path = Path("camera_paths/turntable.json")
    """Where to write the camera path JSON."""
    num_frames: int = 60
    """Frames in one full turn."""
    seconds: float = 4.0
    """Duration of the video ``ns-render`` makes from the path."""


def entrypoint() -> None:
    """Console entry point."""
    args = tyro.cli(CameraPathArgs)
    if not args.load_config.is_file():
        raise FileNotFoundError(f"--load-config {args.load_config} does not exist (expected a run's config.yml)")
    out = write_turntable(args.load_config, args.output, args.num_frames, args.seconds)
    print(f"wrote {out} ({args.num_frames} frames)")


if __name__ == "__main__":
    entrypoint()
