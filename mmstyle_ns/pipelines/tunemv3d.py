"""``tunemv3d``'s pipeline: the guided pipeline over a collection of scenes, every view's VAE latent cached once.

A step draws one scene and ``n + n'`` of its views (:class:`~mmstyle_ns.data.scene_sets.SceneSetDataManager`); the
model computes Eq. 3 on them (:meth:`~mmstyle_ns.models.tunemv3d.TuneMV3DModel.training_losses`). After encoding,
the viewer shows the field aggregating the display scene's clean input views; a generation replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from nerfstudio.utils.rich_utils import CONSOLE
from PIL import Image

from mmstyle_ns.data.scene_sets import SceneSetDataManagerConfig
from mmstyle_ns.models.tunemv3d import TuneMV3DModelConfig
from mmstyle_ns.pipelines.guided import GuidedPipeline, GuidedPipelineConfig


@dataclass
class TuneMV3DPipelineConfig(GuidedPipelineConfig):
    """TuneMV3D: a frozen diffusion model modulated by a field aggregating every view, trained on many scenes."""

    _target: type = field(default_factory=lambda: TuneMV3DPipeline)
    datamanager: Any = field(default_factory=SceneSetDataManagerConfig)
    """A collection of multi-view scenes with captions (--data: a folder from mmstyle-scene --kind toy-collection)."""
    model: TuneMV3DModelConfig = field(default_factory=TuneMV3DModelConfig)
    """The interactive model."""
    display_every: int = 50
    """Steps between refreshes of the shown display scene (the field aggregating its clean input views)."""

    def check_inputs(self) -> None:
        """The diffusion model and the generation prompt."""
        super().check_inputs()
        if not self.model.prompt.strip():
            raise ValueError('--pipeline.model.prompt is empty: give a prompt, e.g. "a red cube on grass"')


class TuneMV3DPipeline(GuidedPipeline):
    """The guided pipeline with TuneMV3D's datamanager and model."""

    config: TuneMV3DPipelineConfig

    def encode_views(self) -> None:
        """VAE latents of every view of every scene (read from the cache where present)."""
        from mmstyle_ns.data.latents import LatentCache, encode_views
        from mmstyle_ns.progress import progress

        datamanager: Any = self.datamanager
        cache = LatentCache(self.config.cache_root() / "latents")
        self.scene_latents: list[torch.Tensor] = []
        with progress(len(datamanager.scene_images), "Encoding the scenes' views", quiet=False) as advance:
            for files in datamanager.scene_images:
                images = [np.asarray(Image.open(f)) for f in files]
                self.scene_latents.append(encode_views(self.backbone, images, cache))
                advance()
        CONSOLE.print(
            f"VAE latents of {sum(len(x) for x in self.scene_latents)} views of {len(self.scene_latents)} scenes: "
            f"{cache.hits} read, {cache.misses} new"
        )
        self.show_display_scene()

    def display_cameras(self) -> Any:
        """The display scene's cameras a generation uses (``views_per_step`` of them, spread by azimuth)."""
        datamanager: Any = self.datamanager
        return datamanager.display_cameras()

    @torch.no_grad()
    def show_display_scene(self) -> None:
        """Lets the model's field aggregate the display scene's clean input views (``t = 0``): what the viewer and
        evaluation images show until a generation replaces it."""
        datamanager: Any = self.datamanager
        model: Any = self.model
        index = datamanager.config.display_scene
        views = datamanager.display_views()
        cameras = datamanager.display_cameras()
        latents = self.scene_latents[index][views].to(self.device)
        text = self.backbone.text_embeddings(datamanager.scenes[index].caption)[:1]
        was_training = model.training
        model.eval()
        model.generation_cameras = cameras
        out = model.interact(latents, 0, text, cameras)
        model.show(out["views"], 0)
        model.train(was_training)

    def get_training_callbacks(self, training_callback_attributes: Any) -> list[Any]:
        """The datamanager's and model's callbacks, and a refresh of the shown display scene every
        ``display_every`` steps (what the viewer shows while training)."""
        from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackLocation

        callbacks = super().get_training_callbacks(training_callback_attributes)
        callbacks.append(
            TrainingCallback(
                where_to_run=[TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                update_every_num_iters=self.config.display_every,
                func=lambda step: (
                    None if getattr(self.model, "showing_generation", False) else self.show_display_scene()
                ),
            )
        )
        return callbacks

    def _losses(self, step: int, evaluation: bool) -> tuple[Any, Any, Any]:
        datamanager: Any = self.datamanager
        cameras, batch = datamanager.next_eval(step) if evaluation else datamanager.next_train(step)
        latents = self.scene_latents[batch["scene"]][batch["views"]].to(self.device)
        n = int(batch["num_inputs"])
        novel = cameras[torch.arange(n, len(cameras))] if len(cameras) > n else None
        model: Any = self.model
        losses = model.training_losses(
            latents[:n],
            cameras[torch.arange(n)],
            latents[n:] if novel is not None else None,
            novel,
            batch["prompt"],
            batch["generator"],
        )
        return {}, losses, {key.replace("_loss", ""): value.detach() for key, value in losses.items()}

    def get_train_loss_dict(self, step: int) -> tuple[Any, Any, Any]:
        return self._losses(step, evaluation=False)

    def get_eval_loss_dict(self, step: int) -> tuple[Any, Any, Any]:
        self.eval()
        with torch.no_grad():
            result = self._losses(step, evaluation=True)
        self.train()
        return result
