"""``mmstyle-tunemv3d``: multi-view generation with a trained ``tunemv3d`` run, and its evaluation.

``mmstyle-tunemv3d generate --load-config RUN/config.yml --prompt "a blue sphere on grass"`` runs multi-view DDIM
sampling (every view through the interactive model at every step, a progress bar over the steps) from the run's
display-scene cameras and writes a run folder next to the trained one
(``<output-dir>/<experiment>/tunemv3d/generate-<name>/``): ``config.yml`` and a checkpoint whose shown state is the
generated object's field (open it with ``ns-viewer`` or export it with ``ns-render``), ``grid.png`` (rows: the
generated views, the field's ``x_0`` rendering, its depth) and ``generation.json``.

``mmstyle-tunemv3d evaluate --load-config RUN/config.yml`` generates the held-out prompts with TuneMV3D and with the
same frozen model sampling every view independently, and measures view consistency (warped RMSE between
neighbouring views through depth from the trained field aggregating each sampler's final views, the same reader
for both), text alignment (CLIP R-precision as in the supplement: per-view retrieval from a pool of prompts,
majority vote over views; and the colour checker's vote) and time per sample; writes ``metrics.json``,
``sheet.png`` and ``steps.png`` (latents and field opacity over the denoising steps).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import tyro


@dataclass
class GenerateArgs:
    """Generate a 3-D-consistent set of views (and their field) from a prompt with a trained tunemv3d run."""

    load_config: Path
    """config.yml of a trained tunemv3d run."""
    prompt: str
    """Text prompt, e.g. "a blue sphere on grass"."""
    steps: int | None = None
    """DDIM steps (default: the run's --pipeline.model.sample-steps)."""
    guidance_scale: float | None = None
    """Classifier-free guidance (default: the run's)."""
    num_views: int | None = None
    """Views to generate, spread evenly over the display scene's cameras (default: the run's views per step)."""
    seed: int = 0
    """Seed of the initial noise."""
    name: str | None = None
    """Name of the generation's run folder (generate-<name>; default: from the prompt and seed)."""
    output_dir: Path | None = None
    """Where the generation's run folder goes (default: the trained run's output folder)."""
    overwrite: bool = False
    """Replace an existing generation of the same name."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "prompt"


def generation_cameras(pipeline: Any, num_views: int | None) -> Any:
    """``num_views`` of the display scene's cameras (default: the run's views per step), evenly spread over the
    cameras ordered by azimuth, so that neighbouring views are neighbours on the orbit."""
    try:
        return pipeline.datamanager.display_cameras(num_views)
    except ValueError as error:
        raise ValueError(f"--num-views: {error}") from None


def _depth_images(depth: torch.Tensor, accumulation: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    import torch.nn.functional as F
    from nerfstudio.utils import colormaps

    images = []
    for d, a in zip(depth, accumulation, strict=True):
        d = F.interpolate(d[None], size=size, mode="nearest")[0].permute(1, 2, 0)
        a = F.interpolate(a[None], size=size, mode="nearest")[0].permute(1, 2, 0)
        images.append(colormaps.apply_depth_colormap(d, accumulation=a).cpu().numpy())
    return np.stack(images)


def generate(args: GenerateArgs) -> Path:
    """Runs the generation; returns the generation's run folder."""
    import torch.nn.functional as F
    import yaml
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.engine import RunConfigError, load_run_config
    from mmstyle_ns.metrics import contact_sheet, save_png
    from mmstyle_ns.pipelines.tunemv3d import TuneMV3DPipelineConfig
    from mmstyle_ns.progress import progress

    if not args.prompt.strip():
        raise RunConfigError('--prompt is empty: give a prompt, e.g. --prompt "a blue sphere on grass"')
    config = load_run_config(args.load_config)
    if not isinstance(config.pipeline, TuneMV3DPipelineConfig):
        raise RunConfigError(f"--load-config {args.load_config} is a {config.method_name} run, not a tunemv3d run")
    name = args.name if args.name is not None else f"{_slug(args.prompt)}-{args.seed}"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise RunConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' only")
    # nerfstudio's layout: <output-dir>/<experiment>/<method>/<timestamp>/config.yml
    run_dir = args.load_config.resolve().parent
    saved = dataclasses.replace(config, timestamp=f"generate-{name}", experiment_name=run_dir.parent.parent.name)
    saved.output_dir = run_dir.parent.parent.parent if args.output_dir is None else args.output_dir
    target = saved.get_base_dir()
    if target.exists() and not args.overwrite:
        raise RunConfigError(f"{target} exists already; pass another --name, or --overwrite to replace it")

    _, pipeline, checkpoint, step = eval_setup(args.load_config, test_mode="inference")
    model: Any = pipeline.model
    cameras = generation_cameras(pipeline, args.num_views)
    steps = model.config.sample_steps if args.steps is None else args.steps
    generator = torch.Generator().manual_seed(args.seed)
    with progress(steps, f"Generating {args.prompt!r}", quiet=False) as advance:
        result = model.generate(
            cameras,
            args.prompt,
            steps=steps,
            guidance_scale=args.guidance_scale,
            generator=generator,
            callback=lambda index, t, state: advance(t=t),
        )
    images = result["images"].clamp(0, 1)
    size = (int(images.shape[-2]), int(images.shape[-1]))
    field_rgb = model.field_pictures(result["x0"]).clamp(0, 1)
    field_rgb = F.interpolate(field_rgb, size=size, mode="bilinear")
    rows = [
        images.permute(0, 2, 3, 1).cpu().numpy(),
        field_rgb.permute(0, 2, 3, 1).cpu().numpy(),
        _depth_images(result["depth"], result["accumulation"], size),
    ]
    if target.exists():  # --overwrite: nothing of the old generation may stay (a stale checkpoint would load)
        shutil.rmtree(target)
    target.mkdir(parents=True)
    save_png(target / "grid.png", contact_sheet(rows, row_labels=["generated", "field x0", "field depth"]))
    # a run folder of its own: the trained weights with the generated field as the shown state
    models = target / saved.relative_model_dir
    models.mkdir(exist_ok=True)
    state = torch.load(checkpoint, map_location="cpu")  # torch's weights_only default, safe globals registered
    state["pipeline"] = {f"_model.{k}": v for k, v in model.state_dict().items()}
    torch.save(state, models / f"step-{step:09d}.ckpt")
    (target / "config.yml").write_text(yaml.dump(saved), "utf8")
    transforms = args.load_config.parent / "dataparser_transforms.json"
    if transforms.is_file():
        shutil.copyfile(transforms, target / transforms.name)
    (target / "generation.json").write_text(
        json.dumps(
            {
                "prompt": args.prompt,
                "seed": args.seed,
                "steps": steps,
                "views": len(cameras),
                "guidance_scale": args.guidance_scale
                if args.guidance_scale is not None
                else model.config.guidance_scale,
                "trained_run": str(args.load_config),
                "trained_step": step,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"Wrote {target / 'grid.png'}; view the field with: ns-viewer --load-config {target / 'config.yml'}")
    return target


@dataclass
class ExportArgs:
    """Write a trained tunemv3d run as a small self-contained run folder: weights only (no optimizer state)."""

    load_config: Path
    """config.yml of a trained tunemv3d run."""
    output_dir: Path
    """The new run folder goes to <output-dir>/<experiment>/tunemv3d/<timestamp>/."""
    experiment: str = "tunemv3d-toy"
    """Experiment name of the exported run."""
    timestamp: str = "shipped"
    """Timestamp (folder name) of the exported run."""
    overwrite: bool = False
    """Replace an existing export."""


def export(args: ExportArgs) -> Path:
    """Copies the run's config (re-rooted), its latest checkpoint without optimizer state, and its dataparser
    transforms; returns the exported config.yml."""
    import yaml

    from mmstyle_ns.compat.checkpoints import find_checkpoint
    from mmstyle_ns.engine import RunConfigError, load_run_config
    from mmstyle_ns.pipelines.tunemv3d import TuneMV3DPipelineConfig

    config = load_run_config(args.load_config)
    if not isinstance(config.pipeline, TuneMV3DPipelineConfig):
        raise RunConfigError(f"--load-config {args.load_config} is a {config.method_name} run, not a tunemv3d run")
    checkpoint = find_checkpoint(args.load_config.parent)
    if checkpoint is None:
        raise RunConfigError(f"no checkpoint in {args.load_config.parent / 'nerfstudio_models'}; train the run first")
    saved = dataclasses.replace(config, experiment_name=args.experiment, timestamp=args.timestamp)
    saved.output_dir = args.output_dir
    target = saved.get_base_dir()
    if target.exists() and not args.overwrite:
        raise RunConfigError(f"{target} exists already; pass --overwrite to replace it")
    state = torch.load(checkpoint, map_location="cpu")  # torch's weights_only default, safe globals registered
    models = target / saved.relative_model_dir
    if models.exists():
        shutil.rmtree(models)
    models.mkdir(parents=True)
    torch.save({"step": state["step"], "pipeline": state["pipeline"]}, models / checkpoint.name)
    (target / "config.yml").write_text(yaml.dump(saved), "utf8")
    transforms = args.load_config.parent / "dataparser_transforms.json"
    if transforms.is_file():
        shutil.copyfile(transforms, target / transforms.name)
    print(f"Wrote {target / 'config.yml'} ({(models / checkpoint.name).stat().st_size / 2**20:.1f} MB of weights)")
    return target / "config.yml"


@dataclass
class EvaluateArgs:
    """Measure a trained tunemv3d run on held-out prompts against independent sampling of every view."""

    load_config: Path
    """config.yml of a trained tunemv3d run."""
    prompts: tuple[str, ...] = ()
    """Prompts to generate (default: the collection's held-out prompts, never used in training)."""
    seeds: tuple[int, ...] = (0, 1)
    """Seeds of the initial noise; every prompt is generated once per seed, by both samplers."""
    steps: int | None = None
    """DDIM steps (default: the run's)."""
    guidance_scale: float | None = None
    """Classifier-free guidance (default: the run's)."""
    num_views: int | None = None
    """Views per object (default: the run's views per step)."""
    pool_size: int = 100
    """Candidate prompts of the R-precision retrieval: the evaluated prompts plus other photo captions of the toy
    grammar (the supplement: 100)."""
    clip_model: str = "toy-clip"
    """open_clip model of the R-precision (e.g. ViT-B-32 with real weights)."""
    clip_checkpoint: str | None = "examples/toy-clip"
    """Its weights (None: no CLIP figure)."""
    output_dir: Path = Path("renders/tunemv3d_eval")
    """Where metrics.json, sheet.png and steps.png are written."""
    loss_draws: int = 64
    """Draws (scene, views, timestep, noise) from the held-out scenes on which the noise prediction error of the
    modulated and of the frozen model are compared (0: skip)."""


def prompt_pool(prompts: list[str], size: int, seed: int = 0) -> list[str]:
    """``prompts`` followed by other photo captions of the toy grammar (drawn with ``seed``), ``size`` in all."""
    from mmstyle_ns.teacher import vocab

    others = [vocab.caption(spec) for spec in vocab.all_specs() if spec.style == "photo"]
    others = [text for text in others if text not in prompts]
    order = np.random.default_rng(seed).permutation(len(others))
    return prompts + [others[i] for i in order[: max(0, size - len(prompts))]]


def _upsample(x: torch.Tensor, size: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    import torch.nn.functional as F

    return F.interpolate(x, size=size, mode=mode)


def evaluate(args: EvaluateArgs) -> dict[str, Any]:
    """Runs the evaluation; returns what it writes to ``metrics.json``."""
    import time

    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.data.collection import held_out_captions
    from mmstyle_ns.engine import RunConfigError, load_run_config
    from mmstyle_ns.metrics import contact_sheet, save_png, warped_error
    from mmstyle_ns.metrics.clip_space import r_precision
    from mmstyle_ns.pipelines.tunemv3d import TuneMV3DPipelineConfig
    from mmstyle_ns.progress import progress
    from mmstyle_ns.teacher import vocab
    from mmstyle_ns.teacher.checker import classify_colours

    config = load_run_config(args.load_config)
    if not isinstance(config.pipeline, TuneMV3DPipelineConfig):
        raise RunConfigError(f"--load-config {args.load_config} is a {config.method_name} run, not a tunemv3d run")
    prompts = list(args.prompts) or list(held_out_captions())
    for text in prompts:
        if not text.strip():
            raise RunConfigError("--prompts holds an empty prompt")
    clip = None
    if args.clip_checkpoint is not None:
        from mmstyle_ns.clip.loader import load_clip

        clip = load_clip(args.clip_model, args.clip_checkpoint)
    _, pipeline, _, step = eval_setup(args.load_config, test_mode="test")  # encodes (or reads) the scenes' latents
    model: Any = pipeline.model
    backbone = model.backbone
    cameras = generation_cameras(pipeline, args.num_views)
    poses = cameras.camera_to_worlds.cpu().numpy()
    intrinsics = torch.cat([cameras.fx, cameras.fy, cameras.cx, cameras.cy], dim=-1).cpu().numpy()
    size = (int(cameras.height[0, 0]), int(cameras.width[0, 0]))
    samplers = {"tunemv3d": True, "independent": False}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in samplers}
    timings: dict[str, list[float]] = {name: [] for name in samplers}
    sheet_rows: list[list[np.ndarray]] = []
    sheet_labels: list[str] = []
    step_states: list[dict[str, torch.Tensor]] = []
    jobs = [(p, s) for p in prompts for s in args.seeds]
    with progress(len(jobs), "Generating", quiet=False) as advance:
        for job, (text, seed) in enumerate(jobs):
            for name, modulate in samplers.items():
                record = job == 0 and modulate
                callback = (
                    (lambda i, t, state: step_states.append({k: v.clone() for k, v in state.items()}))
                    if record
                    else None
                )
                start = time.perf_counter()
                out = model.generate(
                    cameras,
                    text,
                    steps=args.steps,
                    guidance_scale=args.guidance_scale,
                    generator=torch.Generator().manual_seed(seed),
                    modulate=modulate,
                    callback=callback,
                )
                timings[name].append(time.perf_counter() - start)
                images = out["images"].clamp(0, 1)
                # the same depth reader for both samplers: the trained field aggregating the final views at t = 0
                with torch.no_grad():
                    model.eval()
                    recon = model.interact(out["latents"], 0, backbone.text_embeddings(text)[:1], cameras)
                depth = _upsample(recon["depth"], size)[:, 0].cpu().numpy()
                valid = (_upsample(recon["accumulation"], size)[:, 0] > 0.5).cpu().numpy()
                frames = images.permute(0, 2, 3, 1).cpu().numpy()
                entry: dict[str, Any] = {"prompt": text, "seed": seed}
                if len(frames) > 1:
                    entry["rmse_gap1"] = float(
                        warped_error(frames, depth, poses, intrinsics, gap=1, valid=valid)["mean_rmse"]
                    )
                if modulate:  # through the sampling field's own depth as well
                    own = _upsample(out["depth"], size)[:, 0].cpu().numpy()
                    own_valid = (_upsample(out["accumulation"], size)[:, 0] > 0.5).cpu().numpy()
                    if len(frames) > 1:
                        entry["rmse_gap1_sampling_field"] = float(
                            warped_error(frames, own, poses, intrinsics, gap=1, valid=own_valid)["mean_rmse"]
                        )
                entry["colours"] = classify_colours(frames)
                entry["frames"] = frames
                results[name].append(entry)
                if seed == args.seeds[0]:
                    sheet_rows.append(list(frames))
                    sheet_labels.append(f"{name}: {text}")
            advance()
    report_loss: dict[str, float] = {}
    if args.loss_draws > 0:
        ours_mse, frozen_mse = held_out_denoising(pipeline, args.loss_draws)
        report_loss = {"draws": args.loss_draws, "mse_tunemv3d": ours_mse, "mse_frozen": frozen_mse,
                       "ratio": ours_mse / frozen_mse}  # fmt: skip
    pool = prompt_pool(prompts, args.pool_size)
    report: dict[str, Any] = {
        "run": str(args.load_config),
        "step": step,
        "prompts": prompts,
        "seeds": list(args.seeds),
        "views": len(cameras),
        "pool_size": len(pool),
        "device": str(pipeline.device),
        "held_out_denoising": report_loss,
    }
    for name, entries in results.items():
        summary: dict[str, Any] = {"seconds_per_sample": float(np.mean(timings[name]))}
        for key in ("rmse_gap1", "rmse_gap1_sampling_field"):
            values = [e[key] for e in entries if key in e and np.isfinite(e[key])]
            if values:
                summary[key] = float(np.mean(values))
        # colour checker: the object's colour voted over its views
        hits = 0
        for e in entries:
            votes = [c for c in e["colours"] if c is not None]
            winner = max(set(votes), key=votes.count) if votes else None
            hits += int(winner == vocab.parse_caption(e["prompt"]).colour)
        summary["colour_precision"] = hits / len(entries)
        if clip is not None:
            prompt_emb = clip.encode_texts(pool)
            views = [clip.encode_images(list(e["frames"])) for e in entries]
            truth = [pool.index(e["prompt"]) for e in entries]
            rp = r_precision(views, prompt_emb, truth)
            summary["clip_r_precision"] = rp.top1
            summary["clip_view_top1"] = rp.view_top1
        summary["per_object"] = [{k: v for k, v in e.items() if k != "frames"} for e in entries]
        report[name] = summary
    args.output_dir.mkdir(parents=True, exist_ok=True)
    save_png(args.output_dir / "sheet.png", contact_sheet(sheet_rows, row_labels=sheet_labels))
    if step_states:
        save_png(args.output_dir / "steps.png", steps_figure(model, step_states))
    (args.output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def held_out_denoising(pipeline: Any, draws: int) -> tuple[float, float]:
    """Mean noise-prediction error (MSE) of the modulated and of the frozen model on the same draws from the
    held-out scenes (the training objective's first term, on scenes the run never trained on)."""
    model: Any = pipeline.model
    backbone = model.backbone
    datamanager: Any = pipeline.datamanager
    model.eval()
    ours, frozen = [], []
    for draw in range(draws):
        cameras, batch = datamanager.next_eval(draw)
        n = int(batch["num_inputs"])
        latents = pipeline.scene_latents[batch["scene"]][batch["views"][:n]].to(pipeline.device)
        generator = batch["generator"]
        t = backbone.sample_timesteps(1, generator=generator, min_step_ratio=model.config.min_step_ratio,
                                      max_step_ratio=model.config.max_step_ratio)  # fmt: skip
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        noisy = backbone.add_noise(latents, noise, t.to(latents.device).expand(n))
        text = backbone.text_embeddings(batch["prompt"])[:1]
        eps = model.interact(noisy, int(t), text, cameras[torch.arange(n)])["eps"]
        plain = backbone.unet_with_residuals(noisy, t.expand(n), text.expand(n, -1, -1))
        ours.append(float(((eps - noise) ** 2).mean()))
        frozen.append(float(((plain - noise) ** 2).mean()))
    return float(np.mean(ours)), float(np.mean(frozen))


def steps_figure(model: Any, states: list[dict[str, torch.Tensor]], columns: int = 8) -> np.ndarray:
    """The supplement's Fig. 1: the first view's decoded latent (top) and the field's opacity (bottom) over the
    denoising steps."""
    from mmstyle_ns.metrics import contact_sheet

    picks = np.unique(np.linspace(0, len(states) - 1, min(columns, len(states))).round().astype(int))
    latents = torch.stack([states[i]["latents"][0] for i in picks])
    decoded = model.backbone.decode_latents(latents).clamp(0, 1)
    size = (int(decoded.shape[-2]), int(decoded.shape[-1]))
    opacity = torch.stack([states[i]["accumulation"][0] for i in picks])
    opacity = _upsample(opacity, size).expand(-1, 3, -1, -1)
    rows = [list(decoded.permute(0, 2, 3, 1).cpu().numpy()), list(opacity.permute(0, 2, 3, 1).cpu().numpy())]
    return contact_sheet(rows, row_labels=["latent x_t", "field opacity"], col_labels=[f"step {i + 1}" for i in picks])


def entrypoint() -> None:
    """Console-script entry point."""
    from mmstyle_ns.engine import reported_run_config_errors

    args = tyro.extras.subcommand_cli_from_dict(
        {"generate": GenerateArgs, "evaluate": EvaluateArgs, "export": ExportArgs}
    )
    with reported_run_config_errors("mmstyle-tunemv3d"):
        try:
            if isinstance(args, ExportArgs):
                export(args)
            elif isinstance(args, EvaluateArgs):
                print(json.dumps({k: v for k, v in evaluate(args).items() if k not in ("tunemv3d", "independent")}))
            else:
                generate(args)
        except ValueError as error:
            print(f"mmstyle-tunemv3d: {error}", file=sys.stderr)
            raise SystemExit(2) from None


if __name__ == "__main__":
    entrypoint()
