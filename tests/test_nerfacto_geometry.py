"""Stylizing a user's own nerfacto run: ``--pipeline.model.geometry-from <a nerfacto run>``.

A tiny nerfacto (torch hash grids, CPU) is trained in the test through nerfstudio's own trainer; ``mm-nerf`` then
learns its styles on that run's frozen geometry and colours without reconstructing anything, and ``mmstyle-base``'s
appearance can be trained on its samples (the path of the guided methods).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ns_train_refusal, short_run_config
from nerfstudio.cameras.cameras import Cameras

from mmstyle_ns.fields.nerfacto_geometry import NerfactoGeometry, without_lpips

pytestmark = pytest.mark.usefixtures("one_thread")

NERFACTO_STEPS = 120


def _train_nerfacto(data: Path, output: Path) -> tuple[Path, Any]:
    """A tiny nerfacto run on ``data`` (its folder, and the trained pipeline)."""
    from nerfstudio.configs.method_configs import method_configs

    config: Any = copy.deepcopy(method_configs["nerfacto"])
    model: Any = config.pipeline.model
    model.implementation = "torch"
    model.log2_hashmap_size = 12
    model.num_levels = 4
    model.max_res = 128
    model.hidden_dim = model.hidden_dim_color = 16
    model.num_nerf_samples_per_ray = 16
    model.num_proposal_samples_per_ray = (32, 16)
    model.background_color = "white"
    model.camera_optimizer.mode = "off"
    for args in model.proposal_net_args_list:
        args["log2_hashmap_size"] = 12
    datamanager: Any = config.pipeline.datamanager
    datamanager.data = data
    datamanager.train_num_rays_per_batch = 256
    config.output_dir = output
    config.timestamp = "nerfacto"
    config.vis = "tensorboard"
    config.max_num_iterations = NERFACTO_STEPS
    config.steps_per_save = NERFACTO_STEPS
    config.save_only_latest_checkpoint = True
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    config.set_timestamp()
    torch.manual_seed(0)
    with without_lpips():
        trainer = config.setup(local_rank=0, world_size=1)
        trainer.setup()
        config.save_config()
        trainer.train()
    run = config.get_base_dir()
    assert (run / "config.yml").is_file() and list((run / "nerfstudio_models").glob("step-*.ckpt"))
    # The reference: the run as ns-render loads it (the trainer's own model still holds the proposal sampler's
    # training-time annealing; a loaded run samples with the final one).
    from nerfstudio.utils.eval_utils import eval_setup

    with without_lpips():
        _, pipeline, _, _ = eval_setup(run / "config.yml", test_mode="inference")
    return run, pipeline


@pytest.fixture(scope="module")
def nerfacto_run(tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    return _train_nerfacto(tiny_scene, tmp_path_factory.mktemp("nerfacto"))


def _camera(pipeline: Any) -> Cameras:
    return pipeline.datamanager.eval_dataset.cameras[0:1]


@torch.no_grad()
def _render(model: Any, camera: Cameras) -> dict[str, torch.Tensor]:
    was_training = model.training
    model.eval()
    outputs = model.get_outputs_for_camera(camera)
    model.train(was_training)
    return outputs


def test_mm_nerf_learns_styles_on_a_nerfacto_runs_frozen_geometry(
    nerfacto_run: tuple[Path, Any], tiny_scene: Path, tmp_path: Path
) -> None:
    run, nerfacto_pipeline = nerfacto_run
    nerfacto = nerfacto_pipeline.model
    before = {k: v.clone() for k, v in nerfacto.state_dict().items() if not k.startswith("lpips")}
    config = short_run_config("mm-nerf", tiny_scene, tmp_path, iterations=6)
    config.pipeline.model.geometry_from = run
    config.pipeline.stylized_views = 3
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    pipeline: Any = trainer.pipeline
    model = pipeline.mm_model
    assert isinstance(model.external_geometry, NerfactoGeometry)
    assert model.in_style_stage(0)  # nothing to reconstruct

    # The photorealistic render is nerfacto's own: same samples, weights and colours.
    camera = _camera(pipeline)
    ours, theirs = _render(model, camera), _render(nerfacto, camera)
    torch.testing.assert_close(ours["original"], theirs["rgb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["accumulation"], theirs["accumulation"], atol=1e-5, rtol=0)
    assert float(theirs["accumulation"].mean()) > 0.1  # the tiny nerfacto did learn the object

    trainer.train()
    assert pipeline.style_ready and model.trainable == list(range(len(model.style_names)))
    cache = model.sample_cache
    assert cache is not None
    # The cached samples are nerfacto's (weights below cache_min_weight left out).
    train_camera = pipeline.datamanager.train_dataset.cameras[model.cached_cameras[0] : model.cached_cameras[0] + 1]
    expected = _render(nerfacto, train_camera)["accumulation"].reshape(-1)
    _, height, width = cache.image_shape
    cached = cache.accumulation[: height * width]
    assert float((cached - expected).abs().max()) < 16 * model.config.cache_min_weight
    # Nerfacto's weights did not move, and the styles render differently from the photorealistic scene.
    after = {k[len("external_geometry.model.") :]: v for k, v in model.state_dict().items() if "external_geometry" in k}
    assert before.keys() <= after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    renders = _render(model, camera)
    styled = [renders[name] for name in model.style_names]
    assert all(float((s - renders["original"]).abs().mean()) > 0.01 for s in styled)
    assert float((styled[0] - styled[1]).abs().mean()) > 0.005


def test_a_finished_run_on_nerfacto_geometry_renders_from_its_checkpoint(
    nerfacto_run: tuple[Path, Any], tiny_scene: Path, tmp_path: Path
) -> None:
    """The run's checkpoint holds the nerfacto weights too: ns-render's path (config.yml, then the checkpoint)."""
    from nerfstudio.utils.eval_utils import eval_setup

    run, _ = nerfacto_run
    config = short_run_config("mm-nerf", tiny_scene, tmp_path, iterations=3)
    config.pipeline.model.geometry_from = run
    config.pipeline.stylized_views = 2
    config.set_timestamp()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    config.save_config()
    trainer.train()
    camera = _camera(trainer.pipeline)
    trained = _render(trainer.pipeline.model, camera)
    _, loaded, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="inference")
    again = _render(loaded.model, camera)
    for name in ("original", *trainer.pipeline.model.style_names):
        torch.testing.assert_close(again[name], trained[name], atol=1e-5, rtol=0)


def test_base_appearance_trains_on_nerfacto_samples(nerfacto_run: tuple[Path, Any], tiny_scene: Path, tmp_path: Path):
    """Methods that learn their own appearance (the guided ones) train it on the nerfacto run's samples."""
    run, nerfacto_pipeline = nerfacto_run
    config = short_run_config("mmstyle-base", tiny_scene, tmp_path, iterations=60)
    config.pipeline.model.geometry_from = run
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model: Any = trainer.pipeline.model
    assert model.external_geometry is not None and bool(model.field.contracted)
    camera = _camera(trainer.pipeline)
    target = _render(nerfacto_pipeline.model, camera)["rgb"]
    start = float(((_render(model, camera)["rgb"] - target) ** 2).mean())
    trainer.train()
    end = float(((_render(model, camera)["rgb"] - target) ** 2).mean())
    assert end < 0.5 * start, (start, end)
    torch.testing.assert_close(
        _render(model, camera)["accumulation"],
        _render(nerfacto_pipeline.model, camera)["accumulation"],
        atol=1e-5,
        rtol=0,
    )


