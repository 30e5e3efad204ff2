"""Optimizer configurations shared by the methods."""

from __future__ import annotations

from dataclasses import dataclass

from nerfstudio.engine.optimizers import AdamOptimizerConfig


@dataclass
class FusedAdamOptimizerConfig(AdamOptimizerConfig):
    """Adam with the fused single-kernel update (torch >= 2.4, CPU and CUDA): several times faster on the
    multi-million-entry voxel grids than the default multi-pass update."""

    fused: bool = True
    """Use the fused implementation."""
