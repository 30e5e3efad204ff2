"""Method specification of ``ed-nerf``: ED-NeRF, a latent-space NeRF edited with Delta Denoising Score."""

from __future__ import annotations

from mmstyle_ns.method_configs.base import base_trainer_config  # pyright: ignore[reportMissingImports]
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from mmstyle_ns.data.datamanagers import GuidedDataManagerConfig
from mmstyle_ns.models.ed_nerf import EDNeRFModelConfig
from mmstyle_ns.optim import FusedAdamOptimizerConfig
from mmstyle_ns.pipelines.ed_nerf import EDNeRFPipelineConfig

RECONSTRUCTION_STEPS = 1500
EDIT_STEPS = 300


def ed_nerf_trainer_config(
    reconstruction_steps: int = RECONSTRUCTION_STEPS, edit_steps: int = EDIT_STEPS
) -> TrainerConfig:
    """Stage 1 (latent reconstruction with the refinement layer) followed by the DDS edit, in one run."""
    total = reconstruction_steps + edit_steps
    config = base_trainer_config(max_num_iterations=total)
    config.method_name = "ed-nerf"
    config.steps_per_eval_image = 250
    config.pipeline = EDNeRFPipelineConfig(
        datamanager=GuidedDataManagerConfig(dataparser=NerfstudioDataParserConfig()),
        model=EDNeRFModelConfig(
            reconstruction_steps=reconstruction_steps,
            grid_resolutions=(32, 64, 112),
            regrid_steps=(100, 500),
            occupancy_warmup_steps=50,
        ),
    )
    for group in ("grid", "fields", "camera_opt"):
        scheduler = config.optimizers[group]["scheduler"]
        assert isinstance(scheduler, ExponentialDecaySchedulerConfig)
        scheduler.max_steps = total
    config.optimizers["refinement"] = {
        "optimizer": FusedAdamOptimizerConfig(lr=1e-3, eps=1e-15),
        "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=total),
    }
    return config


ed_nerf = MethodSpecification(
    config=ed_nerf_trainer_config(),
    description=(
        "ED-NeRF: a NeRF rendering Stable Diffusion latents with a refinement layer, edited from "
        "--pipeline.model.source-prompt to --pipeline.model.target-prompt by Delta Denoising Score "
        "(--pipeline.guidance.model-path: a Stable Diffusion folder or examples/toy-teacher)."
    ),
)
