"""``mmstyle-demo``: the project's main job on the embedded scene, with the same commands a user types.

1. ``mmstyle-scene`` writes the embedded 360° scene;
2. ``ns-train mm-nerf`` reconstructs it and stylizes it with three styles (images shipped with scikit-image) in
   one run;
3. ``mmstyle-camera-path`` fits a turntable to the training cameras;
4. ``ns-render camera-path`` renders one turntable video per style (and one of the unstylized scene);
5. ``mmstyle-mm-eval`` measures consistency and style match and writes a contact sheet (rows: styles).
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


DEMO_STYLES = ("builtin:coffee", "builtin:hubble_deep_field", "builtin:chelsea")


@dataclass
class DemoArgs:
    """Generate the embedded scene, train mm-nerf with three styles, render a video per style, evaluate."""

    data: Path = Path("data/object360")
    """Where the embedded scene is written."""
    output_dir: Path = Path("outputs")
    """nerfstudio output folder for the run."""
    render_dir: Path = Path("renders")
    """Where videos are written."""
    steps: int = 600
    """Reconstruction (photorealistic) iterations before stylization."""
    stylization_steps: int = 900
    """Stylization iterations (shared by all styles, one style per iteration)."""
    styles: tuple[str, ...] = DEMO_STYLES
    """Styles (see ns-train mm-nerf --help, --pipeline.styles)."""
    resolution: int = 128
    """Image size of the embedded scene."""
    num_views: int = 100
    """Views of the embedded scene."""


def main(args: DemoArgs) -> list[Path]:
    """Runs the demo; returns the paths of the videos."""
    from mmstyle_ns.style.sources import parse_style_specs

    names = [source.name for source in parse_style_specs(args.styles)]
    start = time.perf_counter()
    _run([_bin("mmstyle-scene"), "--kind", "object360", "--out", str(args.data),
          "--resolution", str(args.resolution), "--num-views", str(args.num_views)])  # fmt: skip
    timestamp = "demo"
    _run([_bin("ns-train"), "mm-nerf", "--data", str(args.data), "--output-dir", str(args.output_dir),
          "--timestamp", timestamp, "--max-num-iterations", str(args.steps + args.stylization_steps),
          "--pipeline.model.reconstruction-steps", str(args.steps), "--pipeline.styles", *args.styles,
          "--vis", "tensorboard", "--viewer.quit-on-train-completion", "True"])  # fmt: skip
    config = args.output_dir / args.data.name / "mm-nerf" / timestamp / "config.yml"
    camera_path = args.render_dir / "turntable.json"
    _run([_bin("mmstyle-camera-path"), "--load-config", str(config), "--output", str(camera_path)])
    videos = []
    for name in ["original", *names]:
        video = args.render_dir / f"mm_nerf_{name}.mp4"
        _run([_bin("ns-render"), "camera-path", "--load-config", str(config), "--camera-path-filename",
              str(camera_path), "--rendered-output-names", name, "--output-path", str(video)])  # fmt: skip
        videos.append(video)
    _run([_bin("mmstyle-mm-eval"), "--load-config", str(config), "--output-dir", str(args.render_dir / "mm_nerf_eval"),
          "--num-frames", "24", "--gaps", "1", "6"])  # fmt: skip
    print(
        f"demo done in {time.perf_counter() - start:.0f} s: videos {', '.join(str(v) for v in videos)}; "
        f"contact sheet {args.render_dir / 'mm_nerf_eval' / 'contact_sheet.png'}; run {config.parent}"
    )
    return videos


def entrypoint() -> None:
    """Console entry point."""
    main(tyro.cli(DemoArgs))


if __name__ == "__main__":
    entrypoint()
