"""The pipeline every mmstyle_ns method runs: nerfstudio's vanilla pipeline, correct on several devices.

With ``--machine.num-devices N`` nerfstudio starts N processes and its vanilla pipeline wraps the model in
``DistributedDataParallel`` (with ``device_ids``, which also rules out CPU processes). Our grids change their
parameters during training, which DDP cannot follow, so this pipeline keeps the model unwrapped and the trainer's
optimizers average the gradients instead (:mod:`mmstyle_ns.distributed`); the model starts out identical on every
process.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from PIL import Image

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
    folder (``--data``, or the dataparser's own ``data``) and, for nerfstudio's dataparser, its ``transforms.json``
    and every image and ``mask_path`` file its frames name, at the paths nerfstudio reads them from (the
    ``images_<n>``/``masks_<n>`` copies with ``--pipeline.datamanager.dataparser.downscale-factor n``). A file is
    checked cheaply (:func:`_image_size`): its header, and that it is complete; images are not decoded.

    A datamanager configuration with a ``check_data()`` method (a folder of many scenes) checks its own data.

    Raises:
        DataFolderError: the folder, its ``transforms.json`` or a file it names is missing or unreadable.
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
    _check_frame_files(data, transforms, meta["frames"], dataparser.downscale_factor)


_JPEG_END = b"\xff\xd9"
"""The end-of-image marker a complete JPEG file ends with."""
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
"""The IEND chunk a complete PNG file ends with."""
_MISSING = "does not exist"
"""What :func:`_image_size` says of a missing file."""


class _UnreadableImage(Exception):
    """An image file nerfstudio could not load; the message says why."""


def _image_size(path: Path) -> tuple[int, int]:
    """The ``(width, height)`` of the image file ``path``, checked without decoding it: the file exists, its header
    decodes and it is complete (a JPEG ends with its end-of-image marker, a PNG with its IEND chunk). Any other
    file, or one with bytes after that end, is decoded in full (a JPEG at 1/8 of its size, which still reads all
    of it).

    Raises:
        _UnreadableImage: the file is missing, no image or incomplete.
    """
    if not path.is_file():
        raise _UnreadableImage(_MISSING)
    try:
        with Image.open(path) as image:
            size = image.size
            with path.open("rb") as file:
                file.seek(max(0, path.stat().st_size - len(_PNG_END)))
                end = file.read()
            if (image.format == "JPEG" and end.endswith(_JPEG_END)) or (image.format == "PNG" and end == _PNG_END):
                return size
            if image.format == "JPEG":
                image.draft(None, (max(1, size[0] // 8), max(1, size[1] // 8)))
            image.load()
    except Exception as error:  # PIL's decoders raise OSError, ValueError, SyntaxError, EOFError, struct.error...
        reason = str(error) or type(error).__name__
        if isinstance(error, OSError) and "truncated" in reason.lower():
            raise _UnreadableImage(f"cannot be read: the file is incomplete ({reason})") from None
        raise _UnreadableImage(f"cannot be read as an image ({reason})") from None
    return size


def _check_frame_files(data: Path, transforms: Path, frames: list[Any], downscale_factor: int | None) -> None:
    """Checks the image and ``mask_path`` files of the frames of ``transforms`` (see :func:`check_data_folder`):
    the files nerfstudio's dataparser reads with ``downscale_factor`` (None: its automatic choice).

    Raises:
        DataFolderError: naming the first frame or file that cannot be used, and how many more cannot.
    """
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import MAX_AUTO_RESOLUTION

    name = transforms.name
    for index, frame in enumerate(frames):
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise DataFolderError(f"--data {data}: frame {index} of {name} has no file_path")
    with_masks = sum("mask_path" in frame for frame in frames)
    if with_masks not in (0, len(frames)):
        raise DataFolderError(
            f"--data {data}: {with_masks} of the {len(frames)} frames of {name} have a mask_path; give every frame "
            "one, or none"
        )
    folder = transforms.parent
    fix = f"replace the file, or remove its frame from {name}"
    if downscale_factor is None:  # nerfstudio's choice: from the size of the first frame's full-resolution image
        first = Path(frames[0]["file_path"])
        try:
            longest = max(_image_size(folder / first))
        except _UnreadableImage as error:
            raise DataFolderError(f"--data {data}: image {folder / first} {error}; {fix}") from None
        downscale_factor = 1
        while (
            longest / downscale_factor > MAX_AUTO_RESOLUTION
            and (folder / f"images_{downscale_factor * 2}" / first.name).exists()
        ):
            downscale_factor *= 2

    def located(file_path: str, prefix: str) -> Path:
        """Where nerfstudio's dataparser reads the file ``file_path`` of transforms.json from."""
        if downscale_factor > 1:
            return folder / f"{prefix}{downscale_factor}" / Path(file_path).name
        return folder / file_path

    problems: list[tuple[str, str]] = []  # (the file, what is wrong with it)
    for frame in frames:
        image = located(frame["file_path"], "images_")
        try:
            size = _image_size(image)
        except _UnreadableImage as error:
            problems.append((f"image {image}", str(error)))
            size = None
        if "mask_path" not in frame:
            continue
        mask = located(str(frame["mask_path"]), "masks_")
        try:
            mask_size = _image_size(mask)
        except _UnreadableImage as error:
            problems.append((f"mask {mask}", str(error)))
            continue
        if size is not None and mask_size != size:
            sizes = f"{mask_size[0]}x{mask_size[1]} pixels, not {size[0]}x{size[1]}"
            problems.append((f"mask {mask}", f"does not match the size of its image {image}: {sizes}"))
    if not problems:
        return
    file, wrong = problems[0]
    more = f" ({len(problems) - 1} more problems with files named in {name})" if len(problems) > 1 else ""
    if downscale_factor > 1 and wrong == _MISSING:
        fix = (
            f"the downscale factor {downscale_factor} reads the copies in {Path(file).parent.name}/: write them (as "
            "ns-process-data does), or pass --pipeline.datamanager.dataparser.downscale-factor 1"
        )
    raise DataFolderError(f"--data {data}: {file} {wrong}{more}; {fix}")


