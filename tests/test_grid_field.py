"""Unit tests of the dense-grid field and the occupancy sampler against plain-PyTorch references."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmstyle_ns.fields.grid_field import DenseGridField, replace_parameters, trilinear_corners, trilinear_lookup
from mmstyle_ns.fields.occupancy import OccupancySampler, packed_weights, ray_aabb

AABB = torch.tensor([[-1.0, -0.5, -0.25], [1.0, 0.5, 0.75]])


def test_trilinear_matches_grid_sample_values_and_gradients() -> None:
    torch.manual_seed(0)
    shape = (5, 4, 6)
    table = torch.randn(5 * 4 * 6, 3, requires_grad=True)
    points = AABB[0] + torch.rand(200, 3) * (AABB[1] - AABB[0])
    ours = trilinear_lookup(table, *trilinear_corners(points, AABB, shape))
    # grid_sample reference: volume [1, C, D=x, H=y, W=z]; its coordinates are ordered (z, y, x) in [-1, 1].
    volume = table.t().reshape(1, 3, *shape)
    norm = (points - AABB[0]) / (AABB[1] - AABB[0]) * 2 - 1
    ref = F.grid_sample(volume, norm.flip(-1).view(1, 1, 1, -1, 3), align_corners=True).view(3, -1).t()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), table)
    (grad_ref,) = torch.autograd.grad(ref.square().sum(), table)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-4, rtol=1e-4)


def test_corners_clamp_points_outside_the_box() -> None:
    index, weights = trilinear_corners(torch.tensor([[5.0, 5.0, 5.0], [-5.0, 0.0, 0.0]]), AABB, (4, 4, 4))
    assert int(index.min()) >= 0 and int(index.max()) < 64
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))


def test_field_colour_is_view_dependent_and_density_positive() -> None:
    torch.manual_seed(0)
    field = DenseGridField(AABB, resolution=8)
    points = torch.zeros(2, 3)
    dirs = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    rgb = field.color_from_corners(*field.corners(points), dirs)
    assert rgb.shape == (2, 3) and ((rgb >= 0) & (rgb <= 1)).all()
    assert (rgb[0] - rgb[1]).abs().max() > 1e-4, "colour must depend on the view direction"
    assert (field.density_at(points) > 0).all()


def test_regrid_preserves_the_function_and_resizes() -> None:
    torch.manual_seed(0)
    field = DenseGridField(AABB, resolution=8)
    with torch.no_grad():
        # A linear function of position is reproduced exactly by trilinear resampling.
        verts = torch.stack(
            torch.meshgrid(
                *[torch.linspace(float(AABB[0, i]), float(AABB[1, i]), n) for i, n in enumerate(field.shape)],
                indexing="ij",
            ),
            dim=-1,
        ).reshape(-1, 3)
        field.density_grid.copy_(verts @ torch.tensor([[0.3], [-0.2], [0.5]]))
    points = torch.rand(100, 3) * 0.5 - 0.25
    old = field.density_grid
    optimizer = torch.optim.Adam([field.density_grid, field.feature_grid], lr=0.1)
    field.density_grid.sum().backward()
    optimizer.step()  # a uniform shift: the grid stays a linear function, and the optimizer has state
    before = field.density_at(points)
    field.regrid(torch.tensor([[-0.5, -0.5, -0.25], [0.5, 0.5, 0.5]]), resolution=16)
    replace_parameters(optimizer, {old: field.density_grid})
    assert field.density_grid is not old and field.shape == (16, 16, 12)
    torch.testing.assert_close(field.density_at(points), before, atol=1e-5, rtol=1e-5)
    assert optimizer.param_groups[0]["params"][0] is field.density_grid and old not in optimizer.state
    field.density_grid.sum().backward()  # the new leaf trains
    optimizer.step()


def test_state_dict_loads_into_a_fresh_field_of_another_size() -> None:
    trained = DenseGridField(AABB, resolution=8)
    trained.regrid(AABB * 0.5, resolution=12)
    fresh = DenseGridField(AABB, resolution=8)
    fresh.load_state_dict(trained.state_dict())
    points = torch.rand(50, 3) * 0.4 - 0.2
    torch.testing.assert_close(fresh.density_at(points), trained.density_at(points))
    assert fresh.shape == trained.shape


def test_packed_weights_match_a_dense_reference() -> None:
    torch.manual_seed(0)
    counts = [3, 0, 5, 1]
    ray_indices = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    sigmas = torch.rand(len(ray_indices), requires_grad=True)
    t_starts = torch.rand(len(ray_indices))
    t_ends = t_starts + 0.3
    weights, trans, _ = packed_weights(t_starts, t_ends, sigmas, ray_indices)
    start = 0
    for n in counts:
        s = slice(start, start + n)
        optical = sigmas[s] * 0.3
        t_ref = torch.exp(-torch.cat([torch.zeros(1), torch.cumsum(optical, 0)[:-1]])) if n else torch.zeros(0)
        torch.testing.assert_close(trans[s], t_ref)
        torch.testing.assert_close(weights[s], t_ref * (1 - torch.exp(-optical)))
        start += n
    weights.sum().backward()
    assert sigmas.grad is not None and torch.isfinite(sigmas.grad).all()


def test_ray_aabb_entry_and_exit() -> None:
    origins = torch.tensor([[-3.0, 0.0, 0.0], [-3.0, 5.0, 0.0]])
    dirs = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    near, far = ray_aabb(origins, dirs, AABB)
    torch.testing.assert_close(near[0], torch.tensor(2.0))
    torch.testing.assert_close(far[0], torch.tensor(4.0))
    assert far[1] < near[1]  # misses


def test_sampler_skips_empty_space_and_stops_early() -> None:
    field = DenseGridField(AABB, resolution=32, density_init=1e-4)
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-2)
    with torch.no_grad():  # an opaque slab at x in [0.2, 0.4]
        x = torch.linspace(-1, 1, field.shape[0]).view(-1, 1, 1).expand(field.shape).reshape(-1, 1)
        raw = torch.where((x > 0.2) & (x < 0.4), torch.tensor(10.0), torch.tensor(-20.0)) - field.density_shift
        field.density_grid.copy_(raw)
    origins = torch.tensor([[-3.0, 0.0, 0.25]]).repeat(4, 1)
    dirs = torch.tensor([[1.0, 0.0, 0.0]]).repeat(4, 1)
    everything = sampler(field, origins, dirs)
    sampler.update(field)
    culled = sampler(field, origins, dirs)
    assert culled.positions.shape[0] < everything.positions.shape[0] / 4
    xs = culled.positions[:, 0]
    assert (xs > 0.1).all() and (xs < 0.45).all(), "samples only in and next to the occupied slab"
    sigmas = field.density_at(culled.positions)[:, 0]
    weights, _, _ = packed_weights(culled.t_starts, culled.t_ends, sigmas, culled.ray_indices)
    acc = torch.zeros(4).index_add_(0, culled.ray_indices, weights)
    torch.testing.assert_close(acc, torch.ones(4), atol=1e-3, rtol=0)


def test_block_skipping_keeps_exactly_the_exhaustive_samples(monkeypatch) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    field = DenseGridField(AABB, resolution=48, density_init=1e-4)
    with torch.no_grad():  # a few occupied blobs
        verts = field.vertex_positions()
        centres = torch.tensor([[0.3, 0.1, 0.2], [-0.5, -0.2, 0.5], [0.8, 0.3, -0.1]])
        near = torch.cdist(verts, centres).min(-1).values < 0.12
        field.density_grid.copy_(torch.where(near, 6.0, -20.0)[:, None] - field.density_shift)
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-2)
    sampler.update(field)
    origins = torch.tensor([-3.0, 0.0, 0.2]) + torch.randn(512, 3) * 0.05
    targets = AABB[0] + torch.rand(512, 3) * (AABB[1] - AABB[0])
    dirs = F.normalize(targets - origins, dim=-1)
    skipped = sampler(field, origins, dirs)
    monkeypatch.setattr(sampler, "_block_grid", lambda: torch.ones(field.shape, dtype=torch.bool))
    exhaustive = sampler(field, origins, dirs)
    assert skipped.positions.shape[0] > 0
    torch.testing.assert_close(skipped.ray_indices, exhaustive.ray_indices)
    torch.testing.assert_close(skipped.t_starts, exhaustive.t_starts)


def test_segmented_marching_keeps_the_samples_of_one_pass(monkeypatch) -> None:  # noqa: ANN001
    torch.manual_seed(1)
    field = DenseGridField(AABB, resolution=64, density_init=1e-4)
    with torch.no_grad():  # opaque blobs: most rays stop inside the first one they meet
        verts = field.vertex_positions()
        centres = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.2, 0.1], [-0.6, -0.3, 0.3]])
        near = torch.cdist(verts, centres).min(-1).values < 0.3
        field.density_grid.copy_(torch.where(near, 8.0, -20.0)[:, None] - field.density_shift)
    sampler = OccupancySampler(step_ratio=0.5, alpha_threshold=1e-2, early_stop_eps=1e-3)
    sampler.update(field)
    origins = torch.tensor([-3.0, 0.1, 0.1]) + torch.randn(400, 3) * 0.05
    dirs = F.normalize(AABB[0] + torch.rand(400, 3) * (AABB[1] - AABB[0]) - origins, dim=-1)
    monkeypatch.setattr(OccupancySampler, "SEGMENT", 8)
    segmented = sampler(field, origins, dirs)
    monkeypatch.setattr(OccupancySampler, "SEGMENT", 10**6)
    one_pass = sampler(field, origins, dirs)
    assert segmented.positions.shape[0] > 0
    torch.testing.assert_close(segmented.ray_indices, one_pass.ray_indices)
    torch.testing.assert_close(segmented.t_starts, one_pass.t_starts)
    torch.testing.assert_close(segmented.positions, one_pass.positions)


def test_packed_distortion_loss_matches_the_pairwise_definition() -> None:
    from mmstyle_ns.losses import packed_distortion_loss

    torch.manual_seed(2)
    counts = [5, 1, 7]
    ray_indices = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))
    t_starts = torch.cat([torch.sort(torch.rand(n) * 3).values for n in counts])
    t_ends = t_starts + torch.rand(len(t_starts)) * 0.1
    weights = torch.rand(len(t_starts), requires_grad=True)
    loss = packed_distortion_loss(weights, t_starts, t_ends, ray_indices, num_rays=3)
    reference = torch.zeros(())
    for r in range(3):
        sel = ray_indices == r
        w, m = weights[sel], ((t_starts + t_ends) / 2)[sel]
        reference = reference + (w[:, None] * w[None, :] * (m[:, None] - m[None, :]).abs()).sum()
        reference = reference + (w.square() * (t_ends - t_starts)[sel]).sum() / 3
    torch.testing.assert_close(loss, reference / 3)
    (grad,) = torch.autograd.grad(loss, weights)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
