"""Measures a CLIP on the toy world (any open_clip model; the toy CLIP by default).

* **Held-out pictures** of the generator (a seed never used in training): zero-shot classification of every
  attribute — each class is the normalised mean text embedding of all grammar captions with that value
  (CLIP's prompt ensembling) — and caption retrieval among all 1728 captions of the grammar (top-1, top-5).
* **Embedded toy scenes**: views rendered by ``mmstyle-scene --kind toy`` (the scene generator, not the picture
  generator): the same attribute accuracies over the photo captions, caption retrieval per view, and the
  scene-level R-precision of :func:`mmstyle_ns.metrics.clip_space.r_precision`.
* **The toy teacher's samples**: are they retrieved by their own prompts (among the evaluation prompts), and is
  their colour read right — a reading of the teacher independent of the colour checker.

Writes ``report.json`` and ``sheet.png`` (examples with the retrieved captions) and prints a summary.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from mmstyle_ns.clip.config import ClipEvalConfig
from mmstyle_ns.clip.loader import ClipFlags, ClipModel, load_clip
from mmstyle_ns.metrics.clip_space import r_precision
from mmstyle_ns.teacher.vocab import ATTRIBUTES, SceneSpec, all_specs, caption, colour_prompts, parse_caption


def class_embeddings(
    clip: ClipModel, attribute: str, specs: Sequence[SceneSpec], text_embeddings: Tensor | None = None
) -> Float[Tensor, "K D"]:
    """One embedding per value of ``attribute``: the normalised mean over the captions of ``specs`` having it."""
    texts = text_embeddings if text_embeddings is not None else clip.encode_texts([caption(s) for s in specs])
    rows = []
    for value in ATTRIBUTES[attribute]:
        members = [i for i, spec in enumerate(specs) if getattr(spec, attribute) == value]
        if not members:
            raise ValueError(f"no caption has {attribute} {value!r}")
        rows.append(torch.nn.functional.normalize(texts[members].mean(dim=0), dim=0))
    return torch.stack(rows)


def attribute_accuracy(
    images: Float[Tensor, "N D"], specs: Sequence[SceneSpec], classes: dict[str, Tensor]
) -> dict[str, float]:
    """Zero-shot accuracy per attribute, given each attribute's class embeddings."""
    result = {}
    for attribute, table in classes.items():
        values = ATTRIBUTES[attribute]
        predicted = (images @ table.T).argmax(dim=1)
        truth = torch.tensor([values.index(getattr(spec, attribute)) for spec in specs])
        result[attribute] = float((predicted == truth).float().mean())
    return result


def retrieval_ranks(images: Float[Tensor, "N D"], texts: Float[Tensor, "P D"], truth: Sequence[int]) -> Tensor:
    """Rank (0 = best) of each image's own text among ``texts``."""
    sims = images @ texts.T
    own = sims[torch.arange(len(truth)), torch.tensor(list(truth))]
    return (sims > own[:, None]).sum(dim=1)


def _summary(ranks: Tensor) -> dict[str, float]:
    return {"top1": float((ranks == 0).float().mean()), "top5": float((ranks < 5).float().mean())}


def _scene_views(spec_caption: str, views: int, folder: Path) -> np.ndarray:
    """RGB renders ``[V, H, W, 3]`` (uint8, over white) of an embedded toy scene written by the scene generator."""
    from PIL import Image

    from mmstyle_ns.data.scene import generate_scene

    generate_scene("toy", folder, num_views=views, resolution=128, caption=spec_caption, eval_every=views + 1)
    frames = []
    for path in sorted((folder / "images").glob("frame_*.png")):
        rgba = np.asarray(Image.open(path).convert("RGBA")).astype(np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:] + (1.0 - rgba[..., 3:])
        frames.append((rgb * 255.0 + 0.5).astype(np.uint8))
    return np.stack(frames)


