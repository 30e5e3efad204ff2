"""Command-line generator of synthetic nerfstudio datasets with exact ground truth.

Examples::

    mmstyle-scene --kind object360 --out data/object360 --num-views 100 --resolution 128 --seed 0
    mmstyle-scene --kind toy --caption "a red cube on a wooden floor" --out data/toy
    mmstyle-scene --kind toy-collection --num-scenes 200 --out data/toy-collection
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tyro


@dataclass
class SceneCommand:
    """Render an analytic textured scene (or a collection of toy scenes) and write it as a nerfstudio dataset.

    The output folder receives transforms.json (nerfstudio-data format, OPENCV pinhole cameras, OpenGL
    camera-to-world poses, train/val/test file lists), images/frame_XXXXX.png (8-bit RGB),
    depths/frame_XXXXX.png (16-bit z-depth in millimetres, 0 = background) and scene.json (metadata such as
    the bounding box of the content). A toy-collection writes one such folder per scene (scene_00000/, ...) and an
    index, collection.json. The same arguments always produce byte-identical files.
    """

    kind: Literal["object360", "forward", "unbounded", "head", "toy", "toy-collection"] = "object360"
    """Scene: objects on a disc, 360 deg views (object360); wall and objects, camera grid (forward); a ground to
    the horizon, a sky, objects and far landmarks, low orbit, full frames without alpha (unbounded); head;
    the toy teacher world's objects that --caption describes on a disc, 360 deg views (toy); or a folder of
    --num-scenes toy scenes with photo captions drawn from --seed, a few colour-shape pairs held out for
    evaluation, the training data of tunemv3d (toy-collection: scene_00000/ ... and collection.json)."""
    out: Path | None = None
    """Output folder; defaults to data/<kind>. An existing dataset (or collection) there is replaced."""
    num_views: int | None = None
    """Number of rendered views (per scene, at least 2); unset: 100, and 16 per scene of a toy-collection."""
    num_scenes: int = 200
    """Number of scenes of a toy-collection (only used there)."""
    resolution: int = 128
    """Width and height of the square images in pixels (at least 8)."""
    seed: int = 0
    """Seed of the object layout, colours, light direction and camera jitter (non-negative); of a toy-collection,
    the seed its captions and scene seeds are drawn from."""
    eval_every: int = 8
    """Hold out every n-th view (starting with the first) as the val and test split (a toy-collection holds out only
    each scene's first view)."""
    supersample: int = 2
    """Colour samples per pixel along each axis (2 means 2x2 anti-aliasing)."""
    specular: bool = True
    """Render specular highlights on glossy materials (view-dependent colour; always on in a toy-collection)."""
    portrait: Literal["grace_hopper", "astronaut"] = "grace_hopper"
    """Public-domain portrait shown on the face of the head kind."""
    caption: str | None = None
    """Toy-world photo caption of the toy kind (required there, not allowed otherwise), e.g. "a red cube on grass".
    Grammar: (a|an|two|three) [shiny] <colour> <shape>[s] on <ground>.
    Colours: red, orange, yellow, green, blue, purple, white, black. Shapes: sphere, cube, cylinder.
    Grounds: "a wooden floor", grass, stone, "a plain floor". No style prefix ("a painting of ..."): photos only."""
    masks: bool = False
    """Also write the objects' masks as nerfstudio's per-frame mask_path (masks/frame_XXXXX.png): the region an
    editing method (ed-nerf) changes. Leave off for datasets that ray-based methods reconstruct (nerfstudio trains
    them on masked pixels only). Not available for a toy-collection."""


def main(config: SceneCommand) -> Path:
    """Generates the dataset described by ``config`` and prints a summary.

    Args:
        config: Parsed command-line options.

    Returns:
        The output folder.
    """
    if config.kind == "toy" and not (config.caption or "").strip():
        raise ValueError('--kind toy needs --caption, e.g. --caption "a red cube on a wooden floor"')
    if config.kind == "toy-collection":
        if config.caption is not None:
            raise ValueError(
                "--caption does not apply to --kind toy-collection: its captions are drawn from --seed "
                "(use --kind toy for one scene of a given caption)"
            )
        if config.masks or not config.specular:
            flag = "--masks" if config.masks else "--no-specular"
            raise ValueError(f"{flag} does not apply to --kind toy-collection")
    elif config.kind != "toy" and config.caption is not None:
        raise ValueError(f"--caption only applies to --kind toy, not to --kind {config.kind}")
    out = config.out if config.out is not None else Path("data") / config.kind
    start = time.perf_counter()
    if config.kind == "toy-collection":
        from mmstyle_ns.data.collection import HELD_OUT_PAIRS, generate_collection

        views = 16 if config.num_views is None else config.num_views
        generate_collection(
            out,
            config.num_scenes,
            num_views=views,
            resolution=config.resolution,
            seed=config.seed,
            supersample=config.supersample,
            log=lambda msg: print(f"  {msg}", flush=True),
        )
        print(
            f"Wrote a collection of {config.num_scenes} toy scenes, {views} views each at {config.resolution}x"
            f"{config.resolution}, in {time.perf_counter() - start:.1f} s to {out} (never shown, for evaluation: "
            f"{', '.join(f'{colour} {shape}' for colour, shape in HELD_OUT_PAIRS)})"
        )
        return out
    from mmstyle_ns.data.scene import generate_scene, split_indices

    num_views = 100 if config.num_views is None else config.num_views
    generate_scene(
        kind=config.kind,
        out_dir=out,
        num_views=num_views,
        resolution=config.resolution,
        seed=config.seed,
        eval_every=config.eval_every,
        supersample=config.supersample,
        specular=config.specular,
        portrait=config.portrait,
        caption=config.caption,
        masks=config.masks,
        log=lambda msg: print(f"  {msg}", flush=True),
    )
    elapsed = time.perf_counter() - start
    train, held_out = split_indices(num_views, config.eval_every)
    shows = f" of {config.caption.strip()!r}" if config.caption is not None else ""
    print(
        f"Wrote {config.kind} scene{shows}: {num_views} views at {config.resolution}x{config.resolution} "
        f"({len(train)} train, {len(held_out)} val/test) in {elapsed:.1f} s to {out}"
    )
    return out


def entrypoint() -> None:
    """Console-script entry point."""
    config = tyro.cli(SceneCommand)
    try:
        main(config)
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    entrypoint()
