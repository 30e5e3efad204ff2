"""``head-stylize``'s pipeline: the guided pipeline with the head stylization model and its input checks."""

from __future__ import annotations

from dataclasses import dataclass, field

from mmstyle_ns.guidance.rules import LDConfig, SDSConfig
from mmstyle_ns.models.head_stylize import HeadStylizeModelConfig
from mmstyle_ns.pipelines.guided import GuidedPipeline, GuidedPipelineConfig


@dataclass
class HeadStylizePipelineConfig(GuidedPipelineConfig):
    """Head stylization: k x k views and their mirror views per step, distilled from a text-to-image model."""

    _target: type = field(default_factory=lambda: HeadStylizePipeline)
    model: HeadStylizeModelConfig = field(default_factory=HeadStylizeModelConfig)
    """The stylized RGB field."""

    def check_inputs(self) -> None:
        """The diffusion model, the prompt, a score rule without source branch and whole-view sampling."""
        super().check_inputs()
        from mmstyle_ns.data.datamanagers import PatchSamplingConfig

        if not self.model.prompt.strip():
            raise ValueError(
                'head-stylize needs --pipeline.model.prompt "..." (what the head should become, e.g. '
                '"a cartoon of a red sphere on a plain floor" with examples/toy-teacher)'
            )
        if not isinstance(self.model.rule, LDConfig | SDSConfig):
            raise ValueError("head-stylize distils from the prompt alone: use pipeline.model.rule:ld or rule:sds")
        if isinstance(getattr(self.datamanager, "sampling", None), PatchSamplingConfig):
            raise ValueError(
                "head-stylize renders whole views: use pipeline.datamanager.sampling:mirrored-view-set (the "
                "default), :view-set, :mirrored-pair or :view"
            )


class HeadStylizePipeline(GuidedPipeline):
    """The guided pipeline with the head stylization model; the views' VAE latents are not needed."""

    config: HeadStylizePipelineConfig

    def encode_views(self) -> None:
        """Nothing to encode: the score depends on the renders and the prompt alone."""
