"""Frozen geometry (:mod:`mmstyle_ns.models.frozen`) over a tiny base model trained by nerfstudio's Trainer.

The base run (``mmstyle-base``) is trained once per module; each test loads its state into a fresh
:class:`FrozenGeometryModel`, so a test that freezes, perturbs or caches leaves the others untouched.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import short_run_config
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation

from mmstyle_ns.models.base import MMStyleBaseModel, MMStyleBaseModelConfig
from mmstyle_ns.models.frozen import FrozenGeometryModel, FrozenGeometryModelConfig, SampleCache
from mmstyle_ns.style.cache import StylizedViewCache

ITERATIONS = 40
CACHE_FIELDS = ("positions", "weights", "offsets", "accumulation", "depth")


@dataclasses.dataclass
class Trained:
    pipeline: Any
    """The base run's pipeline (its datamanager's training cameras and dataset)."""
    base: MMStyleBaseModel
    cameras: Cameras
    """Two training cameras."""


@pytest.fixture(scope="module")
def trained(tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = short_run_config("mmstyle-base", tiny_scene, tmp_path_factory.mktemp("base"), iterations=ITERATIONS)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    base = trainer.pipeline.model
    assert isinstance(base, MMStyleBaseModel)
    train_dataset = trainer.pipeline.datamanager.train_dataset
    assert train_dataset is not None
    yield Trained(trainer.pipeline, base, train_dataset.cameras[torch.tensor([0, 5])])
    torch.set_num_threads(threads)


@pytest.fixture
def frozen(trained: Trained) -> Callable[[], FrozenGeometryModel]:
    """Builds a frozen-geometry model holding the trained base's state (a new one per call)."""

    def build() -> FrozenGeometryModel:
        base = trained.base
        options = {
            f.name: getattr(base.config, f.name)
            for f in dataclasses.fields(MMStyleBaseModelConfig)
            if f.init and f.name != "_target"
        }
        model = FrozenGeometryModelConfig(**options).setup(scene_box=base.scene_box, num_train_data=base.num_train_data)
        assert isinstance(model, FrozenGeometryModel)
        model.load_state_dict(base.state_dict())
        return model

    return build


def _after_step(model: FrozenGeometryModel, pipeline: Any, step: int) -> None:
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=pipeline, trainer=None)
    for callback in model.get_training_callbacks(attributes):
        callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)


