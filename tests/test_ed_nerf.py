"""``ed-nerf`` (ED-NeRF) with tiny components: a latent field that follows the VAE, the refinement layer, DDS
editing with and without masks, viewer outputs, and input errors before anything is written."""

from __future__ import annotations

import contextlib
import copy
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import short_run_config
from nerfstudio.cameras.cameras import Cameras

from mmstyle_ns.models.ed_nerf import EDNeRFModel
from mmstyle_ns.pipelines.ed_nerf import EDNeRFPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(scene: Path, root: Path, guidance: Path, iterations: int, reconstruction: int) -> Any:
    config = short_run_config("ed-nerf", scene, root, iterations=iterations, guidance_model=guidance)
    config.pipeline.model.reconstruction_steps = reconstruction
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    return trainer


@pytest.fixture(scope="module")
def stage_one(tiny_scene: Path, tiny_guidance_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A run that stays in stage 1 (latent reconstruction) for its 150 steps (16 rays each)."""
    torch.manual_seed(0)
    trainer = _trainer(tiny_scene, tmp_path_factory.mktemp("ed"), tiny_guidance_model, 150, 1000)
    model = trainer.pipeline.model
    initial = {k: v.detach().clone() for k, v in model.refinement.state_dict().items()}
    before = _mean_latent_error(trainer.pipeline)
    trainer.train()
    return trainer, initial, before, _mean_latent_error(trainer.pipeline)


@torch.no_grad()
def _mean_latent_error(pipeline: Any) -> float:
    """Mean squared error of the refined latent renders of every training view (eval mode: no jitter)."""
    model, latents = pipeline.model, pipeline.train_latents
    cameras = pipeline.datamanager.train_dataset.cameras
    model.eval()
    errors = [
        float(((model.latent_views(cameras[i : i + 1])["refined"] - latents[i]) ** 2).mean())
        for i in range(len(latents))
    ]
    model.train()
    return sum(errors) / len(errors)


def test_latent_field_follows_the_backbones_vae(stage_one: Any) -> None:
    trainer, _, _, _ = stage_one
    pipeline = trainer.pipeline
    assert isinstance(pipeline, EDNeRFPipeline)
    model = pipeline.model
    assert isinstance(model, EDNeRFModel)
    backbone = pipeline.backbone
    assert model.field.out_channels == backbone.latent_channels and model.field.activation == "none"
    assert model.refinement.config.channels == backbone.latent_channels
    with torch.no_grad():
        white = backbone.encode_images(torch.ones(1, 3, 32, 32)).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.background_latent, white, rtol=0, atol=1e-5)
    dataset = pipeline.datamanager.train_dataset
    assert pipeline.train_latents is not None and dataset is not None
    assert pipeline.train_latents.shape == (len(dataset), backbone.latent_channels, 4, 4)  # 32 px / 8
    camera, batch = pipeline.datamanager.next_train(0)
    assert isinstance(camera, Cameras)
    out = model.guided_outputs(camera, pipeline._with_latent(batch, pipeline.train_latents), 0)
    assert out["latent"].shape == (1, backbone.latent_channels, 4, 4) and out["latent"].requires_grad


def test_stage_one_fits_the_latents_and_trains_the_refinement_layer(stage_one: Any) -> None:
    """The refinement layer starts as the identity (zero output convolution) and is trained with the field."""
    trainer, initial, before, after = stage_one
    model = trainer.pipeline.model
    assert float(initial["conv_out.weight"].abs().max()) == 0.0
    assert not torch.equal(model.refinement.state_dict()["conv_out.weight"], initial["conv_out.weight"])
    assert after < 0.7 * before, (before, after)
    assert not model.guided_stage


def _guided(trainer: Any, source: str, target: str) -> tuple[EDNeRFModel, Any, dict[str, Any]]:
    pipeline = trainer.pipeline
    model = pipeline.model
    model.config.source_prompt, model.config.target_prompt = source, target
    model.start_guided_stage()
    camera, batch = pipeline.datamanager.next_train(1)
    return model, camera, pipeline._with_latent(batch, pipeline.train_latents)


def test_equal_prompts_on_an_unchanged_scene_give_no_edit(stage_one: Any) -> None:
    """DDS with the source prompt as target, on a render equal to its source latent: no gradient at all."""
    trainer, _, _, _ = stage_one
    model, camera, batch = _guided(trainer, "a red cube on grass", "a red cube on grass")
    model.zero_grad(set_to_none=True)
    outputs = model.guided_outputs(camera, batch, 0)
    batch["latent_target"] = outputs["latent"].detach().clone()
    losses = model.get_loss_dict(outputs, batch)
    assert set(losses) == {"score_loss"}
    torch.stack(list(losses.values())).sum().backward()
    grad = model.field.feature_grid.grad
    assert grad is None or float(grad.abs().max()) == 0.0
    # another target prompt does move the scene
    model.zero_grad(set_to_none=True)
    model.config.target_prompt = "a blue cube on grass"
    outputs = model.guided_outputs(camera, batch, 0)
    model.get_loss_dict(outputs, batch)["score_loss"].backward()
    assert model.field.feature_grid.grad is not None and float(model.field.feature_grid.grad.abs().max()) > 0


def test_masked_edit_leaves_pixels_outside_the_mask_to_reconstruction(stage_one: Any) -> None:
    trainer, _, _, _ = stage_one
    model, camera, batch = _guided(trainer, "a red cube on grass", "a blue cube on grass")
    height, width = batch["image"].shape[:2]
    mask = torch.zeros(height, width, 1, dtype=torch.bool)
    mask[:, : width // 2] = True  # the left half may change
    batch["mask"] = mask
    outputs = model.guided_outputs(camera, batch, 0)
    latent = outputs["latent"]
    latent.retain_grad()
    losses = model.get_loss_dict(outputs, batch)
    assert set(losses) == {"score_loss", "masked_reconstruction"}
    (score_grad,) = torch.autograd.grad(losses["score_loss"], latent, retain_graph=True)
    right = score_grad[..., latent.shape[-1] // 2 :]
    assert float(right.abs().max()) == 0.0 and float(score_grad.abs().max()) > 0
    (recon_grad,) = torch.autograd.grad(losses["masked_reconstruction"], latent)
    assert float(recon_grad[..., : latent.shape[-1] // 2].abs().max()) == 0.0


def test_viewer_outputs_are_decoded_rgb_at_full_resolution(stage_one: Any) -> None:
    trainer, _, _, _ = stage_one
    model = trainer.pipeline.model
    camera = trainer.pipeline.datamanager.eval_dataset.cameras[0:1]
    model.eval()  # no sampler jitter
    outputs = model.get_outputs_for_camera(camera)
    with torch.no_grad():
        views = model.latent_views(camera)
        expected = trainer.pipeline.backbone.decode_latents(views["refined"])[0].permute(1, 2, 0)
    model.train()
    h, w = int(camera.height), int(camera.width)
    assert outputs["rgb"].shape == (h, w, 3) and float(outputs["rgb"].min()) >= 0 and float(outputs["rgb"].max()) <= 1
    assert outputs["latent"].shape == (h, w, 3) and outputs["depth"].shape == (h, w, 1)
    torch.testing.assert_close(outputs["rgb"], expected, rtol=0, atol=1e-5)
    channels = trainer.pipeline.backbone.latent_channels  # every latent channel is an output of its own
    assert [name for name in outputs if name.startswith("latent_")] == [f"latent_{c}" for c in range(channels)]
    refined = views["refined"][0]  # [c, h/8, w/8], each latent pixel shown as a block of (h/8) x (w/8) pixels
    for c in range(channels):
        assert outputs[f"latent_{c}"].shape == (h, w, 1)
        torch.testing.assert_close(
            outputs[f"latent_{c}"][:: h // refined.shape[1], :: w // refined.shape[2], 0], refined[c]
        )


@pytest.mark.parametrize("problem", ["model-path", "source-prompt", "target-prompt", "missing-folder"])
def test_bad_inputs_fail_before_anything_is_written(
    problem: str, tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    config = short_run_config("ed-nerf", tiny_scene, tmp_path, guidance_model=tiny_guidance_model)
    expected = {
        "model-path": "--pipeline.guidance.model-path <a Stable Diffusion folder",
        "source-prompt": '--pipeline.model.source-prompt "..."',
        "target-prompt": '--pipeline.model.target-prompt "..."',
        "missing-folder": "is neither a folder nor a hub id",
    }[problem]
    if problem == "model-path":
        config.pipeline.guidance.model_path = None
    elif problem == "missing-folder":
        config.pipeline.guidance.model_path = str(tmp_path / "no-such-model")
    else:
        setattr(config.pipeline.model, problem.replace("-", "_"), "  ")
    with pytest.raises(SystemExit) as stopped:
        main(config)
    assert stopped.value.code == 2 and expected in capsys.readouterr().out  # one message, no traceback
    assert not (tmp_path / "runs").exists()


def test_the_edit_changes_latent_colours_only(stage_one: Any) -> None:
    """In the guided stage the density and the refinement layer are fixed (edit_refinement off): the score's
    gradient reaches the feature grid alone."""
    trainer, _, _, _ = stage_one
    model, camera, batch = _guided(trainer, "a red cube on grass", "a blue cube on grass")
    assert not model.field.density_grid.requires_grad
    assert not any(p.requires_grad for p in model.refinement.parameters())
    model.zero_grad(set_to_none=True)
    model.get_loss_dict(model.guided_outputs(camera, batch, 0), batch)["score_loss"].backward()
    assert model.field.density_grid.grad is None
    assert all(p.grad is None for p in model.refinement.parameters())
    assert model.field.feature_grid.grad is not None and float(model.field.feature_grid.grad.abs().max()) > 0


def test_a_run_that_edits_from_its_first_step_freezes_the_geometry(
    tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    trainer = _trainer(tiny_scene, tmp_path, tiny_guidance_model, 3, 0)
    model = trainer.pipeline.model
    assert not model.guided_stage and model.field.density_grid.requires_grad
    trainer.train()  # the first step's callbacks carve empty space, then switch to the edit before any update
    assert model.guided_stage and not model.field.density_grid.requires_grad
    assert model.field.density_grid.grad is None and model.field.feature_grid.grad is not None
    assert model.guided_span == (0, 3) and model.guided_progress() == (model.step, 3)  # for timestep annealing


def test_latent_camera_matches_the_vae_input_size(stage_one: Any) -> None:
    """Images whose sides are not multiples of 8 are encoded at the nearest multiple; the latent camera renders
    exactly that latent size, intrinsics scaled per axis."""
    from mmstyle_ns.data.latents import vae_input_size

    trainer, _, _, _ = stage_one
    model = trainer.pipeline.model
    camera = copy.deepcopy(trainer.pipeline.datamanager.train_dataset.cameras[0:1])
    camera.rescale_output_resolution(100 / 32, scale_rounding_mode="round")  # 100 x 100 pixels
    assert (int(camera.height), int(camera.width)) == (100, 100)
    scaled = model.latent_camera(camera)
    h, w = (side // 8 for side in vae_input_size(100, 100, 8))
    assert (int(scaled.height), int(scaled.width)) == (h, w) == (13, 13)
    torch.testing.assert_close(scaled.fx, camera.fx * 13 / 100)
    torch.testing.assert_close(scaled.cy, camera.cy * 13 / 100)
    assert model.latent_views(camera)["refined"].shape[-2:] == (13, 13)


def test_a_box_on_the_command_line_is_the_edit_region(stage_one: Any) -> None:
    """With edit_box, the pixels whose rendered surface lies in the box are edited: a box around the whole scene
    lets the score reach every covered pixel, a box outside the scene none (all go to reconstruction)."""
    trainer, _, _, _ = stage_one
    model, camera, batch = _guided(trainer, "a red cube on grass", "a blue cube on grass")
    batch.pop("mask", None)
    try:
        for box, covered in (((-10.0, -10.0, -10.0, 10.0, 10.0, 10.0), True), ((5.0, 5.0, 5.0, 6.0, 6.0, 6.0), False)):
            model.config.edit_box = box
            outputs = model.guided_outputs(camera, batch, 0)
            mask = outputs["edit_mask"]
            solid = outputs["accumulation"][..., 0] > 0.5
            assert bool((mask[0, 0] > 0).eq(solid & torch.tensor(covered)).all())
            latent = outputs["latent"]
            losses = model.get_loss_dict(outputs, batch)
            assert "masked_reconstruction" in losses
            (grad,) = torch.autograd.grad(losses["score_loss"], latent)
            outside = grad * (1 - mask)
            assert float(outside.abs().max()) == 0.0
            assert (float(grad.abs().max()) > 0) == (covered and bool(solid.any()))
    finally:
        model.config.edit_box = None


def test_the_target_prompt_follows_the_viewer_text_field(stage_one: Any) -> None:
    """The viewer's "Target prompt" field sets what the next steps edit towards (an empty text is ignored)."""
    trainer, _, _, _ = stage_one
    model, camera, batch = _guided(trainer, "a red cube on grass", "a red cube on grass")
    element = model.viewer_target_prompt
    assert element.name == "Target prompt"
    outputs = model.guided_outputs(camera, batch, 0)
    batch["latent_target"] = outputs["latent"].detach().clone()
    model.zero_grad(set_to_none=True)
    model.get_loss_dict(outputs, batch)["score_loss"].backward()
    assert model.field.feature_grid.grad is None or float(model.field.feature_grid.grad.abs().max()) == 0.0
    element.value = "a blue cube on grass"  # what typing into the field does, then the viewer calls the hook
    element.cb_hook(element)
    assert model.config.target_prompt == "a blue cube on grass"
    model.zero_grad(set_to_none=True)
    model.get_loss_dict(model.guided_outputs(camera, batch, 0), batch)["score_loss"].backward()
    assert model.field.feature_grid.grad is not None and float(model.field.feature_grid.grad.abs().max()) > 0
    element.value = "  "
    element.cb_hook(element)
    assert model.config.target_prompt == "a blue cube on grass"


@contextlib.contextmanager
def _solid_block(model: EDNeRFModel) -> Iterator[tuple[torch.Tensor, float]]:
    """The model's density becomes a solid cube in the middle of its grid (empty elsewhere) inside the block, and
    is restored after it; yields the cube's centre and half side."""
    field = model.field
    saved = field.density_grid.detach().clone(), model.sampler.occupancy.clone()
    centre = field.aabb.mean(dim=0)
    half = 0.25 * float((field.aabb[1] - field.aabb[0]).min())
    with torch.no_grad():
        inside = ((field.vertex_positions() - centre).abs() <= half).all(dim=-1, keepdim=True)
        solid, empty = field.raw_density_for(1e3), field.raw_density_for(1e-4)
        field.density_grid.copy_(torch.where(inside, solid, empty))
        model.sampler.update(field)
    try:
        yield centre, half
    finally:
        with torch.no_grad():
            field.density_grid.copy_(saved[0])
        model.sampler.occupancy = saved[1]


def test_a_rectangle_drawn_in_a_view_becomes_a_box_around_what_it_covered(stage_one: Any) -> None:
    """box_from_view on a scene that is a solid block: a rectangle over the whole view gives a box around the
    block (about as deep as it is wide, from one side only), which marks the block's pixels as the edit region when
    projected back with the rendered depth; a rectangle over empty space gives no box."""
    trainer, _, _, _ = stage_one
    block = trainer.pipeline.model
    with _solid_block(block) as (centre, half):
        block.eval()
        try:
            _check_box_from_view(block, trainer.pipeline.datamanager.train_dataset.cameras[0:1], centre, half)
        finally:
            block.config.edit_box = None
            block.train()


def _check_box_from_view(block: EDNeRFModel, camera: Cameras, centre: torch.Tensor, half: float) -> None:
    box = block.box_from_view(camera, (0.0, 0.0), (1.0, 1.0))
    assert box is not None
    lower, upper = torch.tensor(box[:3]) - centre, torch.tensor(box[3:]) - centre
    assert bool((lower <= -0.8 * half).all()) and bool((upper >= 0.8 * half).all()), box  # the block, every axis
    assert bool((lower >= -1.5 * half).all()) and bool((upper <= 1.5 * half).all()), box  # and not much more
    with torch.no_grad():
        views = block.latent_views(camera)
    block.config.edit_box = box
    mask = block.box_mask(camera, views["depth"], views["accumulation"])[0, 0] > 0
    solid = views["accumulation"][..., 0] > 0.5
    assert bool(solid.any()) and bool(mask.eq(solid).all())
    corner = block.box_from_view(camera, (0.0, 0.0), (0.05, 0.05))  # the view's corner shows empty space
    assert corner is None


def test_the_viewers_prompt_field_and_edit_box_drawing_reach_the_model(stage_one: Any, tmp_path: Path) -> None:
    """Driven as the browser drives it (viser's websocket protocol). The viewer sends a "Target prompt" text field
    holding the model's target; a client's edit of it becomes the target of the next training steps. Pressing
    "Draw edit box" and drawing a rectangle (viser's rect-select pointer event) makes the model's edit box the box
    around what the rectangle covered, shown in the "Edit box" field; typing an empty box clears it."""
    import time

    from nerfstudio.viewer.viewer import Viewer
    from viser import _messages
    from viser_client import ViewerClient

    trainer, _, _, _ = stage_one
    pipeline = trainer.pipeline
    model = pipeline.model
    model.config.target_prompt = "a blue cube on grass"
    model.viewer_target_prompt.value = "a blue cube on grass"
    solid = _solid_block(model)  # a scene that the viewer's camera surely sees
    centre, half = solid.__enter__()
    config = trainer.config
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    config.viewer.websocket_host, config.viewer.websocket_port = "127.0.0.1", port
    viewer = Viewer(config.viewer, log_filename=tmp_path / "viewer.txt", datapath=tmp_path, pipeline=pipeline)
    try:
        viewer.init_scene(train_dataset=pipeline.datamanager.train_dataset, train_state="training")
        with ViewerClient(port) as client:
            client.receive(3.0)
            field = client.gui["Target prompt"]
            assert field["type"] == "GuiAddTextMessage" and field["value"] == "a blue cube on grass"
            assert client.gui["Draw edit box"]["type"] == "GuiAddButtonMessage"
            assert client.gui["Edit box"]["value"] == ""
            # the first training camera, in viser's units and convention
            c2w = pipeline.datamanager.train_dataset.cameras.camera_to_worlds[0].double()
            from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO
            from viser import transforms as vtf

            rotation = vtf.SO3.from_matrix(c2w[:, :3].numpy()) @ vtf.SO3.from_x_radians(np.pi)
            position = c2w[:, 3].numpy() * VISER_NERFSTUDIO_SCALE_RATIO
            client.set_camera(tuple(rotation.wxyz), tuple(position), 0.9)  # the first camera registers the client
            client.receive(1.0)
            client.set_value("Target prompt", "a green cube on grass")
            deadline = time.monotonic() + 20.0
            while model.config.target_prompt != "a green cube on grass" and time.monotonic() < deadline:
                client.receive(0.5)
            assert model.config.target_prompt == "a green cube on grass"
            client.set_value("Draw edit box", True)
            client.receive(1.0)
            client._send(
                _messages.ScenePointerMessage("rect-select", None, None, ((0.0, 0.0), (1.0, 1.0)))  # type: ignore[arg-type]
            )
            deadline = time.monotonic() + 20.0
            while model.config.edit_box is None and time.monotonic() < deadline:
                client.receive(0.5)
            box = model.config.edit_box
            assert box is not None
            assert all(
                lo <= c - 0.8 * half and hi >= c + 0.8 * half
                for lo, hi, c in zip(box[:3], box[3:], centre.tolist(), strict=True)
            )
            assert model.viewer_edit_box.value.split() == [f"{x:.3f}" for x in box]
            client.set_value("Edit box", "")
            deadline = time.monotonic() + 10.0
            while model.config.edit_box is not None and time.monotonic() < deadline:
                client.receive(0.5)
            assert model.config.edit_box is None
    finally:
        model.config.edit_box = None
        solid.__exit__(None, None, None)
        viewer.viser_server.stop()
        for machine in list(viewer.render_statemachines.values()):
            machine.running = False


def test_stage_one_can_reuse_the_geometry_of_a_base_run(
    tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    """--pipeline.model.geometry-from <mmstyle-base run>: the latent field starts with the base run's density (in
    its box, resampled to the latent field's final grid), keeps it through stage 1 (no regrids) and trains its
    latent appearance on it (measured on the toy scene in docs/ed_nerf.md)."""
    torch.manual_seed(0)
    base_config = short_run_config("mmstyle-base", tiny_scene, tmp_path / "base", iterations=60)
    base = base_config.setup(local_rank=0, world_size=1)
    base.setup()
    base.train()
    base_field = base.pipeline.model.field
    config = short_run_config("ed-nerf", tiny_scene, tmp_path / "ed", iterations=30, guidance_model=tiny_guidance_model)
    config.pipeline.model.reconstruction_steps = 1000
    config.pipeline.model.geometry_from = base_config.get_base_dir()
    config.save_config()  # what ns-train does first
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = trainer.pipeline.model
    field = model.field
    assert model.geometry_frozen and not field.density_grid.requires_grad
    torch.testing.assert_close(field.aabb, base_field.aabb, rtol=0, atol=0)
    assert max(field.shape) == config.pipeline.model.grid_resolutions[-1]
    with torch.no_grad():
        vertices = field.vertex_positions()
        expected = base_field.density_at(vertices)[:, 0]
        torch.testing.assert_close(field.density_at(vertices)[:, 0], expected, rtol=1e-4, atol=1e-4)
    assert field.feature_grid.shape == (field.density_grid.shape[0], field.feature_dim)
    assert bool(model.sampler.initialized) and bool(model.views_initialized)
    density, features = field.density_grid.detach().clone(), field.feature_grid.detach().clone()
    trainer.train()
    torch.testing.assert_close(field.density_grid.detach(), density, rtol=0, atol=0)  # frozen, no regrid either
    assert float((field.feature_grid.detach() - features).abs().max()) > 0  # the appearance trained
    import shutil

    from nerfstudio.utils.eval_utils import eval_setup

    shutil.rmtree(base_config.get_checkpoint_dir())  # a finished run renders from its own checkpoint alone
    _, pipeline, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="inference")
    reloaded = pipeline.model
    assert isinstance(reloaded, EDNeRFModel)
    torch.testing.assert_close(reloaded.field.density_grid, density, rtol=0, atol=0)


def test_geometry_from_a_folder_without_checkpoints_fails_before_anything_is_written(
    tiny_scene: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    config = short_run_config("ed-nerf", tiny_scene, tmp_path, guidance_model=tiny_guidance_model)
    config.pipeline.model.geometry_from = tmp_path / "nowhere"
    config.set_timestamp()
    with pytest.raises(SystemExit) as raised:
        config.save_config()  # what ns-train does first: check every input, then write config.yml
    assert raised.value.code == 2
    assert not config.get_base_dir().exists()
