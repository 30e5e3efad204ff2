"""``mmstyle-demo``: the project's main job on the embedded scene, with the same commands a user types.

1. ``mmstyle-scene`` writes the embedded 360° scene;
2. ``ns-train mmstyle-base`` trains the base field on it;
3. ``mmstyle-camera-path`` fits a turntable to the training cameras;
4. ``ns-render camera-path`` renders the turntable video.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro


def _bin(name: str) -> str:
    """A console script of this environment (next to its ``python``), else from ``PATH``."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install mmstyle_ns into this environment (make env)")
    return found


def _run(args: list[str]) -> None:
    print("$ " + " ".join(args), flush=True)
    subprocess.run(args, check=True)


@dataclass
class DemoArgs:
    """Generate the embedded scene, train the base field and render a turntable video."""

    data: Path = Path("data/object360")
    """Where the embedded scene is written."""
    output_dir: Path = Path("outputs")
    """nerfstudio output folder for the run."""
    render_dir: Path = Path("renders")
    """Where videos are written."""
    steps: int = 800
    """Training iterations of the base field."""
    resolution: int = 128
    """Image size of the embedded scene."""
    num_views: int = 100
    """Views of the embedded scene."""


def main(args: DemoArgs) -> Path:
    """Runs the demo; returns the path of the turntable video."""
    start = time.perf_counter()
    _run([_bin("mmstyle-scene"), "--kind", "object360", "--out", str(args.data),
          "--resolution", str(args.resolution), "--num-views", str(args.num_views)])  # fmt: skip
    timestamp = "demo"
    _run([_bin("ns-train"), "mmstyle-base", "--data", str(args.data), "--output-dir", str(args.output_dir),
          "--timestamp", timestamp, "--max-num-iterations", str(args.steps), "--vis", "tensorboard",
          "--viewer.quit-on-train-completion", "True"])  # fmt: skip
    config = args.output_dir / args.data.name / "mmstyle-base" / timestamp / "config.yml"
    camera_path = args.render_dir / "turntable.json"
    _run([_bin("mmstyle-camera-path"), "--load-config", str(config), "--output", str(camera_path)])
    video = args.render_dir / "base_turntable.mp4"
    _run([_bin("ns-render"), "camera-path", "--load-config", str(config), "--camera-path-filename",
          str(camera_path), "--output-path", str(video)])  # fmt: skip
    print(f"demo done in {time.perf_counter() - start:.0f} s: video {video}, run {config.parent}")
    return video


def entrypoint() -> None:
    """Console entry point."""
    main(tyro.cli(DemoArgs))


if __name__ == "__main__":
    entrypoint()
