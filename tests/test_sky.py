"""The sky map of contracted fields: lookup by direction, the sky beyond its radius, and the shell reset."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmstyle_ns.fields.grid_field import SKY_RADIUS, DenseGridField
from mmstyle_ns.fields.occupancy import OccupancySampler
from mmstyle_ns.fields.sky import SkyMap

BOX = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]])


def _direction(longitude: float, latitude: float) -> list[float]:
    return [math.cos(latitude) * math.cos(longitude), math.cos(latitude) * math.sin(longitude), math.sin(latitude)]


def test_a_texel_centre_reads_its_own_value_and_the_seam_is_continuous() -> None:
    torch.manual_seed(0)
    sky = SkyMap(channels=2, rows=8, activation="none")
    with torch.no_grad():
        sky.table.normal_()
    rows, cols = 8, 16
    # texel (row 2, column 5): latitude from +pi/2 at row 0's top edge, longitude from -pi at column 0's left edge
    latitude = math.pi / 2 - (2 + 0.5) * math.pi / rows
    longitude = -math.pi + (5 + 0.5) * 2 * math.pi / cols
    value = sky(torch.tensor([_direction(longitude, latitude)]))
    torch.testing.assert_close(value[0], sky.table[0, :, 2, 5], atol=1e-5, rtol=0)
    # on the seam (longitude +-pi) the value is the mean of the first and the last column, from either side
    seam = latitude
    either = sky(torch.tensor([_direction(math.pi - 1e-6, seam), _direction(-math.pi + 1e-6, seam)]))
    torch.testing.assert_close(either[0], either[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(either[0], (sky.table[0, :, 2, 0] + sky.table[0, :, 2, -1]) / 2, atol=1e-4, rtol=0)
    # scale does not matter; RGB maps are in (0, 1)
    torch.testing.assert_close(sky(torch.tensor([[0.0, 0.0, 5.0]])), sky(torch.tensor([[0.0, 0.0, 1.0]])))
    rgb = SkyMap(channels=3, rows=4)
    colours = rgb(torch.randn(32, 3))
    assert bool(((colours > 0) & (colours < 1)).all())


def test_only_far_samples_of_a_contracted_field_take_the_sky_and_it_learns_from_them() -> None:
    field = DenseGridField(BOX, resolution=16, color_mode="sh", sh_levels=1, density_init=1e-3, sky_rows=8)
    points = torch.tensor([[0.5, 0.0, 0.0], [0.0, 3.0 * SKY_RADIUS, 0.0]])
    assert not bool(field.sky_mask(points).any()), "a bounded field has no sky"
    field.contract_space(BOX, 32, inner=1.0)
    with torch.no_grad():  # empty space
        field.density_grid.fill_(field.raw_density_for(1e-6))
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-3, early_stop_eps=1e-4)
    sampler.update(field)
    origins = torch.tensor([[0.3, -0.2, 0.1]]).expand(4, 3)
    directions = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    samples = sampler(field, origins, directions, near=0.01, far_samples=True)
    assert samples.far is not None
    torch.testing.assert_close(field.sky_mask(samples.positions), samples.far)  # the far samples, and only them
    grid_colors = field.color_from_corners(*field.corners(samples.positions), samples.directions)
    colors = field.with_sky(grid_colors, samples.positions)
    assert field.sky is not None
    torch.testing.assert_close(colors[~samples.far], grid_colors[~samples.far])
    # the sky is read by direction from the box centre, i.e. nearly the ray's direction this far out
    torch.testing.assert_close(colors[samples.far], field.sky(directions), atol=1e-3, rtol=0)
    colors[samples.far].sum().backward()
    assert field.sky.table.grad is not None and float(field.sky.table.grad.abs().sum()) > 0


def test_resetting_the_shell_keeps_the_box_and_gives_every_far_voxel_the_same_opacity() -> None:
    field = DenseGridField(BOX, resolution=16, color_mode="sh", sh_levels=1, density_init=1.0)
    with pytest.raises(ValueError, match="contracted"):
        field.reset_beyond(1.1, 1e-2)
    field.contract_space(BOX, 40, inner=0.6)
    with torch.no_grad():
        field.density_grid.fill_(field.raw_density_for(30.0))
    before = field.density_grid.detach().clone()
    field.reset_beyond(1.5, 1e-2)
    grid = field.vertex_grid_positions().abs().amax(-1)
    radius = 1.0 / (1.0 - ((grid - 0.6) / 1.4).clamp(0, 1 - 1e-4))  # L-infinity radius in box units
    beyond = radius > 1.5 + 1e-4
    assert bool(beyond.any()) and bool((~beyond).any())
    torch.testing.assert_close(field.density_grid[~beyond], before[~beyond])
    # opacity per voxel: density (per unit length) times the world length the voxel spans
    density = field.vertex_densities().reshape(-1)
    length = field.vertex_length_scale().reshape(-1) * field.voxel_size()
    opacity = 1 - torch.exp(-density * length)
    torch.testing.assert_close(opacity[beyond], torch.full_like(opacity[beyond], 1e-2), rtol=1e-3, atol=0)


def test_checkpoints_from_before_the_sky_map_load() -> None:
    old = DenseGridField(BOX, resolution=8, color_mode="sh", sh_levels=1)
    state = old.state_dict()
    assert not any(name.startswith("sky") for name in state)
    new = DenseGridField(BOX, resolution=8, color_mode="sh", sh_levels=1, sky_rows=4)
    new.load_state_dict(state)  # strict: the sky map keeps its initial values
    assert new.sky is not None and float(new.sky.table.detach().abs().sum()) == 0.0
    other = DenseGridField(BOX, resolution=8, color_mode="sh", sh_levels=1, sky_rows=6)
    other.load_state_dict(new.state_dict())  # another map size: the checkpoint's
    assert other.sky is not None and other.sky.table.shape == (1, 3, 4, 8)