def check_geometry_from(pipeline: Any) -> None:
    """Checks the run a pipeline configuration's ``model.geometry_from`` names, without loading its weights: that it
    holds a checkpoint and, for a nerfacto run, its ``config.yml``; and that the run normalised the poses of the
    data as this run will (its ``dataparser_transforms.json``), so that both see the scene in the same place.

    Raises:
        ValueError: the run is missing, untrained, or trained on differently normalised poses.
    """
    geometry = getattr(getattr(pipeline, "model", None), "geometry_from", None)
    if geometry is None:
        return
    from mmstyle_ns.compat.checkpoints import find_checkpoint
    from mmstyle_ns.fields.nerfacto_geometry import run_config_path

    path = Path(geometry)
    flag = f"--pipeline.model.geometry-from {path}"
    checkpoint = find_checkpoint(path)
    if not path.exists() or checkpoint is None:
        raise ValueError(
            f"{flag}: no nerfstudio checkpoint there (give a trained nerfacto or mmstyle_ns run's folder, its "
            "nerfstudio_models folder or a step-*.ckpt file)"
        )
    config = run_config_path(path)
    transforms = config.parent / "dataparser_transforms.json" if config is not None else None
    if transforms is None or not transforms.is_file():
        return
    try:
        theirs = json.loads(transforms.read_text("utf8"))
        their_transform = np.asarray(theirs["transform"], dtype=np.float64)
        their_scale = float(theirs["scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{flag}: {transforms} cannot be read ({error})") from None
    datamanager = pipeline.datamanager
    dataparser_config = copy.deepcopy(datamanager.dataparser)
    if getattr(datamanager, "data", None) is not None:
        dataparser_config.data = datamanager.data
    if not hasattr(dataparser_config, "setup"):
        return
    outputs = dataparser_config.setup().get_dataparser_outputs(split="train")
    ours = np.asarray(outputs.dataparser_transform, dtype=np.float64)
    if (
        their_transform.shape != ours.shape
        or not np.allclose(their_transform, ours, atol=1e-4)
        or not np.isclose(their_scale, float(outputs.dataparser_scale), rtol=1e-4)
    ):
        raise ValueError(
            f"{flag}: that run normalised the camera poses differently (its dataparser_transforms.json); train on "
            "the same data with the same dataparser options (orientation, centring, scale) as that run"
        )
