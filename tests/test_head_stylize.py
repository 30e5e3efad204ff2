"""``head-stylize`` with tiny components: the head's mirror plane and 360-degree views, mirrored renders, grid
distillation with mirror gradients, the silhouette mask, a short run through nerfstudio's trainer, input errors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import short_run_config
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.data.scene_box import SceneBox

from mmstyle_ns.data.cameras import look_at
from mmstyle_ns.data.datamanagers import (
    GuidedDataManager,
    GuidedDataManagerConfig,
    MirroredViewSetSampling,
    MirroredViewSetSamplingConfig,
    PatchSamplingConfig,
    concat_cameras,
    mirror_cameras,
)
from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig
from mmstyle_ns.guidance.scores import unpack_grid
from mmstyle_ns.models.head_stylize import HeadStylizeModel, HeadStylizeModelConfig

PROMPT = "a cartoon of a red sphere on a plain floor"
Y_AXIS = torch.tensor([0.0, 1.0, 0.0])
"""The generated head's symmetry plane is y = 0 (its face looks along +x, its ears sit at +-y)."""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_head(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated head (``mmstyle-scene --kind head``): 24 views at 32x32 all the way round."""
    from mmstyle_ns.data.scene import generate_scene

    return generate_scene("head", tmp_path_factory.mktemp("head") / "head", num_views=24, resolution=32)


@pytest.fixture(scope="module")
def backbone(tiny_guidance_model: Path) -> DiffusionBackbone:
    backbone = DiffusionBackboneConfig(model_path=str(tiny_guidance_model)).setup(device="cpu")
    assert isinstance(backbone, DiffusionBackbone)
    return backbone


def _angle_deg(a: torch.Tensor, b: torch.Tensor) -> float:
    """Angle between two lines (directions up to sign)."""
    cosine = float((a @ b).abs() / (a.norm() * b.norm()))
    return math.degrees(math.acos(min(1.0, cosine)))


