"""The interface of the 2D stylizers that supervise MM-NeRF (Magenta by default, AdaIN with user weights)."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np
from jaxtyping import Float


def as_float_image(image: Any, what: str = "image") -> Float[np.ndarray, "H W 3"]:
    """An RGB image as float32 ``[H, W, 3]`` in ``[0, 1]`` (uint8 is scaled by 1/255, alpha is dropped).

    Raises:
        ValueError: the array is not ``[H, W, 3]`` or ``[H, W, 4]`` or is empty.
    """
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{what} must be an RGB array [H, W, 3], got shape {tuple(array.shape)}")
    array = array[..., :3]
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


class Stylizer(abc.ABC):
    """Arbitrary 2D style transfer: a style image becomes a style vector; content images are rendered in a style.

    Subclasses provide :meth:`style_vector` and :meth:`_stylize_one`; the batching and checks live here.
    """

    vector_dim: int
    """Length of a style vector."""

    @property
    @abc.abstractmethod
    def identifier(self) -> str:
        """Identifies the model and its weights, e.g. for cache keys."""

    @abc.abstractmethod
    def style_vector(self, image: Float[np.ndarray, "H W 3"]) -> Float[np.ndarray, " D"]:
        """The style vector of one style image."""

    @abc.abstractmethod
    def _stylize_one(
        self, image: Float[np.ndarray, "H W 3"], vector: Float[np.ndarray, " D"], strength: float
    ) -> Float[np.ndarray, "H W 3"]:
        """One content image (float32 in ``[0, 1]``) rendered in a style, same size."""

    def style_vectors(self, images: Sequence[Float[np.ndarray, "H W 3"]]) -> Float[np.ndarray, "S D"]:
        """Style vectors of several style images (each may have its own size)."""
        if len(images) == 0:
            return np.zeros((0, self.vector_dim), dtype=np.float32)
        return np.stack([self.style_vector(image) for image in images])

    def stylize(
        self,
        content: Float[np.ndarray, "N H W 3"],
        vector: Float[np.ndarray, " D"],
        strength: float = 1.0,
    ) -> Float[np.ndarray, "N H W 3"]:
        """Renders content images in the style of a style vector.

        Args:
            content: content images in ``[0, 1]`` (a single ``[H, W, 3]`` image is accepted too).
            vector: style vector from :meth:`style_vector`.
            strength: in ``[0, 1]``; how much of the style to apply (each stylizer says how it blends).

        Returns:
            Stylized images in ``[0, 1]``, float32, same shape as ``content``.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        images = np.asarray(content)
        single = images.ndim == 3
        if single:
            images = images[None]
        if images.ndim != 4:
            raise ValueError(f"content must be [N, H, W, 3] (or one [H, W, 3] image), got {tuple(images.shape)}")
        style = np.asarray(vector, dtype=np.float32).reshape(-1)
        if style.shape != (self.vector_dim,):
            raise ValueError(f"style vector must have {self.vector_dim} values, got shape {np.shape(vector)}")
        result = np.stack(
            [self._stylize_one(as_float_image(image, "content image"), style, strength) for image in images]
        ).astype(np.float32)
        return result[0] if single else result
