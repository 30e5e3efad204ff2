"""A short training run of EVERY method this package registers, through nerfstudio's own trainer.

The methods come from the installed entry points, so a newly registered method is trained here without
editing this file. Each run saves a checkpoint, which is then loaded back the way ``ns-render``/``ns-eval``
load it (``eval_setup``, with torch's ``weights_only`` default) and must render the same image.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from conftest import short_run_config

OUR_METHODS = sorted(
    ep.name for ep in entry_points(group="nerfstudio.method_configs") if ep.value.startswith("mmstyle_ns.")
)


MULTI_SCENE_METHODS = {"tunemv3d"}
"""Methods trained on a collection of scenes rather than one scene."""


def test_methods_are_registered() -> None:
    assert {"mmstyle-base", "mm-nerf", "ed-nerf"} <= set(OUR_METHODS)


@pytest.mark.parametrize("method", OUR_METHODS)
def test_method_trains_saves_and_reloads(
    method: str, tiny_scene: Path, tmp_path: Path, tiny_guidance_model: Path, request: pytest.FixtureRequest
) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    data = request.getfixturevalue("tiny_collection") if method in MULTI_SCENE_METHODS else tiny_scene
    config = short_run_config(method, data, tmp_path, guidance_model=tiny_guidance_model)
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    camera = trainer.pipeline.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        model.eval()
        before = model.get_outputs_for_camera(camera)["rgb"]
        model.train()
    trainer.train()
    with torch.no_grad():
        model.eval()
        after = model.get_outputs_for_camera(camera)["rgb"]
    assert torch.isfinite(after).all()
    assert (after - before).abs().mean() > 1e-3, "training changed nothing"

    config_path = config.get_base_dir() / "config.yml"
    checkpoints = sorted(p.name for p in (config.get_base_dir() / "nerfstudio_models").glob("step-*.ckpt"))
    assert config_path.exists() and checkpoints == [f"step-{config.max_num_iterations - 1:09d}.ckpt"]
    saved = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    assert saved.schedule_start == 0 and saved.viewer.websocket_host == "127.0.0.1"  # schedule and viewer host
    _, pipeline, _, _ = eval_setup(config_path, test_mode="inference")
    with torch.no_grad():
        reloaded = pipeline.model.get_outputs_for_camera(camera.to(pipeline.device))["rgb"]
    torch.testing.assert_close(reloaded, after, atol=1e-5, rtol=1e-5)
