"""``mmstyle-demo``: the project's main jobs on embedded scenes, with the same commands a user types.

``--method mm-nerf`` (the default):

1. ``mmstyle-scene`` writes the embedded 360° scene;
2. ``ns-train mm-nerf`` reconstructs it and stylizes it with three styles (images shipped with scikit-image) in
   one run;
3. ``mmstyle-camera-path`` fits a turntable to the training cameras;
4. ``ns-render camera-path`` renders one turntable video per style (and one of the unstylized scene);
5. ``mmstyle-mm-eval`` measures consistency and style match and writes a contact sheet (rows: styles).

``--method ed-nerf``:

1. ``mmstyle-scene --kind toy --masks`` writes a scene of the toy teacher's world with object masks;
2. ``ns-train ed-nerf`` fits the latent field and refinement layer (stage 1);
3. ``ns-train ed-nerf --load-dir <stage 1>`` edits the object's colour with DDS inside the masks (one target colour
   by default; ``--edit-colours`` names more);
4. ``ns-render`` renders a turntable of the first edit and ``mmstyle-ed-eval`` writes the figures and a contact
   sheet (rows: images, VAE round trip, stage 1, each edit).

``--method head-stylize``:

1. ``mmstyle-scene --kind head`` writes the embedded head (a public-domain portrait on the face, 360° cameras);
2. ``ns-train mmstyle-base`` reconstructs it;
3. ``ns-train head-stylize --load-dir <base>`` stylizes it towards ``--head-prompt`` (likelihood distillation over
   2 x 2 mirrored view grids, with the toy teacher by default);
4. ``ns-render`` renders a turntable of the stylized head and ``mmstyle-head-eval`` writes the identity, text
   alignment and left/right figures and a contact sheet (rows: unstylized, stylized; columns: yaws).

``--method tunemv3d``:

1. ``mmstyle-scene --kind toy-collection`` writes the collection of toy scenes the shipped run was trained on (its
   display scene's cameras are the generation's);
2. ``mmstyle-tunemv3d generate`` samples ``--tunemv3d-prompt`` (a prompt no training scene shows) from the shipped
   checkpoint (``--tunemv3d-run``; trained with the command in docs/tunemv3d.md) and writes the grid and a run
   folder of the generated field;
3. ``ns-render`` renders a turntable of the generated field;
4. ``mmstyle-tunemv3d evaluate`` measures the held-out prompts against independent sampling and writes the figures.

``--ablations`` adds the measurements of docs/ed_nerf.md: stage 1 without the refinement layer (the paper's
ablation), and the first edit once unmasked and once with SDS instead of DDS.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    # this environment's tools first (ns-render finds ffmpeg on PATH), also when it is not activated
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    subprocess.run(args, check=True, env=env)


DEMO_STYLES = ("builtin:coffee", "builtin:hubble_deep_field", "builtin:chelsea")


@dataclass
class DemoArgs:
    """Generate an embedded scene, train a method on it, render videos, evaluate (mm-nerf, ed-nerf, head-stylize), or
    generate with the shipped tunemv3d checkpoint."""

    method: Literal["mm-nerf", "ed-nerf", "head-stylize", "tunemv3d"] = "mm-nerf"
    """Which method's demo to run."""
    data: Path = Path("data/object360")
    """Where the embedded scene is written."""
    kind: Literal["object360", "forward", "unbounded"] = "object360"
    """mm-nerf: the embedded scene's kind (mmstyle-scene --kind)."""
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
    toy_caption: str = "a red cube on a wooden floor"
    """ed-nerf: the toy scene (its caption is the edit's source prompt)."""
    edit_colours: tuple[str, ...] = ("blue",)
    """ed-nerf: the target colours of the masked DDS edits (docs/ed_nerf.md: blue green yellow purple orange
    white)."""
    ablations: bool = False
    """ed-nerf: also stage 1 without the refinement layer, and the first edit unmasked and with SDS."""
    stage1_steps: int = 1500
    """ed-nerf: steps of stage 1 (latent reconstruction); each whole view is only (resolution / 8)^2 rays."""
    edit_steps: int = 200
    """ed-nerf: steps of each edit."""
    guidance_model: Path = Path("examples/toy-teacher")
    """ed-nerf and head-stylize: the diffusion model."""
    head_portrait: str = "grace_hopper"
    """head-stylize: the portrait on the embedded head (see mmstyle-scene --help)."""
    head_base_steps: int = 800
    """head-stylize: steps of the mmstyle-base reconstruction of the head."""
    head_prompt: str = "a cartoon of a blue sphere on a plain floor"
    """head-stylize: what the head should look like (the toy teacher knows its toy world's words)."""
    head_steps: int = 200
    """head-stylize: steps of the stylization."""
    head_extra: tuple[str, ...] = (
        "--optimizers.grid.optimizer.lr", "0.02",
        "pipeline.datamanager.sampling:mirrored-view-set", "--pipeline.datamanager.sampling.grid-k", "1",
        "pipeline.model.rule:ld", "--pipeline.model.rule.min-step-ratio", "0.5",
    )  # fmt: skip
    """head-stylize: further ns-train arguments (by default what works best with the toy teacher: a higher colour
    learning rate, one view with its mirror per step, and timesteps from half the schedule up, where the toy teacher
    changes colours rather than adding grain; the method's defaults, 2 x 2 grids, follow the paper)."""
    tunemv3d_run: Path = Path("examples/tunemv3d-toy/tunemv3d/shipped/config.yml")
    """tunemv3d: the trained run to generate with (the shipped one by default)."""
    tunemv3d_prompt: str = "a green cylinder on grass"
    """tunemv3d: the prompt of the generation (no training scene shows a green cylinder)."""
    tunemv3d_scenes: int = 200
    """tunemv3d: scenes of the collection written first (the shipped run's: 200)."""


