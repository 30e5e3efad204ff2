"""The pipeline every mmstyle_ns method runs: nerfstudio's vanilla pipeline, correct on several devices.

With ``--machine.num-devices N`` nerfstudio starts N processes and its vanilla pipeline wraps the model in
``DistributedDataParallel`` (with ``device_ids``, which also rules out CPU processes). Our grids change their
parameters during training, which DDP cannot follow, so this pipeline keeps the model unwrapped and the trainer's
optimizers average the gradients instead (:mod:`mmstyle_ns.distributed`); the model starts out identical on every
process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from mmstyle_ns.distributed import broadcast_module


@dataclass
class MMStylePipelineConfig(VanillaPipelineConfig):
    """nerfstudio's vanilla pipeline configuration, for a pipeline that trains correctly on several devices."""

    _target: type = field(default_factory=lambda: MMStylePipeline)


class MMStylePipeline(VanillaPipeline):
    """nerfstudio's vanilla pipeline without the DDP wrapper; see the module docstring."""

    def __init__(
        self,
        config: VanillaPipelineConfig,
        device: str,
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        grad_scaler: Any = None,
    ) -> None:
        super().__init__(config, device, test_mode, world_size=1, local_rank=local_rank, grad_scaler=grad_scaler)
        self.world_size = world_size
        self.datamanager.world_size = world_size  # type: ignore[attr-defined]
        broadcast_module(self.model)


@dataclass(frozen=True)
class ModelWithArguments:
    """A pipeline's ``config.model`` while nerfstudio's ``VanillaPipeline.__init__`` builds the model (it only calls
    ``config.model.setup(scene_box=..., ...)``): that configuration's ``setup`` with ``arguments`` added to the
    keywords, which nerfstudio's ``Model.__init__`` keeps in ``Model.kwargs`` for ``populate_modules`` to read."""

    config: Any
    """The model configuration."""
    arguments: dict[str, Any]
    """What the model is built with besides nerfstudio's own arguments (e.g. styles, a diffusion backbone)."""

    def setup(self, **kwargs: Any) -> Any:
        """Builds the model with the extra arguments."""
        return self.config.setup(**self.arguments, **kwargs)


def cache_root_for(datamanager: Any, cache_dir: Path | str | None) -> Path:
    """Where a method keeps its on-disk caches: ``cache_dir``, or ``mmstyle_cache`` inside the dataset folder."""
    if cache_dir is not None:
        return Path(cache_dir)
    data = datamanager.data if datamanager.data is not None else datamanager.dataparser.data
    return Path(str(data)) / "mmstyle_cache"


class DataFolderError(ValueError):
    """The dataset ``--data`` names cannot be read; the message says what to pass instead."""


def check_data_folder(datamanager: Any) -> None:
    """Checks, without loading it, that the dataset of a datamanager configuration is there and readable: the
    folder (``--data``, or the dataparser's own ``data``) and, for nerfstudio's dataparser, its ``transforms.json``.

    A datamanager configuration with a ``check_data()`` method (a folder of many scenes) checks its own data.

    Raises:
        DataFolderError: the folder or its ``transforms.json`` is missing or unreadable.
    """
    own_check = getattr(datamanager, "check_data", None)
    if callable(own_check):
        own_check()
        return
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig

    given = getattr(datamanager, "data", None)
    dataparser = getattr(datamanager, "dataparser", None)
    data = Path(given) if given is not None else Path(getattr(dataparser, "data", "."))
    hint = "pass --data <a dataset folder>"
    if isinstance(dataparser, NerfstudioDataParserConfig):
        hint = "pass --data <a folder with transforms.json> (e.g. one made by ns-process-data or mmstyle-scene)"
    if not data.exists():
        raise DataFolderError(f"--data {data}: the data folder does not exist; {hint}")
    if not os.access(data, os.R_OK) or (data.is_dir() and not os.access(data, os.X_OK)):
        raise DataFolderError(f"--data {data}: the data folder cannot be read (permissions); {hint}")
    if not isinstance(dataparser, NerfstudioDataParserConfig):
        return
    transforms = data if data.suffix == ".json" else data / "transforms.json"
    if not transforms.is_file():
        raise DataFolderError(f"--data {data}: no transforms.json in it; {hint}")
    try:
        meta = json.loads(transforms.read_text("utf8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataFolderError(f"--data {data}: {transforms.name} cannot be read ({error}); {hint}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("frames"), list) or not meta["frames"]:
        raise DataFolderError(f"--data {data}: {transforms.name} lists no frames; {hint}")
