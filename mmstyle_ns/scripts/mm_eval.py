"""``mmstyle-mm-eval``: consistency, style match and a contact sheet for a trained ``mm-nerf`` run.

Renders a turntable fitted to the training cameras and, for every style, measures

* short- and long-range consistency: warped RMSE / masked error between frames ``gap`` apart (gaps 1 and 7 by
  default), the warp given by the rendered depth and the known cameras — for the stylized renders and for a
  per-view 2D stylization of the same (unstylized) views, the baseline MM-NeRF improves on;
* style match: cosine similarity of the Magenta style vector of the renders to the style's own, for ours, the
  unstylized renders and the per-view 2D stylizations (the ceiling), and the share of the 2D gain ours reaches,
  ``(ours - unstylized) / (2D - unstylized)``;
* with a CLIP (the run's own when it embeds styles with CLIP, or ``--clip-model``/``--clip-checkpoint``): the same
  style match in CLIP space, the image-text similarity of the renders to each text style's prompt, and how well
  text styles and the images made from them agree in CLIP space
  (:func:`~mmstyle_ns.metrics.clip_space.modality_agreement`).

Writes ``metrics.json`` and ``contact_sheet.png`` (rows: styles, columns: views, then a zoomed crop of one view so
that texture, not only colour, can be judged) into the output folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro
from rich.console import Console
from rich.table import Table

CONSOLE = Console()


@dataclass
class MMEvalArgs:
    """Evaluate a trained mm-nerf run: consistency vs. per-view 2D stylization, style match, contact sheet."""

    load_config: Path
    """config.yml of the trained mm-nerf run."""
    output_dir: Path = Path("renders/mm_nerf_eval")
    """Where metrics.json and contact_sheet.png are written."""
    num_frames: int = 36
    """Frames of the turntable the metrics are computed on."""
    gaps: tuple[int, ...] = (1, 7)
    """Frame gaps of the consistency measure (short and long range)."""
    sheet_columns: int = 6
    """Views shown per style in the contact sheet."""
    zoom: int = 3
    """Enlargement of the zoomed crop (the sheet's last column; 0: none)."""
    zoom_fraction: float = 0.4
    """Side of the zoomed crop, as a fraction of the frame's shorter side (centred on the object)."""
    baseline: bool = True
    """Also stylize every frame independently in 2D (the per-view baseline); the slow part of the evaluation."""
    clip_model: str | None = None
    """open_clip model name for the CLIP-space figures (e.g. toy-clip, ViT-B-32); default: the run's own CLIP when
    it embeds styles with CLIP, else no CLIP figures."""
    clip_checkpoint: str | None = None
    """CLIP weights for the CLIP-space figures (a file, a folder such as examples/toy-clip, or a cached tag)."""


def turntable_cameras(config_path: Path, num_frames: int):  # noqa: ANN201 - nerfstudio Cameras
    """nerfstudio cameras on the turntable fitted to the run's training cameras."""
    from nerfstudio.cameras.cameras import Cameras, CameraType

    from mmstyle_ns.scripts.camera_path import load_run_cameras, turntable

    c2ws, fov, width, height = load_run_cameras(config_path)
    poses = torch.from_numpy(turntable(c2ws, num_frames)[:, :3]).float()
    focal = height / (2 * math.tan(math.radians(fov) / 2))
    return Cameras(
        camera_to_worlds=poses,
        fx=focal,
        fy=focal,
        cx=width / 2,
        cy=height / 2,
        width=width,
        height=height,
        camera_type=CameraType.PERSPECTIVE,
    )


def main(args: MMEvalArgs) -> dict:
    """Runs the evaluation; returns the metrics written to ``metrics.json``."""
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.engine import RunConfigError, load_run_config
    from mmstyle_ns.metrics import contact_sheet, save_png, style_match_report, warped_error
    from mmstyle_ns.metrics.sheets import zoomed_crop
    from mmstyle_ns.metrics.style_match import gain_share, style_similarity
    from mmstyle_ns.models.mm_nerf import ORIGINAL, MMNeRFModel
    from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipelineConfig

    config = load_run_config(args.load_config)  # a missing or foreign config: one message, before any set-up
    if not isinstance(config.pipeline, MMNeRFPipelineConfig):
        raise RunConfigError(f"--load-config {args.load_config} is a {config.method_name} run, not an mm-nerf run")
    _, pipeline, _, _ = eval_setup(args.load_config, test_mode="inference")
    model = pipeline.model
    if not isinstance(model, MMNeRFModel):
        raise RunConfigError(f"--load-config {args.load_config} is not an mm-nerf run")
    clip = _clip_for(args, pipeline)  # before the slow part: bad CLIP settings fail at once
    cameras = turntable_cameras(args.load_config, args.num_frames).to(pipeline.device)
    names = [ORIGINAL, *model.style_names]
    frames: dict[str, list[np.ndarray]] = {name: [] for name in names}
    depths, valids = [], []
    with torch.no_grad():
        for i in range(len(cameras)):
            outputs = model.get_outputs_for_camera(cameras[i : i + 1])
            for name in names:
                frames[name].append(outputs[name].clamp(0, 1).cpu().numpy())
            depths.append(outputs["depth"][..., 0].cpu().numpy())
            valids.append((outputs["accumulation"][..., 0] > 0.5).cpu().numpy())
    depth, valid = np.stack(depths), np.stack(valids)
    poses = cameras.camera_to_worlds.cpu().numpy()
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).cpu().numpy()

    def consistency(stack: np.ndarray) -> dict[str, float]:
        result = {}
        for gap in args.gaps:
            err = warped_error(stack, depth, poses, intrinsics, gap=gap, valid=valid)
            result[f"rmse_gap{gap}"] = float(err["mean_rmse"])
            result[f"mae_gap{gap}"] = float(err["mean_mae"])
        return result

    from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipeline

    assert isinstance(pipeline, MMNeRFPipeline)
    magenta = pipeline.extractor.stylizer  # style match is measured in Magenta's style space, whatever trained
    prepared = {p.source.name: p for p in pipeline.prepared}
    report: dict = {"config": str(args.load_config), "frames": args.num_frames, "styles": {}}
    report["original"] = consistency(np.stack(frames[ORIGINAL]))
    if clip is not None:
        report["clip"] = {"model": clip.name}
    baseline_frames: dict[str, np.ndarray] = {}
    for name in model.style_names:
        vector = magenta.style_vector(prepared[name].image)
        ours = np.stack(frames[name])
        entry = {"ours": consistency(ours)}
        if args.baseline:  # the run's own 2D stylizer
            own = pipeline.stylizer.style_vector(prepared[name].image)
            per_view = pipeline.stylizer.stylize(np.stack(frames[ORIGINAL]), own, pipeline.config.style_strength)
            per_view = np.where(valid[..., None], per_view, 1.0)  # same white background as the renders
            baseline_frames[name] = per_view
            entry["per_view_2d"] = consistency(per_view)
        step = max(1, len(ours) // 6)  # the same frames for ours, the unstylized renders and the 2D ceiling
        match = style_match_report(ours[::step], np.stack(frames[ORIGINAL])[::step], vector, magenta)
        entry["style_match"] = {"stylized": match["stylized"], "unstylized": match["unstylized"], "gain": match["gain"]}
        if name in baseline_frames:
            ceiling = style_similarity(baseline_frames[name][::step], vector, magenta)
            entry["style_match"]["per_view_2d"] = ceiling
            entry["style_match"]["gain_share"] = gain_share(match["stylized"], match["unstylized"], ceiling)
        if clip is not None:
            entry.update(_clip_figures(clip, ours, np.stack(frames[ORIGINAL]), prepared[name]))
        report["styles"][name] = entry
    if clip is not None:
        with_prompts = [p for p in prepared.values() if p.prompt]
        if len(with_prompts) >= 2:
            from mmstyle_ns.metrics.clip_space import modality_agreement

            texts = clip.encode_texts([str(p.prompt) for p in with_prompts])
            images = clip.encode_images(np.stack([_square(p.image) for p in with_prompts]))
            report["clip"]["modality_agreement"] = modality_agreement(texts, images).as_dict() | {
                "styles": [p.source.name for p in with_prompts]
            }

    args.output_dir.mkdir(parents=True, exist_ok=True)
    columns = np.linspace(0, args.num_frames - 1, args.sheet_columns).round().astype(int)
    zoom_view = int(columns[len(columns) // 2])
    centre = _object_centre(valid[zoom_view])

    def row_of(stack: Any) -> list[np.ndarray]:
        cells = [stack[c] for c in columns]
        if args.zoom > 0:
            cells.append(zoomed_crop(stack[zoom_view], centre, args.zoom_fraction, args.zoom))
        return cells

    rows = [row_of(frames[name]) for name in names]
    labels = list(names)
    for name, per_view in baseline_frames.items():
        rows.append(row_of(per_view))
        labels.append(f"{name} (2D per view)")
    col_labels = [f"view {c}" for c in columns] + ([f"view {zoom_view} x{args.zoom}"] if args.zoom > 0 else [])
    sheet = contact_sheet(rows, row_labels=labels, col_labels=col_labels)
    save_png(args.output_dir / "contact_sheet.png", sheet)
    (args.output_dir / "metrics.json").write_text(json.dumps(report, indent=2))

    table = Table(title="mm-nerf: consistency (warped RMSE, lower is better) and style match")
    table.add_column("style")
    for gap in args.gaps:
        table.add_column(f"ours gap {gap}")
        table.add_column(f"2D gap {gap}")
    table.add_column("style sim (ours / unstylized / 2D)")
    table.add_column("share of 2D gain")
    if clip is not None:
        table.add_column(f"CLIP style sim ({clip.name})")
    for name, entry in report["styles"].items():
        cells = []
        for gap in args.gaps:
            cells.append(f"{entry['ours'][f'rmse_gap{gap}']:.4f}")
            base = entry.get("per_view_2d", {}).get(f"rmse_gap{gap}", float("nan"))
            cells.append(f"{base:.4f}")
        sm = entry["style_match"]
        cells.append(f"{sm['stylized']:.3f} / {sm['unstylized']:.3f} / {sm.get('per_view_2d', float('nan')):.3f}")
        cells.append(f"{sm.get('gain_share', float('nan')):.2f}")
        if clip is not None:
            cm = entry["clip_style_match"]
            cells.append(f"{cm['stylized']:.3f} / {cm['unstylized']:.3f}")
        table.add_row(name, *cells)
    CONSOLE.print(table)
    agreement = report.get("clip", {}).get("modality_agreement")
    if agreement is not None:
        CONSOLE.print(
            f"CLIP text/image agreement of the text styles: matched {agreement['matched']:.3f}, unrelated "
            f"{agreement['unrelated']:.3f}, retrieval {agreement['retrieval']:.0%}"
        )
    CONSOLE.print(f"wrote {args.output_dir / 'metrics.json'} and {args.output_dir / 'contact_sheet.png'}")
    return report


def _clip_for(args: MMEvalArgs, pipeline: Any) -> Any:
    """The CLIP of the CLIP-space figures (``--clip-*``, else the run's own when it embeds with CLIP), or None."""
    from mmstyle_ns.clip.loader import ClipFlags, load_clip

    if args.clip_checkpoint is not None:
        from mmstyle_ns.clip.config import TOY_CLIP_NAME

        folder = Path(args.clip_checkpoint)
        folder = folder if folder.is_dir() else folder.parent
        default = TOY_CLIP_NAME if (folder / f"{TOY_CLIP_NAME}.json").is_file() else "ViT-B-32"
        name = args.clip_model if args.clip_model is not None else default
        return load_clip(name, args.clip_checkpoint, pipeline.device, ClipFlags())
    if args.clip_model is not None:
        raise ValueError("--clip-model needs --clip-checkpoint (the weights)")
    if pipeline.extractor.config.embedding == "clip":
        return pipeline.extractor.clip()
    return None


def _object_centre(mask: np.ndarray) -> tuple[float, float]:
    """Centre of a frame's opaque pixels as ``(row, column)`` fractions (the frame's centre when none)."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.5, 0.5
    return float(rows.mean() + 0.5) / mask.shape[0], float(cols.mean() + 0.5) / mask.shape[1]


def _square(image: np.ndarray) -> np.ndarray:
    """A style image cropped to its central square (what CLIP's preprocessing sees)."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def _clip_figures(clip: Any, ours: np.ndarray, original: np.ndarray, prepared: Any) -> dict[str, Any]:
    """CLIP style match of a style's renders (and image-text similarity to its prompt, for text/audio styles)."""
    import torch

    from mmstyle_ns.metrics import style_match_report
    from mmstyle_ns.metrics.clip_space import image_text_similarity

    step = max(1, len(ours) // 6)
    match = style_match_report(ours[::step], original[::step], clip.style_vector(prepared.image), clip)
    figures: dict[str, Any] = {
        "clip_style_match": {"stylized": match["stylized"], "unstylized": match["unstylized"], "gain": match["gain"]}
    }
    if prepared.prompt:
        text = clip.encode_texts([prepared.prompt])[0]
        figures["clip_text_similarity"] = {
            "prompt": prepared.prompt,
            "stylized": float(torch.mean(image_text_similarity(clip.encode_images(ours[::step]), text))),
            "unstylized": float(torch.mean(image_text_similarity(clip.encode_images(original[::step]), text))),
        }
    return figures


def entrypoint() -> None:
    """Console entry point."""
    from mmstyle_ns.engine import reported_run_config_errors
    from mmstyle_ns.scripts import reported_input_errors

    args = tyro.cli(MMEvalArgs)
    with reported_run_config_errors("Cannot evaluate this run"), reported_input_errors("Cannot evaluate this run"):
        main(args)


if __name__ == "__main__":
    entrypoint()
