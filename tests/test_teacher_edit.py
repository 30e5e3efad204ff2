"""SDS/DDS editing of single pictures (``mmstyle-teacher edit``) with a tiny untrained teacher: the mechanics.

Whether the edits reach the target colour depends on a trained teacher; the README reports those figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.teacher.config import TINY_ARCHITECTURE, EditConfig
from mmstyle_ns.teacher.edit import EditInputError, edit_latents, parse_pair, run_edits
from mmstyle_ns.teacher.model import build_teacher, save_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_teacher(build_teacher(TINY_ARCHITECTURE, seed=3), tmp_path_factory.mktemp("edit") / "teacher")


@pytest.fixture(scope="module")
def backbone(teacher_dir: Path) -> DiffusionBackbone:
    return DiffusionBackboneConfig(model_path=str(teacher_dir)).setup()


def _latents_and_prompts(backbone: DiffusionBackbone) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    latents = torch.randn(1, backbone.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    source = backbone.text_embeddings("a red cube on grass")
    target = backbone.text_embeddings("a blue cube on grass")
    return latents, source, target, backbone.text_embeddings("")


def test_dds_with_the_source_prompt_as_target_leaves_the_latents(backbone: DiffusionBackbone) -> None:
    latents, source, _, uncond = _latents_and_prompts(backbone)
    generator = torch.Generator().manual_seed(1)
    edited = edit_latents(backbone, latents, "dds", source, source, uncond, 5, 0.5, 7.5, generator)
    torch.testing.assert_close(edited, latents)


@pytest.mark.parametrize("method", ["sds", "dds"])
def test_edits_move_the_latents_and_leave_the_input(backbone: DiffusionBackbone, method: str) -> None:
    latents, source, target, uncond = _latents_and_prompts(backbone)
    before = latents.clone()
    generator = torch.Generator().manual_seed(1)
    edited = edit_latents(backbone, latents, method, source, target, uncond, 3, 0.5, 7.5, generator)
    torch.testing.assert_close(latents, before)
    assert (edited - latents).abs().max() > 1e-4
    assert all(not p.requires_grad or p.grad is None for m in backbone.frozen_modules() for p in m.parameters())


def test_unknown_method_and_bad_pairs_are_refused(backbone: DiffusionBackbone) -> None:
    latents, source, target, uncond = _latents_and_prompts(backbone)
    with pytest.raises(ValueError, match="unknown method"):
        edit_latents(backbone, latents, "sdx", source, target, uncond, 1, 0.1, 7.5, torch.Generator())
    assert parse_pair("red:blue") == ("red", "blue")
    for bad in ("red", "red:red", "red:teal", "red:blue:green"):
        with pytest.raises(EditInputError):
            parse_pair(bad)


def test_run_writes_sheet_pictures_and_report(teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "edits"
    config = EditConfig(model=teacher_dir, pairs=("red:blue",), pictures_per_pair=2, steps=2, output=out, quiet=True)
    report = run_edits(config, log=lambda _: None)
    assert len(report.cases) == 2 and report.sheet.is_file()
    for i in range(2):
        for name in ("source", "sds", "dds"):
            assert (out / f"{i:02d}_{name}.png").is_file()
    saved = json.loads((out / "report.json").read_text())
    assert saved["cases"][0]["target_prompt"] == saved["cases"][0]["source_prompt"].replace("red", "blue")
    assert set(saved["success"]) == {"source", "sds", "dds"}
    assert report.success["source"] == 0.0  # a red picture is not read as blue by the checker


def test_missing_model_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--model"):
        run_edits(EditConfig(model=tmp_path / "nothing", output=tmp_path / "out", quiet=True))
