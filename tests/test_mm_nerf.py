"""Behaviour of ``mm-nerf`` (MM-NeRF, many styles in one NeRF) on a short CPU run through nerfstudio's Trainer.

One module-scoped run trains the embedded ``tiny_scene`` (25 reconstruction + 30 stylization steps, two styles)
and saves a checkpoint; the other tests inspect that pipeline or load its checkpoint into new pipelines (a style
appended, styles reordered) without training from scratch again.

"""

from __future__ import annotations

import copy
import random
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.engine.callbacks import TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from torch import Tensor

from mmstyle_ns.models.mm_nerf import ORIGINAL, STYLE_PANEL, MMNeRFModel, MMNeRFModelConfig
from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipeline, MMNeRFPipelineConfig
from mmstyle_ns.style.cache import StylizedViewCache
from mmstyle_ns.style.sources import StyleInputError

RECONSTRUCTION_STEPS = 25
STYLIZATION_STEPS = 30
STYLES = ("builtin:coffee", "builtin:chelsea")
NAMES = ("coffee", "chelsea")
ADDED_STYLE = "builtin:rocket"
TEXT_FLAG = "--pipeline.model.style-extractor.text-to-image-model"


# ---- helpers ---------------------------------------------------------------------------------------------


def _parts(config: TrainerConfig) -> tuple[MMNeRFPipelineConfig, MMNeRFModelConfig]:
    pipeline = config.pipeline
    assert isinstance(pipeline, MMNeRFPipelineConfig) and isinstance(pipeline.model, MMNeRFModelConfig)
    return pipeline, pipeline.model


def _config(scene: Path, root: Path, styles: tuple[str, ...], timestamp: str, iterations: int = 1) -> TrainerConfig:
    """A short CPU ``mm-nerf`` run on the tiny scene, derived from the registered method config."""
    from nerfstudio.plugins.registry import discover_methods

    methods, _ = discover_methods()
    config = copy.deepcopy(methods["mm-nerf"])
    pipeline, model = _parts(config)
    datamanager = pipeline.datamanager
    assert isinstance(datamanager, VanillaDataManagerConfig)
    datamanager.data = scene
    datamanager.train_num_rays_per_batch = 256
    pipeline.styles = styles
    pipeline.stylized_views = 4
    pipeline.incremental_views = 4
    pipeline.cache_dir = root / "style_cache"
    model.reconstruction_steps = RECONSTRUCTION_STEPS
    # Both regrids inside the reconstruction stage (a regrid during stylization is a bug of its own, see
    # test_regrid_during_stylization_keeps_geometry_frozen).
    model.regrid_steps = (10, 20)
    model.occupancy_warmup_steps = 8
    config.output_dir = root / "runs"
    config.timestamp = timestamp
    config.vis = "tensorboard"
    config.max_num_iterations = iterations
    config.steps_per_save = 10**6
    config.save_only_latest_checkpoint = True
    config.steps_per_eval_batch = config.steps_per_eval_image = config.steps_per_eval_all_images = 10**6
    config.machine.device_type = "cpu"
    return config


def _mm(pipeline: Any) -> MMNeRFModel:
    assert isinstance(pipeline, MMNeRFPipeline)
    return pipeline.mm_model


@torch.no_grad()
def _render(model: MMNeRFModel, camera: Cameras) -> dict[str, Tensor]:
    was_training = model.training
    model.eval()
    outputs = model.get_outputs_for_camera(camera)
    model.train(was_training)
    return outputs


def _head_state(model: MMNeRFModel, index: int) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.heads[index].state_dict().items()}


def _same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _set_view(model: MMNeRFModel, first: str, second: str, t: float) -> None:
    model.style_controls.style.value = first
    model.style_controls.blend_with.value = second
    model.style_controls.blend.value = t


def _assert_cache_matches_live_rays(pipeline: MMNeRFPipeline, views: list[int], style: int) -> None:
    model = pipeline.mm_model
    assert model.sample_cache is not None and model.cached_cameras is not None
    train_dataset = pipeline.datamanager.train_dataset
    assert train_dataset is not None
    cameras = train_dataset.cameras
    _, height, width = model.sample_cache.image_shape
    was_training = model.training
    model.eval()  # the sampler jitters in training mode
    try:
        with torch.no_grad():
            for view in views:  # views of the sample cache
                camera = int(model.cached_cameras[view])
                bundle = cameras.generate_rays(camera_indices=camera, keep_shape=True)
                pixels = view * height * width + torch.arange(height * width)
                cached = model.render_cached(pixels, style)
                live = model.render_uncached(bundle.origins.reshape(-1, 3), bundle.directions.reshape(-1, 3), style)
                torch.testing.assert_close(cached, live, rtol=0, atol=1e-6)
    finally:
        model.train(was_training)


def _total(losses: dict[str, Tensor]) -> Tensor:
    return torch.stack(list(losses.values())).sum()


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- fixtures --------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Trained:
    """The module's one trained run."""

    pipeline: MMNeRFPipeline
    model: MMNeRFModel
    checkpoint: Path
    camera: Cameras
    """An eval camera."""
    renders: dict[str, Tensor]
    """Outputs of ``camera`` right after training (viewer at its defaults)."""
    scene: Path
    root: Path


