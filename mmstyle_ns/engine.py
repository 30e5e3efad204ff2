"""nerfstudio trainer pieces shared by the methods: input checks before anything is written, resuming that finishes
the planned schedule, checkpoints a kill cannot tear, tolerant optimizer loading, and reading a trained run.

* ``ns-train`` prints and then writes ``config.yml`` before it builds the pipeline; :class:`MMStyleTrainerConfig`
  first checks the data folder (every method) and runs the pipeline config's ``check_inputs()`` (when it has one),
  so bad inputs stop the run with nothing printed but one message naming what to pass, nothing written, exit
  status 2, no traceback.
* The schedule: a run trains from step ``schedule_start`` up to ``schedule_start + max_num_iterations``. A fresh run
  starts at 0. ``--load-dir``/``--load-checkpoint`` of an *unfinished* run of the same method (e.g. a killed one)
  resumes it: ``schedule_start`` is that run's own, so the planned schedule is finished, not trained again. Loading
  any other checkpoint (another method's, or a finished run's, such as a base run for a stylization stage) starts a
  new stage: ``schedule_start`` is the loaded step and ``--max-num-iterations`` counts from there (nerfstudio's
  rule). ``--schedule-start`` sets it by hand.
* Checkpoints are written next to the checkpoint folder and moved in when complete, so a kill during a save leaves
  the previous checkpoint as the latest one.
* Resuming restores every optimizer's state; when a parameter group changed since the checkpoint (e.g. a style
  was added), :class:`TolerantOptimizers` leaves that group's state fresh instead of failing.
* With several processes (``--machine.num-devices``), :class:`TolerantOptimizers` averages the gradients over
  the processes before it steps (see :mod:`mmstyle_ns.distributed` for why this replaces DDP here).
* :func:`load_run_config` reads a trained run's ``config.yml`` for the ``mmstyle-*`` commands, with one clear
  :class:`RunConfigError` when it is missing or no run.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.engine.trainer import Trainer, TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from mmstyle_ns.distributed import average_gradients

if TYPE_CHECKING:
    from torch.cuda.amp.grad_scaler import GradScaler

_CHECKPOINT_RE = re.compile(r"^step-(\d+)\.ckpt$")


class RunConfigError(ValueError):
    """A ``--load-config`` (or the run it names) that cannot be used; the message says what to pass instead."""


def load_run_config(path: Path) -> TrainerConfig:
    """Reads the ``config.yml`` of a trained nerfstudio run.

    Raises:
        RunConfigError: the file is missing, unreadable or holds no nerfstudio trainer configuration.
    """
    import yaml

    hint = "pass the config.yml of a trained run, e.g. outputs/<data>/<method>/<timestamp>/config.yml"
    if not path.exists():
        raise RunConfigError(f"--load-config {path} does not exist; {hint}")
    if path.is_dir():
        inside = "; it holds a config.yml: pass that file" if (path / "config.yml").is_file() else ""
        raise RunConfigError(f"--load-config {path} is a folder, not a config.yml{inside or '; ' + hint}")
    try:
        config = yaml.load(path.read_text("utf8"), Loader=yaml.Loader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ImportError, AttributeError, TypeError) as error:
        raise RunConfigError(f"--load-config {path} cannot be read as a run's config.yml ({error}); {hint}") from None
    if not isinstance(config, TrainerConfig):
        raise RunConfigError(f"--load-config {path} is no nerfstudio run configuration; {hint}")
    return config


@contextlib.contextmanager
def reported_run_config_errors(heading: str) -> Iterator[None]:
    """Turns a :class:`RunConfigError` into one line and exit status 2 (the console commands' way)."""
    try:
        yield
    except RunConfigError as error:
        CONSOLE.print(f"[bold red]{heading}:[/bold red] {error}", soft_wrap=True)
        raise SystemExit(2) from None


def checkpoint_step(path: Path) -> int | None:
    """The step of a nerfstudio checkpoint file named ``step-<step>.ckpt`` (None for another name)."""
    match = _CHECKPOINT_RE.match(path.name)
    return int(match[1]) if match else None


def latest_checkpoint(folder: Path) -> Path | None:
    """The checkpoint with the highest step in a ``nerfstudio_models`` folder, or None."""
    found = [(step, p) for p in folder.glob("step-*.ckpt") if (step := checkpoint_step(p)) is not None]
    return max(found)[1] if found else None


def _loaded_checkpoint(config: TrainerConfig) -> tuple[Path, int] | None:
    """The checkpoint ``--load-dir``/``--load-step``/``--load-checkpoint`` name and its step, read from its name."""
    if config.load_dir is not None:
        if config.load_step is not None:
            return config.load_dir / f"step-{config.load_step:09d}.ckpt", int(config.load_step)
        path = latest_checkpoint(config.load_dir)
    elif config.load_checkpoint is not None:
        path = config.load_checkpoint
    else:
        return None
    step = None if path is None else checkpoint_step(path)
    return None if path is None or step is None else (path, step)


def check_load_paths(config: TrainerConfig) -> None:
    """Checks that ``--load-dir``/``--load-step``/``--load-checkpoint`` name an existing checkpoint.

    Raises:
        RunConfigError: they name none.
    """
    if config.load_dir is not None:
        folder = config.load_dir
        if not folder.is_dir():
            raise RunConfigError(f"--load-dir {folder} is no folder; pass a run's nerfstudio_models folder")
        if config.load_step is not None:
            if not (folder / f"step-{config.load_step:09d}.ckpt").is_file():
                raise RunConfigError(f"--load-dir {folder} holds no checkpoint of --load-step {config.load_step}")
            return
        if latest_checkpoint(folder) is None or any(checkpoint_step(p) is None for p in folder.iterdir()):
            # nerfstudio reads a step from the name of every file there
            inside = ": pass its nerfstudio_models folder" if (folder / "nerfstudio_models").is_dir() else ""
            raise RunConfigError(f"--load-dir {folder} must hold step-*.ckpt files and nothing else{inside}")
    elif config.load_checkpoint is not None and not config.load_checkpoint.is_file():
        raise RunConfigError(f"--load-checkpoint {config.load_checkpoint} does not exist; pass a step-*.ckpt file")


def resolve_schedule_start(config: TrainerConfig) -> int:
    """The step a run's schedule starts at (see the module docstring): 0 for a fresh run; with a loaded checkpoint,
    the loaded run's own start when that run is an unfinished run of the same method, else the loaded step + 1."""
    explicit = getattr(config, "schedule_start", None)
    if explicit is not None:
        return int(explicit)
    loaded = _loaded_checkpoint(config)
    if loaded is None:
        return 0
    checkpoint, step = loaded
    run_config = checkpoint.parent.parent / "config.yml"
    try:
        run = load_run_config(run_config)
    except RunConfigError:
        return step + 1  # no run around the checkpoint to resume: a new stage
    if run.method_name != config.method_name:
        return step + 1  # another method's checkpoint: a new stage from it
    start = getattr(run, "schedule_start", None)
    if start is None:  # a run written before schedules were recorded
        if run.load_dir is not None or run.load_checkpoint is not None:
            return step + 1
        start = 0
    if step + 1 >= int(start) + int(run.max_num_iterations):
        return step + 1  # that run finished its schedule: a new stage (e.g. ed-nerf's edit after stage 1)
    return int(start)


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
    """nerfstudio's trainer with :class:`TolerantOptimizers`, the planned schedule and untearable checkpoints."""

    config: MMStyleTrainerConfig

    def __init__(self, config: TrainerConfig, local_rank: int = 0, world_size: int = 1) -> None:
        super().__init__(config, local_rank, world_size)
        self.schedule: tuple[int, int] = (0, int(config.max_num_iterations))
        """First step and end step (exclusive) of this run's schedule, set by :meth:`setup`."""

    def setup(self, test_mode: Literal["test", "val", "inference"] = "val") -> None:
        start = resolve_schedule_start(self.config)
        self.schedule = (start, start + int(self.config.max_num_iterations))  # before the callbacks read it
        super().setup(test_mode)
        from nerfstudio.utils import writer

        writer.GLOBAL_BUFFER["max_iter"] = self.schedule[1]  # progress and ETA against the planned end
        if self._start_step > start:
            CONSOLE.print(
                f"Resuming at step {self._start_step} the schedule of steps {start} to {self.schedule[1] - 1}"
            )

    def setup_optimizers(self) -> Optimizers:
        return TolerantOptimizers(self.config.optimizers.copy(), self.pipeline.get_param_groups())

    def train(self) -> None:
        remaining = max(0, self.schedule[1] - self._start_step)
        if remaining == 0:
            CONSOLE.print(f"Nothing left to train: the schedule ended at step {self.schedule[1] - 1}")
        self.step = max(0, self._start_step - 1)  # what the final save writes when no step runs
        planned = self.config.max_num_iterations
        self.config.max_num_iterations = remaining  # nerfstudio's loop runs that many steps from _start_step
        try:
            super().train()
        finally:
            self.config.max_num_iterations = planned

    def save_checkpoint(self, step: int) -> None:
        from nerfstudio.utils import comms

        if not comms.is_main_process():  # nerfstudio saves on the main process only
            return
        final = self.checkpoint_dir
        staging = final.parent / f".{final.name}.saving"
        self.checkpoint_dir = staging
        try:
            super().save_checkpoint(step)
        finally:
            self.checkpoint_dir = final
        final.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:09d}.ckpt"
        os.replace(staging / name, final / name)
        with contextlib.suppress(OSError):
            staging.rmdir()
        if self.config.save_only_latest_checkpoint:
            for old in final.glob("step-*.ckpt"):
                if old.name != name:
                    old.unlink()


