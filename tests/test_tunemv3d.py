"""``tunemv3d`` (TuneMV3D) with tiny components: zero-initialised modulation equals the frozen model, gradients reach
only the trainable parts, aggregation ignores the order of views, the field renders views in their own pixels and
learns them, sampling, training through nerfstudio's trainer, and input errors before anything is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.scene_box import SceneBox

from mmstyle_ns.data.datamanagers import cameras_at_size
from mmstyle_ns.fields.aggregation import AggregationField, AggregationFieldConfig, ViewSet

pytestmark = pytest.mark.usefixtures("one_thread")


def _orbit_cameras(count: int, size: int = 64, radius: float = 3.2, elevation: float = 30.0) -> Cameras:
    """Cameras on a ring around the origin looking at it (nerfstudio/OpenGL convention), ``size`` pixels."""
    import numpy as np

    from mmstyle_ns.data.cameras import intrinsics_from_fov, look_at

    poses = []
    for i in range(count):
        azimuth = 2 * np.pi * i / count + 0.3
        eye = radius * np.array(
            [
                np.cos(azimuth) * np.cos(np.radians(elevation)),
                np.sin(azimuth) * np.cos(np.radians(elevation)),
                np.sin(np.radians(elevation)),
            ]
        )
        poses.append(look_at(eye, np.zeros(3))[:3])
    fx, fy, cx, cy = intrinsics_from_fov(size, size, 36.0)
    return Cameras(
        camera_to_worlds=torch.tensor(np.stack(poses), dtype=torch.float32),
        fx=float(fx),
        fy=float(fy),
        cx=float(cx),
        cy=float(cy),
        width=size,
        height=size,
    )


@pytest.fixture(scope="module")
def backbone(tiny_guidance_model: Path) -> Any:
    from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig

    return DiffusionBackboneConfig(model_path=str(tiny_guidance_model)).setup(device="cpu")


def _model(backbone: Any, **overrides: Any) -> Any:
    from mmstyle_ns.models.tunemv3d import TuneMV3DModelConfig

    torch.manual_seed(0)
    config = TuneMV3DModelConfig(feature_dim=8, encoder_width=16, num_samples=16, **overrides)
    config.field = AggregationFieldConfig(hidden=32, blocks=2)
    return config.setup(
        scene_box=SceneBox(aabb=torch.tensor([[-1.0] * 3, [1.0] * 3])), num_train_data=8, backbone=backbone
    )


@pytest.mark.parametrize(("field_output", "raw_noise"), [("x0", True), ("x0", False), ("features", True)])
def test_zero_initialised_modulation_is_the_frozen_model(backbone: Any, field_output: str, raw_noise: bool) -> None:
    model = _model(backbone, field_output=field_output, raw_noise=raw_noise)
    assert model.modulator.zero_outputs()
    cameras = _orbit_cameras(3)
    noisy = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = backbone.text_embeddings("a red cube on grass")[:1]
    with torch.no_grad():
        conditional = model.interact(noisy, 700, text, cameras)["eps"]
        guided = model.interact(noisy, 700, text, cameras, guidance_scale=5.0, uncond_emb=backbone.text_embeddings(""))
    steps = torch.full((3,), 700)
    frozen = backbone.unet_with_residuals(noisy, steps, text.expand(3, -1, -1))
    torch.testing.assert_close(conditional, frozen, rtol=0, atol=0)
    empty = backbone.text_embeddings("")[:1]
    torch.testing.assert_close(guided["eps"], model.frozen_prediction(noisy, 700, text, 5.0, empty), rtol=0, atol=0)
    # the same guidance as the backbone's batched call, to float rounding
    torch.testing.assert_close(guided["eps"], backbone.predict_noise(noisy, 700, text, 5.0), rtol=1e-4, atol=1e-5)
    # and through a whole sampling run: the modulated sampler equals independent sampling of every view
    seeds = [torch.Generator().manual_seed(5) for _ in range(2)]
    ours = model.generate(cameras, "a red cube on grass", steps=2, generator=seeds[0])
    independent = model.generate(cameras, "a red cube on grass", steps=2, generator=seeds[1], modulate=False)
    torch.testing.assert_close(ours["latents"], independent["latents"], rtol=0, atol=0)
    width = 4 if field_output == "x0" else int(backbone.unet.config.block_out_channels[0])
    assert ours["images"].shape == (3, 3, 64, 64) and ours["x0"].shape == (3, width, 8, 8)
    assert model.field_pictures(ours["x0"]).shape == (3, 3, 64, 64)


@pytest.mark.parametrize("field_output", ["x0", "features"])
def test_gradients_reach_only_the_trainable_parts(backbone: Any, field_output: str) -> None:
    model = _model(backbone, field_output=field_output)
    cameras = _orbit_cameras(6)
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def backward() -> None:
        model.zero_grad(set_to_none=True)
        losses = model.training_losses(
            latents[:3],
            cameras[torch.arange(3)],
            latents[3:],
            cameras[torch.arange(3, 6)],
            "a blue sphere on grass",
            torch.Generator().manual_seed(3),
        )
        torch.stack(list(losses.values())).sum().backward()

    def grad_sum(part: torch.nn.Module) -> float:
        return sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None)

    backward()
    for module in backbone.frozen_modules():
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    zero_convs = [*model.modulator.encoder.controlnet_down_blocks, model.modulator.encoder.controlnet_mid_block]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for conv in zero_convs for p in conv.parameters())
    if field_output == "x0":  # the field loss trains the encoder and the field from the first step
        assert grad_sum(model.encoder) > 0 and grad_sum(model.field) > 0
    else:  # only the zero convolutions learn at first (their zero weights block everything before them)
        assert grad_sum(model.encoder) == 0 and grad_sum(model.field) == 0
    # one optimizer step makes the modulation non-zero: the model departs from the frozen one, and the denoising
    # loss now reaches the field and the encoder through the copied UNet encoder
    torch.optim.SGD(model.modulator.parameters(), lr=1.0).step()
    assert not model.modulator.zero_outputs()
    backward()
    assert grad_sum(model.encoder) > 0 and grad_sum(model.field) > 0 and grad_sum(model.modulator) > 0
    for module in backbone.frozen_modules():
        assert all(p.grad is None for p in module.parameters())


def test_aggregation_does_not_depend_on_the_order_of_views(backbone: Any) -> None:
    torch.manual_seed(0)
    field = AggregationField(feature_dim=5, out_channels=4)
    cameras = _orbit_cameras(4, size=8)
    views = TuneMV3DModelFor.view_set(torch.randn(4, 5, 8, 8), cameras)
    points = torch.rand(300, 3) * 1.6 - 0.8
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(field.aggregate(points, views), field.aggregate(points, views.permuted(order)))
    # the whole interactive model: permuting the input views permutes its outputs (with a non-zero modulation)
    model = _model(backbone)
    with torch.no_grad():
        for conv in [*model.modulator.encoder.controlnet_down_blocks, model.modulator.encoder.controlnet_mid_block]:
            conv.weight.normal_(0.0, 0.05)
    assert not model.modulator.zero_outputs()
    model.eval()
    noisy = torch.randn(4, 4, 8, 8)
    text = backbone.text_embeddings("two green cubes on stone")[:1]
    with torch.no_grad():
        out = model.interact(noisy, 300, text, _orbit_cameras(4))
        permuted = model.interact(noisy[order], 300, text, _orbit_cameras(4)[order])
    torch.testing.assert_close(permuted["x0"], out["x0"][order], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(permuted["eps"], out["eps"][order], atol=1e-5, rtol=1e-5)


class TuneMV3DModelFor:
    """Access to the model's static helpers without building a model."""

    @staticmethod
    def view_set(features: torch.Tensor, cameras: Cameras) -> ViewSet:
        from mmstyle_ns.models.tunemv3d import TuneMV3DModel

        return TuneMV3DModel.view_set(features, cameras)


