"""Method specification of ``mm-nerf``: multimodal multi-style NeRF (MM-NeRF) on the dense-grid base."""

from __future__ import annotations

from mmstyle_ns.method_configs.base import base_trainer_config  # pyright: ignore[reportMissingImports]
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from mmstyle_ns.models.mm_nerf import MMNeRFModelConfig
from mmstyle_ns.optim import FusedAdamOptimizerConfig
from mmstyle_ns.pipelines.mm_nerf import MMNeRFPipelineConfig

RECONSTRUCTION_STEPS = 600
STYLIZATION_STEPS = 900


def mm_nerf_trainer_config(
    reconstruction_steps: int = RECONSTRUCTION_STEPS, stylization_steps: int = STYLIZATION_STEPS
) -> TrainerConfig:
    """The base method's reconstruction followed by the stylization stage, in one run."""
    total = reconstruction_steps + stylization_steps
    config = base_trainer_config(max_num_iterations=total)
    config.method_name = "mm-nerf"
    base_pipeline = config.pipeline
    config.pipeline = MMNeRFPipelineConfig(
        datamanager=base_pipeline.datamanager,
        model=MMNeRFModelConfig(reconstruction_steps=reconstruction_steps),
    )
    for group in ("grid", "fields", "camera_opt"):  # reconstruction schedules end where stylization starts
        scheduler = config.optimizers[group]["scheduler"]
        assert isinstance(scheduler, ExponentialDecaySchedulerConfig)
        scheduler.max_steps = reconstruction_steps
    config.optimizers["style_grid"] = {
        "optimizer": FusedAdamOptimizerConfig(lr=0.05, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-3, max_steps=total),
    }
    config.optimizers["style_heads"] = {
        "optimizer": FusedAdamOptimizerConfig(lr=2e-3, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=2e-4, max_steps=total),
    }
    return config


mm_nerf = MethodSpecification(
    config=mm_nerf_trainer_config(),
    description=(
        "MM-NeRF: many styles in one NeRF, from style images, texts or audio clips (--pipeline.styles); "
        "per-style heads predict the colour head's parameters; multi-view style-consistent loss; pick or blend "
        "styles in the viewer, render any with ns-render --rendered-output-names <style>."
    ),
)
