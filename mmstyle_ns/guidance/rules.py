"""Typed score-rule configs: SDS, DDS and likelihood distillation as tyro subcommands over one call signature.

A method selects its rule with one field, ``rule: ScoreRuleConfig = field(default_factory=DDSConfig)``; tyro shows
the choice as the subcommands ``rule:sds``, ``rule:dds`` and ``rule:ld``, each with its own documented flags.
``config.setup()`` builds a :class:`ScoreRule` whose :meth:`~ScoreRule.loss` takes the backbone and one
:class:`ScoreInputs` (what the method has: latents, prompts, source latents, mask) and returns the
:class:`~mmstyle_ns.guidance.scores.ScoreOutput` of the pure function in :mod:`mmstyle_ns.guidance.scores` it wraps:

    * :class:`SDSConfig` -> :func:`~mmstyle_ns.guidance.scores.sds` (DreamFusion, target prompt only);
    * :class:`DDSConfig` -> :func:`~mmstyle_ns.guidance.scores.dds` (ED-NeRF: source + target prompt and the
      latents of the unedited render);
    * :class:`LDConfig` -> :func:`~mmstyle_ns.guidance.scores.likelihood_distillation` (head stylization, rank
      weighted).

A rule samples its timesteps in its own range (``min_step_ratio``/``max_step_ratio``, annealed by the backbone's
``anneal`` setting from the training ``step``) and draws the noise from the same ``generator``, in the order the
pure functions do, so a rule and its function agree exactly for the same seed and range.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal, TypeAlias

import torch
import tyro
from jaxtyping import Float, Int
from nerfstudio.configs.base_config import InstantiateConfig
from torch import Tensor

from mmstyle_ns.guidance.backbone import DiffusionBackbone
from mmstyle_ns.guidance.scores import ScoreOutput, ScoreWeighting, dds, likelihood_distillation, sds

__all__ = [
    "DDSConfig",
    "DDSRule",
    "LDConfig",
    "LDRule",
    "SDSConfig",
    "SDSRule",
    "ScoreInputs",
    "ScoreRule",
    "ScoreRuleConfig",
]

Prompt: TypeAlias = str | Sequence[str]
"""One prompt for the whole batch, or one per sample."""


@dataclass
class ScoreInputs:
    """Everything a score rule may read, one shape for every rule; each rule checks that what it needs is there.

    ED-NeRF (DDS) fills ``latents``, ``target_text``, ``source_text``, ``source_latents`` (and ``mask``); SDS needs
    ``latents`` and ``target_text``; head stylization (LD) ``latents``, ``target_text`` and optionally ``mask``.
    Inputs a rule does not use are ignored, except a ``mask`` given to SDS (which has no masked variant).
    """

    latents: Float[Tensor, "B c h w"]
    """Latents being optimised (the encoded render); the rule's gradient goes to them."""
    target_text: Prompt
    """Prompt(s) of the wanted result."""
    source_text: Prompt | None = None
    """Prompt(s) describing the unedited scene (DDS)."""
    source_latents: Float[Tensor, "B c h w"] | None = None
    """Latents of the unedited render of the same views (DDS); not differentiated."""
    mask: Float[Tensor, "B 1 H W"] | None = None
    """Where the gradient may act, values in [0, 1], any resolution (resized to the latents); DDS and LD."""
    negative_text: Prompt | None = None
    """Prompt(s) of the unconditional branch of classifier-free guidance; None is the empty prompt."""
    controlnet_cond: Float[Tensor, "B 3 H W"] | None = None
    """ControlNet condition (e.g. depth in [0, 1]); needs the backbone's controlnet_path."""


def _check_common(config: SDSConfig | DDSConfig | LDConfig) -> None:
    if not 0.0 <= config.min_step_ratio < config.max_step_ratio <= 1.0:
        raise ValueError(
            f"{type(config).__name__}: need 0 <= min_step_ratio < max_step_ratio <= 1, got "
            f"{config.min_step_ratio}, {config.max_step_ratio}"
        )
    if config.guidance_scale < 0.0:
        raise ValueError(f"{type(config).__name__}: guidance_scale must be >= 0, got {config.guidance_scale}")


