"""Tests of the style-match metric (mmstyle_ns.metrics.style_match)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmstyle_ns.metrics.style_match import frame_similarities, style_match_report, style_similarity

torch.set_num_threads(1)


class MeanColour:
    """A fake predictor: the style vector is the image's mean colour; it records what it was given."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def style_vector(self, image: np.ndarray) -> np.ndarray:
        self.seen.append(image)
        return image.reshape(-1, 3).mean(axis=0)


def _solid(rgb: tuple[float, float, float], size: int = 4) -> np.ndarray:
    return np.broadcast_to(np.asarray(rgb, dtype=np.float32), (size, size, 3)).copy()


def test_cosine_similarity_and_mean_over_frames():
    predictor = MeanColour()
    target = np.array([1.0, 0.0, 0.0])
    assert style_similarity(_solid((0.5, 0.0, 0.0)), target, predictor) == pytest.approx(1.0)
    assert style_similarity(_solid((0.0, 0.3, 0.0)), target, predictor) == pytest.approx(0.0)
    # cos between (1, 1, 0) and (1, 0, 0) is 1/sqrt(2); the mean over two frames is (1 + 1/sqrt(2)) / 2.
    frames = np.stack([_solid((0.2, 0.0, 0.0)), _solid((0.4, 0.4, 0.0))])
    assert frame_similarities(frames, target, predictor) == pytest.approx([1.0, 2**-0.5])
    assert style_similarity(frames, target * 7, predictor) == pytest.approx((1 + 2**-0.5) / 2)
    # The predictor gets float [0, 1] frames of shape [H, W, 3], from uint8 and torch input alike.
    predictor.seen.clear()
    as_uint8 = (frames * 255).round().astype(np.uint8)
    assert style_similarity(as_uint8, target, predictor) == pytest.approx((1 + 2**-0.5) / 2, abs=1e-3)
    assert style_similarity(torch.from_numpy(frames), torch.tensor(target), predictor) == pytest.approx(
        (1 + 2**-0.5) / 2
    )
    assert all(seen.shape == (4, 4, 3) and seen.dtype == np.float32 and seen.max() <= 1.0 for seen in predictor.seen)


def test_report_gives_both_similarities_and_the_gain():
    target = np.array([0.0, 0.0, 1.0])
    stylized = np.stack([_solid((0.0, 0.1, 0.9)), _solid((0.0, 0.0, 0.5))])
    plain = _solid((0.6, 0.6, 0.6))
    report = style_match_report(stylized, plain, target, MeanColour())
    cos_a = 0.9 / np.hypot(0.1, 0.9)
    assert report["stylized_frames"] == pytest.approx([cos_a, 1.0])
    assert report["stylized"] == pytest.approx((cos_a + 1.0) / 2)
    assert report["unstylized"] == pytest.approx(1 / np.sqrt(3))
    assert report["gain"] == pytest.approx(report["stylized"] - report["unstylized"])
    assert report["gain"] > 0.3


def test_rejects_bad_input():
    predictor = MeanColour()
    with pytest.raises(ValueError, match="target_vector"):
        style_similarity(_solid((0.1, 0.2, 0.3)), np.zeros(3), predictor)
    with pytest.raises(ValueError, match="3-d vectors"):
        style_similarity(_solid((0.1, 0.2, 0.3)), np.ones(100), predictor)
    with pytest.raises(ValueError, match="frames"):
        style_similarity(np.zeros((4, 4)), np.ones(3), predictor)
    with pytest.raises(ValueError, match="frames"):
        style_similarity(np.zeros((0, 4, 4, 3)), np.ones(3), predictor)
    with pytest.raises(ValueError, match="predicted"):
        style_similarity(_solid((0.0, 0.0, 0.0)), np.ones(3), predictor)  # a zero vector has no direction


def test_magenta_stylized_view_matches_its_style_better_than_the_content():
    from mmstyle_ns.style.magenta import MagentaStylizer
    from mmstyle_ns.style.sources import builtin_style_images, load_style_image

    stylizer = MagentaStylizer(num_threads=1)
    images = builtin_style_images()
    style = load_style_image(images["brick"], max_side=128)
    content = load_style_image(images["astronaut"], max_side=96)
    target = stylizer.style_vector(style)
    stylized = stylizer.stylize(content, target)
    report = style_match_report(stylized, content, target, stylizer)
    assert report["stylized"] > report["unstylized"] + 0.05
    assert report["stylized"] > 0.9
    assert report["stylized"] == pytest.approx(style_similarity(stylized, target, stylizer), abs=1e-6)
