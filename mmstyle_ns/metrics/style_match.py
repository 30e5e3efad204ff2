"""How well renders match a target style: cosine similarity of style vectors.

Magenta's style-prediction network (Ghiasi et al., `arXiv 1705.06830 <https://arxiv.org/abs/1705.06830>`_,
:class:`mmstyle_ns.style.magenta.MagentaStylizer`) maps an image to a 100-d vector that summarises its style
(colour statistics and texture). A render that carries the target style gets a vector pointing the same way as
the target style image's vector. The score of a set of frames is the mean over frames of
``cos(s(I_k), s*) = <s(I_k), s*> / (||s(I_k)|| ||s*||)``; higher is better. Renders of the unstylized field give
the baseline; :func:`style_match_report` reports both and the gain. With a per-view 2D stylization of the same
frames as the ceiling, :func:`gain_share` gives the share of the 2D stylizer's gain a method reaches,
``(S(ours) - S(unstylized)) / (S(2D) - S(unstylized))``.

Any object with a ``style_vector(image)`` method works as the predictor (a CLIP-image-embedding wrapper, a fake
in tests); predictor calls are the only cost.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, TypedDict

import numpy as np
from jaxtyping import Float
from torch import Tensor

Array = Tensor | np.ndarray
"""Frames and vectors may be numpy arrays or torch tensors."""


class StylePredictor(Protocol):
    """Maps one RGB image (float ``[H, W, 3]`` in ``[0, 1]``) to a style vector."""

    def style_vector(self, image: Float[np.ndarray, "H W 3"]) -> Float[np.ndarray, " D"]: ...


def _frames(images: Any) -> Float[np.ndarray, "N H W 3"]:
    """Images as float32 ``[N, H, W, 3]`` in ``[0, 1]`` (one ``[H, W, 3]`` image, uint8, tensors accepted)."""
    if isinstance(images, Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise ValueError(f"frames must be [H, W, 3] or [N, H, W, 3] with N > 0, got {tuple(array.shape)}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _vector(vector: Any, what: str) -> Float[np.ndarray, " D"]:
    """A non-zero 1-d float64 vector."""
    if isinstance(vector, Tensor):
        vector = vector.detach().cpu().numpy()
    array = np.asarray(vector, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(array))
    if array.size == 0 or not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"{what} must be a finite non-zero vector")
    return array


def frame_similarities(
    render: Float[Array, "*n H W 3"], target_vector: Float[Array, " D"], predictor: StylePredictor
) -> list[float]:
    """``cos(s(I_k), s*)`` for every frame ``I_k`` of ``render`` (see :func:`style_similarity`)."""
    target = _vector(target_vector, "target_vector")
    scores = []
    for frame in _frames(render):
        predicted = _vector(predictor.style_vector(frame), "predicted style vector")
        if predicted.shape != target.shape:
            raise ValueError(f"predictor gives {predicted.shape[0]}-d vectors, the target has {target.shape[0]}")
        scores.append(float(predicted @ target / (np.linalg.norm(predicted) * np.linalg.norm(target))))
    return scores


def style_similarity(
    render: Float[Array, "*n H W 3"], target_vector: Float[Array, " D"], predictor: StylePredictor
) -> float:
    """Mean cosine similarity between the renders' style vectors and the target style's vector.

    ``S = (1 / N) sum_k <s(I_k), s*> / (||s(I_k)|| ||s*||)``, in ``[-1, 1]``; higher is better.

    Args:
        render: one frame ``[H, W, 3]`` or frames ``[N, H, W, 3]`` (float in ``[0, 1]`` or uint8; numpy or torch).
        target_vector: the target style's vector ``s*`` (e.g. ``predictor.style_vector(style_image)``).
        predictor: e.g. :class:`mmstyle_ns.style.magenta.MagentaStylizer`.
    """
    scores = frame_similarities(render, target_vector, predictor)
    return sum(scores) / len(scores)


class StyleMatchReport(TypedDict):
    """Result of :func:`style_match_report`."""

    stylized: float
    """Mean style similarity of the stylized frames."""
    unstylized: float
    """Mean style similarity of the unstylized frames (the baseline)."""
    gain: float
    """``stylized - unstylized``: how much closer stylization brought the renders to the target style."""
    stylized_frames: list[float]
    """Per-frame similarities of the stylized frames."""
    unstylized_frames: list[float]
    """Per-frame similarities of the unstylized frames."""


def style_match_report(
    stylized_frames: Float[Array, "*n H W 3"],
    unstylized_frames: Float[Array, "*m H W 3"],
    target_vector: Float[Array, " D"],
    predictor: StylePredictor,
) -> StyleMatchReport:
    """Style similarity of stylized and unstylized renders and the gain ``S(stylized) - S(unstylized)``.

    Args:
        stylized_frames: renders of the stylized field (``[H, W, 3]`` or ``[N, H, W, 3]``).
        unstylized_frames: renders of the unstylized field, usually from the same cameras.
        target_vector: the target style's vector.
        predictor: style-vector predictor (see :func:`style_similarity`).
    """
    stylized = frame_similarities(stylized_frames, target_vector, predictor)
    unstylized = frame_similarities(unstylized_frames, target_vector, predictor)
    mean_stylized = sum(stylized) / len(stylized)
    mean_unstylized = sum(unstylized) / len(unstylized)
    return StyleMatchReport(
        stylized=mean_stylized,
        unstylized=mean_unstylized,
        gain=mean_stylized - mean_unstylized,
        stylized_frames=stylized,
        unstylized_frames=unstylized,
    )


def gain_share(stylized: float, unstylized: float, ceiling: float, eps: float = 1e-6) -> float:
    """Share of the ceiling's style-match gain that the stylized renders reach.

    ``(S(stylized) - S(unstylized)) / (S(ceiling) - S(unstylized))``: 0 for no gain, 1 for the ceiling's (a per-view
    2D stylization of the same frames), above 1 beyond it; NaN when the ceiling gains nothing (``<= eps``).
    """
    gain = ceiling - unstylized
    if not math.isfinite(gain) or gain <= eps:
        return float("nan")
    return (stylized - unstylized) / gain
