"""``ed-nerf``'s pipeline: the guided pipeline with ED-NeRF's model and its prompt checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmstyle_ns.guidance.rules import DDSConfig
from mmstyle_ns.models.ed_nerf import EDNeRFModelConfig
from mmstyle_ns.pipelines.guided import GuidedPipeline, GuidedPipelineConfig


@dataclass
class EDNeRFPipelineConfig(GuidedPipelineConfig):
    """ED-NeRF: latents of the training views, a latent field with a refinement layer, a DDS edit."""

    _target: type = field(default_factory=lambda: EDNeRFPipeline)
    model: EDNeRFModelConfig = field(default_factory=EDNeRFModelConfig)
    """The latent-space model."""

    def check_inputs(self) -> None:
        """The diffusion model, and the edit's prompts (both for DDS, the target for the other rules)."""
        super().check_inputs()
        from mmstyle_ns.data.datamanagers import GuidedDataManagerConfig, ViewSamplingConfig

        datamanager = self.datamanager
        if isinstance(datamanager, GuidedDataManagerConfig) and not isinstance(
            datamanager.sampling, ViewSamplingConfig
        ):
            raise ValueError(
                "ed-nerf trains on whole latent views: use --pipeline.datamanager.sampling view (the default)"
            )
        model = self.model
        needed = ["target_prompt"] + (["source_prompt"] if isinstance(model.rule, DDSConfig) else [])
        missing = [name for name in needed if not getattr(model, name).strip()]
        if missing:
            flags = " and ".join(f'--pipeline.model.{name.replace("_", "-")} "..."' for name in missing)
            raise ValueError(
                f'the edit needs {flags} (e.g. --pipeline.model.source-prompt "a red cube on a wooden floor" '
                '--pipeline.model.target-prompt "a blue cube on a wooden floor")'
            )


class EDNeRFPipeline(GuidedPipeline):
    """The guided pipeline with ED-NeRF's model."""

    config: EDNeRFPipelineConfig
