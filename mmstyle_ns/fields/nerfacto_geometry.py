"""The frozen geometry of a user's trained ``nerfacto`` run: ray samples and weights from its proposal sampler.

Appearance-editing methods keep a scene's geometry and learn colours on top of it. A user who already trained
nerfacto on a capture can hand that run to them (``--pipeline.model.geometry-from <the nerfacto run>``): the
nerfacto model is rebuilt from the run's own ``config.yml`` with nerfstudio's loaders, its checkpoint loaded, and
its density used as it is, frozen: the proposal networks place the samples of a ray, the nerfacto field gives
their densities (hence the rendering weights) and the photorealistic colours. Nothing of it is trained again.

The nerfacto model stays in evaluation mode (no jitter, the average appearance embedding), so a ray's samples
are deterministic and can be cached like the dense grid's (see :mod:`mmstyle_ns.models.frozen`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mmstyle_ns.fields.occupancy import PackedSamples

NERFACTO_KEYS = ("_model.proposal_networks.", "_model.field.mlp_base")
"""Pipeline state keys that mark a checkpoint as a nerfacto run's."""


def is_nerfacto_state(state: dict[str, Any]) -> bool:
    """Whether a pipeline state dict (a checkpoint's ``"pipeline"``) is a nerfacto model's."""
    return all(any(key.startswith(prefix) for key in state) for prefix in NERFACTO_KEYS)