def test_the_head_mirror_plane_is_estimated_and_the_views_go_all_round(tiny_head: Path) -> None:
    """From the views alone: the plane through the look-at centre under which the views mirror each other is the
    head's y = 0 plane; a round of draws covers 360 degrees about it, back of the head included; the second half
    of each step's cameras are the first half's mirrors, and mirroring them again gives the originals back."""
    config = GuidedDataManagerConfig(
        data=tiny_head, dataparser=NerfstudioDataParserConfig(), sampling=MirroredViewSetSamplingConfig(grid_k=2)
    )
    manager = config.setup(device="cpu")
    assert isinstance(manager, GuidedDataManager)
    sampler = manager.sampler
    assert isinstance(sampler, MirroredViewSetSampling)
    outputs = manager.train_dataparser_outputs
    expected = outputs.dataparser_transform[:3, :3].float() @ Y_AXIS
    assert _angle_deg(sampler.normal, expected) < 10.0
    head_centre = outputs.dataparser_scale * (outputs.dataparser_transform[:3, :3] @ torch.tensor([0.0, 0.0, 0.3]))
    head_centre = head_centre + outputs.dataparser_scale * outputs.dataparser_transform[:3, 3]
    assert float((sampler.point - head_centre.float()).norm()) < 0.1

    up = outputs.cameras.camera_to_worlds[:, :3, 1].mean(0)
    front = torch.linalg.cross(sampler.normal, up / up.norm())
    azimuths = []
    for step in range(len(manager.train_dataset) // 4):  # one round: every view once
        cameras, batch = manager.next_train(step)
        assert cameras.shape == (8,) and batch["image"].shape[0] == 4 and batch["mirrored"] is True
        views, mirrors = cameras[:4], cameras[4:]
        expected_mirrors = mirror_cameras(views, sampler.normal, sampler.point)
        torch.testing.assert_close(mirrors.camera_to_worlds, expected_mirrors.camera_to_worlds)
        twice = mirror_cameras(mirrors, sampler.normal, sampler.point)
        torch.testing.assert_close(twice.camera_to_worlds, views.camera_to_worlds, atol=1e-6, rtol=0)
        torch.testing.assert_close(twice.cx, views.cx)
        offsets = views.camera_to_worlds[:, :3, 3] - sampler.point
        azimuths += torch.atan2(offsets @ sampler.normal, offsets @ front).rad2deg().tolist()
    quadrants = {int((a + 180.0) // 90.0) % 4 for a in azimuths}
    assert quadrants == {0, 1, 2, 3}
    assert max(abs(a) for a in azimuths) > 150.0 and min(abs(a) for a in azimuths) < 30.0  # back and front


# ---------------------------------------------------------------------- a synthetic head, symmetric about y = 0
def _head_model(backbone: DiffusionBackbone, **options: Any) -> HeadStylizeModel:
    """A model whose density is an ellipsoid (off-centre in x and z) and whose colour (view-independent) varies in
    x, |y| and z: the scene is mirror-symmetric about y = 0 and about no other plane through the y-axis."""
    config = HeadStylizeModelConfig(
        prompt=PROMPT, grid_resolutions=(41,), regrid_steps=(), init_from_views=False, **options
    )
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    model = config.setup(scene_box=SceneBox(aabb=aabb), num_train_data=1, backbone=backbone)
    assert isinstance(model, HeadStylizeModel)
    field = model.field
    with torch.no_grad():
        positions = field.vertex_positions()
        centre, radii = torch.tensor([0.15, 0.0, 0.1]), torch.tensor([0.45, 0.55, 0.6])
        inside = (((positions - centre) / radii) ** 2).sum(-1) < 1.0
        dense, empty = field.raw_density_for(80.0), field.raw_density_for(1e-4)
        field.density_grid[:, 0] = torch.where(inside, dense, empty)
        x, y, z = positions.unbind(-1)
        coefficients = torch.zeros(len(positions), 3, field.sh_coefficients)
        coefficients[:, 0, 0] = 6.0 * torch.sin(5.0 * x)
        coefficients[:, 1, 0] = 6.0 * torch.cos(6.0 * y.abs())
        coefficients[:, 2, 0] = 5.0 * z + 3.0 * x
        field.feature_grid.copy_(coefficients.view(len(positions), -1))
    model.sampler.update(field)
    return model


def _camera(eye: tuple[float, float, float], size: int = 32, target: tuple[float, ...] = (0.1, 0.0, 0.1)) -> Cameras:
    c2w = torch.from_numpy(look_at(np.array(eye), np.array(target))[:3]).float()
    return Cameras(
        camera_to_worlds=c2w[None], fx=1.2 * size, fy=1.2 * size, cx=size / 2, cy=size / 2, width=size, height=size
    )


def test_the_mirrored_render_of_a_symmetric_scene_is_the_flipped_render(backbone: DiffusionBackbone) -> None:
    model = _head_model(backbone).eval()
    camera = _camera((2.2, 1.3, 0.7))
    render = model.render_camera(camera)["rgb"].detach()
    mirrored = model.render_camera(mirror_cameras(camera, Y_AXIS, torch.zeros(3)))["rgb"].detach()
    torch.testing.assert_close(mirrored.flip(1), render, atol=2e-4, rtol=0)
    assert float((render.flip(1) - render).abs().max()) > 0.2  # the view itself is not symmetric
    wrong = model.render_camera(mirror_cameras(camera, torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3)))["rgb"]
    assert float((wrong.detach().flip(1) - render).abs().max()) > 0.2  # nor is the scene about x = 0


def _spy(monkeypatch: pytest.MonkeyPatch, model: HeadStylizeModel, backbone: DiffusionBackbone) -> dict[str, Any]:
    """Records what the rule is given and returns, the encoded latents (with their gradient kept when they have
    one) and the renders' gradient."""
    seen: dict[str, Any] = {}
    rule_loss, encode, outputs = model.rule.loss, backbone.encode_images, model.guided_outputs

    def loss(*args: Any, **kwargs: Any) -> Any:
        seen["inputs"], seen["score"] = args[1], rule_loss(*args, **kwargs)
        return seen["score"]

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        latents = encode(images)
        if latents.requires_grad:
            latents.retain_grad()
        seen["latents"] = latents
        return latents

    def guided_outputs(*args: Any) -> dict[str, torch.Tensor]:
        out = outputs(*args)
        out["renders"].retain_grad()
        seen["renders"] = out["renders"]
        return out

    monkeypatch.setattr(model.rule, "loss", loss)
    monkeypatch.setattr(backbone, "encode_images", encode_images)
    monkeypatch.setattr(model, "guided_outputs", guided_outputs)
    return seen


def _ring(count: int) -> Cameras:
    """Cameras round the synthetic head at different azimuths and heights."""
    eyes = [(2.3 * math.cos(a), 2.3 * math.sin(a), 0.3 + 0.2 * i) for i, a in enumerate(np.linspace(0.3, 5.5, count))]
    return concat_cameras(*[_camera(eye) for eye in eyes])


@pytest.mark.parametrize("path", ["decoder", "encoder"])
def test_grid_distillation_scores_the_views_once_and_sends_each_tile_to_its_view_and_its_mirror(
    path: str, backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One grid is scored per step; tile i's latent gradient g reaches view i (x 0.75) and, flipped, its mirror
    (x 0.25): through the decoder as the image step (D(z) - D(z - g)) / 2, or through the encoder as J_E^T g."""
    model = _head_model(backbone, gradient_path=path, silhouette_mask=False)
    model.start_guided_stage()
    seen = _spy(monkeypatch, model, backbone)
    views = _ring(4)
    cameras = concat_cameras(views, mirror_cameras(views, Y_AXIS, torch.zeros(3)))
    batch = {"image": torch.ones(4, 32, 32, 4), "mirrored": True}
    outputs = model.guided_outputs(cameras, batch, 0)
    side = model.tile_side(2)
    assert side == 32 and outputs["renders"].shape == (8, 3, 32, 32)  # 2x2 tiles of 4 latents: the teacher's 8
    loss = model.get_loss_dict(outputs, batch)["score_loss"]
    loss.backward()

    grid = seen["inputs"].latents
    latents = seen["latents"]
    assert grid.shape == (1, backbone.latent_channels, 8, 8)  # one diffusion input per step
    torch.testing.assert_close(grid[0, :, :4, 4:], latents[1].detach())  # row-major: view 1 is the top right tile
    torch.testing.assert_close(grid[0, :, 4:, :4], latents[2].detach())
    tiles = unpack_grid(seen["score"].grad, 2)
    assert all(float((tiles[i] - tiles[j]).abs().max()) > 0 for i in range(4) for j in range(i))
    renders = seen["renders"]
    if path == "encoder":
        torch.testing.assert_close(latents.grad[:4], 0.75 * tiles)
        torch.testing.assert_close(latents.grad[4:], 0.25 * tiles.flip(-1))
    else:
        assert not latents.requires_grad  # no encoder backward
        scale = float(backbone.vae.config.scaling_factor)
        with torch.no_grad():
            step = (
                backbone.vae.decode(latents[:4] / scale).sample
                - backbone.vae.decode((latents[:4] - tiles) / scale).sample
            ) / 2
        assert float(step.abs().max()) > 0
        torch.testing.assert_close(renders.grad[:4], 0.75 * step, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(renders.grad[4:], 0.25 * step.flip(-1), atol=1e-6, rtol=1e-4)
    # the score reaches the colours; the frozen density gets nothing
    assert model.field.density_grid.grad is None
    assert model.field.feature_grid.grad is not None and float(model.field.feature_grid.grad.abs().max()) > 0


def test_the_decoder_step_is_the_decoders_change_for_the_latent_step(backbone: DiffusionBackbone) -> None:
    """image_step is D's response to the latent step -g in [0, 1] units: ~J_D g / 2 for a small g (checked against
    the decoder's backward, <u, J_D g> = <J_D^T u, g>; the decoder's reconstruction error cancels), zero for g = 0."""
    model = _head_model(backbone)
    torch.manual_seed(0)
    latents, direction = torch.randn(2, backbone.latent_channels, 4, 4), torch.randn(2, backbone.latent_channels, 4, 4)
    probe = torch.randn(2, 3, 32, 32)
    scale = float(backbone.vae.config.scaling_factor)
    z = latents.clone().requires_grad_(True)
    (vjp,) = torch.autograd.grad((backbone.vae.decode(z / scale).sample * probe).sum(), z)
    expected = float((vjp * direction).sum()) / 2
    small = model.image_step(latents, 1e-3 * direction)
    assert small.shape == (2, 3, 32, 32) and abs(expected) > 0
    assert float((small * probe).sum()) / 1e-3 == pytest.approx(expected, rel=1e-2)
    assert float(model.image_step(latents, torch.zeros_like(latents)).abs().max()) == 0.0


def test_geometry_changes_only_when_asked(backbone: DiffusionBackbone) -> None:
    for freeze in (True, False):
        model = _head_model(backbone, freeze_geometry=freeze)
        model.start_guided_stage()
        batch = {"image": torch.ones(1, 32, 32, 4)}
        model.get_loss_dict(model.guided_outputs(_ring(1), batch, 0), batch)["score_loss"].backward()
        density = model.field.density_grid.grad
        assert (density is not None and float(density.abs().max()) > 0) == (not freeze)


@pytest.mark.parametrize("path", ["decoder", "encoder"])
@pytest.mark.parametrize("rule", ["ld", "sds"])
def test_the_silhouette_mask_zeroes_the_gradient_off_the_head(
    rule: str, path: str, backbone: DiffusionBackbone, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstyle_ns.guidance.rules import LDConfig, SDSConfig

    model = _head_model(backbone, rule=LDConfig() if rule == "ld" else SDSConfig(), gradient_path=path)
    model.start_guided_stage()
    seen = _spy(monkeypatch, model, backbone)
    camera, batch = _ring(1), {"image": torch.ones(1, 32, 32, 4)}
    for masked in (True, False):
        model.config.silhouette_mask = masked
        torch.manual_seed(0)
        outputs = model.guided_outputs(camera, batch, 0)
        model.get_loss_dict(outputs, batch)["score_loss"].backward()
        # encoder: the latents' gradient [1, c, 8, 8] (one view, its tile is the whole grid); decoder: the render's
        grad = seen["latents"].grad if path == "encoder" else seen["renders"].grad
        silhouette = torch.nn.functional.interpolate(outputs["silhouette"], size=grad.shape[-2:], mode="area")
        off, on = silhouette[0, 0] == 0, silhouette[0, 0] > 0.9
        assert int(off.sum()) >= 8 and int(on.sum()) >= 8  # the head fills part of the picture
        assert float(grad[..., on].abs().max()) > 0
        assert (float(grad[..., off].abs().max()) == 0.0) == masked


# ---------------------------------------------------------------------- through nerfstudio's trainer
def test_a_short_run_from_a_base_run_stylizes_the_colours_and_renders(
    tiny_head: Path, tiny_guidance_model: Path, tmp_path: Path
) -> None:
    """ns-train mmstyle-base, then ns-train head-stylize --load-dir <its nerfstudio_models>: straight into the
    stylization, the base geometry kept, the colours changed; the run loads back as ns-render loads it."""
    from nerfstudio.utils.eval_utils import eval_setup

    base_config = short_run_config("mmstyle-base", tiny_head, tmp_path / "base", iterations=40)
    base_config.pipeline.model.grid_resolutions = (16, 32, 48)  # enough for 32 x 32 views; small checkpoints
    base = base_config.setup(local_rank=0, world_size=1)
    base.setup()
    base.train()
    base_field = base.pipeline.model.field
    config = short_run_config("head-stylize", tiny_head, tmp_path, iterations=4, guidance_model=tiny_guidance_model)
    config.pipeline.model.prompt = PROMPT
    config.pipeline.model.reconstruction_steps = 0
    config.load_dir = base_config.get_checkpoint_dir()
    config.save_config()  # what ns-train does first (after the input checks)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer._start_step == 40
    model = trainer.pipeline.model
    assert isinstance(model, HeadStylizeModel)
    assert torch.equal(model.field.feature_grid, base_field.feature_grid)
    trainer.train()
    assert model.guided_stage and not model.field.density_grid.requires_grad
    assert torch.equal(model.field.density_grid, base_field.density_grid)
    assert float((model.field.feature_grid - base_field.feature_grid).abs().max()) > 1e-3
    _, losses, metrics = trainer.pipeline.get_eval_loss_dict(44)  # what the trainer logs as "Eval Loss"
    assert set(losses) == {"rgb_loss"} and math.isfinite(float(losses["rgb_loss"])) and "psnr" in metrics
    field = model.viewer_prompt  # the viewer's "Prompt" text field: typing a prompt restyles from the next step
    assert field.name == "Prompt" and field.default_value == PROMPT
    field.value = "a painting of a red sphere on grass"
    field.cb_hook(field)
    assert model.config.prompt == "a painting of a red sphere on grass"
    field.value = " "
    field.cb_hook(field)
    assert model.config.prompt == "a painting of a red sphere on grass"

    _, pipeline, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="inference")
    reloaded = pipeline.model
    assert isinstance(reloaded, HeadStylizeModel)
    torch.testing.assert_close(reloaded.field.feature_grid, model.field.feature_grid.detach())
    camera = trainer.pipeline.datamanager.train_dataset.cameras[0:1]
    rgb = reloaded.get_outputs_for_camera(camera)["rgb"]
    assert rgb.shape == (32, 32, 3) and torch.isfinite(rgb).all()


@pytest.mark.parametrize("problem", ["model-path", "prompt", "patches"])
def test_bad_inputs_fail_before_anything_is_written(
    problem: str, tiny_head: Path, tiny_guidance_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    config = short_run_config("head-stylize", tiny_head, tmp_path, guidance_model=tiny_guidance_model)
    config.pipeline.model.prompt = PROMPT
    expected = {
        "model-path": "--pipeline.guidance.model-path <a Stable Diffusion folder",
        "prompt": '--pipeline.model.prompt "..."',
        "patches": "head-stylize renders whole views",
    }[problem]
    if problem == "model-path":
        config.pipeline.guidance.model_path = None
    elif problem == "prompt":
        config.pipeline.model.prompt = "  "
    else:
        config.pipeline.datamanager.sampling = PatchSamplingConfig()
    with pytest.raises(ValueError, match="") as error:
        config.pipeline.check_inputs()
    assert expected in str(error.value)
    with pytest.raises(SystemExit) as stopped:
        main(config)
    assert stopped.value.code == 2 and expected in capsys.readouterr().out  # one message, no traceback
    assert not (tmp_path / "runs").exists()


def test_the_depth_condition_is_inverse_depth_over_the_head() -> None:
    """Nearest pixel 1, farthest 0 over the silhouette, empty space 0; a view without the head is all zeros."""
    from mmstyle_ns.guidance.scores import depth_control_image

    depth = torch.tensor([[1.0, 2.0], [4.0, 9.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    accumulation = torch.tensor([[1.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2).repeat(2, 1, 1, 1)
    accumulation[1] = 0.0
    image = depth_control_image(depth, accumulation)
    inverse = torch.tensor([1.0, 0.5, 0.25])
    expected = (inverse - 0.25) / 0.75
    torch.testing.assert_close(image[0].flatten()[:3], expected)
    assert float(image[0, 0, 1, 1]) == 0.0 and float(image[1].abs().max()) == 0.0


def test_a_controlnet_conditions_the_score_on_the_rendered_depth(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a ControlNet loaded, the rule gets the views' depth conditions tiled like their latents, near bright;
    depth_condition False (or no ControlNet) scores without one."""
    from mmstyle_ns.guidance.tiny import build_tiny_stable_diffusion

    root = build_tiny_stable_diffusion(tmp_path / "sd", vae_channels=(8, 8, 8, 8), controlnet=True, seed=0)
    controlled = DiffusionBackboneConfig(model_path=str(root), controlnet_path=str(root / "controlnet")).setup()
    assert isinstance(controlled, DiffusionBackbone) and controlled.controlnet is not None
    for condition in (True, False):
        model = _head_model(controlled, depth_condition=condition)
        model.start_guided_stage()
        seen = _spy(monkeypatch, model, controlled)
        cameras = _ring(4)
        batch = {"image": torch.ones(4, 32, 32, 4), "mirrored": False}
        outputs = model.guided_outputs(cameras, batch, 0)
        model.get_loss_dict(outputs, batch)["score_loss"].backward()
        cond = seen["inputs"].controlnet_cond
        if not condition:
            assert cond is None
            continue
        assert cond is not None and cond.shape == (1, 1, 64, 64)  # 2x2 views of 32 pixels: the grid's pixel size
        assert 0.0 <= float(cond.min()) and float(cond.max()) == pytest.approx(1.0, abs=1e-2)
        tiles = unpack_grid(cond, 2)
        depth, silhouette = outputs["view_depth"], outputs["silhouette"]
        for tile, d, s in zip(tiles, depth, silhouette, strict=True):
            solid = s > 0.5  # the head, as depth_control_image sees it
            nearest, farthest = (d == d[solid].min()) & solid, (d == d[solid].max()) & solid
            torch.testing.assert_close(tile[nearest], s[nearest])  # 1 x the accumulation
            assert float(tile[farthest].abs().max()) < 1e-6
            assert float(tile[solid].std()) > 0.05  # a depth map, not a silhouette
            empty = s < 0.01
            assert bool(empty.any()) and float(tile[empty].abs().max()) < 0.01  # empty space is black
        assert model.field.feature_grid.grad is not None  # the score still reaches the colours
    assert all(p.grad is None for p in controlled.controlnet.parameters())
