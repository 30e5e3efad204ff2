"""Every method on a dataset laid out the way ``ns-process-data`` writes a real capture, and one clear message for
an image file of such a dataset that cannot be read.

The capture (:func:`write_capture`) has what generated scenes lack: RGB JPEG images without alpha at a non-square
size, per-frame intrinsics that differ between frames (as for a capture of several cameras) with small lens
distortion, a ``mask_path`` per frame, half-size copies in ``images_2``/``masks_2`` (read with
``--pipeline.datamanager.dataparser.downscale-factor 2``), an ``applied_transform``, no depth and no split lists.
The images are rendered without distortion; only the parameters matter here, and nerfstudio reads them.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ns_train_refusal, short_run_config
from PIL import Image

from mmstyle_ns.pipelines.base import DataFolderError, check_data_folder

OUR_METHODS = sorted(
    ep.name for ep in entry_points(group="nerfstudio.method_configs") if ep.value.startswith("mmstyle_ns.")
)
MULTI_SCENE_METHODS = {"tunemv3d"}
"""Methods trained on a collection of scenes rather than one capture."""

WIDTH, HEIGHT = 96, 64
"""Full-resolution size of the capture's images (``images_2`` holds them at half this size)."""
NUM_VIEWS = 12
APPLIED_TRANSFORM = [[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, -1.0, 0.0]]
"""What ``ns-process-data`` records for a COLMAP capture (its axes to nerfstudio's)."""
UNMASKED = (HEIGHT // 4, WIDTH // 4)
"""The top-left corner of every frame the masks leave out (height, width at full resolution)."""


def _k1(index: int) -> float:
    """The radial distortion ``k1`` of frame ``index``: small, nonzero and different for every frame."""
    return 0.01 + 0.002 * index


def write_capture(out: Path) -> Path:
    """Writes a small dataset in ``ns-process-data``'s layout (see the module docstring) into ``out``: an
    ``object360`` scene rendered from its capture rig, each frame with its own focal length and principal point."""
    from mmstyle_ns.data.scene import build_scene, make_cameras, render_views

    setup = build_scene("object360", 0)
    poses = make_cameras(setup, NUM_VIEWS)
    focal = 0.5 * WIDTH / np.tan(np.radians(setup.fov_deg) / 2) * (1.0 + 0.04 * (np.arange(NUM_VIEWS) % 3))
    offset = (np.arange(NUM_VIEWS) % 2).astype(float)
    intrinsics = np.stack([focal, focal * 1.01, WIDTH / 2 + 1.5 * offset, HEIGHT / 2 - offset], axis=-1)
    rgb, _ = render_views(setup, poses, intrinsics, WIDTH, HEIGHT, supersample=1)
    for folder in ("images", "images_2", "masks", "masks_2"):
        (out / folder).mkdir(parents=True)
    mask = np.full((HEIGHT, WIDTH), 255, dtype=np.uint8)
    mask[: UNMASKED[0], : UNMASKED[1]] = 0
    frames = []
    for index, (colour, c2w, (fx, fy, cx, cy)) in enumerate(zip(rgb, poses, intrinsics, strict=True)):
        name = f"frame_{index + 1:05d}"
        image = Image.fromarray((colour * 255.0 + 0.5).astype(np.uint8), mode="RGB")
        image.save(out / "images" / f"{name}.jpg", quality=95)
        image.resize((WIDTH // 2, HEIGHT // 2), Image.Resampling.BICUBIC).save(out / "images_2" / f"{name}.jpg")
        Image.fromarray(mask).save(out / "masks" / f"{name}.png")
        Image.fromarray(mask[::2, ::2]).save(out / "masks_2" / f"{name}.png")
        frames.append(
            {
                "file_path": f"images/{name}.jpg",
                "mask_path": f"masks/{name}.png",
                "transform_matrix": [[float(x) for x in row] for row in c2w],
                "colmap_im_id": index + 1,
                "fl_x": float(fx),
                "fl_y": float(fy),
                "cx": float(cx),
                "cy": float(cy),
                "w": WIDTH,
                "h": HEIGHT,
                "k1": _k1(index),
                "k2": -0.002,
                "p1": 0.0005,
                "p2": -0.0005,
            }
        )
    meta = {"camera_model": "OPENCV", "frames": frames, "applied_transform": APPLIED_TRANSFORM}
    (out / "transforms.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The capture of :func:`write_capture`; tests that change it work on a copy (:func:`_copy`)."""
    return write_capture(tmp_path_factory.mktemp("real") / "capture")


def _copy(capture: Path, tmp_path: Path) -> Path:
    """A copy of the capture in ``tmp_path`` to damage."""
    return Path(shutil.copytree(capture, tmp_path / "capture"))


def _frames_by_image(capture: Path) -> dict[str, dict[str, Any]]:
    """The frames of the capture's transforms.json by image file name."""
    frames = json.loads((capture / "transforms.json").read_text())["frames"]
    return {Path(frame["file_path"]).name: frame for frame in frames}


# ---- 1. nerfstudio reads every convention of the capture -----------------------------------------------------


def test_nerfstudio_reads_the_capture_conventions(capture: Path, tmp_path: Path) -> None:
    from nerfstudio.data.dataparsers.nerfstudio_dataparser import NerfstudioDataParserConfig
    from nerfstudio.data.datasets.base_dataset import InputDataset

    outputs = NerfstudioDataParserConfig(data=capture, downscale_factor=2).setup().get_dataparser_outputs("train")
    assert {Path(f).parent.name for f in outputs.image_filenames} == {"images_2"}
    assert outputs.mask_filenames is not None and {Path(f).parent.name for f in outputs.mask_filenames} == {"masks_2"}
    frames = _frames_by_image(capture)
    shown = [frames[Path(f).name] for f in outputs.image_filenames]
    cameras = outputs.cameras
    assert cameras.width.flatten().tolist() == [WIDTH // 2] * len(shown)
    assert cameras.height.flatten().tolist() == [HEIGHT // 2] * len(shown)
    expected_fx = torch.tensor([frame["fl_x"] / 2 for frame in shown])
    torch.testing.assert_close(cameras.fx.flatten(), expected_fx)  # per frame, at the downscaled size
    assert len(set(cameras.fx.flatten().tolist())) == 3 and len(set(cameras.cx.flatten().tolist())) == 2
    assert cameras.distortion_params is not None
    torch.testing.assert_close(cameras.distortion_params[:, 0], torch.tensor([frame["k1"] for frame in shown]))
    assert (cameras.distortion_params[:, 0] > 0).all() and (cameras.distortion_params[:, 4] == 0.0005).all()

    # applied_transform: the dataparser's transform from the capture's original frame includes it
    folder = _copy(capture, tmp_path)
    meta = json.loads((folder / "transforms.json").read_text())
    del meta["applied_transform"]
    (folder / "transforms.json").write_text(json.dumps(meta))
    plain = NerfstudioDataParserConfig(data=folder, downscale_factor=2)
    without = plain.setup().get_dataparser_outputs("train").dataparser_transform
    applied = torch.tensor([*APPLIED_TRANSFORM, [0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(outputs.dataparser_transform, without @ applied)

    data = InputDataset(outputs).get_data(0)
    assert data["image"].shape == (HEIGHT // 2, WIDTH // 2, 3)  # RGB, no alpha
    mask = data["mask"][..., 0]
    assert not mask[: UNMASKED[0] // 2, : UNMASKED[1] // 2].any() and mask[UNMASKED[0] // 2 :].all()

    automatic = NerfstudioDataParserConfig(data=capture).setup().get_dataparser_outputs("train")
    assert {Path(f).parent.name for f in automatic.image_filenames} == {"images"}  # small images: full size
    assert automatic.cameras.width.flatten().tolist() == [WIDTH] * len(shown)


# ---- 2. every method trains a few steps on it and renders ---------------------------------------------------


@pytest.fixture(scope="module")
def capture_collection(capture: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A collection of one's own (``collection.json`` next to the scenes' datasets) holding the capture: the data
    a multi-scene method trains on."""
    root = tmp_path_factory.mktemp("real_collection")
    shutil.copytree(capture, root / "capture")
    (root / "collection.json").write_text(json.dumps({"scenes": [{"name": "capture", "caption": "a red cube"}]}))
    return root


def _eval_view(datamanager: Any) -> tuple[Any, torch.Tensor]:
    """The first evaluation camera and its image as the model is trained on them: a whole-image datamanager
    caches its images first, undistorted, which crops them and changes the cameras' intrinsics."""
    cached = getattr(datamanager, "cached_eval", None)
    if cached is not None:
        return datamanager.eval_dataset.cameras[0:1], cached[0]["image"]
    return datamanager.eval_dataset.cameras[0:1], datamanager.eval_dataset.get_data(0)["image"]


@pytest.mark.parametrize("method", OUR_METHODS)
def test_method_trains_and_renders_on_a_capture(
    method: str, capture: Path, tmp_path: Path, tiny_guidance_model: Path, request: pytest.FixtureRequest
) -> None:
    data = request.getfixturevalue("capture_collection") if method in MULTI_SCENE_METHODS else capture
    config = short_run_config(method, data, tmp_path, iterations=20, guidance_model=tiny_guidance_model)
    config.pipeline.datamanager.dataparser.downscale_factor = 2
    config.save_config()  # runs the input checks, the data folder's included
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    datamanager = trainer.pipeline.datamanager
    assert {Path(f).parent.name for f in datamanager.train_dataparser_outputs.image_filenames} == {"images_2"}
    camera, image = _eval_view(datamanager)
    assert image.shape[-1] == 3 and abs(image.shape[0] - HEIGHT // 2) <= 2 and abs(image.shape[1] - WIDTH // 2) <= 2
    model = trainer.pipeline.model
    with torch.no_grad():
        model.eval()
        before = model.get_outputs_for_camera(camera)["rgb"]
        model.train()
    trainer.train()
    with torch.no_grad():
        model.eval()
        after = model.get_outputs_for_camera(camera)["rgb"]
    assert after.shape == image.shape, "the render does not match the image it is compared with"
    assert torch.isfinite(after).all()
    assert (after - before).abs().mean() > 1e-3, "training changed nothing"
    assert (config.get_base_dir() / "nerfstudio_models" / f"step-{config.max_num_iterations - 1:09d}.ckpt").is_file()


def test_a_multi_scene_method_refuses_a_single_capture(
    capture: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """tunemv3d trains on a collection (above: a collection holding the capture); a capture itself is refused."""
    from nerfstudio.scripts.train import main

    config = short_run_config("tunemv3d", capture, tmp_path, guidance_model=tmp_path / "unchecked")
    with pytest.raises(SystemExit) as stopped:
        main(config)
    text = capsys.readouterr().out
    assert stopped.value.code == 2
    assert f"Cannot train tunemv3d: --data {capture}: {capture / 'collection.json'} not found" in text
    assert "Traceback" not in text and not (tmp_path / "runs").exists()


# ---- 3. an image file that cannot be read: one message naming it --------------------------------------------


def _truncate(path: Path) -> None:
    """Cuts the file ``path`` in half (a JPEG keeps its header: it opens, but cannot be decoded)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage(folder: Path, kind: str) -> tuple[int | None, str]:
    """Damages the capture copy ``folder`` in one way; the downscale factor to check it with and the message
    expected."""
    if kind == "truncated_jpeg":
        _truncate(folder / "images" / "frame_00003.jpg")
        return None, f"image {folder / 'images' / 'frame_00003.jpg'} cannot be read: the file is incomplete"
    if kind == "not_an_image":
        (folder / "images" / "frame_00002.jpg").write_text("no image")
        return None, f"image {folder / 'images' / 'frame_00002.jpg'} cannot be read as an image"
    if kind == "missing_image":
        (folder / "images" / "frame_00005.jpg").unlink()
        return 1, f"image {folder / 'images' / 'frame_00005.jpg'} does not exist; replace the file, or remove"
    if kind == "missing_downscaled_copy":
        (folder / "images_2" / "frame_00004.jpg").unlink()
        return 2, (
            f"image {folder / 'images_2' / 'frame_00004.jpg'} does not exist; the downscale factor 2 reads the "
            "copies in images_2/"
        )
    if kind == "truncated_mask":
        _truncate(folder / "masks_2" / "frame_00007.png")
        return 2, f"mask {folder / 'masks_2' / 'frame_00007.png'} cannot be read"
    if kind == "mask_of_another_size":
        Image.new("L", (WIDTH // 2, HEIGHT // 2), 255).save(folder / "masks" / "frame_00001.png")
        return 1, (
            f"mask {folder / 'masks' / 'frame_00001.png'} does not match the size of its image "
            f"{folder / 'images' / 'frame_00001.jpg'}: {WIDTH // 2}x{HEIGHT // 2} pixels, not {WIDTH}x{HEIGHT}"
        )
    assert kind == "two_missing"
    (folder / "images" / "frame_00006.jpg").unlink()
    (folder / "images" / "frame_00009.jpg").unlink()
    return 1, f"image {folder / 'images' / 'frame_00006.jpg'} does not exist (1 more problems with files named"


def _base_datamanager(data: Path, tmp_path: Path, downscale_factor: int | None) -> Any:
    """The datamanager configuration of a short mmstyle-base run on ``data``."""
    config = short_run_config("mmstyle-base", data, tmp_path)
    config.pipeline.datamanager.dataparser.downscale_factor = downscale_factor
    return config.pipeline.datamanager


@pytest.mark.parametrize(
    "kind",
    [
        "truncated_jpeg",
        "not_an_image",
        "missing_image",
        "missing_downscaled_copy",
        "truncated_mask",
        "mask_of_another_size",
        "two_missing",
    ],
)
def test_an_unusable_file_is_named(kind: str, capture: Path, tmp_path: Path) -> None:
    folder = _copy(capture, tmp_path)
    downscale_factor, expected = _damage(folder, kind)
    with pytest.raises(DataFolderError) as refused:
        check_data_folder(_base_datamanager(folder, tmp_path, downscale_factor))
    assert str(refused.value).startswith(f"--data {folder}: ") and expected in str(refused.value)


def test_complete_captures_pass_the_check(capture: Path, tmp_path: Path) -> None:
    """The capture at both sizes, and a JPEG with bytes after its end (as phones append) that nerfstudio loads."""
    for downscale_factor in (None, 1, 2):
        check_data_folder(_base_datamanager(capture, tmp_path, downscale_factor))
    folder = _copy(capture, tmp_path)
    image = folder / "images" / "frame_00002.jpg"
    image.write_bytes(image.read_bytes() + b"\x00trailing data")
    check_data_folder(_base_datamanager(folder, tmp_path, 1))
    assert np.asarray(Image.open(image)).shape == (HEIGHT, WIDTH, 3)


def test_the_file_check_is_cheap(tmp_path: Path) -> None:
    """300 full-HD JPEGs with masks are checked in well under two seconds: headers and file ends, no decoding."""
    rng = np.random.default_rng(0)
    coarse = Image.fromarray((rng.random((68, 120, 3)) * 255).astype(np.uint8))
    jpeg, png = io.BytesIO(), io.BytesIO()
    coarse.resize((1920, 1080), Image.Resampling.BICUBIC).save(jpeg, format="JPEG", quality=90)
    Image.new("L", (1920, 1080), 255).save(png, format="PNG")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    frames = []
    for index in range(300):
        (tmp_path / "images" / f"{index}.jpg").write_bytes(jpeg.getvalue())
        (tmp_path / "masks" / f"{index}.png").write_bytes(png.getvalue())
        frames.append({"file_path": f"images/{index}.jpg", "mask_path": f"masks/{index}.png"})
    (tmp_path / "transforms.json").write_text(json.dumps({"frames": frames}))
    datamanager = _base_datamanager(tmp_path, tmp_path, None)
    start = time.perf_counter()
    check_data_folder(datamanager)
    assert time.perf_counter() - start < 1.5


def test_ns_train_with_a_truncated_image_prints_one_message(capture: Path, tmp_path: Path) -> None:
    """The real console command: exit status 2, one line naming the file, no traceback, no output folder."""
    folder = _copy(capture, tmp_path)
    broken = folder / "images" / "frame_00003.jpg"
    _truncate(broken)
    error, _ = ns_train_refusal("mmstyle-base", folder, tmp_path / "out")
    assert f"image {broken} cannot be read: the file is incomplete" in error
