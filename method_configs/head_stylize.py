"""Method specification of ``head-stylize``: identity-preserving head stylization by likelihood distillation."""

from __future__ import annotations

from mmstyle_ns.method_configs.base import base_trainer_config  # pyright: ignore[reportMissingImports]
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from mmstyle_ns.data.datamanagers import GuidedDataManagerConfig, MirroredViewSetSamplingConfig
from mmstyle_ns.models.head_stylize import HeadStylizeModelConfig
from mmstyle_ns.optim import FusedAdamOptimizerConfig
from mmstyle_ns.pipelines.head_stylize import HeadStylizePipelineConfig

STYLIZATION_STEPS = 1000


def head_stylize_trainer_config(stylization_steps: int = STYLIZATION_STEPS) -> TrainerConfig:
    """Stylization of a trained base run (--load-dir): 2 x 2 view grids with mirror views, the colours' own
    learning-rate schedule (the base run's is not resumed)."""
    config = base_trainer_config(max_num_iterations=stylization_steps)
    config.method_name = "head-stylize"
    config.load_scheduler = False
    config.steps_per_eval_image = 250
    config.steps_per_save = 250
    config.pipeline = HeadStylizePipelineConfig(
        datamanager=GuidedDataManagerConfig(
            dataparser=NerfstudioDataParserConfig(), sampling=MirroredViewSetSamplingConfig(grid_k=2)
        ),
        model=HeadStylizeModelConfig(),
    )
    config.optimizers["grid"] = {
        "optimizer": FusedAdamOptimizerConfig(lr=0.005, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-4, max_steps=stylization_steps),
    }
    return config


head_stylize = MethodSpecification(
    config=head_stylize_trainer_config(),
    description=(
        "Identity-preserving head stylization: a trained mmstyle-base head (--load-dir) restyled towards "
        "--pipeline.model.prompt by rank-weighted likelihood distillation over 2x2 view grids with mirror gradients "
        "(--pipeline.guidance.model-path: a Stable Diffusion folder or examples/toy-teacher)."
    ),
)
