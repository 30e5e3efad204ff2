"""Text-guided editing of single pictures with SDS and DDS from a diffusion model: the guidance layer in 2D.

A picture of the toy world (``"a red cube on grass"``) is encoded to latents ``z``, and ``z`` is optimised with
plain SGD, ``z <- z - lr * g``, where ``g`` is the score of one rule of :mod:`mmstyle_ns.guidance.scores`:

* SDS toward the target prompt: ``g = w(t) (eps_hat(z_t; y_tgt) - eps)``;
* DDS from the source to the target prompt: ``g = eps_hat(z_t; y_tgt) - eps_hat(zs_t; y_src)``, with ``zs`` the
  source latents noised with the same ``eps`` and ``t``.

The prompts differ only in the object colour, so the colour checker, which never sees the prompts, says whether an
edit worked. How much of the rest of the picture survived is the PSNR of the pixels away from the objects (the
generator's object mask, grown by 3 pixels). DDS should change the colour and keep the rest; SDS tends to drift.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, UInt8
from rich.progress import Progress
from scipy import ndimage
from torch import Tensor

from mmstyle_ns.teacher.checker import classify_colour
from mmstyle_ns.teacher.config import EditConfig
from mmstyle_ns.teacher.data import generate_sample
from mmstyle_ns.teacher.evaluate import images_to_uint8
from mmstyle_ns.teacher.model import default_device
from mmstyle_ns.teacher.vocab import COLOURS, GROUNDS, SHAPES, SceneSpec, caption

METHODS = ("sds", "dds")
"""The score rules compared."""


@dataclass
class EditCase:
    """One source picture and its edits."""

    source_prompt: str
    """Caption of the source picture."""
    target_prompt: str
    """The same caption with the target colour."""
    target_colour: str
    """Colour the edit should produce."""
    readings: dict[str, str | None]
    """Checker reading of the source ('source') and of each method's result."""
    background_psnr: dict[str, float]
    """PSNR (dB) of each result (and of the source's VAE round trip, 'round_trip') against the source, away from
    the objects."""


@dataclass
class EditReport:
    """Figures of an edit run."""

    cases: list[EditCase]
    """Every edited picture."""
    success: dict[str, float]
    """Share of pictures each method turned into the target colour (and 'source': share already in it)."""
    background_psnr: dict[str, float]
    """Mean background PSNR of each method, and of the VAE round trip of the source ('round_trip': the most a
    latent edit can keep)."""
    seconds_per_step: dict[str, float]
    """Wall time of one optimisation step of each method."""
    sheet: Path
    """Before/after sheet."""

    def table(self) -> str:
        """The figures as text."""
        lines = [f"{'':8s} {'target colour':>14s} {'background PSNR':>16s} {'s/step':>8s}"]
        lines.append(f"{'source':8s} {self.success['source']:>13.0%}  {'':>16s} {'':>8s}")
        lines.append(f"{'VAE only':8s} {'':>14s} {self.background_psnr['round_trip']:>13.1f} dB {'':>8s}")
        for method in METHODS:
            lines.append(
                f"{method:8s} {self.success[method]:>13.0%}  {self.background_psnr[method]:>13.1f} dB "
                f"{self.seconds_per_step[method]:>8.3f}"
            )
        return "\n".join(lines)


class EditInputError(ValueError):
    """A colour pair that is not SOURCE:TARGET with two different vocabulary colours."""


def parse_pair(pair: str) -> tuple[str, str]:
    """``"red:blue"`` -> ``("red", "blue")``; both must be vocabulary colours and differ."""
    parts = pair.split(":")
    if len(parts) != 2 or any(p not in COLOURS for p in parts) or parts[0] == parts[1]:
        raise EditInputError(f"colour pair {pair!r} is not SOURCE:TARGET with two different colours of {COLOURS}")
    return parts[0], parts[1]


def edit_latents(
    backbone: Any,
    latents: Float[Tensor, "1 c h w"],
    method: str,
    source_emb: Float[Tensor, "1 L D"],
    target_emb: Float[Tensor, "1 L D"],
    uncond_emb: Float[Tensor, "1 L D"],
    steps: int,
    lr: float,
    guidance_scale: float,
    generator: torch.Generator,
) -> Float[Tensor, "1 c h w"]:
    """``steps`` SGD steps of one score rule on a copy of ``latents``; returns the edited latents."""
    from mmstyle_ns.guidance.scores import dds, sds

    source = latents.detach()
    z = source.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([z], lr=lr)
    for _ in range(steps):
        if method == "sds":
            out = sds(
                backbone, z, target_emb, uncond_emb=uncond_emb, guidance_scale=guidance_scale, generator=generator
            )
        elif method == "dds":
            out = dds(
                backbone,
                z,
                source,
                target_emb,
                source_emb,
                uncond_emb=uncond_emb,
                guidance_scale=guidance_scale,
                generator=generator,
            )
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
    return z.detach()


