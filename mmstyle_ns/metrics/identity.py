"""Face identity kept by a stylization: dlib face embeddings of original and stylized views.

A stylized head should still show the same person. Each original view and its stylized counterpart (same camera)
are mapped to 128-d face descriptors with dlib's ResNet face-recognition model; the euclidean distance between the
two descriptors is the identity change. dlib's model puts images of one person within ``0.6`` of each other
(:data:`SAME_IDENTITY_THRESHOLD`), so a view whose distance stays below it keeps the identity. Lower is better.

Pipeline of one view pair (:meth:`FaceIdentity.compare`):

1. Detect the face on the **original** view only: dlib's HOG detector, retried on upsampled copies of the image
   (renders of 128-256 px show faces smaller than the detector's 80 px window), then dlib's CNN (MMOD) detector
   as a fallback. A view without a detectable face (the back of the head, a profile) is recorded as undetected
   and left out of the summary figures.
2. Fit dlib's 5-point landmark model inside that box on both images and compute both descriptors. The stylized
   view reuses the original's box because a detector often misses a heavily stylized face whose geometry is
   unchanged.

The models come from the ``face-recognition-models`` package (model files only; its Python helpers are not
used) and ``dlib`` (e.g. the prebuilt ``dlib-bin`` wheel). Both are imported when a :class:`FaceIdentity` is
built, never when this module is imported; without them :class:`IdentityModelError` says what to install.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from jaxtyping import Float, Shaped

INSTALL_HINT = "pip install dlib-bin face-recognition-models"
"""The command that installs what this metric needs."""

MODEL_PACKAGE = "face_recognition_models"
"""Importable name of the package that ships dlib's face models."""

MODEL_FILES = {
    "cnn_detector": "mmod_human_face_detector.dat",
    "landmarks": "shape_predictor_5_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
}
"""Model files used, inside the ``models`` folder of :data:`MODEL_PACKAGE`."""

SAME_IDENTITY_THRESHOLD = 0.6
"""Descriptor distance below which dlib's model judges two faces to be the same person."""

DESCRIPTOR_SIZE = 128
"""Length of a face descriptor."""

_HOG_TARGET_SIDE = 512
"""Automatic HOG upsampling stops once the image's longer side would pass this many pixels."""

_CNN_TARGET_SIDE = 256
"""The CNN fallback upsamples the image until its longer side reaches this many pixels (it costs ~0.4 s there)."""

_MAX_AUTO_UPSAMPLE = 3
"""Most doublings the automatic upsampling applies."""


class IdentityModelError(RuntimeError):
    """dlib or its face models are missing or cannot be loaded."""


RGBImage = Shaped[np.ndarray, "H W 3"]
"""One RGB image: uint8, or float in ``[0, 1]`` (values outside are clipped)."""


@dataclass(frozen=True)
class FaceBox:
    """A detected face, in pixel coordinates of the image it was found in (may reach past the image border)."""

    left: int
    """Column of the box's left edge."""
    top: int
    """Row of the box's top edge."""
    right: int
    """Column of the box's right edge."""
    bottom: int
    """Row of the box's bottom edge."""
    score: float
    """Detector confidence (HOG margin or CNN confidence; the two scales differ)."""
    detector: Literal["hog", "cnn"]
    """Which detector found the face."""
    upsample: int
    """How many times the image was doubled in size before detection."""


@dataclass(frozen=True)
class ViewIdentity:
    """Identity figures of one original/stylized view pair."""

    index: int
    """Position of the pair in the inputs."""
    detected: bool
    """Whether a face was detected on the original view; the other figures are None when not."""
    distance: float | None
    """Euclidean distance between the two face descriptors (lower is better)."""
    cosine: float | None
    """Cosine similarity of the two face descriptors (higher is better)."""
    box: FaceBox | None
    """Face box found on the original view and used for both images."""