def test_field_renders_every_view_in_its_own_pixels(backbone: Any) -> None:
    """A point on the ray of latent pixel (row i, column j) of a view samples that pixel's feature, and the rendered
    images are every camera's own, rows and columns in place (non-square, so a transpose cannot pass)."""
    model = _model(backbone)
    model.eval()
    cameras = model.latent_cameras(_orbit_cameras(3, size=64))
    cameras = cameras_at_size(cameras, 6, 10)  # latent images of 6 rows x 10 columns
    bundle = cameras.generate_rays(camera_indices=torch.arange(3)[:, None])  # [6, 10, 3]
    points = (bundle.origins + 2.5 * bundle.directions).permute(2, 0, 1, 3)  # [3, 6, 10, 3]
    one_hot = torch.eye(60).reshape(60, 6, 10)  # feature k is 1 at pixel k (row-major) only
    field = AggregationField(feature_dim=60, out_channels=4)
    for view in range(3):
        single = TuneMV3DModelFor.view_set(one_hot[None], cameras[view : view + 1])
        mean = field.aggregate(points[view].reshape(-1, 3), single)[:, :60]  # [60 pixels, 60 features]
        torch.testing.assert_close(mean, torch.eye(60), atol=1e-4, rtol=0)
    views = model.view_set(torch.randn(3, 8, 6, 10, generator=torch.Generator().manual_seed(0)), cameras)
    rendered = model.render_views(views, cameras, 0)
    assert rendered["x0"].shape == (3, 4, 6, 10) and rendered["depth"].shape == (3, 1, 6, 10)
    for view in range(3):  # each image is its own camera's, rows and columns in place
        rays = model._collide(cameras.generate_rays(camera_indices=view).flatten())  # [60], row-major
        direct = model.field.render(rays, views, 0, model.config.num_samples, model.background_latent)
        torch.testing.assert_close(direct["values"].T.reshape(4, 6, 10), rendered["x0"][view], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(direct["depth"].T.reshape(1, 6, 10), rendered["depth"][view], atol=1e-5, rtol=1e-5)


def test_field_learns_to_render_held_out_views_of_a_scene(backbone: Any, tmp_path: Path) -> None:
    """Trained on one toy scene at a low timestep, the field renders views it was not given (the novel views)
    much closer to their latents than it did at the start."""
    import numpy as np
    from PIL import Image

    from mmstyle_ns.data.latents import encode_views
    from mmstyle_ns.data.scene import generate_scene
    from mmstyle_ns.data.scene_sets import scene_dataparser

    scene = generate_scene(
        "toy",
        tmp_path / "toy",
        num_views=12,
        resolution=64,
        caption="a red cube on grass",
        eval_every=12,
        supersample=1,
    )
    parsed = scene_dataparser()
    parsed.data = scene
    outputs = parsed.setup().get_dataparser_outputs("train")
    cameras = outputs.cameras
    latents = encode_views(backbone, [np.asarray(Image.open(f)) for f in outputs.image_filenames])
    model = _model(backbone, min_step_ratio=0.0, max_step_ratio=0.01, uncond_prob=0.0, denoise_weight=0.0)
    inputs, novel = torch.arange(6), torch.arange(6, 11)

    def novel_error() -> float:
        model.eval()
        with torch.no_grad():
            text = backbone.text_embeddings("a red cube on grass")[:1]
            out = model.interact(latents[inputs], 0, text, cameras[inputs], cameras[novel])
        model.train()
        return float((out["x0"][len(inputs) :] - latents[novel]).abs().mean())

    before = novel_error()
    optimizer = torch.optim.Adam([*model.encoder.parameters(), *model.field.parameters()], lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        losses = model.training_losses(
            latents[inputs], cameras[inputs], latents[novel], cameras[novel], "a red cube on grass", generator
        )
        optimizer.zero_grad()
        losses["field_loss"].backward()
        optimizer.step()
    after = novel_error()
    assert after < 0.6 * before, (before, after)


@pytest.fixture(scope="module")
def trained_run(tiny_collection: Path, tiny_guidance_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """config.yml of a short tunemv3d run on the tiny collection, through nerfstudio's trainer."""
    from conftest import short_run_config

    config = short_run_config(
        "tunemv3d", tiny_collection, tmp_path_factory.mktemp("tmv"), iterations=20, guidance_model=tiny_guidance_model
    )
    config.save_config()
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    return config.get_base_dir() / "config.yml"


def test_generation_writes_a_run_that_renders_the_generated_field(trained_run: Path) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.scripts.tunemv3d import GenerateArgs, generate

    target = generate(GenerateArgs(trained_run, "a purple sphere on grass", steps=2, seed=3))
    assert target.parent == trained_run.parent.parent and (target / "grid.png").is_file()
    pipeline: Any = eval_setup(target / "config.yml", test_mode="inference")[1]
    trained: Any = eval_setup(trained_run, test_mode="inference")[1]
    camera = pipeline.datamanager.eval_dataset.cameras[0:1].to(pipeline.device)
    with torch.no_grad():
        shown = pipeline.model.get_outputs_for_camera(camera)["rgb"]
        before = trained.model.get_outputs_for_camera(camera)["rgb"]
    assert shown.shape == before.shape and (shown - before).abs().mean() > 1e-4  # the generated field, not the run's
    from diffusers import DDIMScheduler

    schedule: Any = DDIMScheduler.from_config(pipeline.model.backbone.scheduler.config)
    schedule.set_timesteps(2)
    assert pipeline.model.views_t == int(schedule.timesteps[-1]) and pipeline.model.views is not None
    with pytest.raises(ValueError, match="exists already"):
        generate(GenerateArgs(trained_run, "a purple sphere on grass", steps=2, seed=3))


def test_evaluation_reports_both_samplers(trained_run: Path, tmp_path: Path) -> None:
    import json

    from mmstyle_ns.scripts.tunemv3d import EvaluateArgs, evaluate

    args = EvaluateArgs(
        trained_run,
        prompts=("a green cylinder on grass",),
        seeds=(0,),
        steps=2,
        pool_size=10,
        clip_checkpoint=str(Path(__file__).resolve().parents[1] / "examples" / "toy-clip"),
        output_dir=tmp_path / "eval",
        loss_draws=2,
    )
    report = evaluate(args)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for name in ("tunemv3d", "independent"):
        assert 0.0 <= saved[name]["colour_precision"] <= 1.0 and saved[name]["seconds_per_sample"] > 0
        assert len(saved[name]["per_object"]) == 1
    for name in ("tunemv3d", "independent"):  # R-precision with the toy CLIP over a pool of 10 prompts
        assert 0.0 <= saved[name]["clip_r_precision"] <= 1.0 and 0.0 <= saved[name]["clip_view_top1"] <= 1.0
    denoising = saved["held_out_denoising"]
    assert denoising["draws"] == 2 and denoising["mse_frozen"] > 0 and denoising["ratio"] > 0
    assert report["pool_size"] == 10 and (tmp_path / "eval" / "steps.png").is_file()
    assert (tmp_path / "eval" / "sheet.png").is_file()


def test_bad_inputs_stop_before_anything_is_written(
    tiny_collection: Path, tiny_guidance_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import short_run_config

    def message(config: Any) -> str:
        with pytest.raises(SystemExit) as stop:
            config.save_config()
        assert stop.value.code == 2 and not (tmp_path / "runs").exists()
        return " ".join(capsys.readouterr().out.split())

    config = short_run_config("tunemv3d", tiny_collection, tmp_path, guidance_model=tiny_guidance_model)
    config.pipeline.model.prompt = "  "
    assert "--pipeline.model.prompt is empty" in message(config)
    config = short_run_config("tunemv3d", tiny_collection, tmp_path, guidance_model=tiny_guidance_model)
    config.pipeline.guidance.model_path = None
    assert "--pipeline.guidance.model-path" in message(config)
    config = short_run_config("tunemv3d", tmp_path, tmp_path, guidance_model=tiny_guidance_model)
    assert "collection.json not found" in message(config)


def test_viewer_prompt_and_generate_button_replace_the_shown_field(trained_run: Path) -> None:
    from types import SimpleNamespace

    from nerfstudio.utils.eval_utils import eval_setup

    pipeline: Any = eval_setup(trained_run, test_mode="test")[1]
    model = pipeline.model
    assert model.generation_cameras is not None and model.views_t == 0  # the display scene, aggregated at t = 0
    # nerfstudio's evaluation: the loss on held-out scenes, and the display scene's held-out image through the field
    _, losses, _ = pipeline.get_eval_loss_dict(0)
    assert set(losses) == {"denoise_loss", "field_loss"} and all(torch.isfinite(v) for v in losses.values())
    metrics, images = pipeline.get_eval_image_metrics_and_images(0)
    assert metrics["psnr"] > 5.0 and images["img"].shape[-1] == 3
    before = model.shown_features.clone()
    model.set_prompt_from_viewer(SimpleNamespace(value="   "))
    assert model.config.prompt == "a red cube on grass"
    model.set_prompt_from_viewer(SimpleNamespace(value="three white spheres on stone"))
    model.config.sample_steps = 2
    model.generate_from_viewer()
    assert model.config.prompt == "three white spheres on stone"
    assert not torch.equal(model.shown_features, before)  # the field of the generation's last step


def test_export_writes_a_weights_only_run_that_renders_the_same(trained_run: Path, tmp_path: Path) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.scripts.tunemv3d import ExportArgs, export

    exported = export(ExportArgs(trained_run, tmp_path / "examples"))
    assert exported == tmp_path / "examples" / "tunemv3d-toy" / "tunemv3d" / "shipped" / "config.yml"
    (checkpoint,) = (exported.parent / "nerfstudio_models").glob("step-*.ckpt")
    assert set(torch.load(checkpoint, map_location="cpu", weights_only=True)) == {"step", "pipeline"}
    renders = []
    for config in (trained_run, exported):
        pipeline: Any = eval_setup(config, test_mode="inference")[1]
        camera = pipeline.datamanager.eval_dataset.cameras[0:1].to(pipeline.device)
        with torch.no_grad():
            renders.append(pipeline.model.get_outputs_for_camera(camera)["rgb"])
    torch.testing.assert_close(renders[0], renders[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="exists already"):
        export(ExportArgs(trained_run, tmp_path / "examples"))
