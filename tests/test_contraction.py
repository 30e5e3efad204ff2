"""Scene contraction of the dense grid (unbounded scenes): the mapping against nerfstudio's, the switch of a field
to contracted space, marching to the far shell with empty-space skipping, and the automatic choice."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from nerfstudio.field_components.spatial_distortions import SceneContraction

from mmstyle_ns.fields.grid_field import DenseGridField, contract, uncontract
from mmstyle_ns.fields.occupancy import OccupancySampler, packed_weights
from mmstyle_ns.models.base import has_transparent_pixels

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _points(count: int = 2000) -> torch.Tensor:
    """Points from close to the origin out to a few hundred units, in all directions."""
    torch.manual_seed(0)
    return F.normalize(torch.randn(count, 3), dim=-1) * torch.logspace(-2, 2.5, count)[:, None]


def test_contraction_matches_nerfstudios_and_inverts() -> None:
    x = _points()
    torch.testing.assert_close(contract(x), SceneContraction(order=float("inf"))(x), atol=1e-6, rtol=1e-6)
    for inner in (1.0, 1.5):
        y = contract(x, inner)
        assert float(y.abs().amax()) < 2.0
        inside = x.abs().amax(-1) <= 1.0
        torch.testing.assert_close(y[inside], inner * x[inside])  # the box keeps linear coordinates
        torch.testing.assert_close(uncontract(y, inner), x, atol=1e-3, rtol=1e-4)


def test_contract_space_keeps_the_box_and_gives_far_voxels_their_opacity() -> None:
    field = DenseGridField(BOX, resolution=24, color_mode="sh", sh_levels=1, density_init=0.5)
    with torch.no_grad():  # a dense blob at the centre
        blob = field.vertex_positions().norm(dim=-1) < 0.4
        field.density_grid[blob] += 3.0
    probe = torch.tensor([[0.0, 0.0, 0.0], [0.1, -0.1, 0.05]])
    before = field.density_at(probe) * field.voxel_size()  # opacity (optical depth) per voxel
    field.contract_space(BOX * 2.0, 48, inner=1.5)  # the box keeps 48 * 0.75 vertices over its side
    assert bool(field.contracted) and field.shape == (48, 48, 48)
    torch.testing.assert_close(field.density_at(probe) * field.voxel_size(), before, rtol=0.05, atol=0.0)
    torch.testing.assert_close(field.from_grid(field.to_grid(_points())), _points(), atol=1e-3, rtol=1e-4)
    # Per-voxel opacity of the untouched far space equals the inner voxels' (density times the world length).
    grid = field.vertex_grid_positions().abs().amax(-1)
    opacity = field.vertex_densities().reshape(-1) * field.voxel_size() * field.vertex_length_scale().reshape(-1)
    inner_empty = opacity[(grid < 1.5) & (field.vertex_positions().norm(dim=-1) > 1.5)]
    far = opacity[(grid > 1.7) & (grid < 1.95)]
    torch.testing.assert_close(far.mean(), inner_empty.mean(), rtol=0.02, atol=0.0)
    with pytest.raises(ValueError, match="already contracted"):
        field.contract_space(BOX, 24)


def test_contracted_marching_reaches_the_far_shell_and_finds_far_content() -> None:
    """A wall in the contracted shell is found where a fine uniform march (the reference) finds it; a ray into
    empty space runs out to ``far_radius`` in steps that grow with the distance."""
    field = DenseGridField(BOX, resolution=16, color_mode="sh", sh_levels=1, density_init=1e-3)
    field.contract_space(BOX, 96, inner=1.5)
    with torch.no_grad():  # a wall of three vertex layers around grid x = 1.94 (about 9 box units away)
        grid_x = field.vertex_grid_positions()[:, 0]
        field.density_grid.fill_(field.raw_density_for(1e-6))
        field.density_grid[(grid_x - 1.94).abs() < 0.05] = field.raw_density_for(2.0)
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-3, early_stop_eps=1e-4, far_radius=500.0)
    origins = torch.tensor([[0.2, 0.1, 0.0], [0.2, 0.1, 0.0]])
    directions = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    everything = sampler(field, origins, directions, near=0.01)
    sampler.update(field)
    samples = sampler(field, origins, directions, near=0.01)
    assert samples.positions.shape[0] < everything.positions.shape[0] / 4, "empty space is skipped"
    with torch.no_grad():
        sigmas = field.density_at(samples.positions)[:, 0]
        weights, _, _ = packed_weights(samples.t_starts, samples.t_ends, sigmas, samples.ray_indices)
        toward = samples.ray_indices == 0
        t_mid = (samples.t_starts + samples.t_ends) / 2
        # reference: 100k uniform steps along the first ray out to 50 units
        t_ref = torch.linspace(0.01, 50.0, 100_001)
        sigma_ref = field.density_at(origins[0] + t_ref[:-1, None] * directions[0])[:, 0]
        w_ref, _, _ = packed_weights(t_ref[:-1], t_ref[1:], sigma_ref, torch.zeros(100_000, dtype=torch.long))
    assert float(w_ref.sum()) > 0.99 and float(weights[toward].sum()) > 0.99
    depth_ref = float((w_ref * (t_ref[:-1] + t_ref[1:]) / 2).sum())
    depth = float((weights[toward] * t_mid[toward]).sum())
    assert 4.0 < depth_ref < 20.0
    # within half a marching step there (about 1.5 units long at this distance: a voxel of the shell spans 3)
    assert abs(depth - depth_ref) < 0.8
    # Marching the empty ray without skipping: consecutive intervals, from the near plane out to the far shell.
    away = everything.ray_indices == 1
    starts, ends = everything.t_starts[away], everything.t_ends[away]
    torch.testing.assert_close(starts[1:], ends[:-1])
    assert float(starts[0]) == pytest.approx(0.01, abs=1e-4)
    last = field.to_grid((origins[1] + ends[-1] * directions[1])[None])  # within a voxel of the grid's outer face
    assert float(last.abs().amax()) > 2.0 - 4.0 / 95
    assert int(away.sum()) < 400  # steps grow with the distance
    assert everything.s_starts is not None and everything.s_ends is not None
    assert float(everything.s_ends[away][-1]) < 10.0  # marching distance stays bounded


class _Images:
    """A stand-in for nerfstudio's dataset: ``len`` and ``get_image_float32``."""

    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def get_image_float32(self, index: int) -> torch.Tensor:
        return self.images[index]


