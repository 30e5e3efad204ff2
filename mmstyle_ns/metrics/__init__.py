"""Evaluation metrics for stylized radiance fields: multi-view consistency, style match and contact sheets.

Design:

* :mod:`~mmstyle_ns.metrics.consistency` measures how consistent rendered views are with each other. Stylization
  papers warp view ``i`` into view ``i + gap`` with optical flow and report the masked error (short range:
  ``gap = 1``, long range: e.g. ``gap = 7``); a radiance field renders depth, so the warp here comes from the
  rendered depth and the known cameras instead of an estimated flow. Lower is better.
* :mod:`~mmstyle_ns.metrics.style_match` measures how close the renders are to the target style: cosine
  similarity of Magenta style vectors (or those of any predictor with a ``style_vector`` method). Higher is
  better; the report gives the gain over the unstylized renders.
* :mod:`~mmstyle_ns.metrics.clip_space` holds the CLIP-space figures every method reports: the directional
  similarity of an edit, image-text similarity, CLIP R-precision (a vote of each object's views) and the agreement
  of text styles with the images made from them. They take embeddings, so any open_clip model measures.
* :mod:`~mmstyle_ns.metrics.sheets` composes images into labelled grids for visual comparison.

Importing this package loads no model and no nerfstudio module; everything works on plain arrays (numpy or
torch), so the eval command and the benchmarks can feed it renders from any source.
"""

from mmstyle_ns.metrics.clip_space import (
    DirectionalScore,
    ModalityAgreement,
    RPrecision,
    directional_similarity,
    image_text_similarity,
    modality_agreement,
    r_precision,
)
from mmstyle_ns.metrics.consistency import WarpedError, camera_arrays, unproject, warp, warped_error
from mmstyle_ns.metrics.sheets import contact_sheet, save_png
from mmstyle_ns.metrics.style_match import StyleMatchReport, StylePredictor, style_match_report, style_similarity

__all__ = [
    "DirectionalScore",
    "ModalityAgreement",
    "RPrecision",
    "directional_similarity",
    "image_text_similarity",
    "modality_agreement",
    "r_precision",
    "StyleMatchReport",
    "StylePredictor",
    "WarpedError",
    "camera_arrays",
    "contact_sheet",
    "save_png",
    "style_match_report",
    "style_similarity",
    "unproject",
    "warp",
    "warped_error",
]
