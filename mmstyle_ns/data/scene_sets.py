"""Training on a folder of many multi-view scenes (TuneMV3D): each step draws one scene and a set of its views.

The folder is a collection written by ``mmstyle-scene --kind toy-collection`` (:mod:`mmstyle_ns.data.collection`):
``collection.json`` and one nerfstudio dataset per scene, each with its caption. Every scene is read with
nerfstudio's own dataparser, in the scenes' shared world frame (no re-orientation, centring or scaling, so that one
field generalizes over all of them). The datamanager keeps nerfstudio's ``FullImageDatamanager`` contract for one
*display* scene: the viewer shows its cameras and evaluation images come from it; the training draws come from the
whole collection. Every ``eval_every_scene``-th scene is held out of training (the evaluation loss).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.data.datamanagers.full_images_datamanager import FullImageDatamanager, FullImageDatamanagerConfig
from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
from torch import Tensor

from mmstyle_ns.data.datamanagers import concat_cameras, seeded_generator

__all__ = ["SceneSetDataManager", "SceneSetDataManagerConfig", "scene_dataparser"]


def scene_dataparser() -> NerfstudioDataParserConfig:
    """nerfstudio's dataparser in the scenes' own world frame (shared by every scene of a collection)."""
    return NerfstudioDataParserConfig(orientation_method="none", center_method="none", auto_scale_poses=False)


@dataclass
class SceneSetDataManagerConfig(FullImageDatamanagerConfig):
    """A step draws one scene of a collection (``--data``) and ``views_per_step + novel_views_per_step`` of its
    views."""

    _target: type = field(default_factory=lambda: SceneSetDataManager)
    dataparser: Any = field(default_factory=scene_dataparser)
    """How each scene is read (nerfstudio's dataparser, no pose normalisation: the scenes share one frame)."""
    views_per_step: int = 4
    """Input views n of a step (the supplement: 8)."""
    novel_views_per_step: int = 4
    """Novel views n' the field also renders for its L1 loss (the supplement: 8)."""
    display_scene: int = 0
    """Scene of the collection the viewer shows (its cameras) and evaluation images come from."""
    eval_every_scene: int = 10
    """Every n-th scene (counting from the n-th) is held out of training for the evaluation loss; 0 keeps all."""

    def display_folder(self) -> Path:
        """The dataset folder of the display scene."""
        from mmstyle_ns.data.collection import load_collection
        from mmstyle_ns.pipelines.base import DataFolderError

        if self.data is None:
            raise DataFolderError("the run names no scene collection (--data)")
        return load_collection(self.data)[self.display_scene].path

    def check_data(self) -> None:
        """Checks the collection folder without loading images (run before ns-train writes anything)."""
        from mmstyle_ns.data.collection import load_collection
        from mmstyle_ns.pipelines.base import DataFolderError

        if self.data is None:
            raise DataFolderError(
                "pass --data <a scene collection folder> (written by mmstyle-scene --kind toy-collection)"
            )
        if not Path(self.data).exists():
            raise DataFolderError(
                f"--data {self.data}: the data folder does not exist; pass --data <a scene collection folder> "
                "(written by mmstyle-scene --kind toy-collection)"
            )
        try:
            scenes = load_collection(self.data)
        except ValueError as error:
            raise DataFolderError(f"--data {self.data}: {error}") from None
        if not 0 <= self.display_scene < len(scenes):
            raise DataFolderError(
                f"--pipeline.datamanager.display-scene {self.display_scene}: the collection has {len(scenes)} scenes"
            )
        if self.views_per_step < 1 or self.novel_views_per_step < 0:
            raise DataFolderError("views-per-step must be >= 1 and novel-views-per-step >= 0")


class SceneSetDataManager(FullImageDatamanager):
    """Draws (scene, views) per step from a collection; nerfstudio's whole-image contract for the display scene.

    Attributes:
        scenes: the collection's scenes (name, path, caption).
        scene_cameras: every scene's cameras (all its views, train split then val split).
        scene_images: every scene's image files, in the order of its cameras.
        train_scenes: indices of the scenes training draws from; ``eval_scenes`` the held-out ones.
    """

    config: SceneSetDataManagerConfig

    def __init__(
        self,
        config: SceneSetDataManagerConfig,
        device: torch.device | str = "cpu",
        test_mode: Literal["test", "val", "inference"] = "val",
        world_size: int = 1,
        local_rank: int = 0,
        **kwargs: Any,
    ) -> None:
        from mmstyle_ns.data.collection import load_collection

        config.check_data()
        assert config.data is not None
        self.collection_root = Path(config.data)
        self.scenes = load_collection(self.collection_root)
        display = self.scenes[config.display_scene]
        shown = dataclasses.replace(config, data=display.path)
        shown.dataparser = dataclasses.replace(config.dataparser, data=display.path)
        super().__init__(shown, device, test_mode, world_size, local_rank, **kwargs)
        self.config = config
        self.local_rank = local_rank
        self.scene_cameras: list[Cameras] = []
        self.scene_images: list[list[Path]] = []
        for scene in self.scenes:
            parser = dataclasses.replace(config.dataparser, data=scene.path).setup()
            splits = [parser.get_dataparser_outputs(split) for split in ("train", "val")]
            self.scene_cameras.append(concat_cameras(*(s.cameras for s in splits)))
            self.scene_images.append([Path(f) for s in splits for f in s.image_filenames])
        every = config.eval_every_scene
        held = {i for i in range(len(self.scenes)) if every > 0 and (i + 1) % every == 0}
        self.train_scenes = [i for i in range(len(self.scenes)) if i not in held] or list(range(len(self.scenes)))
        self.eval_scenes = sorted(held) or self.train_scenes
        if not held:
            from nerfstudio.utils.rich_utils import CONSOLE

            CONSOLE.print(
                f"[yellow]The collection has {len(self.scenes)} scenes, fewer than --pipeline.datamanager."
                f"eval-every-scene {every}: the evaluation loss uses training scenes.[/yellow]"
            )
        need = config.views_per_step + config.novel_views_per_step
        fewest = min(len(c) for c in self.scene_cameras)
        if need > fewest:
            raise ValueError(f"a step needs {need} views of a scene; the smallest scene of the collection has {fewest}")

    def _draw(self, scenes: list[int], step: int, tag: str) -> tuple[Cameras, dict[str, Any]]:
        config = self.config
        generator = seeded_generator(config.train_cameras_sampling_seed, tag, step, self.local_rank)
        scene = scenes[int(torch.randint(len(scenes), (1,), generator=generator))]
        cameras = self.scene_cameras[scene]
        views: Int[Tensor, " V"] = torch.randperm(len(cameras), generator=generator)
        views = views[: config.views_per_step + config.novel_views_per_step]
        batch = {
            "scene": scene,
            "views": views,
            "num_inputs": config.views_per_step,
            "prompt": self.scenes[scene].caption,
            "generator": generator,
        }
        return cameras[views].to(self.device), batch

    def next_train(self, step: int) -> tuple[Cameras, dict[str, Any]]:  # type: ignore[override]
        """One training scene and its views; the batch holds ``scene``, ``views`` (indices into the scene's
        cameras: the inputs first), ``num_inputs``, ``prompt`` and the step's ``generator`` (noise, timestep)."""
        return self._draw(self.train_scenes, step, "train")

    def next_eval(self, step: int) -> tuple[Cameras, dict[str, Any]]:  # type: ignore[override]
        """The same draw over the held-out scenes."""
        return self._draw(self.eval_scenes, step, "eval")

    def display_views(self, count: int | None = None) -> Int[Tensor, " V"]:
        """Indices of ``count`` cameras of the display scene (default ``views_per_step``), evenly spread over its
        cameras ordered by azimuth about the world's z axis, so that neighbouring views are neighbours on the orbit."""
        cameras = self.scene_cameras[self.config.display_scene]
        count = self.config.views_per_step if count is None else count
        if not 1 <= count <= len(cameras):
            raise ValueError(f"{count} views asked for: the display scene has {len(cameras)} cameras")
        position = cameras.camera_to_worlds[:, :, 3]
        order = torch.argsort(torch.atan2(position[:, 1], position[:, 0]))
        return order[torch.linspace(0, len(cameras), count + 1)[:-1].long()]

    def display_cameras(self, count: int | None = None) -> Cameras:
        """The cameras of :meth:`display_views`, on the training device."""
        return self.scene_cameras[self.config.display_scene][self.display_views(count)].to(self.device)

    def get_train_rays_per_batch(self) -> int:
        """Latent pixels the field renders per step (for the trainer's statistics)."""
        camera = self.scene_cameras[0]
        pixels = int(camera.height.reshape(-1)[0]) * int(camera.width.reshape(-1)[0]) // 64
        return pixels * (self.config.views_per_step + self.config.novel_views_per_step)