class _UnusedLPIPS(nn.Module):
    """Stands in for nerfacto's LPIPS metric while a nerfacto model is built for its geometry: the real one loads
    AlexNet weights (a download on a machine that never evaluated LPIPS), and only evaluation metrics use it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()

    def forward(self, *args: object) -> Tensor:
        raise RuntimeError("LPIPS is not available on a nerfacto model loaded for its geometry")


@contextlib.contextmanager
def without_lpips() -> Iterator[None]:
    """Builds nerfacto models inside this block without their LPIPS network (see :class:`_UnusedLPIPS`)."""
    import torchmetrics.image.lpip as lpip_module

    original = lpip_module.LearnedPerceptualImagePatchSimilarity
    lpip_module.LearnedPerceptualImagePatchSimilarity = _UnusedLPIPS  # type: ignore[misc]
    try:
        yield
    finally:
        lpip_module.LearnedPerceptualImagePatchSimilarity = original  # type: ignore[misc]


def run_config_path(path: Path) -> Path | None:
    """The ``config.yml`` of the run at ``path`` (a run folder, its ``nerfstudio_models`` folder, a checkpoint in
    it, or the config itself); None if there is none."""
    candidates = [path] if path.suffix in (".yml", ".yaml") else []
    folder = path.parent if path.is_file() else path
    candidates += [folder / "config.yml", folder.parent / "config.yml"]
    return next((c for c in candidates if c.is_file()), None)


def is_nerfacto_run(path: Path) -> bool:
    """Whether the run at ``path`` (see :func:`run_config_path`) is a nerfacto run (or of a nerfacto variant), by its
    ``config.yml`` alone."""
    import yaml
    from nerfstudio.models.nerfacto import NerfactoModelConfig

    config_path = run_config_path(path)
    if config_path is None:
        return False
    try:
        config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    except (OSError, yaml.YAMLError, ImportError, AttributeError, TypeError):
        return False
    return isinstance(getattr(getattr(config, "pipeline", None), "model", None), NerfactoModelConfig)


class NerfactoGeometry(nn.Module):
    """A trained nerfacto model, frozen, sampling rays for another model (its proposal sampler and field).

    Args:
        model: the nerfacto model (nerfstudio's ``NerfactoModel``), with its trained weights.
        key: identifies the trained weights (e.g. a digest of the checkpoint) for sample caches.
    """

    def __init__(self, model: Any, key: str) -> None:
        super().__init__()
        self.model = model
        self.key = key
        self.model.requires_grad_(False)
        self.model.eval()

    def train(self, mode: bool = True) -> NerfactoGeometry:
        """Stays in evaluation mode whatever its parent does: its samples must not jitter."""
        super().train(False)
        return self

    @classmethod
    def from_run(cls, path: Path, state: dict[str, Any] | None = None) -> NerfactoGeometry:
        """Rebuilds the nerfacto model of the run at ``path`` from its ``config.yml`` and loads its newest
        checkpoint (or ``state``, that checkpoint's pipeline state if already read)."""
        import yaml

        from mmstyle_ns.compat.checkpoints import find_checkpoint, load_pipeline_state

        config_path = run_config_path(path)
        if config_path is None:
            raise ValueError(f"{path}: no config.yml beside the checkpoint (give the nerfacto run's folder)")
        checkpoint = find_checkpoint(path) or find_checkpoint(config_path.parent)
        if checkpoint is None:
            raise ValueError(f"{path}: the nerfacto run has no checkpoint (step-*.ckpt); train it first")
        if state is None:
            state = load_pipeline_state(checkpoint)
        if not is_nerfacto_state(state):
            raise ValueError(f"{checkpoint} is not a nerfacto run's checkpoint")
        run_config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
        model_config = run_config.pipeline.model
        model_state = {k[len("_model.") :]: v for k, v in state.items() if k.startswith("_model.")}
        from nerfstudio.data.scene_box import SceneBox

        embedding = model_state.get("field.embedding_appearance.embedding.weight")
        num_train_data = int(embedding.shape[0]) if embedding is not None else 1
        with without_lpips():
            model = model_config.setup(
                scene_box=SceneBox(aabb=model_state["field.aabb"].float()),
                num_train_data=num_train_data,
                metadata={},
            )
        result = model.load_state_dict(model_state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("lpips.")]
        if missing:
            raise ValueError(
                f"{checkpoint} does not fit the model its config.yml describes (missing {missing[:3]}); a run "
                "trained with tinycudann loads where tinycudann is installed (--pipeline.model.implementation)"
            )
        digest = hashlib.sha256(f"nerfacto|{checkpoint.name}|".encode())
        for name in sorted(model_state):
            value = model_state[name]
            if isinstance(value, Tensor) and not name.startswith("lpips."):
                digest.update(name.encode())
                digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return cls(model, digest.hexdigest())

    def _ray_samples(self, origins: Float[Tensor, "R 3"], directions: Float[Tensor, "R 3"]) -> Any:
        from nerfstudio.cameras.rays import RayBundle

        count = origins.shape[0]
        bundle = RayBundle(
            origins=origins,
            directions=directions,
            pixel_area=torch.ones(count, 1, device=origins.device),
            camera_indices=torch.zeros(count, 1, dtype=torch.long, device=origins.device),
        )
        bundle = self.model.collider(bundle)
        ray_samples, _, _ = self.model.proposal_sampler(bundle, density_fns=self.model.density_fns)
        return ray_samples

    @torch.no_grad()
    def march(
        self, origins: Float[Tensor, "R 3"], directions: Float[Tensor, "R 3"]
    ) -> tuple[PackedSamples, Float[Tensor, " S"], Float[Tensor, "S 3"]]:
        """Samples rays as the nerfacto run renders them: packed samples (every ray has the same number), their
        rendering weights and nerfacto's (view-dependent) colours."""
        from nerfstudio.field_components.field_heads import FieldHeadNames

        ray_samples = self._ray_samples(origins, directions)
        outputs = self.model.field.forward(ray_samples)
        weights = ray_samples.get_weights(outputs[FieldHeadNames.DENSITY])
        count, per_ray = ray_samples.shape
        frustums = ray_samples.frustums
        ray_indices = torch.arange(count, device=origins.device).repeat_interleave(per_ray)
        samples = PackedSamples(
            t_starts=frustums.starts.reshape(-1),
            t_ends=frustums.ends.reshape(-1),
            ray_indices=ray_indices,
            positions=frustums.get_positions().reshape(-1, 3),
            directions=directions[ray_indices],
        )
        return samples, weights.reshape(-1), outputs[FieldHeadNames.RGB].reshape(-1, 3)

    @torch.no_grad()
    def diffuse_color(self, positions: Float[Tensor, "S 3"]) -> Float[Tensor, "S 3"]:
        """A view-independent colour at each position: nerfacto's colour averaged over the six axis directions
        (its view dependence averages out to first order)."""
        from nerfstudio.cameras.rays import Frustums, RaySamples
        from nerfstudio.field_components.field_heads import FieldHeadNames

        field = self.model.field
        zeros = torch.zeros(positions.shape[0], 1, device=positions.device)
        total = torch.zeros_like(positions)
        axes = torch.cat([torch.eye(3), -torch.eye(3)]).to(positions)
        embedding = None
        for axis in axes:
            samples = RaySamples(
                frustums=Frustums(
                    origins=positions,
                    directions=axis.expand_as(positions),
                    starts=zeros,
                    ends=zeros,
                    pixel_area=torch.ones_like(zeros),
                ),
                camera_indices=zeros.long(),
            )
            if embedding is None:
                _, embedding = field.get_density(samples)
            total += field.get_outputs(samples, density_embedding=embedding)[FieldHeadNames.RGB]
        return total / len(axes)
