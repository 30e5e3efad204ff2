"""Tests of style spec parsing and validation (mmstyle_ns.style.sources)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from mmstyle_ns.style.sources import (
    StyleInputError,
    StyleSource,
    builtin_style_images,
    load_audio,
    load_style_image,
    parse_style_spec,
    parse_style_specs,
    slugify,
)

LICENSED_BUILTINS = {
    "astronaut",
    "rocket",
    "coffee",
    "chelsea",
    "hubble_deep_field",
    "brick",
    "grass",
    "gravel",
    "grace_hopper",
}


def _image(path: Path, size: tuple[int, int] = (12, 8), value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _audio(path: Path, seconds: float = 0.25, rate: int = 8000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate)
    return path


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    _image(tmp_path / "starry.jpg")
    _image(tmp_path / "art" / "x.png")
    _image(tmp_path / "my painting (v2).png")
    _audio(tmp_path / "clips" / "rain.wav")
    _audio(tmp_path / "rain.flac")
    return tmp_path


def test_bare_paths_take_modality_from_suffix(files: Path):
    image = parse_style_spec("starry.jpg")
    assert image == StyleSource("starry", "image", str((files / "starry.jpg").resolve()))
    audio = parse_style_spec("rain.flac")
    assert (audio.name, audio.modality, audio.path) == ("rain", "audio", (files / "rain.flac").resolve())
    # A stem with unsafe characters is turned into a safe name.
    assert parse_style_spec("my painting (v2).png").name == "my_painting_v2"


def test_explicit_modality_name_and_text(files: Path):
    assert parse_style_spec("image:art/x.png") == StyleSource("x", "image", str((files / "art/x.png").resolve()))
    assert parse_style_spec("mono=image:art/x.png").name == "mono"
    rain = parse_style_spec("rain-1=audio:clips/rain.wav")
    assert (rain.name, rain.modality) == ("rain-1", "audio")
    text = parse_style_spec("text:  a   Watercolor painting, with soft edges ")
    assert text == StyleSource("a_watercolor_painting_with", "text", "a Watercolor painting, with soft edges")
    assert parse_style_spec("wc=text:a=b style").value == "a=b style"  # '=' inside the prompt is kept
    assert parse_style_spec("Text:moody").modality == "text"  # the modality is case-insensitive
    with pytest.raises(StyleInputError, match="no file"):
        _ = text.path


def test_slugify():
    assert slugify("A watercolor painting!") == "a_watercolor_painting"
    assert slugify("one two three four five six") == "one_two_three_four"
    assert slugify("日本の絵") == "text"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty style spec"),
        ("missing.png", "does not exist"),
        ("image:missing.png", "does not exist"),
        ("image:", "no image path"),
        ("image:art", "is not a file"),
        ("video:clip.mp4", "unknown modality 'video'"),
        ("text:   ", "empty text prompt"),
        ("notes.txt", "cannot tell the modality"),
        ("a watercolor painting", "text:a watercolor painting"),
        ("bad.name=text:x", "style name 'bad.name' is not allowed"),
        ("builtin:mona_lisa", "unknown built-in style image 'mona_lisa'"),
    ],
)
def test_bad_specs_fail_with_clear_messages(files: Path, spec: str, message: str):
    with pytest.raises(StyleInputError, match=message.replace("(", r"\(")):
        parse_style_spec(spec)


def test_corrupt_files_fail_at_parse_time(files: Path):
    (files / "garbage.png").write_bytes(b"this is not a png")
    good = (files / "starry.jpg").read_bytes()
    (files / "truncated.jpg").write_bytes(good[: len(good) // 2])  # decodable header, broken data
    (files / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunk")
    soundfile.write(str(files / "empty.wav"), np.zeros(0, dtype=np.float32), 8000)
    with pytest.raises(StyleInputError, match="not a readable image"):
        parse_style_spec("garbage.png")
    with pytest.raises(StyleInputError, match="not a readable image"):
        parse_style_spec("truncated.jpg")
    with pytest.raises(StyleInputError, match="not a readable audio"):
        parse_style_spec("noise.wav")
    with pytest.raises(StyleInputError, match="holds no samples"):
        parse_style_spec("empty.wav")
    with pytest.raises(StyleInputError, match="not a readable image"):  # explicit modality is checked too
        parse_style_spec("image:clips/rain.wav")
    assert issubclass(StyleInputError, ValueError)


def test_names_are_unique(files: Path):
    _image(files / "other" / "starry.jpg")
    sources = parse_style_specs(["starry.jpg", "other/starry.jpg", "starry=text:a starry sky", "starry.jpg"])
    # The explicit name keeps 'starry'; automatic names give way with _2, _3, ...
    assert [s.name for s in sources] == ["starry_2", "starry_3", "starry", "starry_4"]
    assert sources[1].path == (files / "other/starry.jpg").resolve()
    with pytest.raises(StyleInputError, match="given twice"):
        parse_style_specs(["a=starry.jpg", "a=text:b"])
    with pytest.raises(StyleInputError, match="no style given"):
        parse_style_specs([])
    assert [s.name for s in parse_style_specs(["text:a b", "text:a b"])] == ["a_b", "a_b_2"]


def test_builtin_style_images_are_permissive_and_load():
    builtins = builtin_style_images()
    assert set(builtins) <= LICENSED_BUILTINS
    assert {"coffee", "astronaut", "grace_hopper", "brick"} <= set(builtins)
    for name, path in builtins.items():
        image = load_style_image(path, max_side=64)
        assert image.ndim == 3 and image.shape[2] == 3 and max(image.shape[:2]) == 64, name
        assert image.dtype == np.float32 and 0.0 <= image.min() and image.max() <= 1.0
    source = parse_style_spec("builtin:coffee")
    assert source == StyleSource("coffee", "image", str(builtins["coffee"]))
    assert parse_style_spec("cup=builtin:coffee").name == "cup"


def test_load_style_image_handles_alpha(tmp_path: Path):
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_style_image(tmp_path / "a.png")
    assert image.shape == (4, 6, 3)
    np.testing.assert_allclose(image[0, 0], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(image[3, 0], [1.0, 1.0, 1.0])


def test_load_audio_mixes_resamples_and_crops(tmp_path: Path):
    rate = 8000
    t = np.arange(rate * 2) / rate
    left = np.sin(2 * np.pi * 50 * t)
    stereo = np.stack([left, -left], axis=1) * 0.5 + 0.25  # mono mix is the constant 0.25
    soundfile.write(str(tmp_path / "s.wav"), stereo.astype(np.float32), rate, subtype="FLOAT")
    mono = load_audio(tmp_path / "s.wav", rate)
    assert mono.shape == (2 * rate,) and mono.dtype == np.float32
    np.testing.assert_allclose(mono, 0.25, atol=1e-6)
    resampled = load_audio(tmp_path / "s.wav", 12000, max_seconds=0.5)
    assert resampled.shape == (6000,)
    np.testing.assert_allclose(resampled, 0.25, atol=1e-3)  # centre crop: away from the resampling edges