def _rays(cameras: Cameras, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    bundle = cameras.generate_rays(camera_indices=index, keep_shape=True)
    return bundle.origins.reshape(-1, 3), bundle.directions.reshape(-1, 3)


def test_a_trained_base_loads_into_the_frozen_geometry_model(
    trained: Trained, frozen: Callable[[], FrozenGeometryModel]
) -> None:
    model = frozen()
    assert model.state_dict().keys() == trained.base.state_dict().keys(), "the layer adds no state"
    assert model.sample_cache is None and model.sample_store_hits == 0 and not model.geometry_frozen
    model.eval()
    trained.base.eval()
    with torch.no_grad():
        ours = model.get_outputs_for_camera(trained.cameras[0:1])
        theirs = trained.base.get_outputs_for_camera(trained.cameras[0:1])
    for name in ("rgb", "accumulation", "depth"):
        assert torch.equal(ours[name], theirs[name]), name


def test_sample_cache_gathers_the_samples_of_the_asked_pixels() -> None:
    cache = SampleCache(
        positions=torch.arange(15.0).view(5, 3),
        weights=torch.arange(5.0),
        offsets=torch.tensor([0, 2, 2, 5]),  # pixel 0: samples 0-1, pixel 1: none, pixel 2: samples 2-4
        accumulation=torch.zeros(3),
        depth=torch.zeros(3),
        image_shape=(1, 1, 3),
    )
    samples, rays = cache.gather(torch.tensor([2, 1, 0]))
    assert samples.tolist() == [2, 3, 4, 0, 1] and rays.tolist() == [0, 0, 0, 2, 2]


def test_geometry_key_follows_the_geometry_and_not_the_colours(frozen: Callable[[], FrozenGeometryModel]) -> None:
    model = frozen()
    key = model.geometry_key()
    assert len(key) == 64 and model.geometry_key() == key, "a key is a SHA-256 of the state, the same each time"
    density = model.field.density_grid.detach().clone()
    with torch.no_grad():
        model.field.feature_grid.add_(torch.randn_like(model.field.feature_grid))  # the base colours
    assert model.geometry_key() == key, "colours do not move the samples"
    with torch.no_grad():
        model.field.density_grid.mul_(1.5)
    changed = model.geometry_key()
    assert changed != key
    with torch.no_grad():
        model.field.density_grid.copy_(density)
    assert model.geometry_key() == key
    model.sampler.update(model.field)  # the occupancy grid of the same density: the same samples
    assert model.geometry_key() == key
    assert not bool(model.sampler.occupancy.all())
    with torch.no_grad():
        model.sampler.occupancy.fill_(True)  # marching everywhere
    assert model.geometry_key() not in (key, changed)
    model.sampler.update(model.field)
    assert model.geometry_key() == key
    model.config.cache_min_weight *= 2  # the cache keeps other samples
    assert model.geometry_key() not in (key, changed)


def test_freezing_stops_gradients_regrids_and_occupancy_updates(
    trained: Trained, frozen: Callable[[], FrozenGeometryModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = trained.base.config
    regrid = config.regrid_steps[0] - 1  # the after-step callback of this step regrids ...
    refresh = config.occupancy_warmup_steps + config.occupancy_update_every - 1  # ... and of this one, refreshes
    assert refresh + 1 not in config.regrid_steps

    live = frozen()
    updates: list[int] = []
    update = live.sampler.update

    def counted(field: Any) -> torch.Tensor:
        updates.append(1)
        return update(field)

    monkeypatch.setattr(live.sampler, "update", counted)
    dims = live.field.grid_dims.clone()
    _after_step(live, trained.pipeline, regrid)
    assert not torch.equal(live.field.grid_dims, dims), "an unfrozen model regrids"
    updates.clear()
    _after_step(live, trained.pipeline, refresh)
    assert updates, "an unfrozen model refreshes its occupancy"

    model = frozen()
    model.freeze_geometry()
    assert model.geometry_frozen
    assert not model.field.density_grid.requires_grad and not model.field.feature_grid.requires_grad
    calls: list[int] = []
    monkeypatch.setattr(model.sampler, "update", lambda field: calls.append(1))
    key, dims, box = model.geometry_key(), model.field.grid_dims.clone(), model.field.aabb.clone()
    for step in (regrid, refresh, config.regrid_steps[1] - 1):
        _after_step(model, trained.pipeline, step)
    assert not calls, "a frozen model's occupancy is never refreshed"
    assert torch.equal(model.field.grid_dims, dims) and torch.equal(model.field.aabb, box)
    assert model.geometry_key() == key


def test_a_second_build_reads_the_store_and_is_bit_identical(
    trained: Trained, frozen: Callable[[], FrozenGeometryModel], tmp_path: Path
) -> None:
    model = frozen()
    model.freeze_geometry()
    store = StylizedViewCache(tmp_path / "samples")
    marched = model.build_sample_cache(trained.cameras)
    assert model.sample_store_hits == 0 and model.sample_cache is marched
    first = model.build_sample_cache(trained.cameras, store)
    assert model.sample_store_hits == 0 and len(list((tmp_path / "samples").rglob("*.npy"))) == 2
    second = model.build_sample_cache(trained.cameras, store)
    assert model.sample_store_hits == 2, "both views come from the store"
    assert second.image_shape == first.image_shape == (2, 32, 32)
    for name in CACHE_FIELDS:
        assert torch.equal(getattr(second, name), getattr(first, name)), name
        assert torch.equal(getattr(first, name), getattr(marched, name)), name

    again = frozen()  # another model with the same geometry reads them too
    again.freeze_geometry()
    third = again.build_sample_cache(trained.cameras, store)
    assert again.sample_store_hits == 2 and all(torch.equal(getattr(third, n), getattr(first, n)) for n in CACHE_FIELDS)
    with torch.no_grad():  # another geometry marches again
        again.field.density_grid.mul_(1.5)
    again.build_sample_cache(trained.cameras, store)
    assert again.sample_store_hits == 0


def test_cached_samples_equal_a_live_march_in_eval_mode(
    trained: Trained, frozen: Callable[[], FrozenGeometryModel]
) -> None:
    model = frozen()
    model.freeze_geometry()
    model.train()  # the cache marches in eval mode (no jitter) whatever the mode, and gives the mode back
    cache = model.build_sample_cache(trained.cameras)
    assert model.training
    _, height, width = cache.image_shape
    pixels_per_view = height * width
    model.eval()
    with torch.no_grad():
        for view in range(len(trained.cameras)):
            origins, directions = _rays(trained.cameras, view)
            samples, weights = model.march_weights(origins, directions)
            keep = weights >= model.config.cache_min_weight
            assert 0 < int(keep.sum()) < keep.numel(), "light samples are left out, some are kept"
            pixels = view * pixels_per_view + torch.arange(pixels_per_view)
            ids, rays = cache.gather(pixels)
            assert torch.equal(rays, samples.ray_indices[keep])
            assert torch.equal(cache.weights[ids], weights[keep])
            torch.testing.assert_close(cache.positions[ids], samples.positions[keep], rtol=0, atol=1e-5)
            accumulation = torch.zeros(pixels_per_view).index_add_(0, rays, weights[keep])
            torch.testing.assert_close(cache.accumulation[pixels], accumulation, rtol=0, atol=1e-6)
            t_mid = (samples.t_starts + samples.t_ends)[keep] / 2
            depth = torch.zeros(pixels_per_view).index_add_(0, rays, weights[keep] * t_mid)
            torch.testing.assert_close(cache.depth[pixels], depth / accumulation.clamp_min(1e-6), rtol=0, atol=1e-5)
            assert float(accumulation.max()) > 0.5, "the views see the object"