def test_geometry_from_a_run_on_other_poses_is_refused_before_anything_is_written(
    nerfacto_run: tuple[Path, Any], tiny_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    run, _ = nerfacto_run
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    transforms = json.loads((moved / "dataparser_transforms.json").read_text())
    transforms["scale"] = transforms["scale"] * 2
    (moved / "dataparser_transforms.json").write_text(json.dumps(transforms))
    for bad, says in ((moved, "normalised the camera poses differently"), (tmp_path / "none", "no nerfstudio")):
        config = short_run_config("mm-nerf", tiny_scene, tmp_path, iterations=3)
        config.pipeline.model.geometry_from = bad
        config.set_timestamp()
        with pytest.raises(SystemExit) as raised:
            config.save_config()
        assert raised.value.code == 2
        assert not config.get_base_dir().exists()
        assert says in " ".join(capsys.readouterr().out.split())


def test_ns_train_names_a_missing_geometry_run_in_one_line(tiny_scene: Path, tmp_path: Path) -> None:
    flags = ("--pipeline.model.geometry-from", str(tmp_path / "no-such-run"))
    error, _ = ns_train_refusal("mm-nerf", tiny_scene, tmp_path / "out", *flags)
    assert "no nerfstudio checkpoint there" in error


def test_ed_nerf_edits_on_a_nerfacto_runs_geometry(
    nerfacto_run: tuple[Path, Any], tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    """A guided method reconstructs its latent appearance and edits it on nerfacto's samples; the density stays."""
    run, nerfacto_pipeline = nerfacto_run
    config = short_run_config("ed-nerf", tiny_scene, tmp_path, iterations=8, guidance_model=tiny_guidance_model)
    config.pipeline.model.geometry_from = run
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model: Any = trainer.pipeline.model
    assert model.external_geometry is not None and not model.keeps_source_appearance
    features = model.field.feature_grid.detach().clone()
    trainer.train()
    assert model.guided_stage
    assert not torch.equal(model.field.feature_grid, features)  # its own (latent) appearance was trained
    camera = _camera(trainer.pipeline)
    theirs = _render(nerfacto_pipeline.model, camera)["accumulation"]
    scale = 1 / 8  # ed-nerf renders latents at the VAE's resolution: compare the opacity at that scale
    with torch.no_grad():
        model.eval()
        ours = model.render_camera(camera, scale=scale)["accumulation"]
        reference = nerfacto_pipeline.model.get_outputs_for_camera(_scaled(camera, scale))["accumulation"]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert float(theirs.mean()) > 0.1


def _scaled(camera: Cameras, scale: float) -> Cameras:
    camera = copy.deepcopy(camera)
    camera.rescale_output_resolution(scale)
    return camera