@dataclass(frozen=True)
class IdentityReport:
    """Per-view identity figures of a set of view pairs and their summary over the views with a detected face."""

    views: list[ViewIdentity]
    """One record per view pair, in input order."""
    threshold: float = SAME_IDENTITY_THRESHOLD
    """Distance below which a view counts as keeping the identity."""

    @property
    def detected(self) -> list[ViewIdentity]:
        """The views whose original shows a detectable face."""
        return [view for view in self.views if view.detected]

    @property
    def num_detected(self) -> int:
        """Number of views with a detected face."""
        return len(self.detected)

    @property
    def num_undetected(self) -> int:
        """Number of views without a detected face (left out of the summary figures)."""
        return len(self.views) - self.num_detected

    @property
    def mean_distance(self) -> float | None:
        """Mean descriptor distance over the detected views (None when no face was detected)."""
        return _mean([view.distance for view in self.detected])

    @property
    def match_rate(self) -> float | None:
        """Share of the detected views whose distance is below :attr:`threshold` (None when none detected)."""
        views = self.detected
        if not views:
            return None
        return sum(1 for view in views if view.distance is not None and view.distance < self.threshold) / len(views)

    @property
    def mean_cosine(self) -> float | None:
        """Mean descriptor cosine similarity over the detected views (None when no face was detected)."""
        return _mean([view.cosine for view in self.detected])

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON-serialisable values: summary figures and the per-view records."""
        return {
            "threshold": self.threshold,
            "num_views": len(self.views),
            "num_detected": self.num_detected,
            "num_undetected": self.num_undetected,
            "mean_distance": self.mean_distance,
            "match_rate": self.match_rate,
            "mean_cosine": self.mean_cosine,
            "views": [asdict(view) for view in self.views],
        }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def model_folder() -> Path:
    """Folder holding dlib's face model files (see :data:`MODEL_FILES`).

    Raises:
        IdentityModelError: the model package is not installed or lacks a model file.
    """
    folder = _find_model_folder()
    if folder is None:
        raise IdentityModelError(f"the face-identity metric needs the {MODEL_PACKAGE} package: {INSTALL_HINT}")
    missing = [name for name in MODEL_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise IdentityModelError(
            f"{MODEL_PACKAGE} lacks {', '.join(missing)}; reinstall it: pip install --force-reinstall "
            "face-recognition-models"
        )
    return folder


def _find_model_folder() -> Path | None:
    """The package's ``models`` folder, located without importing the package (its ``__init__`` needs
    ``pkg_resources``, which current setuptools no longer ships)."""
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _import_dlib() -> Any:
    """The ``dlib`` module, typed loosely (it ships no type information)."""
    return importlib.import_module("dlib")


def _load_dependencies() -> tuple[Any, Path]:
    """dlib and the model folder, or one :class:`IdentityModelError` naming everything that is missing."""
    broken = ""
    try:
        dlib = _import_dlib()
    except ModuleNotFoundError:
        dlib = None
    except ImportError as err:  # installed but unloadable, e.g. a wheel built for another platform
        dlib, broken = None, str(err)
    if broken:
        raise IdentityModelError(
            f"dlib is installed but does not load ({broken}): pip install --force-reinstall dlib-bin"
        )
    folder = _find_model_folder()
    missing = [name for name, absent in (("dlib", dlib is None), (MODEL_PACKAGE, folder is None)) if absent]
    if missing:
        raise IdentityModelError(f"the face-identity metric needs {' and '.join(missing)}: {INSTALL_HINT}")
    return dlib, model_folder()


def _as_uint8(image: Any) -> Shaped[np.ndarray, "H W 3"]:
    """An RGB image (uint8, or float in ``[0, 1]``, clipped; numpy or a tensor) as the C-contiguous uint8
    ``[H, W, 3]`` array that dlib wants."""
    if hasattr(image, "detach"):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[-1] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.ascontiguousarray(array)


def _image_list(images: Any, name: str) -> list[np.ndarray]:
    """A sequence of images (or one ``[N, H, W, 3]`` array) as a list of uint8 images."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray) and images.ndim != 4:
        raise ValueError(f"{name}: expected images [N, H, W, 3] or a sequence of [H, W, 3], got {images.shape}")
    return [_as_uint8(image) for image in images]


def _doublings_within(side: int, target: int) -> int:
    """Most doublings (up to :data:`_MAX_AUTO_UPSAMPLE`) that keep ``side`` at or below ``target``."""
    levels = 0
    while levels < _MAX_AUTO_UPSAMPLE and side * 2 ** (levels + 1) <= target:
        levels += 1
    return levels


def _doublings_to_reach(side: int, target: int) -> int:
    """Fewest doublings (up to :data:`_MAX_AUTO_UPSAMPLE`) that bring ``side`` to at least ``target``."""
    levels = 0
    while levels < _MAX_AUTO_UPSAMPLE and side * 2**levels < target:
        levels += 1
    return levels