def background_psnr(a: UInt8[np.ndarray, "H W 3"], b: UInt8[np.ndarray, "H W 3"], objects: np.ndarray) -> float:
    """PSNR (dB) of ``b`` against ``a`` over the pixels more than 3 pixels away from ``objects``."""
    keep = np.logical_not(ndimage.binary_dilation(objects, iterations=3))
    if not keep.any():
        return float("nan")
    diff = a.astype(np.float64)[keep] - b.astype(np.float64)[keep]
    mse = float(np.mean(diff**2))
    return 10.0 * np.log10(255.0**2 / max(mse, 1e-10))


def run_edits(config: EditConfig, log: Callable[[str], None] = print) -> EditReport:
    """Edits every source picture with every method, checks and saves the results; prints and returns the figures."""
    from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig
    from mmstyle_ns.metrics.sheets import contact_sheet, save_png

    pairs = [parse_pair(p) for p in config.pairs]
    if not (Path(config.model) / "model_index.json").is_file():
        raise FileNotFoundError(
            f"No diffusion model at --model {config.model} (no model_index.json): train the toy teacher with "
            f"'mmstyle-teacher train --output {config.model}' or pass a Stable Diffusion folder"
        )
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device is not None else default_device()
    backbone = DiffusionBackboneConfig(
        model_path=str(config.model),
        flag_prefix="--model",
        min_step_ratio=config.min_step_ratio,
        max_step_ratio=config.max_step_ratio,
    ).setup(device=device)
    resolution = int(backbone.unet.config.sample_size) * backbone.vae_scale_factor
    uncond = backbone.text_embeddings("")
    generator = torch.Generator(device=backbone.device).manual_seed(config.seed)
    scales = {"sds": config.sds_guidance_scale, "dds": config.dds_guidance_scale}

    jobs: list[tuple[SceneSpec, str]] = []
    for source_colour, target_colour in pairs:
        for _ in range(config.pictures_per_pair):
            i = len(jobs)
            spec = SceneSpec(colour=source_colour, shape=SHAPES[i % len(SHAPES)], ground=GROUNDS[i % len(GROUNDS)])
            jobs.append((spec, target_colour))

    cases: list[EditCase] = []
    rows: list[list[np.ndarray]] = []
    labels: list[str] = []
    seconds = dict.fromkeys(METHODS, 0.0)
    bar = Progress(disable=config.quiet)
    task = bar.add_task("Editing", total=len(jobs) * len(METHODS))
    bar.start()
    for index, (spec, target_colour) in enumerate(jobs):
        sample = generate_sample(config.seed, index, resolution, spec=spec)
        source_prompt = caption(spec)
        target_prompt = caption(replace(spec, colour=target_colour))
        image = torch.from_numpy(sample.image).permute(2, 0, 1)[None].float().to(device) / 255.0
        with torch.no_grad():
            latents = backbone.encode_images(image)
        emb_source = backbone.text_embeddings(source_prompt)
        emb_target = backbone.text_embeddings(target_prompt)
        with torch.no_grad():
            round_trip = images_to_uint8(backbone.decode_latents(latents))[0]
        row = [sample.image, round_trip]
        readings: dict[str, str | None] = {"source": classify_colour(sample.image).colour}
        psnrs: dict[str, float] = {"round_trip": background_psnr(sample.image, round_trip, sample.mask)}
        for method in METHODS:
            start = time.perf_counter()
            edited = edit_latents(
                backbone,
                latents,
                method,
                emb_source,
                emb_target,
                uncond,
                config.steps,
                config.lr,
                scales[method],
                generator,
            )
            seconds[method] += time.perf_counter() - start
            with torch.no_grad():
                result = images_to_uint8(backbone.decode_latents(edited))[0]
            readings[method] = classify_colour(result).colour
            psnrs[method] = background_psnr(sample.image, result, sample.mask)
            row.append(result)
            save_png(config.output / f"{index:02d}_{method}.png", result)
            bar.advance(task)
        save_png(config.output / f"{index:02d}_source.png", sample.image)
        cases.append(EditCase(source_prompt, target_prompt, target_colour, readings, psnrs))
        rows.append(row)
        labels.append(f"{spec.colour} -> {target_colour}")
    bar.stop()

    sheet = save_png(
        config.output / "edits.png",
        contact_sheet(rows, row_labels=labels, col_labels=["source", "VAE round trip", *(m.upper() for m in METHODS)]),
    )
    count = max(1, len(cases))
    success = {key: sum(c.readings[key] == c.target_colour for c in cases) / count for key in ("source", *METHODS)}
    mean_psnr = {m: float(np.nanmean([c.background_psnr[m] for c in cases])) for m in ("round_trip", *METHODS)}
    per_step = {m: seconds[m] / max(1, len(cases) * config.steps) for m in METHODS}
    report = EditReport(cases, success, mean_psnr, per_step, sheet)
    (config.output / "report.json").write_text(
        json.dumps(
            {
                "model": str(config.model),
                "steps": config.steps,
                "lr": config.lr,
                "guidance_scale": scales,
                "success": success,
                "background_psnr": mean_psnr,
                "seconds_per_step": per_step,
                "cases": [c.__dict__ for c in cases],
            },
            indent=2,
        )
    )
    log(f"{len(cases)} pictures, {config.steps} steps per edit\n{report.table()}\nSheet: {sheet}")
    return report