def tunemv3d_demo(args: DemoArgs) -> list[Path]:
    """The tunemv3d demo (see the module docstring); returns the path of the video."""
    import yaml

    start = time.perf_counter()
    trained = yaml.load(args.tunemv3d_run.read_text("utf8"), Loader=yaml.Loader)
    collection = Path(trained.pipeline.datamanager.data)
    from mmstyle_ns.data.collection import load_collection

    try:
        load_collection(collection)  # a collection there already (e.g. the one the run trained on) is kept
    except ValueError:
        _run([_bin("mmstyle-scene"), "--kind", "toy-collection", "--out", str(collection),
              "--num-scenes", str(args.tunemv3d_scenes)])  # fmt: skip
    name = "demo"
    _run([_bin("mmstyle-tunemv3d"), "generate", "--load-config", str(args.tunemv3d_run), "--prompt",
          args.tunemv3d_prompt, "--name", name, "--output-dir", str(args.output_dir), "--overwrite"])  # fmt: skip
    experiment = args.tunemv3d_run.resolve().parent.parent.parent.name  # <experiment>/tunemv3d/<timestamp>/config.yml
    generated = args.output_dir / experiment / "tunemv3d" / f"generate-{name}" / "config.yml"
    camera_path = args.render_dir / "tunemv3d_turntable.json"
    _run([_bin("mmstyle-camera-path"), "--load-config", str(generated), "--output", str(camera_path)])
    video = args.render_dir / "tunemv3d.mp4"
    _run([_bin("ns-render"), "camera-path", "--load-config", str(generated), "--camera-path-filename",
          str(camera_path), "--rendered-output-names", "rgb", "--output-path", str(video)])  # fmt: skip
    evaluation = args.render_dir / "tunemv3d_eval"
    _run([_bin("mmstyle-tunemv3d"), "evaluate", "--load-config", str(args.tunemv3d_run), "--output-dir",
          str(evaluation)])  # fmt: skip
    print(
        f"tunemv3d demo done in {time.perf_counter() - start:.0f} s: grid {generated.parent / 'grid.png'}; video "
        f"{video}; figures {evaluation}"
    )
    return [video]