class ScoreRule(ABC):
    """A score rule built from its config; :meth:`loss` maps :class:`ScoreInputs` to a :class:`ScoreOutput`.

    Args:
        config: the rule's configuration (its ``_target`` is the rule class).
    """

    config: SDSConfig | DDSConfig | LDConfig

    def __init__(self, config: SDSConfig | DDSConfig | LDConfig) -> None:
        self.config = config

    def sample_timesteps(
        self,
        backbone: DiffusionBackbone,
        batch: int,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Int[Tensor, " B"]:
        """Uniform timesteps in this rule's ratio range (annealed by the backbone's ``anneal`` setting)."""
        return backbone.sample_timesteps(
            batch,
            step,
            max_steps,
            generator,
            min_step_ratio=self.config.min_step_ratio,
            max_step_ratio=self.config.max_step_ratio,
        )

    def _timesteps(
        self,
        backbone: DiffusionBackbone,
        inputs: ScoreInputs,
        timesteps: Tensor | None,
        step: int | None,
        max_steps: int | None,
        generator: torch.Generator | None,
    ) -> Tensor:
        if inputs.latents.ndim != 4:
            raise ValueError(f"Expected latents [B, c, h, w], got {tuple(inputs.latents.shape)}")
        if timesteps is not None:
            return timesteps
        return self.sample_timesteps(backbone, inputs.latents.shape[0], step, max_steps, generator)

    @staticmethod
    def _uncond(backbone: DiffusionBackbone, inputs: ScoreInputs) -> Tensor | None:
        return None if inputs.negative_text is None else backbone.text_embeddings(inputs.negative_text)

    @abstractmethod
    def loss(
        self,
        backbone: DiffusionBackbone,
        inputs: ScoreInputs,
        *,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
        timesteps: Int[Tensor, " B"] | None = None,
        noise: Float[Tensor, "B c h w"] | None = None,
    ) -> ScoreOutput:
        """The rule's surrogate loss and gradient for ``inputs.latents``.

        Args:
            backbone: the frozen diffusion model.
            inputs: latents, prompts and the optional source latents / mask.
            step: training step, for timestep annealing.
            max_steps: number of training steps, for timestep annealing.
            generator: source of the timesteps (first) and the noise (second).
            timesteps: fixed timesteps instead of sampled ones.
            noise: fixed noise instead of drawn noise.

        Raises:
            ValueError: ``inputs`` lacks what the rule needs, or shapes do not match.
        """


# ---------------------------------------------------------------------- SDS
@dataclass
class SDSConfig(InstantiateConfig):
    """Score Distillation Sampling (Poole et al., DreamFusion, arXiv 2209.14988, Sec. 3): target prompt only."""

    _target: type = field(default_factory=lambda: SDSRule)
    guidance_scale: float = 7.5
    """Classifier-free guidance weight of the noise prediction (DreamFusion used 100 with its own model)."""
    min_step_ratio: float = 0.02
    """Smallest diffusion timestep sampled, as a fraction of the training timesteps."""
    max_step_ratio: float = 0.98
    """Largest diffusion timestep sampled, as a fraction of the training timesteps (at step 0 when annealing)."""
    weighting: ScoreWeighting = "sds"
    """Timestep weight w(t): 'sds' 1 - alpha_bar_t (DreamFusion), 'uniform' 1, 'sqrt_alpha' sqrt(alpha_bar_t)."""

    def __post_init__(self) -> None:
        _check_common(self)


class SDSRule(ScoreRule):
    """:func:`~mmstyle_ns.guidance.scores.sds` with its config: ``g = w(t) (eps_hat(z_t; y, t) - eps)``."""

    config: SDSConfig

    def loss(
        self,
        backbone: DiffusionBackbone,
        inputs: ScoreInputs,
        *,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
        timesteps: Int[Tensor, " B"] | None = None,
        noise: Float[Tensor, "B c h w"] | None = None,
    ) -> ScoreOutput:
        """SDS for ``inputs.latents`` towards ``inputs.target_text`` (see :meth:`ScoreRule.loss`).

        Raises:
            ValueError: ``inputs.mask`` is set (SDS has no masked variant; use DDS or LD, or drop the mask).
        """
        if inputs.mask is not None:
            raise ValueError("SDS has no masked variant: ScoreInputs.mask must be None (DDS and LD take a mask)")
        t = self._timesteps(backbone, inputs, timesteps, step, max_steps, generator)
        return sds(
            backbone,
            inputs.latents,
            backbone.text_embeddings(inputs.target_text),
            uncond_emb=self._uncond(backbone, inputs),
            guidance_scale=self.config.guidance_scale,
            weighting=self.config.weighting,
            timesteps=t,
            noise=noise,
            controlnet_cond=inputs.controlnet_cond,
            generator=generator,
        )


# ---------------------------------------------------------------------- DDS
@dataclass
class DDSConfig(InstantiateConfig):
    """Delta Denoising Score (Hertz et al., arXiv 2304.07090, Sec. 3) as ED-NeRF uses it (arXiv 2310.02712, Sec. 3.3).

    Defaults follow the official DDS release: timesteps in [50, 950] of 1000, the same noise and timestep for the
    source and the target branch (always, that is what cancels the noise term), ``w(t) = 1`` and guidance 7.5.
    """

    _target: type = field(default_factory=lambda: DDSRule)
    guidance_scale: float = 7.5
    """Classifier-free guidance weight of both the target and the source prediction."""
    min_step_ratio: float = 0.05
    """Smallest diffusion timestep sampled, as a fraction of the training timesteps (DDS: 50 of 1000)."""
    max_step_ratio: float = 0.95
    """Largest diffusion timestep sampled, as a fraction of the training timesteps (DDS: 950 of 1000; at step 0 when
    annealing)."""
    weighting: ScoreWeighting = "uniform"
    """Timestep weight w(t): 'uniform' 1 (DDS), 'sds' 1 - alpha_bar_t, 'sqrt_alpha' sqrt(alpha_bar_t)."""
    use_mask: bool = True
    """Multiply the gradient by ScoreInputs.mask when one is given (masked DDS: edit only inside the mask);
    False ignores the mask."""

    def __post_init__(self) -> None:
        _check_common(self)


class DDSRule(ScoreRule):
    """:func:`~mmstyle_ns.guidance.scores.dds` with its config: ``g = w(t) (eps_hat(z_t; y_t) - eps_hat(zs_t; y_s))``.

    ``z`` are the rendered latents, ``zs`` the unedited render's, noised with the same ``eps`` and ``t``.
    """

    config: DDSConfig

    def loss(
        self,
        backbone: DiffusionBackbone,
        inputs: ScoreInputs,
        *,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
        timesteps: Int[Tensor, " B"] | None = None,
        noise: Float[Tensor, "B c h w"] | None = None,
    ) -> ScoreOutput:
        """DDS of ``inputs.latents`` against ``inputs.source_latents`` (see :meth:`ScoreRule.loss`).

        Raises:
            ValueError: ``inputs.source_text`` or ``inputs.source_latents`` is missing.
        """
        source_text, source_latents = inputs.source_text, inputs.source_latents
        if source_text is None or source_latents is None:
            missing = [
                name
                for name, value in (("source_text", source_text), ("source_latents", source_latents))
                if value is None
            ]
            raise ValueError(
                f"DDS needs ScoreInputs.{' and ScoreInputs.'.join(missing)}: the prompt describing the unedited "
                "scene and the latents of its unedited render (ED-NeRF); SDS needs neither"
            )
        t = self._timesteps(backbone, inputs, timesteps, step, max_steps, generator)
        return dds(
            backbone,
            inputs.latents,
            source_latents,
            backbone.text_embeddings(inputs.target_text),
            backbone.text_embeddings(source_text),
            mask=inputs.mask if self.config.use_mask else None,
            uncond_emb=self._uncond(backbone, inputs),
            guidance_scale=self.config.guidance_scale,
            weighting=self.config.weighting,
            timesteps=t,
            noise=noise,
            controlnet_cond=inputs.controlnet_cond,
            generator=generator,
        )


# ---------------------------------------------------------------------- likelihood distillation
@dataclass
class LDConfig(InstantiateConfig):
    """Likelihood distillation with rank-weighted scores (Bilecen et al., arXiv 2411.13536): head stylization."""

    _target: type = field(default_factory=lambda: LDRule)
    guidance_scale: float = 7.5
    """Classifier-free guidance weight s of the score S = s (eps_c - eps_u)."""
    min_step_ratio: float = 0.02
    """Smallest diffusion timestep sampled, as a fraction of the training timesteps."""
    max_step_ratio: float = 0.98
    """Largest diffusion timestep sampled, as a fraction of the training timesteps (at step 0 when annealing)."""
    weighting: ScoreWeighting = "sqrt_alpha"
    """Timestep weight w(t): 'sqrt_alpha' sqrt(alpha_bar_t) (the chain rule through z_t), 'uniform' 1, 'sds'
    1 - alpha_bar_t."""
    score: Literal["guidance", "full"] = "guidance"
    """Score that is decomposed: 'guidance' the CFG direction s (eps_c - eps_u) (the authors' code), 'full' the
    whole guided prediction eps_u + s (eps_c - eps_u)."""
    rank_weights: tuple[float, ...] | None = (1.0, 0.75, 0.5, 0.25)
    """Weights of the score's singular values over latent channels, largest first (components beyond them are
    dropped); None skips the decomposition."""
    match_statistics: bool = True
    """After rank weighting, restore each channel's spatial mean and std to the unweighted score's (authors' code)."""
    use_mask: bool = True
    """Multiply the gradient by ScoreInputs.mask when one is given (e.g. the head's silhouette); False ignores it."""

    def __post_init__(self) -> None:
        _check_common(self)
        if self.rank_weights is not None and len(self.rank_weights) == 0:
            raise ValueError("LDConfig: rank_weights must not be empty (None skips rank weighting)")


class LDRule(ScoreRule):
    """:func:`~mmstyle_ns.guidance.scores.likelihood_distillation` with its config: ``g = w(t) R_W(S)``."""

    config: LDConfig

    def loss(
        self,
        backbone: DiffusionBackbone,
        inputs: ScoreInputs,
        *,
        step: int | None = None,
        max_steps: int | None = None,
        generator: torch.Generator | None = None,
        timesteps: Int[Tensor, " B"] | None = None,
        noise: Float[Tensor, "B c h w"] | None = None,
    ) -> ScoreOutput:
        """Rank-weighted likelihood distillation towards ``inputs.target_text`` (see :meth:`ScoreRule.loss`)."""
        t = self._timesteps(backbone, inputs, timesteps, step, max_steps, generator)
        return likelihood_distillation(
            backbone,
            inputs.latents,
            backbone.text_embeddings(inputs.target_text),
            score=self.config.score,
            rank_weights=self.config.rank_weights,
            match_statistics=self.config.match_statistics,
            uncond_emb=self._uncond(backbone, inputs),
            guidance_scale=self.config.guidance_scale,
            weighting=self.config.weighting,
            mask=inputs.mask if self.config.use_mask else None,
            timesteps=t,
            noise=noise,
            controlnet_cond=inputs.controlnet_cond,
            generator=generator,
        )


ScoreRuleConfig: TypeAlias = (
    Annotated[SDSConfig, tyro.conf.subcommand("sds")]
    | Annotated[DDSConfig, tyro.conf.subcommand("dds")]
    | Annotated[LDConfig, tyro.conf.subcommand("ld")]
)
"""``SDSConfig | DDSConfig | LDConfig``, named for tyro's subcommands ``<field>:sds``, ``:dds`` and ``:ld``."""