def test_full_frames_are_told_apart_from_object_captures() -> None:
    rgb = _Images([torch.rand(8, 8, 3) for _ in range(3)])
    opaque = _Images([torch.cat([torch.rand(8, 8, 3), torch.ones(8, 8, 1)], -1) for _ in range(3)])
    alpha = torch.ones(8, 8, 1)
    alpha[:2] = 0.0
    cutout = _Images([torch.cat([torch.rand(8, 8, 3), alpha], -1) for _ in range(3)])
    assert not has_transparent_pixels(rgb)
    assert not has_transparent_pixels(opaque)
    assert has_transparent_pixels(cutout)


def test_a_bounded_fields_state_loads_into_a_field_that_knows_contraction() -> None:
    """Runs saved before contraction existed have no contraction entries: they load as bounded fields."""
    old = DenseGridField(BOX, resolution=12)
    with torch.no_grad():
        old.density_grid.normal_()
    old.regrid(BOX * 0.8, 16)
    state = {k: v for k, v in old.state_dict().items() if not k.startswith("contraction") and k != "contracted"}
    # A run's model is rebuilt from its config (same box and starting resolution) before its state loads.
    fresh = DenseGridField(BOX, resolution=12)
    fresh.load_state_dict(state)
    assert not bool(fresh.contracted)
    torch.testing.assert_close(fresh.aabb, old.aabb)
    points = torch.rand(20, 3) * 1.8 - 0.9
    torch.testing.assert_close(fresh.density_at(points), old.density_at(points))
    assert math.isclose(fresh.voxel_size(), old.voxel_size())