@pytest.fixture(scope="module")
def trained(tiny_scene: Path, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    root = tmp_path_factory.mktemp("mm_nerf")
    config = _config(tiny_scene, root, STYLES, "trained", RECONSTRUCTION_STEPS + STYLIZATION_STEPS)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    pipeline = trainer.pipeline
    assert isinstance(pipeline, MMNeRFPipeline)
    model = pipeline.mm_model
    assert pipeline.style_ready and model.trainable == [0, 1]
    checkpoints = sorted(config.get_checkpoint_dir().glob("step-*.ckpt"))
    assert len(checkpoints) == 1
    eval_dataset = pipeline.datamanager.eval_dataset
    assert eval_dataset is not None
    camera = eval_dataset.cameras[0:1]
    return Trained(pipeline, model, checkpoints[0], camera, _render(model, camera), tiny_scene, root)


@pytest.fixture(scope="module")
def load_trained(trained: Trained) -> Callable[[tuple[str, ...]], MMNeRFPipeline]:
    """Builds a pipeline configured with the given styles and loads the trained checkpoint into it (cached)."""
    built: dict[tuple[str, ...], MMNeRFPipeline] = {}

    def load(styles: tuple[str, ...]) -> MMNeRFPipeline:
        if styles not in built:
            config = _config(trained.scene, trained.root, styles, "loaded")
            pipeline = config.pipeline.setup(device="cpu", test_mode="val")
            assert isinstance(pipeline, MMNeRFPipeline)
            state = torch.load(trained.checkpoint, map_location="cpu")
            pipeline.load_pipeline(state["pipeline"], state["step"])
            built[styles] = pipeline
        return built[styles]

    return load


# ---- 1. one head per style ---------------------------------------------------------------------------------


def test_heads_predict_different_parameters_and_renders_per_style(trained: Trained) -> None:
    model, renders = trained.model, trained.renders
    assert model.style_names == list(NAMES)
    first, second = model.style_parameters(0).detach(), model.style_parameters(1).detach()
    assert first.shape == second.shape == (model.color_spec.num_params,)
    assert (first - second).abs().max() > 1e-2

    solid = renders["accumulation"][..., 0] > 0.5
    assert solid.float().mean() > 0.2, "the object should cover part of the view"
    assert (renders["coffee"] - renders["chelsea"])[solid].abs().mean() > 1e-4
    for name in (*NAMES, ORIGINAL):
        assert renders[name].shape == renders["rgb"].shape and torch.isfinite(renders[name]).all()
    # stylized, not the photorealistic colours; the viewer shows the first style by default
    assert not torch.allclose(renders["coffee"], renders[ORIGINAL], atol=1e-3)
    torch.testing.assert_close(renders["rgb"], renders[model.style_controls.style.value], rtol=0, atol=0)


# ---- 2. blending -------------------------------------------------------------------------------------------


def test_blend_parameters_at_the_ends_are_the_pure_styles(trained: Trained) -> None:
    model = trained.model
    with torch.no_grad():
        for a, b in ((0, 1), (1, 0)):
            torch.testing.assert_close(model.blend_parameters(a, b, 0.0), model.style_parameters(a), rtol=0, atol=0)
            torch.testing.assert_close(model.blend_parameters(a, b, 1.0), model.style_parameters(b), rtol=0, atol=0)
            middle = model.blend_parameters(a, b, 0.5)
            expected = 0.5 * (model.style_parameters(a) + model.style_parameters(b))
            torch.testing.assert_close(middle, expected, rtol=1e-6, atol=1e-6)


def test_viewer_blend_endpoints_and_midpoint_path(trained: Trained) -> None:
    model, camera, pure = trained.model, trained.camera, trained.renders
    try:
        for first, second in (("coffee", "chelsea"), ("chelsea", "coffee")):
            _set_view(model, first, second, 0.0)
            torch.testing.assert_close(_render(model, camera)["rgb"], pure[first], rtol=0, atol=1e-6)
            _set_view(model, first, second, 1.0)
            torch.testing.assert_close(_render(model, camera)["rgb"], pure[second], rtol=0, atol=1e-6)

        # t = 0.5 between two styles renders the colour head under the blended parameters ...
        _set_view(model, "coffee", "chelsea", 0.5)
        middle = _render(model, camera)["rgb"]
        assert (middle - pure["coffee"]).abs().max() > 1e-5 and (middle - pure["chelsea"]).abs().max() > 1e-5
        model.eval()
        with torch.no_grad():
            bundle = camera.generate_rays(camera_indices=0, keep_shape=True)
            samples, weights, _ = model.march(bundle.origins.reshape(-1, 3), bundle.directions.reshape(-1, 3))
            keep = weights >= model.config.cache_min_weight
            colors = model.stylized_colors(samples.positions[keep], model.blend_parameters(0, 1, 0.5))
            direct = model._composite_white(
                colors, weights[keep], samples.ray_indices[keep], bundle.origins[..., 0].numel()
            )
        torch.testing.assert_close(middle, direct.view_as(middle), rtol=0, atol=1e-6)

        # ... and blending with the photorealistic render mixes the images
        _set_view(model, "chelsea", ORIGINAL, 0.25)
        mixed = _render(model, camera)["rgb"]
        torch.testing.assert_close(mixed, 0.75 * pure["chelsea"] + 0.25 * pure[ORIGINAL], rtol=0, atol=1e-6)
    finally:
        _set_view(model, NAMES[0], ORIGINAL, 0.0)


def test_viewer_blend_midpoint_lies_between_the_styles(trained: Trained) -> None:
    model, camera, pure = trained.model, trained.camera, trained.renders
    try:
        _set_view(model, "coffee", "chelsea", 0.5)
        middle = _render(model, camera)["rgb"]
    finally:
        _set_view(model, NAMES[0], ORIGINAL, 0.0)
    solid = pure["accumulation"][..., 0] > 0.5
    a, b, m = pure["coffee"][solid], pure["chelsea"][solid], middle[solid]
    apart = (a - b).abs().mean()
    assert apart > 1e-4
    # strictly between: nearer to each style than the styles are to each other, and (the colour head is
    # nonlinear, so per pixel only nearly always) inside the per-pixel range of the two styles
    assert 0 < (m - a).abs().mean() < apart and 0 < (m - b).abs().mean() < apart
    inside = (m >= torch.minimum(a, b) - 1e-4) & (m <= torch.maximum(a, b) + 1e-4)
    assert inside.float().mean() > 0.9


# ---- 3. incremental styles ---------------------------------------------------------------------------------


LOAD_PATHS = [
    pytest.param("model", id="model-load_state_dict"),
    pytest.param("load-dir", id="ns-train-load-dir"),
]


@pytest.mark.parametrize("load_path", LOAD_PATHS)
def test_added_style_trains_alone_and_leaves_old_styles_unchanged(
    trained: Trained, monkeypatch: pytest.MonkeyPatch, load_path: str
) -> None:
    config = _config(trained.scene, trained.root, (*STYLES, ADDED_STYLE), f"incremental-{load_path}", iterations=6)
    config.load_dir = trained.checkpoint.parent
    trainer = config.setup(local_rank=0, world_size=1)
    assert isinstance(trainer, Trainer)
    if load_path != "load-dir":  # "load-dir" is nerfstudio's own --load-dir path, unchanged

        def load_model_state() -> None:  # Trainer._load_checkpoint, loading the model's part of the state only
            state = torch.load(trained.checkpoint, map_location="cpu")
            model_state = {k[len("_model.") :]: v for k, v in state["pipeline"].items() if k.startswith("_model.")}
            model = _mm(trainer.pipeline)
            model.update_to_step(state["step"])
            result = model.load_state_dict(model_state, strict=False)
            assert not result.unexpected_keys and result.missing_keys
            new_keys = (f"heads.{len(NAMES)}.", f"residuals.{len(NAMES)}.")
            assert all(key.startswith(new_keys) for key in result.missing_keys)
            trainer._start_step = state["step"] + 1

        monkeypatch.setattr(trainer, "_load_checkpoint", load_model_state)
    trainer.setup()
    pipeline = trainer.pipeline
    assert isinstance(pipeline, MMNeRFPipeline)
    model = pipeline.mm_model
    new = model.style_names.index("rocket")
    assert model.style_names == [*NAMES, "rocket"] and model.trained_styles == set(NAMES)

    loaded = _render(model, trained.camera)
    for name in NAMES:  # heads and shared grid came back by name
        torch.testing.assert_close(loaded[name], trained.renders[name], rtol=0, atol=1e-6)

    pipeline.prepare_stylization(trainer.optimizers)
    # the new head starts as the head of the most similar trained style (cosine of the style embeddings)
    embeddings = model.style_embeddings
    scores = [F.cosine_similarity(embeddings[new], embeddings[i], dim=0) for i in range(len(NAMES))]
    nearest = int(torch.stack(scores).argmax())
    assert _same_state(_head_state(model, new), _head_state(model, nearest))
    assert not _same_state(_head_state(model, new), _head_state(model, 1 - nearest))
    # incremental mode: only the new head trains, the shared style grid is frozen
    assert model.trainable == [new]
    assert not model.style_grid.table.requires_grad
    assert [any(p.requires_grad for p in head.parameters()) for head in model.heads] == [False, False, True]
    # the new style owns a residual feature grid, zero at first (its render starts as its source head's); the
    # trained styles have none, so nothing of theirs changes
    assert [model.residual_grid(i).active for i in range(len(model.style_names))] == [False, False, True]
    assert not model.residual_grid(new).table.any() and model.residual_grid(new).table.requires_grad
    trainable_grids = [p for p in trainer.optimizers.parameters["style_grid"] if p.requires_grad]
    assert len(trainable_grids) == 1 and trainable_grids[0] is model.residual_grid(new).table
    # its views are among the first stylization's, whose ray samples were stored: none is marched again
    assert model.cached_cameras is not None and model.sample_store_hits == len(model.cached_cameras) > 0
    _assert_cache_matches_live_rays(pipeline, views=[0, len(model.cached_cameras) - 1], style=new)
    # with the style grid frozen, the colour heads' inputs are evaluated once; renders are the same without them
    cache = model.sample_cache
    assert cache is not None and cache.head_inputs is not None
    pixels = torch.randint(0, cache.offsets.numel() - 1, (500,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        from_inputs = model.render_cached(pixels, new)
        inputs, cache.head_inputs = cache.head_inputs, None
        from_positions = model.render_cached(pixels, new)
        cache.head_inputs = inputs
    torch.testing.assert_close(from_inputs, from_positions, rtol=0, atol=1e-6)

    old_heads = [_head_state(model, i) for i in range(len(NAMES))]
    grid = model.style_grid.table.detach().clone()
    new_head = _head_state(model, new)
    initialised = _render(model, trained.camera)
    trainer.train()
    after = _render(model, trained.camera)

    for index, name in enumerate(NAMES):
        assert _same_state(_head_state(model, index), old_heads[index])
        assert torch.equal(after[name], loaded[name])  # bit-identical
    assert torch.equal(model.style_grid.table, grid)
    assert model.residual_grid(new).table.abs().max() > 0  # the new style grew features of its own
    assert not _same_state(_head_state(model, new), new_head)
    assert (after["rocket"] - initialised["rocket"]).abs().max() > 1e-5


@pytest.mark.parametrize("styles", [STYLES[::-1], (ADDED_STYLE, *STYLES[::-1])], ids=["swapped", "new-first"])
def test_reordered_styles_load_each_head_by_name(
    trained: Trained, load_trained: Callable[[tuple[str, ...]], MMNeRFPipeline], styles: tuple[str, ...]
) -> None:
    model = _mm(load_trained(styles))
    for old_index, name in enumerate(NAMES):
        assert _same_state(_head_state(model, model.style_names.index(name)), _head_state(trained.model, old_index))


@pytest.mark.parametrize(
    "styles",
    [
        pytest.param(STYLES[::-1], id="swapped"),
        pytest.param((ADDED_STYLE, *STYLES[::-1]), id="new-first"),
    ],
)
def test_reordered_styles_render_the_trained_styles(
    trained: Trained, load_trained: Callable[[tuple[str, ...]], MMNeRFPipeline], styles: tuple[str, ...]
) -> None:
    model = _mm(load_trained(styles))
    for old_index, name in enumerate(NAMES):
        index = model.style_names.index(name)
        torch.testing.assert_close(model.style_embeddings[index], trained.model.style_embeddings[old_index])
    renders = _render(model, trained.camera)
    for name in NAMES:
        torch.testing.assert_close(renders[name], trained.renders[name], rtol=0, atol=1e-6)


def test_checkpoint_saved_before_stylization_holds_no_trained_styles(
    trained: Trained, load_trained: Callable[[tuple[str, ...]], MMNeRFPipeline]
) -> None:
    finished = _mm(load_trained(STYLES))  # the finished run's heads were in training: loaded as such
    assert finished.resumed_styles == set(NAMES) and finished.trained_styles == set()
    config = _config(trained.scene, trained.root, STYLES, "reconstruction-only")
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    state = pipeline.state_dict()  # what a save during reconstruction holds: heads nobody has trained
    assert state["_model._extra_state"]["trained"] == []
    again = config.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(again, MMNeRFPipeline)
    again.load_pipeline(state, RECONSTRUCTION_STEPS // 2)
    assert again.mm_model.trained_styles == set()  # a resumed run stylizes every style afresh
    legacy = {**state, "_model._extra_state": {"style_names": list(NAMES)}}  # runs saved before "trained" existed
    again.load_pipeline(legacy, RECONSTRUCTION_STEPS // 2)
    assert again.mm_model.trained_styles == set(NAMES)


def test_a_resumed_incremental_stage_keeps_its_split_and_its_new_head(trained: Trained) -> None:
    config = _config(trained.scene, trained.root, (*STYLES, ADDED_STYLE), "resume-split")
    state = torch.load(trained.checkpoint, map_location="cpu")
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline.prepare_stylization()
    model = pipeline.mm_model
    new = model.style_names.index("rocket")
    assert model.trainable == [new]
    with torch.no_grad():  # what some steps of training the new style change
        for param in model.heads[new].parameters():
            param.add_(0.01)
        model.residual_grid(new).table.add_(0.1)
    saved = pipeline.state_dict()  # a checkpoint of the incremental stage, e.g. before a kill
    assert saved["_model._extra_state"]["stage"] == {"frozen": sorted(NAMES), "training": ["rocket"]}

    again = config.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(again, MMNeRFPipeline)
    again.load_pipeline(saved, state["step"] + 5)
    again.prepare_stylization()
    resumed = again.mm_model
    # the same split: the old styles and the shared grid stay frozen, the new style trains on from where it was
    assert resumed.trainable == [new] and not resumed.style_grid.table.requires_grad
    assert _same_state(_head_state(resumed, new), _head_state(model, new))
    assert torch.equal(resumed.residual_grid(new).table, model.residual_grid(new).table)
    for name in NAMES:
        index = resumed.style_names.index(name)
        assert not any(p.requires_grad for p in resumed.heads[index].parameters())


def test_load_dir_with_an_added_style_sets_up(trained: Trained) -> None:
    config = _config(trained.scene, trained.root, (*STYLES, ADDED_STYLE), "load_dir")
    config.load_dir = trained.checkpoint.parent
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    model = _mm(trainer.pipeline)
    assert trainer._start_step == RECONSTRUCTION_STEPS + STYLIZATION_STEPS
    for index in range(len(NAMES)):
        assert _same_state(_head_state(model, index), _head_state(trained.model, index))


def test_add_style_command_writes_a_run_that_renders_old_and_new_styles(trained: Trained) -> None:
    from nerfstudio.utils.eval_utils import eval_setup

    from mmstyle_ns.scripts.add_style import AddStyleArgs, add_styles

    config = _config(trained.scene, trained.root, STYLES, "trained")  # the trained run's own configuration
    assert config.get_checkpoint_dir() == trained.checkpoint.parent
    config.save_config()
    load_config = config.get_base_dir() / "config.yml"
    runs = config.get_base_dir().parent

    # a text style without a text-to-image model: stopped before anything is built, naming this command's flag
    before = sorted(p.name for p in runs.iterdir())
    with pytest.raises(StyleInputError, match="pass --text-to-image-model <hub id"):
        add_styles(AddStyleArgs(load_config, ("text:a watercolor",), steps=2, timestamp="refused"))
    assert sorted(p.name for p in runs.iterdir()) == before

    # another text-to-image model than the one the run's own text styles came from: refused, nothing written
    text_run = _config(trained.scene, trained.root, (*STYLES, "text:a watercolor"), "text-run")
    _parts(text_run)[1].style_extractor.text_to_image_model = "first-model"
    text_config = text_run.get_base_dir() / "config.yml"  # written as ns-train would (its check needs the model)
    text_config.parent.mkdir(parents=True)
    text_config.write_text(yaml.dump(text_run), "utf8")
    with pytest.raises(StyleInputError, match="were made with text-to-image-model 'first-model'"):
        add_styles(AddStyleArgs(text_config, (ADDED_STYLE,), text_to_image_model="another-model", timestamp="refused"))
    assert sorted(p.name for p in runs.iterdir()) == sorted([*before, "text-run"])

    new_config, _ = add_styles(AddStyleArgs(load_config, (ADDED_STYLE,), steps=4, timestamp="added"))
    assert new_config == runs / "added" / "config.yml"
    _, pipeline, _, step = eval_setup(new_config, test_mode="inference")  # what ns-render does
    assert step == RECONSTRUCTION_STEPS + STYLIZATION_STEPS - 1 + 4
    model = _mm(pipeline)
    assert model.style_names == [*NAMES, "rocket"]
    renders = _render(model, trained.camera.to(model.device))
    for name in NAMES:
        torch.testing.assert_close(renders[name], trained.renders[name], rtol=0, atol=1e-6)
    assert all((renders["rocket"] - renders[name]).abs().max() > 1e-4 for name in NAMES)  # trained, a style of its own


def test_trained_run_renders_when_its_style_images_cannot_be_made(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmstyle_ns.style.extractor import MultimodalStyleExtractor

    def missing_model(self: Any, sources: Any) -> Any:
        raise StyleInputError("pass --pipeline.model.style-extractor.text-to-image-model <the model that was moved>")

    monkeypatch.setattr(MultimodalStyleExtractor, "prepare", missing_model)
    config = _config(trained.scene, trained.root, STYLES, "render-only")
    with pytest.raises(StyleInputError, match="the model that was moved"):  # training needs the images
        config.pipeline.setup(device="cpu", test_mode="val")
    pipeline = config.pipeline.setup(device="cpu", test_mode="inference")  # ns-render, the viewer
    assert isinstance(pipeline, MMNeRFPipeline)
    state = torch.load(trained.checkpoint, map_location="cpu")
    pipeline.load_pipeline(state["pipeline"], state["step"])  # the embeddings come from the checkpoint
    torch.testing.assert_close(pipeline.mm_model.style_embeddings, trained.model.style_embeddings, rtol=0, atol=0)
    renders = _render(pipeline.mm_model, trained.camera)
    for name in (*NAMES, ORIGINAL):
        torch.testing.assert_close(renders[name], trained.renders[name], rtol=0, atol=1e-6)
    with pytest.raises(StyleInputError, match="style images are needed here: .*the model that was moved"):
        _ = pipeline.prepared  # e.g. mmstyle-mm-eval's style match


def test_load_dir_from_a_trained_base_run_skips_reconstruction(tiny_scene: Path, tmp_path: Path) -> None:
    from conftest import short_run_config

    base_config = short_run_config("mmstyle-base", tiny_scene, tmp_path / "base", iterations=RECONSTRUCTION_STEPS)
    base = base_config.setup(local_rank=0, world_size=1)
    base.setup()
    base.train()
    base_model = base.pipeline.model
    (base_checkpoint,) = base_config.get_checkpoint_dir().glob("step-*.ckpt")

    config = _config(tiny_scene, tmp_path, STYLES, "from-base", iterations=3)
    config.load_dir = base_checkpoint.parent  # ns-train mm-nerf --load-dir <base run>/nerfstudio_models
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer._start_step == RECONSTRUCTION_STEPS  # the base run's steps count as the reconstruction
    pipeline = trainer.pipeline
    assert isinstance(pipeline, MMNeRFPipeline)
    model = pipeline.mm_model
    assert torch.equal(model.field.density_grid, base_model.field.density_grid)
    assert torch.equal(model.field.aabb, base_model.field.aabb)
    eval_dataset = pipeline.datamanager.eval_dataset
    assert eval_dataset is not None
    camera = eval_dataset.cameras[0:1]
    torch.testing.assert_close(_render(model, camera)[ORIGINAL], _render(base_model, camera)["rgb"], rtol=0, atol=1e-6)
    trainer.train()  # straight into the stylization stage
    assert pipeline.style_ready and model.trainable == [0, 1]
    assert torch.equal(model.field.density_grid, base_model.field.density_grid)  # geometry stays the base's


def test_regrid_during_stylization_keeps_geometry_frozen(trained: Trained) -> None:
    config = _config(trained.scene, trained.root, STYLES, "regrid")
    _, model_config = _parts(config)
    model_config.regrid_steps = (10, RECONSTRUCTION_STEPS + 5)
    model_config.grid_resolutions = (32, 96, 48)
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    state = torch.load(trained.checkpoint, map_location="cpu")
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline.prepare_stylization()
    model = pipeline.mm_model
    attributes = TrainingCallbackAttributes(optimizers=None, grad_scaler=None, pipeline=pipeline, trainer=None)
    callbacks = pipeline.get_training_callbacks(attributes)
    step = RECONSTRUCTION_STEPS + 4  # its after-step callback would regrid
    assert model.in_style_stage(step)
    for callback in callbacks:
        callback.run_callback_at_location(step, TrainingCallbackLocation.AFTER_TRAIN_ITERATION)
    assert not model.field.density_grid.requires_grad
    _assert_cache_matches_live_rays(pipeline, views=[0], style=0)


# ---- 4. the sample cache -----------------------------------------------------------------------------------


def test_cached_render_and_loss_match_the_uncached_path(trained: Trained) -> None:
    pipeline, model = trained.pipeline, trained.model
    assert model.sample_cache is not None and model.style_views is not None and model.cached_cameras is not None
    train_dataset = pipeline.datamanager.train_dataset
    assert train_dataset is not None
    cameras = train_dataset.cameras
    _, height, width = model.sample_cache.image_shape
    generator = torch.Generator().manual_seed(0)
    count = 300
    view = torch.randint(0, len(model.style_views), (count,), generator=generator)
    rows = torch.randint(0, height, (count,), generator=generator)
    cols = torch.randint(0, width, (count,), generator=generator)
    cached_view = model.style_views[view]
    pixels = (cached_view * height + rows) * width + cols
    cameras_of = model.cached_cameras[cached_view]

    origins, directions = torch.empty(count, 3), torch.empty(count, 3)
    for camera in cameras_of.unique().tolist():
        bundle = cameras.generate_rays(camera_indices=camera, keep_shape=True)
        mask = cameras_of == camera
        origins[mask] = bundle.origins[rows[mask], cols[mask]]
        directions[mask] = bundle.directions[rows[mask], cols[mask]]

    _assert_cache_matches_live_rays(pipeline, views=[0, len(model.cached_cameras) - 1], style=1)  # whole images
    model.eval()  # the sampler jitters in training mode
    params = [model.style_grid.table, *model.heads.parameters()]
    try:
        for style in range(len(NAMES)):
            cached_losses = model.style_loss(view, rows, cols, style)
            cached_grads = torch.autograd.grad(_total(cached_losses), params, allow_unused=True)

            live = model.render_uncached(origins, directions, style)
            torch.testing.assert_close(model.render_cached(pixels, style), live, rtol=0, atol=1e-6)
            data = model.style_targets[style]
            target = data.targets[view, rows, cols].float() / 255.0
            consensus = data.consensus[view, rows, cols].float() / 255.0
            valid = data.valid[view, rows, cols].float()[:, None]
            assert valid.sum() > 0, "some sampled pixels should have a multi-view consistent target"
            live_losses = {
                "style_loss": F.mse_loss(live, target),
                "consistency_loss": model.config.consistency_weight
                * ((live - consensus) ** 2 * valid).sum()
                / (3 * valid.sum()),
            }
            assert cached_losses.keys() == live_losses.keys()
            for name, value in live_losses.items():
                torch.testing.assert_close(cached_losses[name], value, rtol=1e-6, atol=1e-7)
            assert cached_losses["style_loss"] > 0
            live_grads = torch.autograd.grad(_total(live_losses), params, allow_unused=True)
            for cached_grad, live_grad in zip(cached_grads, live_grads, strict=True):
                if cached_grad is None or live_grad is None:
                    assert cached_grad is None and live_grad is None
                else:
                    torch.testing.assert_close(cached_grad, live_grad, rtol=1e-5, atol=1e-7)
    finally:
        model.train()


def test_sample_store_returns_the_marched_samples_for_the_same_geometry_only(trained: Trained, tmp_path: Path) -> None:
    model = trained.model
    train_dataset = trained.pipeline.datamanager.train_dataset
    assert train_dataset is not None
    cameras = train_dataset.cameras[torch.tensor([0, 2])]
    store = StylizedViewCache(tmp_path / "samples")
    fields = ("positions", "weights", "offsets", "accumulation", "depth")
    kept, density = model.sample_cache, model.field.density_grid.detach().clone()
    try:
        marched = model.build_sample_cache(cameras)
        first = model.build_sample_cache(cameras, store)
        assert model.sample_store_hits == 0
        second = model.build_sample_cache(cameras, store)
        assert model.sample_store_hits == 2
        for name in fields:  # bit-identical to marching
            assert torch.equal(getattr(second, name), getattr(marched, name)), name
            assert torch.equal(getattr(first, name), getattr(marched, name)), name
        with torch.no_grad():  # another geometry: the stored samples no longer apply
            model.field.density_grid.add_(torch.randn_like(density))
        changed = model.build_sample_cache(cameras, store)
        assert model.sample_store_hits == 0
        assert not torch.equal(changed.weights, marched.weights) or not torch.equal(changed.offsets, marched.offsets)
    finally:
        with torch.no_grad():
            model.field.density_grid.copy_(density)
        model.sample_cache = kept


# ---- 5. bad style inputs -----------------------------------------------------------------------------------


def _bad_spec(kind: str, folder: Path) -> tuple[str, str]:
    """A bad style spec of the given kind and a fragment the error message must contain."""
    if kind == "missing":
        path = folder / "no_such_style.png"
        return f"image:{path}", "does not exist"
    if kind == "corrupt":
        path = folder / "corrupt.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        return f"image:{path}", "not a readable image"
    if kind == "modality":
        return "foo:bar", "unknown modality 'foo'"
    assert kind == "text"
    return "text:a watercolor painting", TEXT_FLAG


def _existing_run(config: TrainerConfig) -> Path:
    base = config.get_base_dir()
    (base / "nerfstudio_models").mkdir(parents=True)
    (base / "sentinel.txt").write_text("earlier run, keep me")
    (base / "config.yml").write_text("# the earlier run's config\n")
    (base / "nerfstudio_models" / "step-000000007.ckpt").write_bytes(b"earlier checkpoint")
    return base


@pytest.mark.parametrize("kind", ["missing", "corrupt", "modality", "text"])
def test_bad_style_fails_before_training_and_writes_nothing(tiny_scene: Path, tmp_path: Path, kind: str) -> None:
    spec, fragment = _bad_spec(kind, tmp_path)
    config = _config(tiny_scene, tmp_path, (STYLES[0], spec), "existing")
    base = _existing_run(config)
    before = _tree(tmp_path / "runs")
    trainer = config.setup(local_rank=0, world_size=1)
    assert isinstance(trainer, Trainer)
    with pytest.raises(StyleInputError) as error:
        trainer.setup()
    message = str(error.value)
    assert fragment in message
    if kind in ("missing", "corrupt"):
        assert spec.split(":", 1)[1] in message  # names the file
    assert not hasattr(trainer, "pipeline"), "nothing was built"
    assert _tree(tmp_path / "runs") == before, "the existing run was touched"
    assert (base / "sentinel.txt").read_text() == "earlier run, keep me"
    assert not (tmp_path / "style_cache").exists()


def test_ns_train_with_a_bad_style_writes_nothing(
    tiny_scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nerfstudio.scripts.train import main

    config = _config(tiny_scene, tmp_path, (STYLES[0], "foo:bar"), "existing")
    _existing_run(config)
    before = _tree(tmp_path / "runs")
    with pytest.raises(SystemExit) as stopped:
        main(config)
    assert stopped.value.code == 2 and "unknown modality" in capsys.readouterr().out  # one message, no traceback
    assert _tree(tmp_path / "runs") == before


@pytest.mark.parametrize("weights", ["none", "swapped"])
def test_ns_train_with_adain_but_bad_weights_writes_nothing(
    tiny_scene: Path,
    tmp_path: Path,
    adain_weights: tuple[Path, Path],
    weights: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from nerfstudio.scripts.train import main

    config = _config(tiny_scene, tmp_path, STYLES, "existing")
    pipeline_config = _parts(config)[0]
    pipeline_config.stylizer = "adain"
    message = "--pipeline.adain.vgg-weights <vgg_normalised.pth"
    if weights == "swapped":  # files that exist but hold the other network
        pipeline_config.adain.decoder_weights, pipeline_config.adain.vgg_weights = adain_weights
        message = "--pipeline.adain.vgg-weights .* holds convolutions"
    _existing_run(config)
    before = _tree(tmp_path / "runs")
    with pytest.raises(SystemExit) as stopped:
        main(config)
    assert stopped.value.code == 2 and re.search(message, capsys.readouterr().out)
    assert _tree(tmp_path / "runs") == before


def test_adain_stylizes_the_training_views(trained: Trained, adain_weights: tuple[Path, Path]) -> None:
    config = _config(trained.scene, trained.root, STYLES, "adain")
    pipeline_config, _ = _parts(config)
    pipeline_config.stylizer = "adain"
    pipeline_config.style_strength = 0.8
    pipeline_config.adain.vgg_weights, pipeline_config.adain.decoder_weights = adain_weights
    pipeline_config.adain.content_size = pipeline_config.adain.style_size = 48
    pipeline = pipeline_config.setup(device="cpu", test_mode="val")
    assert isinstance(pipeline, MMNeRFPipeline)
    state = torch.load(trained.checkpoint, map_location="cpu")
    pipeline.load_pipeline(state["pipeline"], state["step"])
    pipeline.mm_model.trained_styles = set()  # stylize both styles afresh
    pipeline.prepare_stylization()
    model = pipeline.mm_model
    assert model.cached_cameras is not None
    train_dataset = pipeline.datamanager.train_dataset
    assert train_dataset is not None
    view = train_dataset.get_image_float32(int(model.cached_cameras[1])).numpy()
    content, alpha = view[..., :3] * view[..., 3:] + (1 - view[..., 3:]), view[..., 3:]  # over white
    stylizer = pipeline.stylizer
    for index in (0, 1):
        vector = stylizer.style_vector(pipeline.prepared[index].image)
        assert vector.shape == (1024,)  # AdaIN's statistics, not a Magenta vector
        expected = stylizer.stylize(content, vector, 0.8) * alpha + (1 - alpha)
        target = model.style_targets[index].targets[1].numpy() / 255.0
        np.testing.assert_allclose(target, expected, atol=0.5 / 255 + 1e-6)

    # rendering the trained run (ns-render, the viewer) does not need the AdaIN weights
    pipeline_config.adain.vgg_weights = pipeline_config.adain.decoder_weights = trained.root / "moved-away.pth"
    for mode in ("inference", "test"):
        viewer_pipeline = pipeline_config.setup(device="cpu", test_mode=mode)
        assert isinstance(viewer_pipeline, MMNeRFPipeline) and viewer_pipeline.mm_model.style_names == list(NAMES)
        with pytest.raises(StyleInputError, match="is not a file"):  # stylizing again does
            _ = viewer_pipeline.stylizer


# ---- 6. one style per step ---------------------------------------------------------------------------------


def test_stylization_step_gives_gradients_to_one_head_and_the_style_grid(trained: Trained) -> None:
    pipeline, model = trained.pipeline, trained.model
    model.zero_grad(set_to_none=True)
    try:
        seen = []
        for step in (RECONSTRUCTION_STEPS + STYLIZATION_STEPS, RECONSTRUCTION_STEPS + STYLIZATION_STEPS + 1):
            model.train()
            _, losses, metrics = pipeline.get_train_loss_dict(step)
            style = int(metrics["style_index"])
            seen.append(style)
            # the patch objective: perceptual style and content terms on a rendered patch, and the colour anchor
            assert set(losses) == {"perceptual_style_loss", "perceptual_content_loss", "consistency_loss"}
            assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
            _total(losses).backward()
            for index, head in enumerate(model.heads):
                grads = [p.grad for p in head.parameters()]
                if index == style:
                    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads if g is not None) > 0
                else:
                    assert all(g is None or not g.any() for g in grads)
            table_grad = model.style_grid.table.grad
            assert table_grad is not None and table_grad.abs().sum() > 0
            # frozen geometry and base colour get nothing
            assert model.field.density_grid.grad is None and model.field.feature_grid.grad is None
            model.zero_grad(set_to_none=True)
        assert sorted(seen) == [0, 1], "consecutive steps train the styles in turn"
    finally:
        model.zero_grad(set_to_none=True)


# ---- 7. the viewer, driven through its websocket as the browser does -----------------------------------------

VIEWER_SIZE = 40


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_viewer_client_picks_and_blends_styles_without_training(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import viser.transforms as vtf
    from nerfstudio.viewer.viewer import VISER_NERFSTUDIO_SCALE_RATIO, Viewer
    from viser_client import ViewerClient

    config = _config(trained.scene, trained.root, STYLES, "viewer")
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")  # its own model: the viewer's thread renders it
    state = torch.load(trained.checkpoint, map_location="cpu")
    pipeline.load_pipeline(state["pipeline"], state["step"])
    model = _mm(pipeline)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, Tensor)}

    renders: list[tuple[tuple[str, str, float], dict[str, np.ndarray]]] = []
    render = model.get_outputs_for_camera

    def recording(camera: Cameras, obb_box: Any = None) -> dict[str, Tensor]:
        outputs = render(camera, obb_box=obb_box)
        controls = model.style_controls
        chosen = (controls.style.value, controls.blend_with.value, float(controls.blend.value))
        frames = {
            k: (v.clamp(0, 1) * 255).round().to(torch.uint8).numpy() for k, v in outputs.items() if v.shape[-1] == 3
        }
        renders.append((chosen, frames))
        return outputs

    monkeypatch.setattr(model, "get_outputs_for_camera", recording)
    config.viewer.websocket_host, config.viewer.websocket_port = "127.0.0.1", _free_port()
    config.viewer.image_format = "png"  # lossless frames
    viewer = Viewer(
        config.viewer, log_filename=tmp_path / "viewer.txt", datapath=trained.scene, pipeline=pipeline, train_lock=None
    )
    try:
        viewer.init_scene(
            train_dataset=pipeline.datamanager.train_dataset,  # type: ignore[arg-type]
            train_state="completed",
            eval_dataset=pipeline.datamanager.eval_dataset,
        )
        with ViewerClient(config.viewer.websocket_port) as client:
            assert b"<html" in client.page().lower()  # what a browser loads first
            client.receive(3.0)
            style, blend_with, blend = client.gui["Style"], client.gui["Blend with"], client.gui["Blend"]
            assert style["type"] == blend_with["type"] == "GuiAddDropdownMessage"
            panel = client.gui[STYLE_PANEL]  # a panel named for the user, not after an attribute
            assert panel["type"] == "GuiAddFolderMessage"
            assert style["container_id"] == blend_with["container_id"] == blend["container_id"] == panel["id"]
            assert not {"mm_model", "model", "style_controls"} & set(client.gui)
            assert list(style["options"]) == list(blend_with["options"]) == [*NAMES, ORIGINAL]
            assert (style["value"], blend_with["value"]) == (NAMES[0], ORIGINAL)
            assert blend["type"] == "GuiAddSliderMessage" and (blend["min"], blend["max"], blend["value"]) == (0, 1, 0)

            c2w = trained.camera.camera_to_worlds[0].numpy()
            rotation = vtf.SO3.from_matrix(c2w[:3, :3]) @ vtf.SO3.from_x_radians(np.pi)  # OpenGL -> viser's OpenCV
            fov = 2 * np.arctan(float(trained.camera.height[0]) / 2 / float(trained.camera.fy[0]))
            client.set_camera(tuple(rotation.wxyz), tuple(c2w[:3, 3] * VISER_NERFSTUDIO_SCALE_RATIO), fov)
            client.set_value("Max res", VIEWER_SIZE)

            def shown(chosen: tuple[str, str, float], output: str) -> Callable[[np.ndarray], bool]:
                """Accepts a full-size frame that is exactly the ``output`` of a render made with the viewer set to
                ``chosen``, and none of that render's other images (so it tells the styles apart)."""

                def accept(frame: np.ndarray) -> bool:
                    if frame.shape != (VIEWER_SIZE, VIEWER_SIZE, 3):
                        return False
                    for c, images in list(renders):
                        if c != chosen or images[output].shape != frame.shape:
                            continue
                        error = {k: int(np.abs(image.astype(int) - frame).max()) for k, image in images.items()}
                        others = [k for k in (*NAMES, ORIGINAL) if k != output]
                        if error[output] <= 1 and all(error[k] > 1 for k in others):
                            return True
                    return False

                return accept

            for name in (NAMES[0], NAMES[1], ORIGINAL):
                if name != NAMES[0]:
                    client.set_value("Style", name)
                frame = client.receive(90.0, shown((name, ORIGINAL, 0.0), name))
                assert frame is not None, f"the viewer never streamed '{name}' after the client picked it"
            client.set_value("Style", NAMES[0])
            client.set_value("Blend with", NAMES[1])
            client.set_value("Blend", 0.5)
            frame = client.receive(90.0, shown((NAMES[0], NAMES[1], 0.5), "rgb"))
            assert frame is not None, "the viewer never streamed the 50/50 blend of the two styles"
    finally:
        viewer.viser_server.stop()
        for machine in list(viewer.render_statemachines.values()):
            machine.running = False
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "picking styles changed the model"


# ---- the paper's CLIP route, offline: the toy CLIP and the toy teacher --------------------------------------

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CLIP_STYLES = ("builtin:coffee", "red=text:a red sphere on a wooden floor", "blue=text:a blue cube on grass")


def test_clip_embedding_puts_image_and_text_styles_in_one_space(tiny_scene: Path, tmp_path: Path) -> None:
    """With ``embedding clip`` and the shipped toy CLIP, image styles and text styles (made into images by the
    toy teacher) are embedded in one CLIP space: each text style's image lies nearer its own prompt than the
    other's, a new text style starts from the head of its CLIP-nearest trained style, and mm-eval reports the
    CLIP-space figures."""
    from mmstyle_ns.clip.loader import load_clip
    from mmstyle_ns.scripts.mm_eval import MMEvalArgs
    from mmstyle_ns.scripts.mm_eval import main as mm_eval

    def clip_config(styles: tuple[str, ...], timestamp: str, iterations: int) -> TrainerConfig:
        config = _config(tiny_scene, tmp_path, styles, timestamp, iterations)
        extractor = _parts(config)[1].style_extractor
        extractor.embedding = "clip"
        extractor.clip_model = "toy-clip"
        extractor.clip_checkpoint = str(EXAMPLES / "toy-clip")
        extractor.text_to_image_model = str(EXAMPLES / "toy-teacher")
        extractor.text_to_image_steps = 20
        return config

    config = clip_config(CLIP_STYLES, "clip", RECONSTRUCTION_STEPS + 4)
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    trainer.train()
    pipeline = trainer.pipeline
    assert isinstance(pipeline, MMNeRFPipeline)
    model = pipeline.mm_model
    clip = load_clip("toy-clip", str(EXAMPLES / "toy-clip"))
    prepared = {p.source.name: p for p in pipeline.prepared}
    assert model.style_embeddings.shape == (3, clip.embed_dim)
    for index, name in enumerate(model.style_names):  # the style image's CLIP image embedding
        expected = clip.encode_images(prepared[name].image[None])[0]
        torch.testing.assert_close(model.style_embeddings[index], expected, rtol=0, atol=1e-5)
    texts = clip.encode_texts([str(prepared["red"].prompt), str(prepared["blue"].prompt)])
    red, blue = model.style_names.index("red"), model.style_names.index("blue")
    sims = model.style_embeddings[[red, blue]] @ texts.T  # [image of red, blue] x [red, blue prompt]
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]

    # incremental: a new red text style starts from the red style's head, the CLIP-nearest trained style
    added = clip_config((*CLIP_STYLES, "crimson=text:two red spheres on stone"), "clip-added", 1)
    loaded = added.pipeline.setup(device="cpu", test_mode="val")
    assert isinstance(loaded, MMNeRFPipeline)
    (checkpoint,) = sorted(config.get_checkpoint_dir().glob("step-*.ckpt"))
    state = torch.load(checkpoint, map_location="cpu")
    loaded.load_pipeline(state["pipeline"], state["step"])
    new_model = loaded.mm_model
    new = new_model.style_names.index("crimson")
    assert new_model.initialise_new_heads() == [new]
    embeddings = new_model.style_embeddings
    scores = {n: float(embeddings[new] @ embeddings[i]) for i, n in enumerate(new_model.style_names) if i != new}
    assert max(scores, key=lambda n: scores[n]) == "red", scores
    assert _same_state(_head_state(new_model, new), _head_state(new_model, red))

    config.save_config()
    report = mm_eval(
        MMEvalArgs(
            config.get_base_dir() / "config.yml",
            tmp_path / "eval",
            num_frames=6,
            gaps=(1, 2),
            sheet_columns=3,
            baseline=False,
        )
    )
    assert report["clip"]["model"] == "toy-clip"
    agreement = report["clip"]["modality_agreement"]
    assert agreement["styles"] == ["red", "blue"] and agreement["matched"] > agreement["unrelated"]
    assert all("clip_style_match" in report["styles"][name] for name in model.style_names)
    similarity = report["styles"]["red"]["clip_text_similarity"]
    assert similarity["prompt"] == prepared["red"].prompt and "clip_text_similarity" not in report["styles"]["coffee"]