@dataclass
class MMStyleTrainerConfig(TrainerConfig):
    """nerfstudio's trainer configuration; checks the inputs before anything is printed or saved, and records the
    step the schedule starts at."""

    _target: type = field(default_factory=lambda: MMStyleTrainer)
    schedule_start: int | None = None
    """Step this run's --max-num-iterations count from: training ends at schedule-start + max-num-iterations.
    Default (resolved and recorded in config.yml): 0 for a fresh run; with --load-dir, the loaded run's own start
    when it is an unfinished run of this method (resuming finishes the planned schedule), else the loaded step (a
    new stage, e.g. head-stylize from an mmstyle-base run or ed-nerf's edit after its reconstruction)."""

    def check_inputs(self) -> None:
        """Checks the data folder and the pipeline's inputs; one message and exit status 2 when they are wrong."""
        from mmstyle_ns.pipelines.base import check_data_folder, check_geometry_from

        try:
            check_load_paths(self)
            check_data_folder(self.pipeline.datamanager)
            check_geometry_from(self.pipeline)
            check = getattr(self.pipeline, "check_inputs", None)
            if callable(check):
                check()
        except ValueError as error:  # the input errors of every method (StyleInputError is one)
            CONSOLE.print(f"[bold red]Cannot train {self.method_name}:[/bold red] {error}", soft_wrap=True)
            raise SystemExit(2) from None

    def print_to_terminal(self) -> None:
        self.check_inputs()  # ns-train prints the whole configuration first: a bad input is the only message
        super().print_to_terminal()

    def save_config(self) -> None:
        self.check_inputs()
        if self.schedule_start is None:
            self.schedule_start = resolve_schedule_start(self)
        super().save_config()