def _scene_model(tmp_path: Path, kind: str):  # noqa: ANN202 - (model, dataset, surface points)
    """A base model and the training dataset of a small generated scene of ``kind``, with the ground-truth surface
    points (from the scene's depth images) in the dataparser's frame."""
    import imageio.v3 as iio
    import numpy as np
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    from mmstyle_ns.data.scene import generate_scene
    from mmstyle_ns.models.base import MMStyleBaseModelConfig

    data = generate_scene(kind, tmp_path / kind, num_views=40, resolution=48)
    outputs = NerfstudioDataParserConfig(data=data).setup().get_dataparser_outputs("train")
    dataset = InputDataset(outputs)
    points = []
    for i, name in enumerate(outputs.image_filenames):
        depth = iio.imread(Path(str(name)).parent.parent / "depths" / Path(name).name).astype(np.float32) / 1000.0
        depth *= outputs.dataparser_scale
        rows, cols = np.nonzero(depth > 0)
        d = depth[rows, cols]
        cam = dataset.cameras[i]
        fx, fy, cx, cy = float(cam.fx), float(cam.fy), float(cam.cx), float(cam.cy)
        local = np.stack([(cols + 0.5 - cx) / fx * d, -(rows + 0.5 - cy) / fy * d, -d], axis=-1)
        c2w = cam.camera_to_worlds.numpy()
        points.append(local @ c2w[:, :3].T + c2w[:, 3])
    model = MMStyleBaseModelConfig().setup(scene_box=outputs.scene_box, num_train_data=len(dataset))
    return model, dataset, torch.from_numpy(np.concatenate(points)).float()


def test_a_forward_capture_gets_a_contraction_box_around_its_content(tmp_path: Path) -> None:
    """nerfstudio scales a forward-facing capture by its cameras' small spread: the content lies far outside the
    scene box. The fitted box holds nearly all of the true surface and the cameras, and is not much larger."""
    model, dataset, surface = _scene_model(tmp_path, "forward")
    box = model.scene_box.aabb
    assert float(((surface >= box[0]) & (surface <= box[1])).all(-1).float().mean()) < 0.05
    fitted = model.fitted_contraction_box(dataset)
    assert fitted is not None
    inside = ((surface >= fitted[0]) & (surface <= fitted[1])).all(-1).float().mean()
    assert float(inside) > 0.9
    centres = dataset.cameras.camera_to_worlds[:, :, 3]
    assert bool(((centres >= fitted[0]) & (centres <= fitted[1])).all())
    truth = torch.quantile(surface, torch.tensor([0.02, 0.98]), dim=0)
    truth = torch.stack([torch.minimum(truth[0], centres.amin(0)), torch.maximum(truth[1], centres.amax(0))])
    assert float((fitted[1] - fitted[0]).prod() / (truth[1] - truth[0]).prod()) < 2.0
    model.contract_space(dataset=dataset)  # the model contracts around it, with the fitted share
    torch.testing.assert_close(model.field.contraction_box, fitted)
    assert float(model.field.contraction_inner) == pytest.approx(2 * model.config.fitted_inner_share)


