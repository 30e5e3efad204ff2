"""``mmstyle-head-eval``: identity, text alignment and left/right consistency of stylized heads.

Every run (``--source-config``, the unstylized head, and each ``--stylized-configs`` run of the same scene) is
rendered from the same cameras: an orbit at the training cameras' mean height and distance around their common
look-at point, at the yaws of ``--identity-yaws`` and ``--sheet-yaws``. Yaw 0 looks at the face: it lies in the
head's symmetry plane (estimated from the training cameras' layout and images, see
:func:`~mmstyle_ns.data.datamanagers.estimate_symmetry_plane`), on the side where the unstylized render shows a
detectable face.

* identity (:mod:`mmstyle_ns.metrics.identity`, dlib): per frontal-ish yaw, the distance between the face
  embeddings of the unstylized and the stylized render (face box from the unstylized one), as the mean distance,
  the share of views under dlib's 0.6 threshold and the mean cosine similarity; views without a detectable face
  are counted, not measured;
* text alignment (the toy CLIP by default): CLIP similarity of the renders to the run's prompt, stylized and
  unstylized;
* left/right consistency: PSNR between the render at yaw ``+a`` and the horizontally flipped render at ``-a`` (the
  mirror camera about the symmetry plane);
* FID against ``--fid-reference`` when an FID implementation that needs no download is available.

Writes ``metrics.json`` and ``contact_sheet.png`` (rows: runs, columns: ``--sheet-yaws``) to ``--output-dir``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro


@dataclass
class HeadEvalArgs:
    """Evaluate head stylizations: identity (dlib), CLIP text alignment, left/right consistency, contact sheet."""

    source_config: Path
    """config.yml of the unstylized head (the mmstyle-base run the stylizations started from)."""
    stylized_configs: tuple[Path, ...] = ()
    """config.yml of each stylized run of the same scene."""
    labels: tuple[str, ...] = ()
    """Row label of each stylized run (default: its run folder's name)."""
    prompt: str | None = None
    """Prompt of the text alignment (default: each run's --pipeline.model.prompt)."""
    identity_yaws: tuple[float, ...] = (-40.0, -30.0, -20.0, -10.0, 0.0, 10.0, 20.0, 30.0, 40.0)
    """Yaws (degrees from the face) of the frontal-ish views whose identity is measured."""
    sheet_yaws: tuple[float, ...] = (-90.0, -45.0, 0.0, 45.0, 90.0, 135.0, 180.0)
    """Yaws of the contact sheet's columns (all the way round, the back of the head included)."""
    output_dir: Path = Path("renders/head_eval")
    """Where metrics.json and contact_sheet.png are written."""
    clip_model: str = "toy-clip"
    """open_clip model of the text alignment."""
    clip_checkpoint: str | None = "examples/toy-clip"
    """Its weights (None: no CLIP figure)."""
    fid_reference: Path | None = None
    """A folder of reference images for FID (needs an FID implementation with its weights available offline)."""


@dataclass
class Orbit:
    """Where the evaluation cameras are: look-at point, up axis, the yaw-0 direction and the camera distance."""

    centre: np.ndarray
    up: np.ndarray
    front: np.ndarray
    height: float
    radius: float

    def pose(self, yaw_deg: float) -> np.ndarray:
        """Camera-to-world ``[3, 4]`` at ``yaw_deg`` (positive: towards ``up x front``)."""
        from mmstyle_ns.data.cameras import look_at

        side = np.cross(self.up, self.front)
        a = math.radians(yaw_deg)
        eye = self.centre + self.up * self.height + self.radius * (math.cos(a) * self.front + math.sin(a) * side)
        return look_at(eye, self.centre, self.up)[:3]


def _load(config: Path) -> tuple[Any, int]:
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, step = eval_setup(config, test_mode="test")
    return pipeline, int(step)


def _cameras(template: Any, poses: list[np.ndarray]) -> Any:
    """Cameras with the template's intrinsics at the given poses."""
    from nerfstudio.cameras.cameras import Cameras

    n = len(poses)
    return Cameras(
        camera_to_worlds=torch.from_numpy(np.stack(poses)).float(),
        fx=template.fx[:1].expand(n, 1).clone(),
        fy=template.fy[:1].expand(n, 1).clone(),
        cx=template.cx[:1].expand(n, 1).clone(),
        cy=template.cy[:1].expand(n, 1).clone(),
        width=template.width[:1].expand(n, 1).clone(),
        height=template.height[:1].expand(n, 1).clone(),
        camera_type=template.camera_type[:1].expand(n, 1).clone(),
    )


@torch.no_grad()
def _render(pipeline: Any, cameras: Any) -> np.ndarray:
    """RGB renders ``[N, H, W, 3]`` in [0, 1]."""
    model = pipeline.model
    model.eval()
    frames = []
    for i in range(len(cameras)):
        rgb = model.get_outputs_for_camera(cameras[i : i + 1].to(model.device))["rgb"]
        frames.append(rgb.clamp(0, 1).cpu().numpy())
    return np.stack(frames)


def orbit_for(pipeline: Any, identity: Any) -> Orbit:
    """The evaluation orbit of a run's training cameras (see the module docstring)."""
    from mmstyle_ns.data.datamanagers import estimate_symmetry_plane, look_at_centre

    dataset = pipeline.datamanager.train_dataset
    c2ws = dataset.cameras.camera_to_worlds.double().numpy()
    centre = look_at_centre(dataset.cameras.camera_to_worlds).double().numpy()
    up = c2ws[:, :3, 1].mean(axis=0)  # nerfstudio's cameras: +y is the image's up
    up = up / np.linalg.norm(up)
    offsets = c2ws[:, :3, 3] - centre
    height = float(np.median(offsets @ up))
    horizontal = offsets - (offsets @ up)[:, None] * up
    radius = float(np.median(np.linalg.norm(horizontal, axis=-1)))
    images = torch.stack([dataset[i]["image"][..., :3].float().permute(2, 0, 1) for i in range(len(dataset))])
    thumbnails = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    normal, _ = estimate_symmetry_plane(dataset.cameras.camera_to_worlds, thumbnails, torch.from_numpy(centre))
    normal = normal.double().numpy()
    front = np.cross(normal, up)
    front = front / np.linalg.norm(front)
    orbit = Orbit(centre, up, front, height, radius)
    template = dataset.cameras
    views = _render(pipeline, _cameras(template, [orbit.pose(0.0), orbit.pose(180.0)]))
    faces = [identity.detect(view) for view in views]
    score = [-math.inf if face is None else float(face.score) for face in faces]
    if score[1] > score[0]:  # the face is on the other side of the plane
        orbit.front = -front
    return orbit


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float(-10.0 * np.log10(max(mse, 1e-12)))


def _fid(reference: Path, images: np.ndarray) -> dict[str, Any]:
    """FID of ``images`` against a folder, or why it was not computed."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, normalize=True)
    except Exception as error:  # the Inception weights are downloaded on first use; nothing is offline
        return {
            "fid": None,
            "why": f"no FID implementation with its weights is available offline ({type(error).__name__}); "
            "install torch-fidelity's Inception weights to compute it",
        }
    from PIL import Image

    files = sorted(p for p in reference.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) < 2:
        return {"fid": None, "why": f"{reference} holds fewer than 2 images"}
    height, width = int(images.shape[1]), int(images.shape[2])
    real = np.stack([np.asarray(Image.open(p).convert("RGB").resize((width, height))) / 255.0 for p in files])
    fid.update(torch.from_numpy(real).permute(0, 3, 1, 2).float(), real=True)
    fid.update(torch.from_numpy(images).permute(0, 3, 1, 2).float(), real=False)
    return {"fid": float(fid.compute()), "reference_images": len(files)}


def main(args: HeadEvalArgs) -> dict[str, Any]:
    """Runs the evaluation; returns the report written to metrics.json."""
    from mmstyle_ns.metrics.identity import FaceIdentity
    from mmstyle_ns.metrics.sheets import contact_sheet, save_png

    if args.labels and len(args.labels) != len(args.stylized_configs):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.stylized_configs)} stylized runs")
    for config in (args.source_config, *args.stylized_configs):
        if not config.is_file():
            raise ValueError(f"{config} is not a run's config.yml")
    identity = FaceIdentity()
    clip = None
    if args.clip_checkpoint is not None:
        from mmstyle_ns.clip.loader import load_clip

        clip = load_clip(args.clip_model, args.clip_checkpoint)
    source, _ = _load(args.source_config)
    orbit = orbit_for(source, identity)
    template = source.datamanager.train_dataset.cameras
    yaws = list(dict.fromkeys([*args.identity_yaws, *[-y for y in args.identity_yaws], *args.sheet_yaws]))
    cameras = _cameras(template, [orbit.pose(y) for y in yaws])
    index = {y: i for i, y in enumerate(yaws)}

    def measure(name: str, frames: np.ndarray, prompt: str | None, original: np.ndarray | None) -> dict[str, Any]:
        frontal = np.stack([frames[index[y]] for y in args.identity_yaws])
        mirrored = [(y, -y) for y in args.identity_yaws if y > 0]
        figures: dict[str, Any] = {
            "run": name,
            "left_right_psnr": float(np.mean([_psnr(frames[index[a]], frames[index[b]][:, ::-1]) for a, b in mirrored]))
            if mirrored
            else None,
        }
        if original is not None:
            report = identity.compare(np.stack([original[index[y]] for y in args.identity_yaws]), frontal)
            figures["identity"] = report.to_dict()
        if clip is not None and prompt:
            text = clip.encode_texts([prompt])
            images = clip.encode_images(list(frontal))
            figures["prompt"] = prompt
            figures["clip_similarity"] = float((images @ text.T).mean())
        return figures

    source_frames = _render(source, cameras)
    rows = [source_frames]
    labels = ["unstylized"]
    results = []
    for i, config in enumerate(args.stylized_configs):
        run, step = _load(config)
        frames = _render(run, cameras)
        prompt = args.prompt or getattr(run.model.config, "prompt", "") or None
        label = args.labels[i] if args.labels else config.parent.name
        figures = measure(label, frames, prompt, source_frames)
        figures["step"] = step
        figures["unstylized_clip_similarity"] = (
            measure("unstylized", source_frames, prompt, None).get("clip_similarity") if prompt else None
        )
        if args.fid_reference is not None:
            figures["fid"] = _fid(args.fid_reference, frames)
        results.append(figures)
        rows.append(frames)
        labels.append(label)
        del run
    report = {
        "yaws": {"identity": list(args.identity_yaws), "sheet": list(args.sheet_yaws)},
        "unstylized": measure("unstylized", source_frames, args.prompt, None),
        "stylized": results,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "metrics.json").write_text(json.dumps(report, indent=1))
    grid = [[row[index[y]] for y in args.sheet_yaws] for row in rows]
    columns = [f"yaw {y:+.0f}" for y in args.sheet_yaws]
    save_png(args.output_dir / "contact_sheet.png", contact_sheet(grid, row_labels=labels, col_labels=columns))
    for figures in results:
        ident = figures.get("identity", {})
        clip_text = (
            f"; CLIP to the prompt {figures['clip_similarity']:.3f} "
            f"(unstylized {figures['unstylized_clip_similarity']:.3f})"
            if "clip_similarity" in figures
            else ""
        )
        mean = ident.get("mean_distance")
        print(
            f"{figures['run']}: identity distance {'-' if mean is None else f'{mean:.3f}'} over "
            f"{ident.get('num_detected', 0)} frontal views ({ident.get('num_undetected', 0)} without a face), "
            f"{100 * (ident.get('match_rate') or 0):.0f}% under 0.6{clip_text}; "
            f"left/right PSNR {figures['left_right_psnr']:.2f} dB"
        )
    print(f"wrote {args.output_dir / 'metrics.json'} and {args.output_dir / 'contact_sheet.png'}")
    return report


def entrypoint() -> None:
    """Console entry point: one message, no traceback, on bad input."""
    args = tyro.cli(HeadEvalArgs)
    try:
        main(args)
    except ValueError as error:
        print(f"mmstyle-head-eval: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