def _teacher_samples(config: ClipEvalConfig, device: torch.device) -> tuple[np.ndarray, list[int], list[str]]:
    from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig
    from mmstyle_ns.teacher.evaluate import images_to_uint8, sample_images

    assert config.teacher is not None
    backbone = DiffusionBackboneConfig(model_path=str(config.teacher)).setup(device=device)
    prompts = [text for text, _ in colour_prompts(2)]
    generator = torch.Generator(device=device).manual_seed(0)
    images, truth = [], []
    for p, prompt in enumerate(prompts):
        batch = sample_images(backbone, [prompt] * config.teacher_samples_per_prompt, generator=generator)
        images.append(images_to_uint8(batch))
        truth += [p] * config.teacher_samples_per_prompt
    return np.concatenate(images), truth, prompts


def _sheet(rows: list[tuple[str, np.ndarray, list[str], list[bool]]], path: Path) -> None:
    """Rows of examples, each picture captioned with what the CLIP retrieved (green: right, red: wrong)."""
    from PIL import Image, ImageDraw, ImageFont

    cell, text_h, label_w = 128, 34, 170
    cols = max(len(r[1]) for r in rows)
    sheet = Image.new("RGB", (label_w + cols * (cell + 4), len(rows) * (cell + text_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for r, (label, images, texts, right) in enumerate(rows):
        y = r * (cell + text_h + 6)
        draw.text((4, y + cell // 2), label, fill=(0, 0, 0), font=font)
        for c, (image, text, ok) in enumerate(zip(images, texts, right, strict=True)):
            x = label_w + c * (cell + 4)
            sheet.paste(Image.fromarray(image).resize((cell, cell)), (x, y))
            words, lines = text.split(), [""]
            for word in words:
                if len(lines[-1]) + len(word) > 24:
                    lines.append("")
                lines[-1] = f"{lines[-1]} {word}".strip()
            draw.multiline_text((x, y + cell + 1), "\n".join(lines[:3]), fill=(0, 130, 0) if ok else (200, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def evaluate_clip(config: ClipEvalConfig, clip: ClipModel | None = None) -> dict[str, Any]:
    """Runs every measurement, writes ``report.json`` and ``sheet.png``; returns the report."""
    from mmstyle_ns.teacher.data import WIDE_VIEWS, generate_images
    from mmstyle_ns.teacher.model import default_device

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device) if config.device is not None else default_device()
    if clip is None:
        clip = load_clip(config.clip_model, config.clip_checkpoint, device, ClipFlags())
    start = time.perf_counter()
    grammar = all_specs()
    captions = [caption(spec) for spec in grammar]
    index = {text: i for i, text in enumerate(captions)}
    texts = clip.encode_texts(captions)
    classes = {name: class_embeddings(clip, name, grammar, texts) for name in ATTRIBUTES}
    report: dict[str, Any] = {"clip_model": config.clip_model, "clip_checkpoint": config.clip_checkpoint}

    images, specs = generate_images(config.held_out_seed, 0, config.held_out, 128, WIDE_VIEWS)
    emb = clip.encode_images(images)
    ranks = retrieval_ranks(emb, texts, [index[caption(s)] for s in specs])
    report["held_out"] = {
        "pictures": len(images),
        "seed": config.held_out_seed,
        "zero_shot": attribute_accuracy(emb, specs, classes),
        "caption_retrieval": _summary(ranks) | {"candidates": len(captions)},
    }
    best = (emb @ texts.T).argmax(dim=1)
    sheet_rows = [
        (
            "held-out pictures",
            images[:8],
            [captions[int(b)] for b in best[:8]],
            [int(b) == index[caption(s)] for b, s in zip(best[:8], specs[:8], strict=True)],
        )
    ]

    photo = [s for s in grammar if s.style == "photo"]
    photo_texts = texts[[index[caption(s)] for s in photo]]
    photo_classes = {name: class_embeddings(clip, name, photo, photo_texts) for name in ATTRIBUTES if name != "style"}
    scene_views, scene_truth, scene_specs = [], [], []
    scenes: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, text in enumerate(config.scene_captions):
            spec = parse_caption(text)
            views = _scene_views(text, config.scene_views, Path(tmp) / f"scene{k}")
            view_emb = clip.encode_images(views)
            own = index[text]
            ranks = retrieval_ranks(view_emb, texts, [own] * len(views))
            scenes[text] = {
                "views": len(views),
                "zero_shot": attribute_accuracy(view_emb, [spec] * len(views), photo_classes),
                "caption_retrieval": _summary(ranks),
            }
            scene_views.append(view_emb)
            scene_truth.append(own)
            scene_specs.append(spec)
            best = (view_emb @ texts.T).argmax(dim=1)
            picks = np.linspace(0, len(views) - 1, 8).round().astype(int)
            sheet_rows.append(
                (
                    f"scene: {text}"[:28],
                    views[picks],
                    [captions[int(best[i])] for i in picks],
                    [int(best[i]) == own for i in picks],
                )
            )
    rp = r_precision(scene_views, texts, scene_truth)
    all_views = torch.cat(scene_views)
    view_specs = [s for s, v in zip(scene_specs, scene_views, strict=True) for _ in range(len(v))]
    report["scenes"] = {
        "per_scene": scenes,
        "zero_shot": attribute_accuracy(all_views, view_specs, photo_classes),
        "caption_retrieval_top1": float(
            (retrieval_ranks(all_views, texts, [index[caption(s)] for s in view_specs]) == 0).float().mean()
        ),
        "r_precision": asdict(rp) | {"candidates": len(captions)},
    }

    if config.teacher is not None:
        samples, truth, prompts = _teacher_samples(config, device)
        sample_emb = clip.encode_images(samples)
        prompt_emb = clip.encode_texts(prompts)
        ranks = retrieval_ranks(sample_emb, prompt_emb, truth)
        prompt_specs = [spec for _, spec in colour_prompts(2)]
        sample_specs = [prompt_specs[t] for t in truth]
        per_prompt = r_precision(
            [sample_emb[[i for i, t in enumerate(truth) if t == p]] for p in range(len(prompts))],
            prompt_emb,
            list(range(len(prompts))),
        )
        report["teacher"] = {
            "model": str(config.teacher),
            "samples": len(samples),
            "prompts": len(prompts),
            "prompt_retrieval": _summary(ranks),
            "prompt_r_precision": per_prompt.top1,
            "zero_shot": attribute_accuracy(sample_emb, sample_specs, {k: classes[k] for k in ("colour", "shape")}),
        }
        best = (sample_emb @ prompt_emb.T).argmax(dim=1)
        picks = list(range(0, len(samples), max(1, len(samples) // 8)))[:8]
        sheet_rows.append(
            (
                "toy teacher samples",
                samples[picks],
                [prompts[int(best[i])] for i in picks],
                [int(best[i]) == truth[i] for i in picks],
            )
        )
    report["seconds"] = round(time.perf_counter() - start, 1)
    config.output.mkdir(parents=True, exist_ok=True)
    (config.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _sheet(sheet_rows, config.output / "sheet.png")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary of :func:`evaluate_clip`'s report."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    held = report["held_out"]
    lines = [
        f"Held-out generated pictures ({held['pictures']}, seed {held['seed']}): zero-shot "
        + ", ".join(f"{k} {pct(v)}" for k, v in held["zero_shot"].items()),
        f"  caption retrieval among {held['caption_retrieval']['candidates']} captions: top-1 "
        f"{pct(held['caption_retrieval']['top1'])}, top-5 {pct(held['caption_retrieval']['top5'])}",
    ]
    scenes = report["scenes"]
    lines.append(
        f"Embedded toy scenes ({len(scenes['per_scene'])} x {next(iter(scenes['per_scene'].values()))['views']} "
        "views): zero-shot " + ", ".join(f"{k} {pct(v)}" for k, v in scenes["zero_shot"].items())
    )
    lines.append(
        f"  caption retrieval per view: top-1 {pct(scenes['caption_retrieval_top1'])}; scene R-precision "
        f"{pct(scenes['r_precision']['top1'])}"
    )
    for text, entry in scenes["per_scene"].items():
        lines.append(f"    {text}: retrieval top-1 {pct(entry['caption_retrieval']['top1'])}")
    if "teacher" in report:
        t = report["teacher"]
        lines.append(
            f"Toy teacher samples ({t['samples']}, {t['prompts']} prompts): retrieved by their prompt top-1 "
            f"{pct(t['prompt_retrieval']['top1'])}; colour read {pct(t['zero_shot']['colour'])}, shape "
            f"{pct(t['zero_shot']['shape'])}; prompt R-precision {pct(t['prompt_r_precision'])}"
        )
    return "\n".join(lines)
