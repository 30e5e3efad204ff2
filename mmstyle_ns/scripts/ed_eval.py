"""``mmstyle-ed-eval``: figures of trained ``ed-nerf`` runs on the held-out views of their scene.

* Stage 1 (``--source-config``, a run that has not edited yet, and optionally ``--ablation-config``, the same
  trained without the refinement layer): PSNR of the decoded renders against the images and against the VAE round
  trip of the same images (the best a latent NeRF can reach through that VAE).
* Each edited run (``--edited-configs``, runs continued from the source run with ``--load-dir``): whether the
  edited views show the target colour (the toy world's independent colour checker, which finds the objects
  itself), the PSNR outside the mask against the source run's renders
  (how much of the rest of the scene the edit kept), and the CLIP directional similarity of the edit
  (source renders -> edited renders vs. source prompt -> target prompt) with any open_clip model (the toy CLIP by
  default).

Writes ``metrics.json`` and ``contact_sheet.png`` (rows: the images, the VAE round trip, the source run, every
edited run) to ``--output-dir``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro


@dataclass
class EDEvalArgs:
    """Evaluate ed-nerf runs: stage-1 PSNR vs. the VAE round trip, edit success, background PSNR, CLIP direction."""

    source_config: Path
    """config.yml of the unedited (stage-1) run."""
    edited_configs: tuple[Path, ...] = ()
    """config.yml of each edited run (continued from the source run)."""
    ablation_config: Path | None = None
    """config.yml of a stage-1 run without the refinement layer (the paper's ablation), if any."""
    output_dir: Path = Path("renders/ed_nerf_eval")
    """Where metrics.json and contact_sheet.png are written."""
    clip_model: str = "toy-clip"
    """open_clip model of the directional score."""
    clip_checkpoint: str | None = "examples/toy-clip"
    """Its weights (None: no CLIP figure)."""
    sheet_columns: int = 6
    """Held-out views shown per row of the contact sheet."""


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    err = (a - b) ** 2
    if mask is not None:
        err = err[mask]
    mse = float(np.mean(err)) if err.size else float("nan")
    return float(-10.0 * np.log10(max(mse, 1e-12)))


def _load(config: Path) -> Any:
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, step = eval_setup(config, test_mode="test")
    from mmstyle_ns.models.ed_nerf import EDNeRFModel

    if not isinstance(pipeline.model, EDNeRFModel):
        raise ValueError(f"{config} is not an ed-nerf run")
    return pipeline, step


@torch.no_grad()
def _renders(pipeline: Any) -> np.ndarray:
    dataset = pipeline.datamanager.eval_dataset
    model = pipeline.model
    model.eval()
    frames = [
        model.get_outputs_for_camera(dataset.cameras[i : i + 1])["rgb"].clamp(0, 1).cpu().numpy()
        for i in range(len(dataset))
    ]
    return np.stack(frames)


def _images_and_masks(pipeline: Any) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    dataset = pipeline.datamanager.eval_dataset
    images, masks = [], []
    for i in range(len(dataset)):
        data = dataset.get_data(i, image_type="float32")
        image = pipeline.model.renderer_rgb.blend_background(data["image"], "white")  # as the latents were encoded
        images.append(image.numpy())
        if "mask" in data:
            masks.append(data["mask"][..., 0].numpy().astype(bool))
    latents = pipeline.eval_latents
    with torch.no_grad():  # in small batches (a GPU holds a few decodes of large views at a time)
        decoded = [pipeline.backbone.decode_latents(latents[i : i + 4]) for i in range(0, len(latents), 4)]
        round_trip = torch.cat(decoded).permute(0, 2, 3, 1).cpu().numpy()
    return np.stack(images), (np.stack(masks) if masks else None), round_trip


def main(args: EDEvalArgs) -> dict[str, Any]:
    """Runs the evaluation; returns the metrics written to ``metrics.json``."""
    from mmstyle_ns.metrics import contact_sheet, save_png
    from mmstyle_ns.teacher.checker import classify_colour
    from mmstyle_ns.teacher.vocab import COLOURS

    for config in (args.source_config, *args.edited_configs, *([args.ablation_config] if args.ablation_config else [])):
        if not config.is_file():
            raise ValueError(f"{config} does not exist: pass the config.yml of an ed-nerf run")
    clip = None
    if args.clip_checkpoint is not None and args.edited_configs:  # checked (and loaded) before the slow part
        from mmstyle_ns.clip.loader import load_clip

        clip = load_clip(args.clip_model, args.clip_checkpoint)
    source, source_step = _load(args.source_config)
    images, masks, round_trip = _images_and_masks(source)
    source_frames = _renders(source)
    report: dict[str, Any] = {
        "views": len(images),
        "stage1": {
            "step": source_step,
            "psnr_vs_images": float(np.mean([_psnr(f, g) for f, g in zip(source_frames, images, strict=True)])),
            "psnr_vs_vae_round_trip": float(
                np.mean([_psnr(f, r) for f, r in zip(source_frames, round_trip, strict=True)])
            ),
            "vae_round_trip_psnr": float(np.mean([_psnr(r, g) for r, g in zip(round_trip, images, strict=True)])),
        },
    }
    if args.ablation_config is not None:
        ablation, _ = _load(args.ablation_config)
        frames = _renders(ablation)
        report["stage1_without_refinement"] = {
            "psnr_vs_images": float(np.mean([_psnr(f, g) for f, g in zip(frames, images, strict=True)])),
            "psnr_vs_vae_round_trip": float(np.mean([_psnr(f, r) for f, r in zip(frames, round_trip, strict=True)])),
        }
    columns = np.linspace(0, len(images) - 1, min(args.sheet_columns, len(images))).round().astype(int)
    rows = [[images[c] for c in columns], [round_trip[c] for c in columns], [source_frames[c] for c in columns]]
    labels = ["images", "VAE round trip", f"stage 1 (step {source_step})"]
    report["edits"] = []
    for config in args.edited_configs:
        edited, step = _load(config)
        model_config = edited.model.config
        frames = _renders(edited)
        target = next((c for c in COLOURS if c in model_config.target_prompt.split()), None)
        read = [classify_colour((frame * 255 + 0.5).astype(np.uint8)).colour for frame in frames]
        outside = None if masks is None else ~masks
        entry: dict[str, Any] = {
            "config": str(config),
            "step": step,
            "rule": type(model_config.rule).__name__.removesuffix("Config").lower(),
            "masked": bool(masks is not None and model_config.use_masks),
            "source_prompt": model_config.source_prompt,
            "target_prompt": model_config.target_prompt,
            "target_colour": target,
            "colours_read": read,
            "success": float(np.mean([r == target for r in read])) if target is not None else None,
            "psnr_outside_mask_vs_source": (
                float(np.mean([_psnr(f, s, o) for f, s, o in zip(frames, source_frames, outside, strict=True)]))
                if outside is not None
                else None
            ),
            "psnr_vs_source": float(np.mean([_psnr(f, s) for f, s in zip(frames, source_frames, strict=True)])),
        }
        if clip is not None:
            from mmstyle_ns.metrics.clip_space import directional_similarity

            texts = clip.encode_texts([model_config.source_prompt, model_config.target_prompt])
            score = directional_similarity(
                clip.encode_images(source_frames), clip.encode_images(frames), texts[0], texts[1]
            )
            entry["clip_directional"] = score.mean
        report["edits"].append(entry)
        rows.append([frames[c] for c in columns])
        labels.append(f"{entry['rule']}{' masked' if entry['masked'] else ''}: {model_config.target_prompt}"[:40])
    args.output_dir.mkdir(parents=True, exist_ok=True)
    save_png(args.output_dir / "contact_sheet.png", contact_sheet(rows, row_labels=labels))
    (args.output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    stage1 = report["stage1"]
    print(
        f"stage 1: {stage1['psnr_vs_images']:.2f} dB vs the images, {stage1['psnr_vs_vae_round_trip']:.2f} dB vs the "
        f"VAE round trip (which is {stage1['vae_round_trip_psnr']:.2f} dB from the images)"
    )
    if "stage1_without_refinement" in report:
        ablation_figures = report["stage1_without_refinement"]
        print(
            f"  without the refinement layer: {ablation_figures['psnr_vs_images']:.2f} dB / "
            f"{ablation_figures['psnr_vs_vae_round_trip']:.2f} dB"
        )
    for entry in report["edits"]:
        background = entry["psnr_outside_mask_vs_source"]
        print(
            f"{entry['rule']}{' masked' if entry['masked'] else ''} -> {entry['target_prompt']!r}: target colour in "
            + (f"{entry['success']:.0%}" if entry["success"] is not None else "(no colour word in the prompt)")
            + f" of views; PSNR vs source {entry['psnr_vs_source']:.2f} dB"
            + (f", outside the mask {background:.2f} dB" if background is not None else "")
            + (f"; CLIP directional {entry['clip_directional']:.3f}" if "clip_directional" in entry else "")
        )
    print(f"wrote {args.output_dir / 'metrics.json'} and {args.output_dir / 'contact_sheet.png'}")
    return report


def entrypoint() -> None:
    """Console entry point: bad inputs end with one message and exit status 2."""
    from mmstyle_ns.guidance.checks import GuidanceModelError

    args = tyro.cli(EDEvalArgs)
    try:
        main(args)
    except (ValueError, GuidanceModelError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
