"""The shared model of diffusion-guided methods: the base field, an injected diffusion backbone, a typed score rule,
and two stages switched by one training callback.

A guided method (ED-NeRF, head stylization, TuneMV3D) trains on whole rendered views (or patches) of cameras,
not on random rays: the pipeline (:class:`~mmstyle_ns.pipelines.guided.GuidedPipeline`) hands the model a
camera and its batch every step and the model renders it with :meth:`MMStyleBaseModel.render_camera`. Stage 1
(``reconstruction_steps``) fits the scene; stage 2 applies the score rule (``rule``: SDS, DDS or likelihood
distillation, chosen on the command line as a subcommand) and, with ``freeze_geometry``, keeps the density fixed.

The backbone is not a module of the model (its weights must stay out of the model's state dict and optimizers):
the pipeline builds it once and passes it to the model's constructor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from torch import Tensor

from mmstyle_ns.guidance.rules import DDSConfig, ScoreRule, ScoreRuleConfig
from mmstyle_ns.models.base import MMStyleBaseModel, MMStyleBaseModelConfig


@dataclass
class GuidedModelConfig(MMStyleBaseModelConfig):
    """A base-field model guided by a frozen 2-D diffusion model in its second stage."""

    _target: type = field(default_factory=lambda: GuidedModel)
    reconstruction_steps: int = 600
    """Steps of stage 1 (fitting the scene); the guided stage starts after them (0: guided from the first step,
    e.g. when --load-dir resumes a trained run)."""
    rule: ScoreRuleConfig = field(default_factory=DDSConfig)
    """Score rule of the guided stage (a subcommand: rule:sds, rule:dds or rule:ld, each with its own options)."""
    freeze_geometry: bool = True
    """Keep the density fixed in the guided stage (edit appearance only)."""


class GuidedModel(MMStyleBaseModel):
    """Base model plus an injected ``DiffusionBackbone`` (``backbone=`` keyword of the constructor) and a score rule.

    Subclasses implement :meth:`guided_outputs` (render what a step trains on) and extend ``get_loss_dict``.
    """

    config: GuidedModelConfig

    def populate_modules(self) -> None:
        self.backbone: Any = self.kwargs.get("backbone")
        """The frozen diffusion backbone (built once by the pipeline; not a submodule)."""
        if self.backbone is None:
            raise ValueError(f"{type(self).__name__} needs the diffusion backbone: build it with a GuidedPipeline")
        super().populate_modules()
        self.rule: ScoreRule = self.config.rule.setup()
        self.guided_stage = False
        """Set by :meth:`start_guided_stage` (from the stage callback, at the first guided step)."""
        self.guided_span: tuple[int, int] | None = None
        """First and last step of the guided stage of this training run, for timestep annealing (set by the
        callbacks from the trainer: a run resumed with --load-dir counts its steps from the loaded one)."""

    def prompt_field(self, label: str, attribute: str, hint: str) -> Any:
        """A viewer text field bound to the prompt ``config.<attribute>``: a non-empty text typed into it becomes the
        prompt from the next training step (text embeddings are cached per prompt by the backbone)."""
        from nerfstudio.viewer.viewer_elements import ViewerText

        self.prompt_attributes: dict[str, str] = {**getattr(self, "prompt_attributes", {}), label: attribute}
        return ViewerText(label, getattr(self.config, attribute), cb_hook=self.set_prompt_from_viewer, hint=hint)

    def set_prompt_from_viewer(self, element: Any) -> None:
        """Viewer callback of :meth:`prompt_field` (an empty text is ignored)."""
        text = str(element.value).strip()
        if text:
            setattr(self.config, self.prompt_attributes[element.name], text)

    def in_guided_stage(self, step: int) -> bool:
        """Whether ``step`` belongs to the guided stage."""
        return step >= self.config.reconstruction_steps

    def start_guided_stage(self) -> None:
        """Called once when the guided stage begins (freezes the geometry if configured)."""
        self.guided_stage = True
        if self.config.freeze_geometry:
            self.geometry_frozen = True
            self.field.density_grid.requires_grad_(False)

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> list[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        trainer = training_callback_attributes.trainer
        if trainer is not None:
            start = int(getattr(trainer, "_start_step", 0))
            # the trainer's planned schedule when it has one (a resumed run keeps its annealing, see engine.py)
            first, last = getattr(trainer, "schedule", (start, start + int(trainer.config.max_num_iterations)))
            self.guided_span = (max(self.config.reconstruction_steps, int(first)), int(last))

        def switch_stage(step: int) -> None:
            if not self.guided_stage and self.in_guided_stage(step):
                self.start_guided_stage()

        callbacks.append(
            TrainingCallback(where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION], func=switch_stage)
        )
        return callbacks

    def guided_progress(self) -> tuple[int | None, int | None]:
        """``(step, max_steps)`` of the guided stage for the score rule's timestep annealing (``None``s when the
        model is not trained by nerfstudio's trainer)."""
        if self.guided_span is None:
            return None, None
        first, last = self.guided_span
        return max(0, self.step - first), max(1, last - first)

    def guided_outputs(self, camera: Cameras, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        """What a training step renders for ``camera`` (with gradients); the pipeline calls it every step."""
        raise NotImplementedError
