"""``mmstyle-clip``: train and evaluate the toy CLIP of the embedded world.

Examples::

    mmstyle-clip train --output examples/toy-clip --threads 2
    mmstyle-clip evaluate --clip-model toy-clip --clip-checkpoint examples/toy-clip --output renders/toy_clip_eval

The trained folder is used like real CLIP weights wherever the package takes a CLIP, e.g.
``--pipeline.model.style-extractor.clip-model toy-clip --pipeline.model.style-extractor.clip-checkpoint
examples/toy-clip``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import tyro

from mmstyle_ns.clip.config import ClipEvalConfig, ClipTrainConfig


@dataclass
class ClipTrainCommand(ClipTrainConfig):
    """Train the toy CLIP on generated toy-world pictures, save it in open_clip's layout, then evaluate it."""

    evaluate: bool = True
    """Evaluate the saved model afterwards (report.json and sheet.png in the output folder)."""


def entrypoint() -> None:
    """Console-script entry point (``mmstyle-clip {train,evaluate}``)."""
    # Passive OpenMP waiting keeps torch fast when another process shares the cores; set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    config = tyro.extras.subcommand_cli_from_dict(
        {"train": ClipTrainCommand, "evaluate": ClipEvalConfig},
        description="Toy CLIP: a small contrastive image-text model of the embedded scenes' world.",
    )
    from mmstyle_ns.clip.evaluate import evaluate_clip, format_report
    from mmstyle_ns.clip.loader import ClipLoadError
    from mmstyle_ns.guidance.checks import GuidanceModelError

    try:
        if isinstance(config, ClipTrainCommand):
            from mmstyle_ns.clip.train import train_clip

            folder = train_clip(config)
            if not config.evaluate:
                return
            config = ClipEvalConfig(
                clip_checkpoint=str(folder), output=folder, device=config.device, threads=config.threads
            )
        report = evaluate_clip(config)
        print(format_report(report))
        print(f"Wrote {config.output / 'report.json'} and {config.output / 'sheet.png'}")
    except (ClipLoadError, GuidanceModelError, FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
