"""Shared diffusion guidance: one frozen latent diffusion backbone and small score rules over it.

See ``DESIGN.md`` in this folder. Importing this package does not import diffusers or transformers.
"""

from mmstyle_ns.guidance.backbone import DiffusionBackbone, DiffusionBackboneConfig, GuidanceModelError
from mmstyle_ns.guidance.rules import (
    DDSConfig,
    DDSRule,
    LDConfig,
    LDRule,
    ScoreInputs,
    ScoreRule,
    ScoreRuleConfig,
    SDSConfig,
    SDSRule,
)
from mmstyle_ns.guidance.scores import (
    ScoreOutput,
    combine_mirror_gradients,
    dds,
    flip_horizontal,
    likelihood_distillation,
    mirror_grid,
    mirror_pair_loss,
    pack_grid,
    rank_weighted_score,
    sds,
    surrogate_loss,
    unpack_grid,
)

__all__ = [
    "DDSConfig",
    "DDSRule",
    "DiffusionBackbone",
    "DiffusionBackboneConfig",
    "GuidanceModelError",
    "LDConfig",
    "LDRule",
    "SDSConfig",
    "SDSRule",
    "ScoreInputs",
    "ScoreOutput",
    "ScoreRule",
    "ScoreRuleConfig",
    "combine_mirror_gradients",
    "dds",
    "flip_horizontal",
    "likelihood_distillation",
    "mirror_grid",
    "mirror_pair_loss",
    "pack_grid",
    "rank_weighted_score",
    "sds",
    "surrogate_loss",
    "unpack_grid",
]
