"""Method specification of ``mmstyle-base``: the fast photorealistic base field."""

from __future__ import annotations

import torch
from nerfstudio.configs.base_config import MachineConfig, ViewerConfig
from nerfstudio.data.datamanagers.base_datamanager import VanillaDataManagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.plugins.types import MethodSpecification

from mmstyle_ns.engine import MMStyleTrainerConfig
from mmstyle_ns.models.base import MMStyleBaseModelConfig
from mmstyle_ns.optim import FusedAdamOptimizerConfig
from mmstyle_ns.pipelines.base import MMStylePipelineConfig


def default_machine() -> MachineConfig:
    """nerfstudio's machine defaults, on the CPU when this torch build has no CUDA."""
    machine = MachineConfig()
    if not torch.cuda.is_available():
        machine.device_type = "cpu"
    return machine


def base_trainer_config(max_num_iterations: int = 750) -> TrainerConfig:
    """Trainer configuration of the base method; the stylization methods derive theirs from it."""
    return MMStyleTrainerConfig(
        method_name="mmstyle-base",
        steps_per_eval_batch=100,
        steps_per_eval_image=500,
        steps_per_eval_all_images=100_000,
        steps_per_save=500,
        max_num_iterations=max_num_iterations,
        mixed_precision=False,
        machine=default_machine(),
        pipeline=MMStylePipelineConfig(
            datamanager=VanillaDataManagerConfig(
                dataparser=NerfstudioDataParserConfig(),
                train_num_rays_per_batch=4096,
                eval_num_rays_per_batch=4096,
            ),
            model=MMStyleBaseModelConfig(),
        ),
        optimizers={
            "grid": {
                "optimizer": FusedAdamOptimizerConfig(lr=0.3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=0.01, max_steps=max_num_iterations),
            },
            "fields": {
                "optimizer": FusedAdamOptimizerConfig(lr=5e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-4, max_steps=max_num_iterations),
            },
            "camera_opt": {
                "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
                "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_num_iterations),
            },
        },
        # local connections only: the viewer has no authentication (--viewer.websocket-host 0.0.0.0 opens it up)
        viewer=ViewerConfig(num_rays_per_chunk=1 << 14, websocket_host="127.0.0.1"),
        vis="viewer",
    )


mmstyle_base = MethodSpecification(
    config=base_trainer_config(),
    description=(
        "mmstyle_ns photorealistic base field: dense voxel grids of density and view-dependent (SH) colour with "
        "empty-space skipping; trains in about two minutes on a CPU. Start here, then stylize."
    ),
)
