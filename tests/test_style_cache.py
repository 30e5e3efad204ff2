"""Tests of the on-disk cache of stylized views (mmstyle_ns.style.cache)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmstyle_ns.style import cache as cache_module
from mmstyle_ns.style.cache import StylizedViewCache, style_key_for, view_key_for
from mmstyle_ns.style.extractor import PreparedStyle
from mmstyle_ns.style.sources import StyleSource


class Counter:
    """A compute callable that counts its calls and returns a fixed random float image."""

    def __init__(self, seed: int, shape: tuple[int, ...] = (6, 5, 3)) -> None:
        self.calls = 0
        self.image = np.random.default_rng(seed).random(shape, dtype=np.float32)

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.image


def _style(image: np.ndarray, name: str = "s") -> PreparedStyle:
    return PreparedStyle(StyleSource(name, "image", "x.png"), image, torch.zeros(3))


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_second_call_is_served_from_disk_losslessly(tmp_path: Path):
    cache = StylizedViewCache(tmp_path / "cache")
    compute = Counter(0)
    first = cache.get_or_compute("style", "view", compute)
    np.testing.assert_array_equal(first, compute.image)
    # A new cache object on the same folder (a resumed run) reads the entry back bit for bit.
    again = StylizedViewCache(tmp_path / "cache").get_or_compute("style", "view", compute)
    assert compute.calls == 1
    np.testing.assert_array_equal(again, compute.image)
    assert again.dtype == np.float32
    assert ("style", "view") in cache and ("style", "other") not in cache
    assert (cache.hits, cache.misses) == (0, 1)


def test_each_style_and_view_has_its_own_entry(tmp_path: Path):
    cache = StylizedViewCache(tmp_path)
    a, b, c = Counter(1), Counter(2), Counter(3)
    out_a = cache.get_or_compute("style-a", "view-0", a)
    out_b = cache.get_or_compute("style-b", "view-0", b)
    out_c = cache.get_or_compute("style-a", "view-1", c)
    assert (a.calls, b.calls, c.calls) == (1, 1, 1)
    assert len(_entries(tmp_path)) == 3
    assert not np.array_equal(out_a, out_b) and not np.array_equal(out_a, out_c)
    np.testing.assert_array_equal(cache.get_or_compute("style-b", "view-0", a), b.image)
    assert a.calls == 1
    assert len({cache.key("style-a", "view-0"), cache.key("style-b", "view-0"), cache.key("style-a", "view-1")}) == 3
    assert cache.key("ab", "c") != cache.key("a", "bc")


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "garbage"])
def test_corrupt_entries_are_recomputed(tmp_path: Path, damage: str):
    cache = StylizedViewCache(tmp_path)
    compute = Counter(4, shape=(16, 16, 3))
    cache.get_or_compute("s", "v", compute)
    path = cache.path("s", "v")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x40  # one bit inside the pixel data: still a loadable .npy
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "empty":
        raw = bytearray()
    else:
        raw = bytearray(b"\x93NUMPY" + os.urandom(200))
    path.write_bytes(bytes(raw))
    assert cache.load("s", "v") is None
    out = cache.get_or_compute("s", "v", compute)
    assert compute.calls == 2
    np.testing.assert_array_equal(out, compute.image)
    rewritten = cache.load("s", "v")
    assert rewritten is not None
    np.testing.assert_array_equal(rewritten, compute.image)


def test_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = StylizedViewCache(tmp_path)
    compute = Counter(5)

    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute("s", "v", compute)
    assert _entries(tmp_path) == []  # neither a partial entry nor a temporary file
    monkeypatch.undo()
    cache.get_or_compute("s", "v", compute)
    assert compute.calls == 2 and len(_entries(tmp_path)) == 1


def test_compute_must_return_a_float_image(tmp_path: Path):
    with pytest.raises(TypeError, match="float image"):
        StylizedViewCache(tmp_path).get_or_compute("s", "v", lambda: np.zeros((2, 2, 3), dtype=np.uint8))
    assert _entries(tmp_path) == []


def test_keys_follow_the_content():
    image = np.random.default_rng(6).random((8, 8, 3), dtype=np.float32)
    key = style_key_for(_style(image), "magenta-abc", 1.0)
    assert key == style_key_for(_style(image.copy(), name="renamed"), "magenta-abc", 1.0)
    changed = image.copy()
    changed[3, 4, 1] += 1e-3
    assert style_key_for(_style(changed), "magenta-abc", 1.0) != key
    assert style_key_for(_style(image), "magenta-abd", 1.0) != key
    assert style_key_for(_style(image), "magenta-abc", 0.8) != key
    assert StylizedViewCache.style_key_for(_style(image), "magenta-abc", 1.0) == key

    view = np.random.default_rng(7).random((12, 10, 3), dtype=np.float32)
    vkey = view_key_for(view, (12, 10))
    assert vkey == view_key_for(view.copy(), (12, 10))
    assert view_key_for(view, (24, 20)) != vkey
    regenerated = view.copy()
    regenerated[0, 0, 0] = 1.0 - regenerated[0, 0, 0]
    assert view_key_for(regenerated, (12, 10)) != vkey
    assert view_key_for(view.reshape(10, 12, 3), (12, 10)) != vkey  # same bytes, other shape


def test_stylized_views_are_produced_once(tmp_path: Path):
    from mmstyle_ns.style.magenta import MagentaStylizer

    stylizer = MagentaStylizer()
    style_image = np.random.default_rng(8).random((64, 64, 3), dtype=np.float32)
    style = _style(style_image)
    vector = stylizer.style_vector(style_image)
    views = [np.full((24, 32, 3), v, dtype=np.float32) for v in (0.2, 0.7)]
    calls: list[int] = []

    def stylize_all(cache: StylizedViewCache) -> list[np.ndarray]:
        style_key = style_key_for(style, stylizer.identifier, 0.8)
        out = []
        for i, view in enumerate(views):

            def compute(i: int = i, view: np.ndarray = view) -> np.ndarray:
                calls.append(i)
                return stylizer.stylize(view[None], vector, strength=0.8)[0]

            out.append(cache.get_or_compute(style_key, view_key_for(view, (view.shape[0], view.shape[1])), compute))
        return out

    first = stylize_all(StylizedViewCache(tmp_path))
    second = stylize_all(StylizedViewCache(tmp_path))  # e.g. the next epoch, or a resumed run
    assert calls == [0, 1]
    for a, b, view in zip(first, second, views, strict=True):
        assert a.shape == view.shape
        np.testing.assert_array_equal(a, b)