def ed_nerf_demo(args: DemoArgs) -> list[Path]:
    """The ed-nerf demo (see the module docstring); returns the path of the video."""
    from mmstyle_ns.teacher.vocab import COLOURS, parse_caption

    source = parse_caption(args.toy_caption)
    data = args.data if args.data != Path("data/object360") else Path("data/toy")
    start = time.perf_counter()
    _run([_bin("mmstyle-scene"), "--kind", "toy", "--caption", args.toy_caption, "--masks", "--out", str(data),
          "--resolution", str(args.resolution), "--num-views", str(min(args.num_views, 60))])  # fmt: skip
    runs = args.output_dir / data.name / "ed-nerf"

    def train(timestamp: str, steps: int, target: str, *extra: str) -> Path:
        _run([_bin("ns-train"), "ed-nerf", "--data", str(data), "--output-dir", str(args.output_dir),
              "--timestamp", timestamp, "--max-num-iterations", str(steps), "--vis", "tensorboard",
              "--pipeline.model.reconstruction-steps", str(args.stage1_steps),
              "--pipeline.guidance.model-path", str(args.guidance_model),
              "--pipeline.model.source-prompt", args.toy_caption, "--pipeline.model.target-prompt", target,
              *extra])  # fmt: skip
        return runs / timestamp / "config.yml"

    def prompt(colour: str) -> str:
        return args.toy_caption.replace(f" {source.colour} ", f" {colour} ", 1)

    colours = [c for c in args.edit_colours if c in COLOURS and c != source.colour]
    if not colours:
        raise SystemExit(f"--edit-colours: name at least one colour other than {source.colour} (one of {COLOURS})")
    stage1 = train("stage1", args.stage1_steps, args.toy_caption)
    eval_extra: list[str] = []
    if args.ablations:
        no_refinement = ("--pipeline.model.use-refinement", "False")
        ablation = train("stage1-no-refinement", args.stage1_steps, args.toy_caption, *no_refinement)
        eval_extra = ["--ablation-config", str(ablation)]
    load = ["--load-dir", str(stage1.parent / "nerfstudio_models")]
    total = args.edit_steps  # nerfstudio counts --max-num-iterations from the loaded checkpoint's step
    edits = [train(f"dds-{c}", total, prompt(c), *load) for c in colours]
    if args.ablations:
        unmasked = ("--pipeline.model.use-masks", "False")
        edits.append(train(f"dds-unmasked-{colours[0]}", total, prompt(colours[0]), *load, *unmasked))
        edits.append(train(f"sds-{colours[0]}", total, prompt(colours[0]), *load, "pipeline.model.rule:sds"))
    camera_path = args.render_dir / "ed_nerf_turntable.json"
    _run([_bin("mmstyle-camera-path"), "--load-config", str(edits[0]), "--output", str(camera_path)])
    video = args.render_dir / f"ed_nerf_{colours[0]}.mp4"
    _run([_bin("ns-render"), "camera-path", "--load-config", str(edits[0]), "--camera-path-filename",
          str(camera_path), "--rendered-output-names", "rgb", "--output-path", str(video)])  # fmt: skip
    _run([_bin("mmstyle-ed-eval"), "--source-config", str(stage1), *eval_extra,
          "--edited-configs", *map(str, edits), "--output-dir", str(args.render_dir / "ed_nerf_eval")])  # fmt: skip
    print(
        f"ed-nerf demo done in {time.perf_counter() - start:.0f} s: video {video}; contact sheet "
        f"{args.render_dir / 'ed_nerf_eval' / 'contact_sheet.png'}; runs {runs}"
    )
    return [video]


def head_stylize_demo(args: DemoArgs) -> list[Path]:
    """The head-stylize demo (see the module docstring); returns the path of the video."""
    data = args.data if args.data != Path("data/object360") else Path("data/head")
    start = time.perf_counter()
    _run([_bin("mmstyle-scene"), "--kind", "head", "--portrait", args.head_portrait, "--out", str(data),
          "--resolution", str(args.resolution), "--num-views", str(args.num_views)])  # fmt: skip
    common = ["--data", str(data), "--output-dir", str(args.output_dir), "--vis", "tensorboard"]
    _run([_bin("ns-train"), "mmstyle-base", *common, "--timestamp", "base",
          "--max-num-iterations", str(args.head_base_steps)])  # fmt: skip
    base = args.output_dir / data.name / "mmstyle-base" / "base"
    _run([_bin("ns-train"), "head-stylize", *common, "--timestamp", "stylized",
          "--load-dir", str(base / "nerfstudio_models"), "--max-num-iterations", str(args.head_steps),
          "--pipeline.guidance.model-path", str(args.guidance_model),
          "--pipeline.model.prompt", args.head_prompt, "--optimizers.grid.scheduler.max-steps", str(args.head_steps),
          *args.head_extra])  # fmt: skip
    stylized = args.output_dir / data.name / "head-stylize" / "stylized" / "config.yml"
    camera_path = args.render_dir / "head_turntable.json"
    _run([_bin("mmstyle-camera-path"), "--load-config", str(stylized), "--output", str(camera_path)])
    video = args.render_dir / "head_stylize.mp4"
    _run([_bin("ns-render"), "camera-path", "--load-config", str(stylized), "--camera-path-filename",
          str(camera_path), "--rendered-output-names", "rgb", "--output-path", str(video)])  # fmt: skip
    evaluation = args.render_dir / "head_stylize_eval"
    _run([_bin("mmstyle-head-eval"), "--source-config", str(base / "config.yml"), "--stylized-configs",
          str(stylized), "--labels", "stylized", "--output-dir", str(evaluation)])  # fmt: skip
    print(
        f"head-stylize demo done in {time.perf_counter() - start:.0f} s: video {video}; contact sheet "
        f"{evaluation / 'contact_sheet.png'}; runs {base.parent.parent}"
    )
    return [video]


def main(args: DemoArgs) -> list[Path]:
    """Runs the demo; returns the paths of the videos."""
    if args.method == "ed-nerf":
        return ed_nerf_demo(args)
    if args.method == "head-stylize":
        return head_stylize_demo(args)
    if args.method == "tunemv3d":
        return tunemv3d_demo(args)
    from mmstyle_ns.style.sources import parse_style_specs

    names = [source.name for source in parse_style_specs(args.styles)]
    start = time.perf_counter()
    _run([_bin("mmstyle-scene"), "--kind", args.kind, "--out", str(args.data),
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
