"""nerfstudio trainer pieces shared by the methods: input checks before anything is written, tolerant resume.

* ``ns-train`` writes ``config.yml`` before it builds the pipeline; :class:`MMStyleTrainerConfig` first runs the
  pipeline config's ``check_inputs()`` (when it has one), so bad inputs stop the run with nothing written: one
  message naming what to pass, exit status 2, no traceback.
* Resuming with ``--load-dir`` restores every optimizer's state; when a parameter group changed since the
  checkpoint (e.g. a style was added), :class:`TolerantOptimizers` leaves that group's state fresh instead of
  failing.
* With several processes (``--machine.num-devices``), :class:`TolerantOptimizers` averages the gradients over
  the processes before it steps (see :mod:`mmstyle_ns.distributed` for why this replaces DDP here).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from mmstyle_ns.distributed import average_gradients

if TYPE_CHECKING:
    from torch.cuda.amp.grad_scaler import GradScaler


class TolerantOptimizers(Optimizers):
    """nerfstudio's optimizers; loading skips groups whose parameters no longer match the checkpoint's, and
    gradients are averaged over the processes of a multi-device run before each step."""

    def optimizer_scaler_step_all(self, grad_scaler: GradScaler) -> None:
        average_gradients(p for params in self.parameters.values() for p in params)
        super().optimizer_scaler_step_all(grad_scaler)

    def optimizer_scaler_step_some(self, grad_scaler: GradScaler, param_groups: list[str]) -> None:
        average_gradients(p for name in param_groups for p in self.parameters[name])
        super().optimizer_scaler_step_some(grad_scaler, param_groups)

    def load_optimizers(self, loaded_state: dict[str, Any]) -> None:
        for name, state in loaded_state.items():
            optimizer = self.optimizers.get(name)
            if optimizer is None:
                continue
            saved = [len(group["params"]) for group in state["param_groups"]]
            current = [len(group["params"]) for group in optimizer.param_groups]
            if saved != current:
                CONSOLE.print(f"Optimizer state of '{name}' not restored: its parameters changed since the checkpoint")
                continue
            optimizer.load_state_dict(state)


class MMStyleTrainer(Trainer):
    """nerfstudio's trainer with :class:`TolerantOptimizers`."""

    def setup_optimizers(self) -> Optimizers:
        return TolerantOptimizers(self.config.optimizers.copy(), self.pipeline.get_param_groups())


@dataclass
class MMStyleTrainerConfig(TrainerConfig):
    """nerfstudio's trainer configuration; checks the pipeline's inputs before the config is saved."""

    _target: type = field(default_factory=lambda: MMStyleTrainer)

    def save_config(self) -> None:
        check = getattr(self.pipeline, "check_inputs", None)
        if callable(check):
            try:
                check()
            except ValueError as error:  # the input errors of every method (StyleInputError is one)
                CONSOLE.print(f"[bold red]Cannot train {self.method_name}:[/bold red] {error}", soft_wrap=True)
                raise SystemExit(2) from None
        super().save_config()
