"""The ``mm-nerf`` pipeline: styles from the command line, stylization supervision, the stylization stage.

Styles are parsed and validated when the pipeline is built — a missing or corrupt file, an unknown modality
or a text/audio style without the model it needs stops the run before anything is trained or written.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.utils.rich_utils import CONSOLE

from mmstyle_ns.distributed import broadcast_module
from mmstyle_ns.fields.grid_field import replace_parameters
from mmstyle_ns.models.mm_nerf import (
    STYLE_PANEL,
    MMNeRFModel,
    MMNeRFModelConfig,
    PatchObjectiveConfig,
    StyleSet,
    StyleTargets,
)
from mmstyle_ns.pipelines.base import MMStylePipeline, MMStylePipelineConfig, ModelWithArguments, cache_root_for
from mmstyle_ns.style.adain import AdaINConfig
from mmstyle_ns.style.cache import StylizedViewCache, style_key_for
from mmstyle_ns.style.extractor import MultimodalStyleExtractor, PreparedStyle
from mmstyle_ns.style.magenta import MissingDependencyError
from mmstyle_ns.style.perceptual import PerceptualStyleLoss, VGGFeaturesConfig
from mmstyle_ns.style.sources import StyleInputError, parse_style_specs
from mmstyle_ns.style.stylizer import Stylizer
from mmstyle_ns.style.targets import composite_white, consistent_targets, stylized_views

PATCH_TRIES = 8
"""Random patch positions (in the step's view) drawn at most, looking for one that covers the object well enough."""

MIN_PATCH_COVERAGE = 0.25
"""Mean rendered opacity a patch needs to be taken at once (else the best of :data:`PATCH_TRIES` is)."""


def spread(items: list[int], count: int) -> list[int]:
    """``count`` items evenly spread over ``items``, ends included (all of them when ``count`` is 0 or too many)."""
    if not 0 < count < len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, count).round().astype(int).tolist()]


DEFAULT_STYLES = ("builtin:coffee", "builtin:hubble_deep_field", "builtin:chelsea")


@dataclass
class MMNeRFPipelineConfig(MMStylePipelineConfig):
    """MM-NeRF pipeline: the vanilla pipeline plus the styles."""

    _target: type = field(default_factory=lambda: MMNeRFPipeline)
    model: MMNeRFModelConfig = field(default_factory=MMNeRFModelConfig)  # type: ignore[assignment]
    """MM-NeRF model."""
    styles: tuple[str, ...] = DEFAULT_STYLES
    """Styles, any number: [name=]image:PATH, text:PROMPT, audio:PATH, builtin:NAME (images shipped with
    scikit-image/matplotlib, e.g. coffee, astronaut, chelsea, rocket, hubble_deep_field, grace_hopper), or a
    bare image/audio path. Example: --pipeline.styles starry.jpg "mono=image:art/ink.png" "text:a watercolor"."""
    stylizer: Literal["magenta", "adain"] = "magenta"
    """2D stylizer of the training views: Magenta arbitrary style transfer (ONNX, offline) or AdaIN, as in the
    paper (needs its weights: --pipeline.adain.vgg-weights and --pipeline.adain.decoder-weights)."""
    adain: AdaINConfig = field(default_factory=AdaINConfig)
    """AdaIN weights and sizes (used with --pipeline.stylizer adain)."""
    style_strength: float = 1.0
    """Strength of the 2D stylization of the training views (0: none, 1: full)."""
    cache_dir: Path | None = None
    """Folder of the caches (stylized views, ray samples, style images generated from text and audio); default:
    'mmstyle_cache' inside the dataset folder. Entries are recomputed when missing; without the stored style images,
    a run with text or audio styles still renders, but training or evaluating it needs their models again."""
    stylized_views: int = 32
    """Training views stylized per style (evenly spread; 0: all). The 2D stylizer is the slow part of the set-up
    and the multi-view consistent loss ties the views together, so a subset suffices."""
    incremental_views: int = 8
    """Views a style added to a trained model trains on, spread over the stylized views (whose ray samples the
    first stylization stored on disk, so they are reused); 0 or more than stylized-views: all of those."""

    def cache_root(self) -> Path:
        """Folder of the caches: stylized views, ray samples, generated style images."""
        return cache_root_for(self.datamanager, self.cache_dir)

    def style_extractor(self, flags: dict[str, str] | None = None) -> MultimodalStyleExtractor:
        """The multimodal style extractor, keeping generated style images under :meth:`cache_root`."""
        store = StylizedViewCache(self.cache_root() / "styles")
        return MultimodalStyleExtractor(self.model.style_extractor, flags=flags, store=store)

    def check_inputs(self) -> None:
        """Validates the styles (files, modalities, models they need) and the 2D stylizer's configuration without
        loading any model; raises StyleInputError."""
        self.style_extractor().check(parse_style_specs(self.styles))
        if self.stylizer == "adain" and (problems := self.adain.problems()):
            raise StyleInputError("\n".join(problems))