class FaceIdentity:
    """dlib's face detectors, 5-point landmark model and ResNet face descriptor, loaded once.

    Args:
        max_upsample: Most doublings of the image the HOG detector tries (it tries 0, 1, ... and stops at the first
            that finds a face). None picks them from the image size: up to a longer side of 512 px.
        cnn_fallback: Run dlib's CNN face detector when HOG finds nothing. It finds more turned faces (up to
            ~45 degrees of yaw instead of ~40) but costs ~0.4 s per 128-256 px image, even when it finds nothing.
        num_jitters: Descriptor jitters (dlib's ``num_jitters``); 0 computes one descriptor per face, more average
            over randomly jittered crops (slower, slightly more stable).

    Raises:
        IdentityModelError: dlib or the model package is missing, or a model file cannot be loaded.
    """

    def __init__(self, max_upsample: int | None = None, cnn_fallback: bool = True, num_jitters: int = 0) -> None:
        if max_upsample is not None and max_upsample < 0:
            raise ValueError(f"max_upsample must be non-negative, got {max_upsample}")
        if num_jitters < 0:
            raise ValueError(f"num_jitters must be non-negative, got {num_jitters}")
        self.max_upsample = max_upsample
        self.cnn_fallback = cnn_fallback
        self.num_jitters = num_jitters
        dlib, folder = _load_dependencies()
        self._dlib = dlib
        try:
            self._hog = dlib.get_frontal_face_detector()
            self._cnn = dlib.cnn_face_detection_model_v1(str(folder / MODEL_FILES["cnn_detector"]))
            self._landmarks = dlib.shape_predictor(str(folder / MODEL_FILES["landmarks"]))
            self._descriptor = dlib.face_recognition_model_v1(str(folder / MODEL_FILES["descriptor"]))
        except RuntimeError as err:
            raise IdentityModelError(
                f"could not load dlib's face models ({err}); reinstall them: pip install --force-reinstall "
                "face-recognition-models"
            ) from None

    def detect(self, image: RGBImage) -> FaceBox | None:
        """The most confident face on an image, or None when there is none.

        HOG runs on the image and, while it finds nothing, on copies doubled in size (up to ``max_upsample``
        times); the most confident box of the first size that finds a face wins. Then, if enabled, the CNN detector
        runs once, on the image doubled until its longer side reaches 256 px.

        Args:
            image: RGB ``[H, W, 3]``, uint8 or float in ``[0, 1]``.
        """
        pixels = _as_uint8(image)
        side = max(pixels.shape[:2])
        hog_levels = self.max_upsample
        if hog_levels is None:
            hog_levels = _doublings_within(side, _HOG_TARGET_SIDE)
        for upsample in range(hog_levels + 1):
            rects, scores, _ = self._hog.run(pixels, upsample, 0.0)
            if len(rects):
                best = int(np.argmax(scores))
                return _box(rects[best], float(scores[best]), "hog", upsample)
        if not self.cnn_fallback:
            return None
        upsample = _doublings_to_reach(side, _CNN_TARGET_SIDE)
        if self.max_upsample is not None:
            upsample = min(upsample, self.max_upsample)
        found = self._cnn(pixels, upsample)
        if not len(found):
            return None
        best = max(found, key=lambda detection: detection.confidence)
        return _box(best.rect, float(best.confidence), "cnn", upsample)

    def embed(self, image: RGBImage, box: FaceBox) -> Float[np.ndarray, " 128"]:
        """The 128-d face descriptor of the face inside ``box`` (landmarks fitted on ``image`` itself).

        Args:
            image: RGB ``[H, W, 3]``, uint8 or float in ``[0, 1]``.
            box: Face box, e.g. from :meth:`detect` on this image or on another view from the same camera.
        """
        pixels = _as_uint8(image)
        rect = self._dlib.rectangle(box.left, box.top, box.right, box.bottom)
        shape = self._landmarks(pixels, rect)
        descriptor = self._descriptor.compute_face_descriptor(pixels, shape, self.num_jitters)
        return np.asarray(descriptor, dtype=np.float64).reshape(DESCRIPTOR_SIZE)

    def compare(
        self,
        originals: Sequence[RGBImage] | Shaped[np.ndarray, "N H W 3"],
        stylized: Sequence[RGBImage] | Shaped[np.ndarray, "N H W 3"],
        threshold: float = SAME_IDENTITY_THRESHOLD,
    ) -> IdentityReport:
        """Identity change of every original/stylized view pair.

        The face is detected on the original view only and its box is used for both images; a view without a
        detectable face is recorded as undetected.

        Args:
            originals: Views before stylization (``[H, W, 3]`` each, uint8 or float in ``[0, 1]``).
            stylized: The same views after stylization, one per original and of the same size.
            threshold: Distance below which a view counts as keeping the identity.

        Raises:
            ValueError: the two sets differ in length or a pair differs in size.
        """
        before = _image_list(originals, "originals")
        after = _image_list(stylized, "stylized")
        if len(before) != len(after):
            raise ValueError(f"got {len(before)} original views but {len(after)} stylized views")
        views = []
        for index, (original, styled) in enumerate(zip(before, after, strict=True)):
            if original.shape != styled.shape:
                raise ValueError(f"view {index}: original is {original.shape[:2]}, stylized is {styled.shape[:2]}")
            box = self.detect(original)
            if box is None:
                views.append(ViewIdentity(index, False, None, None, None))
                continue
            a, b = self.embed(original, box), self.embed(styled, box)
            views.append(ViewIdentity(index, True, float(np.linalg.norm(a - b)), _cosine(a, b), box))
        return IdentityReport(views, threshold)


def _box(rect: Any, score: float, detector: Literal["hog", "cnn"], upsample: int) -> FaceBox:
    return FaceBox(int(rect.left()), int(rect.top()), int(rect.right()), int(rect.bottom()), score, detector, upsample)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b) / norms if norms > 0.0 and math.isfinite(norms) else 0.0


@functools.cache
def default_face_identity() -> FaceIdentity:
    """A shared :class:`FaceIdentity` with default settings, loaded on first use."""
    return FaceIdentity()


def identity_report(
    originals: Sequence[RGBImage] | Shaped[np.ndarray, "N H W 3"],
    stylized: Sequence[RGBImage] | Shaped[np.ndarray, "N H W 3"],
    threshold: float = SAME_IDENTITY_THRESHOLD,
) -> IdentityReport:
    """:meth:`FaceIdentity.compare` with the shared default models (see :func:`default_face_identity`)."""
    return default_face_identity().compare(originals, stylized, threshold)