def test_a_capture_from_inside_the_scene_keeps_the_scene_box(tmp_path: Path) -> None:
    model, dataset, _ = _scene_model(tmp_path, "unbounded")
    assert model.fitted_contraction_box(dataset) is None
    model.contract_space(dataset=dataset)
    torch.testing.assert_close(model.field.contraction_box, model.scene_box.aabb.float())
    assert float(model.field.contraction_inner) == pytest.approx(2 * model.config.contraction_inner_share)
    # the far background sample starts with the first regrid (the coarse grid first forms the content)
    assert not model.far_background_active()
    with torch.no_grad():  # a coarse stage that filled all space (e.g. the sky at some finite depth)
        model.field.density_grid.fill_(model.field.raw_density_for(30.0))
    model.regrid(48)
    assert model.far_background_active()
    # the first regrid resets the shell beyond the clearing radius to the initial opacity per voxel, keeps the rest
    field = model.field
    inner = float(field.contraction_inner)
    rho = field.vertex_grid_positions().abs().amax(-1)
    radius = 1.0 / (1.0 - ((rho - inner) / (2 - inner)).clamp(0, 1 - 1e-4))  # L-infinity radius in box units
    length = field.vertex_length_scale().reshape(-1) * field.voxel_size()
    opacity = 1 - torch.exp(-field.vertex_densities().reshape(-1) * length)
    cleared = radius > model.config.far_background_clear_radius + 1e-3
    kept = rho < inner - 1e-3  # inside the box
    assert bool(cleared.any()) and bool(kept.any())
    expected = torch.full_like(opacity[cleared], model.config.initial_alpha)
    torch.testing.assert_close(opacity[cleared], expected, rtol=1e-3, atol=0)
    assert float(opacity[kept].min()) > 0.5


def test_far_samples_end_open_rays_on_the_outer_face_and_only_them() -> None:
    field = DenseGridField(BOX, resolution=16, color_mode="sh", sh_levels=1, density_init=1e-3)
    field.contract_space(BOX, 48, inner=1.0)
    with torch.no_grad():  # empty space, with an opaque wall across the +x side at about 3 box units
        field.density_grid.fill_(field.raw_density_for(1e-6))
        grid_x = field.vertex_grid_positions()[:, 0]
        field.density_grid[(grid_x - 1.6).abs() < 0.06] = field.raw_density_for(50.0)
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-3, early_stop_eps=1e-4, far_radius=500.0)
    sampler.update(field)
    origins = torch.zeros(3, 3)
    directions = F.normalize(torch.tensor([[-1.0, 0.2, 0.1], [0.1, 0.3, 1.0], [1.0, 0.0, 0.0]]), dim=-1)
    plain = sampler(field, origins, directions, near=0.01)
    assert plain.far is None
    samples = sampler(field, origins, directions, near=0.01, far_samples=True)
    assert samples.far is not None
    far_rays = samples.ray_indices[samples.far]
    assert far_rays.tolist() == [0, 1], "rays into empty space end on a far sample; the blocked one does not"
    for ray in (0, 1):  # the far sample is the ray's last, on the grid's outer face
        mine = (samples.ray_indices == ray).nonzero()[:, 0]
        assert bool(samples.far[mine[-1]]) and int(samples.far[mine].sum()) == 1
        assert float(field.to_grid(samples.positions[mine[-1]][None]).abs().amax()) > 2.0 - 2e-3
    with torch.no_grad():
        sigmas = field.density_at(samples.positions)[:, 0]
        weights, _, _ = packed_weights(samples.t_starts, samples.t_ends, sigmas, samples.ray_indices, samples.far)
        plain_sigmas = field.density_at(plain.positions)[:, 0]
        plain_weights, _, _ = packed_weights(plain.t_starts, plain.t_ends, plain_sigmas, plain.ray_indices)
    opacity = torch.zeros(3).index_add_(0, samples.ray_indices, weights)
    plain_opacity = torch.zeros(3).index_add_(0, plain.ray_indices, plain_weights)
    torch.testing.assert_close(opacity, torch.ones(3), atol=2e-4, rtol=0)  # every ray is opaque now
    assert float(plain_opacity[:2].max()) < 0.05 and float(plain_opacity[2]) > 0.99
    # the far sample spans no marching distance, so the distortion loss does not see it
    assert samples.s_starts is not None and samples.s_ends is not None
    torch.testing.assert_close(samples.s_starts[samples.far], samples.s_ends[samples.far])