class MMNeRFPipeline(MMStylePipeline):
    """Vanilla pipeline whose model has one head per style and a cached stylization stage."""

    config: MMNeRFPipelineConfig

    def __init__(
        self,
        config: MMNeRFPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Any = None,
    ) -> None:
        sources = parse_style_specs(config.styles)  # raises StyleInputError before anything is built
        if test_mode == "val":  # training: the 2D stylizer's weights too, not only when the stylization starts
            config.check_inputs()
        extractor = config.style_extractor()
        self.extractor = extractor
        self._stylizer: Stylizer | None = None
        self._prepared: list[PreparedStyle] | None = None
        self._unprepared: Exception | None = None
        names = [source.name for source in sources]
        try:
            self._prepared = extractor.prepare(sources)  # checks first; stored generated styles need no model
            embeddings = torch.stack([p.embedding for p in self._prepared])
        except (StyleInputError, MissingDependencyError) as error:
            if test_mode == "val":  # training needs the style images
                raise
            # rendering a trained run: the checkpoint holds the style embeddings, the images are only for training
            self._unprepared = error
            embeddings = torch.zeros(len(sources), extractor.embedding_dim())
            CONSOLE.print(
                "[yellow]The style images are not available, so this run can be rendered but not trained or "
                f"evaluated further: {str(error).splitlines()[0]}[/yellow]"
            )
        # the model is built with its styles, so that it creates their heads as it is built (see MMNeRFModel)
        styles = StyleSet(tuple(names), embeddings)
        building = dataclasses.replace(config, model=ModelWithArguments(config.model, {"styles": styles}))
        super().__init__(building, device, test_mode, world_size, local_rank, grad_scaler)
        self.config = config  # the configuration as given (``building`` only differs in how it builds the model)
        assert isinstance(self.model, MMNeRFModel), "mm-nerf needs an MMNeRFModel"
        # nerfstudio's viewer names a panel after the (shortest) attribute path to its elements: this one is
        # shorter than the model's own, so the controls appear under a readable name, not an attribute's
        self.add_module(STYLE_PANEL, self.model.style_controls)
        self._criteria: dict[str, PerceptualStyleLoss] = {}
        """The perceptual loss, built on first use (a plain dict: its frozen network is not part of the state)."""
        self.style_ready = False
        self.stylization_seconds = 0.0
        """Wall time the last :meth:`prepare_stylization` took."""

    @property
    def prepared(self) -> list[PreparedStyle]:
        """Every style's style image and embedding.

        Raises:
            StyleInputError: the run was opened for rendering and a style's image needs a model that is missing.
        """
        if self._prepared is None:
            raise StyleInputError(f"the style images are needed here: {self._unprepared}")
        return self._prepared

    @property
    def stylizer(self) -> Stylizer:
        """The 2D stylizer of the training views (built on first use: rendering a trained run never needs it)."""
        stylizer = self._stylizer
        if stylizer is None:
            stylizer = self.config.adain.setup() if self.config.stylizer == "adain" else self.extractor.stylizer
            self._stylizer = stylizer
        return stylizer

    @property
    def objective(self) -> PatchObjectiveConfig | None:
        """The patch objective's configuration, or None with the pixel objective."""
        objective = self.config.model.objective
        return objective if isinstance(objective, PatchObjectiveConfig) else None

    @property
    def criterion(self) -> PerceptualStyleLoss:
        """The perceptual loss of the patch objective (built once; VGG features default to the AdaIN weights)."""
        if "loss" not in self._criteria:
            objective = self.objective
            assert objective is not None, "the pixel objective has no perceptual loss"
            loss_config = dataclasses.replace(objective.loss)
            features = loss_config.features
            if isinstance(features, VGGFeaturesConfig) and features.vgg_weights is None:
                loss_config.features = dataclasses.replace(features, vgg_weights=self.config.adain.vgg_weights)
            loss_config.features = dataclasses.replace(loss_config.features, device=str(self.device))
            self._criteria["loss"] = loss_config.setup()
        return self._criteria["loss"]

    @property
    def mm_model(self) -> MMNeRFModel:
        """The model, unwrapped."""
        model = self.model
        assert isinstance(model, MMNeRFModel)
        return model

    def cache_root(self) -> Path:
        """Folder of the caches (see :meth:`MMNeRFPipelineConfig.cache_root`)."""
        return self.config.cache_root()

    @torch.no_grad()
    def prepare_stylization(self, optimizers: Any | None = None) -> None:
        """Freezes the geometry, caches ray samples, stylizes the training views and builds the targets.

        Styles with heads from a checkpoint are kept fixed; new ones start from the head of the most similar
        trained style (incremental learning) and only they, with the shared style grid frozen, are trained.
        """
        start = time.perf_counter()
        model = self.mm_model
        model.freeze_geometry()
        old_table = model.style_grid.table
        if model.prepare_style_grid() and optimizers is not None:
            replace_parameters(optimizers, {old_table: model.style_grid.table})
        new = model.initialise_new_heads()
        resumed = [i for i, name in enumerate(model.style_names) if name in model.resumed_styles]
        training = sorted({*new, *resumed})  # a resumed run trains on what its checkpoint was training
        incremental = bool(model.trained_styles) and bool(training)
        model.trainable = training if incremental else list(range(len(model.style_names)))
        if incremental:
            model.style_grid.table.requires_grad_(False)
            replaced = model.prepare_residuals(new)  # new styles may grow texture the frozen grid lacks
            if optimizers is not None and replaced:
                replace_parameters(optimizers, replaced)
            for index, head in enumerate(model.heads):
                head.requires_grad_(index in model.trainable)
                model.residuals[index].requires_grad_(index in model.trainable)
            CONSOLE.print(f"Adding styles {[model.style_names[i] for i in training]} to a trained model (incremental)")

        dataset = self.datamanager.train_dataset
        assert dataset is not None
        cameras = dataset.cameras.to(self.device)
        num = len(cameras)
        views = spread(list(range(num)), self.config.stylized_views)
        if incremental:  # a subset of the first stylization's views: their samples are in the store already
            views = spread(views, self.config.incremental_views)
        sel = torch.tensor(views)
        chosen = cameras[sel.to(cameras.device)]
        store = StylizedViewCache(self.cache_root() / "samples")
        cache = model.build_sample_cache(chosen, store)  # only the stylized views are ever sampled
        if incremental:  # the style grid is frozen: evaluate the colour heads' inputs once
            model.cache_head_inputs()
        _, height, width = cache.image_shape
        model.style_views = torch.arange(len(views), device=self.device)
        model.cached_cameras = sel
        images = [dataset.get_image_float32(i).numpy() for i in views]
        if self.objective is not None:  # the content term's images
            content = np.stack([composite_white(image) for image in images])
            content = np.round(np.clip(content, 0, 1) * 255).astype(np.uint8)
            model.content_views = torch.from_numpy(content).to(self.device)

        # geometry of the chosen views for the multi-view consistent targets
        origins, directions = [], []
        for i in range(len(views)):
            bundle = chosen.generate_rays(camera_indices=i, keep_shape=True)
            origins.append(bundle.origins.cpu())
            directions.append(bundle.directions.cpu())
        depth = cache.depth.view(len(views), height, width).cpu()
        accumulation = cache.accumulation.view(len(views), height, width).cpu()
        poses = chosen.camera_to_worlds.cpu().float()
        intrinsics = torch.cat([chosen.fx, chosen.fy, chosen.cx, chosen.cy], dim=-1).cpu().float()

        stylizer = self.stylizer
        view_cache = StylizedViewCache(self.cache_root())
        strength = self.config.style_strength
        model.style_targets = {}
        for index in model.trainable:
            prepared = self.prepared[index]
            vector = stylizer.style_vector(prepared.image)

            def stylize(image: np.ndarray, vector: np.ndarray = vector) -> np.ndarray:
                return stylizer.stylize(image, vector, strength)

            key = style_key_for(prepared, stylizer.identifier, strength)
            targets = stylized_views(images, key, stylize, view_cache, f"Stylizing views ({prepared.source.name})")
            consensus, valid = consistent_targets(
                targets,
                depth,
                accumulation,
                torch.stack(origins),
                torch.stack(directions),
                poses,
                intrinsics,
                neighbors=model.config.consistency_neighbors,
            )
            reference = None
            if self.objective is not None:
                reference = self.criterion.reference(torch.from_numpy(np.ascontiguousarray(prepared.image)).float())
            model.style_targets[index] = StyleTargets(
                targets.to(self.device), consensus.to(self.device), valid.to(self.device), reference
            )
        broadcast_module(model)  # new heads and style grid start the same on every process
        self.style_ready = True
        self.stylization_seconds = time.perf_counter() - start
        CONSOLE.print(
            f"Stylization ready in {self.stylization_seconds:.1f} s: {len(model.trainable)} style(s), "
            f"{len(views)} views ({model.sample_store_hits} with stored samples), "
            f"{cache.positions.shape[0] / max(1, len(views) * height * width):.2f} samples/pixel"
        )

    def style_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Random training pixels of the stylized views and the style trained at ``step`` (round robin)."""
        model = self.mm_model
        assert model.sample_cache is not None and model.style_views is not None
        _, height, width = model.sample_cache.image_shape
        count = int(self.datamanager.config.train_num_rays_per_batch)  # type: ignore[attr-defined]
        device = self.device
        view = torch.randint(0, len(model.style_views), (count,), device=device)
        rows = torch.randint(0, height, (count,), device=device)
        cols = torch.randint(0, width, (count,), device=device)
        return view, rows, cols, model.trainable[step % len(model.trainable)]

    def patch_size(self) -> int:
        """Side of the rendered training patches: the configured one, capped at the images' shorter side."""
        model, objective = self.mm_model, self.objective
        assert model.sample_cache is not None and objective is not None
        _, height, width = model.sample_cache.image_shape
        size = min(objective.patch_size, height, width)
        if size < self.criterion.min_side:
            raise ValueError(
                f"the patch objective needs patches of at least {self.criterion.min_side} pixels, the images are "
                f"{height}x{width} and --pipeline.model.objective.patch-size is {objective.patch_size}; use the "
                "pixel objective (pipeline.model.objective:pixel-objective-config) for smaller images"
            )
        return size

    def style_patch(self, step: int) -> tuple[int, int, int, int, int]:
        """A random square patch of a stylized view and the style trained at ``step`` (round robin):
        ``(view, top, left, size, style)``."""
        model = self.mm_model
        assert model.sample_cache is not None and model.style_views is not None
        _, height, width = model.sample_cache.image_shape
        size = self.patch_size()
        coverage = model.sample_cache.accumulation.view(-1, height, width)
        view = int(torch.randint(0, len(model.style_views), ()))  # every view as often
        opacity = coverage[model.style_views[view]]
        best: tuple[float, int, int] = (-1.0, 0, 0)
        for _ in range(PATCH_TRIES):  # a patch mostly on the object (an empty one teaches the style nothing)
            top = int(torch.randint(0, height - size + 1, ()))
            left = int(torch.randint(0, width - size + 1, ()))
            covered = float(opacity[top : top + size, left : left + size].mean())
            if covered > best[0]:
                best = (covered, top, left)
            if covered >= MIN_PATCH_COVERAGE:
                break
        _, top, left = best
        return view, top, left, size, model.trainable[step % len(model.trainable)]

    def get_train_loss_dict(self, step: int):  # noqa: ANN201 - nerfstudio's signature
        model = self.mm_model
        if not model.in_style_stage(step):
            return super().get_train_loss_dict(step)
        if not self.style_ready:
            self.prepare_stylization()
        if self.objective is not None:
            view, top, left, size, style = self.style_patch(step)
            losses = model.patch_loss(view, top, left, size, style, self.criterion)
        else:
            view, rows, cols, style = self.style_batch(step)
            losses = model.style_loss(view, rows, cols, style)
        model.stylized.add(model.style_names[style])
        metrics = {"style_index": torch.tensor(float(style))}
        return {}, losses, metrics

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> list[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        optimizers = training_callback_attributes.optimizers

        def before_step(step: int) -> None:
            if self.mm_model.in_style_stage(step) and not self.style_ready:
                self.prepare_stylization(optimizers)

        callbacks.append(
            TrainingCallback(where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], func=before_step)
        )
        return callbacks
