"""The pipeline of diffusion-guided methods: one backbone built once, whole views through nerfstudio's image
datamanager, VAE latents of the training views cached on disk.

* The ``DiffusionBackbone`` (``guidance``, on its own device if configured) is built before the model and passed
  to its constructor (:class:`~mmstyle_ns.models.guided.GuidedModel` reads it from nerfstudio's ``Model.kwargs``).
* The datamanager (:class:`~mmstyle_ns.data.datamanagers.GuidedDataManager`) keeps nerfstudio's
  ``FullImageDatamanager`` contract: ``next_train`` yields cameras and their images (a view, a patch, a k x k view
  set or a mirrored pair); the model renders them (:meth:`~mmstyle_ns.models.guided.GuidedModel.guided_outputs`).
* Every training and evaluation view is encoded once by the backbone's VAE (``latent_target`` of the batch),
  stored under ``cache_dir`` keyed by the VAE's contents and the image's pixels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from nerfstudio.utils.rich_utils import CONSOLE

from mmstyle_ns.data.datamanagers import GuidedDataManagerConfig
from mmstyle_ns.fields.nerfacto_geometry import is_nerfacto_run
from mmstyle_ns.guidance.backbone import DiffusionBackboneConfig
from mmstyle_ns.pipelines.base import MMStylePipeline, MMStylePipelineConfig, ModelWithArguments, cache_root_for


@dataclass
class GuidedPipelineConfig(MMStylePipelineConfig):
    """A pipeline whose model is guided by a frozen 2-D diffusion model."""

    _target: type = field(default_factory=lambda: GuidedPipeline)
    datamanager: Any = field(default_factory=GuidedDataManagerConfig)
    """What a step trains on: whole views (default), patches, k x k view sets or mirrored pairs."""
    guidance: DiffusionBackboneConfig = field(
        default_factory=lambda: DiffusionBackboneConfig(flag_prefix="--pipeline.guidance")
    )
    """The diffusion model (--pipeline.guidance.model-path: a Stable Diffusion folder or hub id, or
    examples/toy-teacher)."""
    cache_dir: Path | None = None
    """Where the views' VAE latents are stored (default: <data>/mmstyle_cache)."""

    def check_inputs(self) -> None:
        """Checks what the method needs without loading anything (run before ns-train writes config.yml)."""
        from mmstyle_ns.guidance.checks import missing_model_files, resolve_local

        value = self.guidance.model_path
        flag = self.guidance.flag("model_path")
        if value is None or not value.strip():
            raise ValueError(
                f"this method needs a diffusion model: pass {flag} <a Stable Diffusion folder or hub id, or "
                "examples/toy-teacher>"
            )
        folder = resolve_local(value, self.guidance.offline)
        if folder is None:
            if not self.guidance.offline:  # a hub id, downloaded by the loaders
                return
            raise ValueError(
                f"{flag} {value!r} is neither a folder nor a hub id in the local Hugging Face cache (nothing is "
                f"downloaded while {self.guidance.flag('offline')} is on)"
            )
        if missing := missing_model_files(folder):
            raise ValueError(f"{flag} {value!r} lacks {', '.join(missing)} (a diffusers Stable Diffusion folder)")

    def cache_root(self) -> Path:
        """The cache folder (``cache_dir``, or ``mmstyle_cache`` inside the dataset)."""
        return cache_root_for(self.datamanager, self.cache_dir)


class GuidedPipeline(MMStylePipeline):
    """Builds the backbone once, encodes the views' latents once, and trains the model on whole views."""

    config: GuidedPipelineConfig

    def __init__(
        self,
        config: GuidedPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Any = None,
    ) -> None:
        geometry = getattr(config.model, "geometry_from", None)
        if test_mode != "val" and geometry is not None and not is_nerfacto_run(Path(geometry)):
            # a trained run loaded for rendering or evaluation: its own checkpoint holds the geometry (a nerfacto
            # run's model is rebuilt from that run's config.yml, and its weights are in the checkpoint too)
            config = dataclasses.replace(config, model=dataclasses.replace(config.model, geometry_from=None))
        config.check_inputs()
        backbone = config.guidance.setup(device=device)
        building = dataclasses.replace(config, model=ModelWithArguments(config.model, {"backbone": backbone}))
        super().__init__(building, device, test_mode, world_size, local_rank, grad_scaler)
        self.config = config
        self.backbone = backbone
        self.train_latents: torch.Tensor | None = None
        self.eval_latents: torch.Tensor | None = None
        if test_mode != "inference":
            self.encode_views()

    def encode_views(self) -> None:
        """VAE latents of every training and evaluation view (read from the cache where present)."""
        from mmstyle_ns.data.latents import LatentCache, encode_views

        cache = LatentCache(self.config.cache_root() / "latents")
        datamanager: Any = self.datamanager
        # the datamanager's cached images: undistorted as its cameras are (the dataset's raw images may not be)
        train = [datamanager.cached_train[i]["image"] for i in range(len(datamanager.train_dataset))]
        self.train_latents = encode_views(self.backbone, train, cache)
        if datamanager.eval_dataset is not None:
            evaluation = [datamanager.cached_eval[i]["image"] for i in range(len(datamanager.eval_dataset))]
            self.eval_latents = encode_views(self.backbone, evaluation, cache)
        CONSOLE.print(f"VAE latents of {len(self.train_latents)} training views: {cache.hits} read, {cache.misses} new")

    def _with_latent(self, batch: dict[str, Any], latents: torch.Tensor | None) -> dict[str, Any]:
        if latents is not None:
            batch["latent_target"] = latents[int(batch["image_idx"])][None].to(self.device)
        return batch

    def get_train_loss_dict(self, step: int) -> tuple[Any, Any, Any]:
        camera, batch = self.datamanager.next_train(step)
        batch = self._with_latent(batch, self.train_latents)
        outputs = self.model.guided_outputs(camera, batch, step)  # type: ignore[attr-defined]
        metrics = self.model.get_metrics_dict(outputs, batch)
        return outputs, self.model.get_loss_dict(outputs, batch, metrics), metrics

    def get_eval_loss_dict(self, step: int) -> tuple[Any, Any, Any]:
        self.eval()
        camera, batch = self.datamanager.next_eval(step)
        batch = self._with_latent(batch, self.eval_latents)
        with torch.no_grad():
            outputs = self.model.guided_outputs(camera, batch, step)  # type: ignore[attr-defined]
            metrics = self.model.get_metrics_dict(outputs, batch)
            losses = self.model.get_loss_dict(outputs, batch, metrics)
        self.train()
        return outputs, losses, metrics
