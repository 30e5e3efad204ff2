"""head-stylize's ablation table, measured in one run: the paper's recipe against each part taken out.

From one trained ``mmstyle-base`` head (``--base-config``), the same stylization (prompt, steps, teacher) is run as

* ``ld``: rank-weighted likelihood distillation over 2 x 2 mirrored view grids (the method's recipe);
* ``sds``: score distillation sampling instead of LD;
* ``no-rank``: LD without the SVD rank weighting;
* ``no-mirror``: 2 x 2 view grids without mirror cameras;
* ``no-grid``: one view (and its mirror) per step instead of a 2 x 2 grid;

then ``mmstyle-head-eval`` measures every row (identity, CLIP text alignment, left/right consistency) and draws the
contact sheet (rows: ablations, columns: yaws). Prints the table with the time per step of each row.

    python benchmarks/head_stylize.py --base-config outputs/head/mmstyle-base/base/config.yml
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

SAMPLING: dict[str, list[str]] = {
    "no-mirror": ["pipeline.datamanager.sampling:view-set", "--pipeline.datamanager.sampling.grid-k", "2"],
    "no-grid": ["pipeline.datamanager.sampling:mirrored-view-set", "--pipeline.datamanager.sampling.grid-k", "1"],
}
"""The rows whose view sampling differs from the method's default (2 x 2 mirrored grids)."""

ROWS = ("ld", "sds", "no-rank", "no-mirror", "no-grid")
"""The ablation rows."""


def row_arguments(row: str, min_step_ratio: float) -> list[str]:
    """Extra ns-train arguments of one row (subcommands last, the data manager's before the model's, as tyro reads
    them); every row samples timesteps from ``min_step_ratio`` up."""
    if row not in ROWS:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    rule = "sds" if row == "sds" else "ld"
    arguments = [*SAMPLING.get(row, []), f"pipeline.model.rule:{rule}"]
    arguments += ["--pipeline.model.rule.min-step-ratio", str(min_step_ratio)]
    if row == "no-rank":
        arguments += ["--pipeline.model.rule.rank-weights", "None"]
    return arguments


@dataclass
class Args:
    base_config: Path
    """config.yml of the trained mmstyle-base head."""
    prompt: str = "a cartoon of a blue sphere on a plain floor"
    """What the head should look like."""
    steps: int = 100
    """Stylization steps of every row."""
    lr: float = 0.02
    """Learning rate of the colours (the method's default is 0.005; the toy teacher needs a stronger push to change
    a head within a benchmark's steps)."""
    min_step_ratio: float = 0.5
    """Smallest diffusion timestep of every row, as a fraction of the schedule (the toy teacher changes colours
    only at high noise levels; lower timesteps add grain)."""
    guidance_model: Path = Path("examples/toy-teacher")
    """The diffusion model."""
    rows: tuple[str, ...] = ROWS
    """Which rows to run (of ld, sds, no-rank, no-mirror, no-grid)."""
    output_dir: Path = Path("outputs/head_stylize_benchmark")
    """Where the runs, metrics.json and contact_sheet.png go."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def main(args: Args) -> None:
    import yaml

    config = yaml.load(args.base_config.read_text(), Loader=yaml.Loader)
    data = Path(config.pipeline.datamanager.data)
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    for row in args.rows:
        start = time.perf_counter()
        command = [
            _bin("ns-train"), "head-stylize", "--data", str(data), "--output-dir", str(args.output_dir),
            "--timestamp", row, "--vis", "tensorboard", "--max-num-iterations", str(args.steps),
            "--load-dir", str(args.base_config.parent / "nerfstudio_models"),
            "--pipeline.guidance.model-path", str(args.guidance_model), "--pipeline.model.prompt", args.prompt,
            "--optimizers.grid.optimizer.lr", str(args.lr), "--optimizers.grid.scheduler.max-steps", str(args.steps),
            *row_arguments(row, args.min_step_ratio),
        ]  # fmt: skip
        log = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        found = re.findall(r"Trainer.train_iteration: ([0-9.]+)", log)
        seconds[row] = float(found[-1]) if found else (time.perf_counter() - start) / args.steps
        runs[row] = args.output_dir / data.name / "head-stylize" / row / "config.yml"
        print(f"{row}: {seconds[row]:.2f} s per step", flush=True)
    evaluation = args.output_dir / "eval"
    subprocess.run(
        [_bin("mmstyle-head-eval"), "--source-config", str(args.base_config), "--stylized-configs",
         *map(str, runs.values()), "--labels", *runs, "--output-dir", str(evaluation)],
        check=True,
    )  # fmt: skip
    report = json.loads((evaluation / "metrics.json").read_text())
    print(
        f"\n{args.steps} steps, colour lr {args.lr}, timesteps from {args.min_step_ratio} of the schedule, "
        f"prompt {args.prompt!r}, teacher {args.guidance_model}"
    )
    print(
        "| row | identity distance | frontal views < 0.6 | CLIP to the prompt (unstylized) | left/right PSNR | s/step |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    unstylized = report["unstylized"]["left_right_psnr"]
    for figures in report["stylized"]:
        ident = figures["identity"]
        mean = ident["mean_distance"]
        match = ident["match_rate"]
        print(
            f"| {figures['run']} | {'-' if mean is None else f'{mean:.3f}'} | "
            f"{'-' if match is None else f'{100 * match:.0f}%'} ({ident['num_detected']} views) | "
            f"{figures.get('clip_similarity', float('nan')):.3f} "
            f"({figures.get('unstylized_clip_similarity', float('nan')):.3f}) | "
            f"{figures['left_right_psnr']:.2f} dB | {seconds[figures['run']]:.2f} |"
        )
    print(f"| unstylized | 0 | - | - | {unstylized:.2f} dB | - |")
    print(f"contact sheet: {evaluation / 'contact_sheet.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
