"""Optimizer configurations shared by the methods."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with the fused single-kernel update (torch >= 2.4, CPU and CUDA): several times faster on the
    multi-million-entry voxel grids than the default multi-pass update."""

    fused: bool = True
    """Use the fused implementation."""


@dataclass
class AdamWOptimizerConfig(AdamOptimizerConfig):
    """AdamW: Adam with decoupled weight decay (Loshchilov and Hutter)."""

    _target: type = torch.optim.AdamW
    weight_decay: float = 1e-2
    """Decoupled weight decay."""
