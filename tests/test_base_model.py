"""The shared base model: N-channel field outputs over any-channel backgrounds, differentiable camera renders, and
only flags that do something."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import short_run_config

from mmstyle_ns.fields.grid_field import DenseGridField
from mmstyle_ns.models.base import MMStyleBaseModel


@pytest.fixture(scope="module")
def trained(tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MMStyleBaseModel, object]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = short_run_config("mmstyle-base", tiny_scene, tmp_path_factory.mktemp("base"), iterations=30)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    model = trainer.pipeline.model
    assert isinstance(model, MMStyleBaseModel)
    model.eval()
    eval_dataset = trainer.pipeline.datamanager.eval_dataset
    yield model, eval_dataset.cameras
    torch.set_num_threads(threads)


def test_render_camera_equals_nerfstudios_no_grad_render(trained) -> None:  # noqa: ANN001
    """Whole image: the differentiable render gives nerfstudio's ``get_outputs_for_camera`` outputs."""
    model, cameras = trained
    with torch.no_grad():
        reference = model.get_outputs_for_camera(cameras[0:1])
    ours = model.render_camera(cameras[0:1], chunk=300)  # chunks that do not divide the image
    for name in ("rgb", "accumulation", "depth"):
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-5)
    assert ours["rgb"].requires_grad


def test_render_camera_sends_gradients_to_the_grids(trained) -> None:  # noqa: ANN001
    model, cameras = trained
    model.zero_grad(set_to_none=True)
    out = model.render_camera(cameras[1:2], patch=(4, 6, 12, 10))
    assert out["rgb"].shape == (12, 10, 3)
    out["rgb"].sum().backward()
    assert model.field.feature_grid.grad is not None and model.field.feature_grid.grad.abs().sum() > 0
    assert model.field.density_grid.grad is not None and model.field.density_grid.grad.abs().sum() > 0


def test_render_camera_at_a_scale_and_patches(trained) -> None:  # noqa: ANN001
    """scale rescales intrinsics as nerfstudio does; a patch is the same pixels as the whole render's slice."""
    model, cameras = trained
    camera = cameras[2:3]
    half = model.render_camera(camera, scale=0.5)
    rescaled = copy.deepcopy(camera)
    rescaled.rescale_output_resolution(0.5)
    with torch.no_grad():
        reference = model.get_outputs_for_camera(rescaled)
    assert half["rgb"].shape[:2] == (int(camera.height) // 2, int(camera.width) // 2)
    torch.testing.assert_close(half["rgb"], reference["rgb"], rtol=0, atol=1e-5)
    full = model.render_camera(camera)
    patch = model.render_camera(camera, patch=(3, 5, 8, 9))
    torch.testing.assert_close(patch["rgb"], full["rgb"][3:11, 5:14], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="does not lie inside"):
        model.render_camera(camera, patch=(30, 30, 8, 8))
    with pytest.raises(ValueError, match="one camera"):
        model.render_camera(cameras[0:2])


def test_field_outputs_any_channel_count_with_the_chosen_activation() -> None:
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])
    for mode in ("sh", "mlp"):
        torch.manual_seed(0)
        field = DenseGridField(aabb, resolution=8, color_mode=mode, out_channels=4, activation="none", sh_levels=2)
        with torch.no_grad():
            field.feature_grid.mul_(40.0)
        points = torch.rand(64, 3) * 2 - 1
        dirs = torch.nn.functional.normalize(torch.randn(64, 3), dim=-1)
        values = field.color_from_corners(*field.corners(points), dirs)
        assert values.shape == (64, 4)
        assert values.min() < 0 or values.max() > 1  # unbounded (latents), not squashed to [0, 1]
    rgb = DenseGridField(aabb, resolution=8, color_mode="sh", sh_levels=2)
    assert rgb.feature_grid.shape[1] == 3 * 4  # the default stays RGB with its SH coefficients
    with pytest.raises(ValueError, match="activation"):
        DenseGridField(aabb, resolution=8, activation="tanh")  # type: ignore[arg-type]


def test_composite_over_a_background_of_any_channel_count(trained) -> None:  # noqa: ANN001
    """``sum w c + (1 - sum w) b``: an empty ray shows the background exactly, an opaque one its own value."""
    model, _ = trained
    colors = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0], [-1.0, 0.0, 1.0, 2.0]])
    weights = torch.tensor([0.25, 0.25, 1.0])
    ray_indices = torch.tensor([0, 0, 2])  # ray 1 has no samples
    background = torch.tensor([0.5, -0.5, 0.25, 0.0])
    out = model.composite(colors, weights, ray_indices, 3, background)
    torch.testing.assert_close(out[0], 0.25 * colors[0] + 0.25 * colors[1] + 0.5 * background)
    torch.testing.assert_close(out[1], background)
    torch.testing.assert_close(out[2], colors[2])
    with pytest.raises(ValueError, match="4 channels"):
        model.composite(colors, weights, ray_indices, 3, torch.zeros(3))


def test_help_shows_only_flags_that_do_something() -> None:
    """No nerfacto flags (the model is not a nerfacto subclass) and nerfstudio's unused collider options hidden."""
    result = subprocess.run(
        [sys.executable, "-m", "nerfstudio.scripts.train", "mmstyle-base", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "--pipeline.model.grid-resolutions" in text and "--pipeline.model.near-plane" in text
    for dead in ("num-proposal-samples-per-ray", "hidden-dim-color", "use-gradient-scaling", "enable-collider"):
        assert f"--pipeline.model.{dead}" not in text, dead
