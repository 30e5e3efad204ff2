"""CLIP-space metrics of the field: directional similarity, image-text similarity, R-precision, modality agreement.

All functions take L2-normalised embeddings (``[N, D]`` tensors, e.g. from
:meth:`mmstyle_ns.clip.loader.ClipModel.encode_images` / ``encode_texts``), so the same code measures with any
open_clip model: the toy CLIP offline, ViT-B/32 or ViT-L/14 weights for the published figures.

* :func:`directional_similarity` — the Instruct-NeRF2NeRF / ED-NeRF edit metric: per view, the cosine between the
  change of image embedding (source render -> edited render) and the change of text embedding (source prompt ->
  target prompt). Undefined when either change is zero (an unedited view, or equal prompts); such views score 0
  and are counted in ``undefined``.
* :func:`image_text_similarity` — the plain cosine between each image and its text.
* :func:`r_precision` — CLIP R-precision as the TuneMV3D supplement uses it: every view of an object retrieves the
  most similar prompt of a candidate pool; the object's answer is the prompt most of its views retrieve (ties go
  to the prompt with the larger summed similarity over the object's views); top-1 is the share of objects whose
  answer is their own prompt.
* :func:`modality_agreement` — MM-NeRF's claim that a text style and the image made from it land together in the
  embedding space: the similarity of matched text/image pairs against that of unrelated pairs, and how often an
  image retrieves its own text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

_EPS = 1e-6


def _check_pairs(name: str, *tensors: Tensor) -> None:
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or tensors[0].ndim != 2:
        raise ValueError(f"{name}: expected embeddings of one shape [N, D], got {[tuple(t.shape) for t in tensors]}")


@dataclass(frozen=True)
class DirectionalScore:
    """CLIP directional similarity of an edit over a set of views."""

    mean: float
    """Mean over views (undefined views count as 0)."""
    per_view: list[float]
    """Score of every view."""
    undefined: int
    """Views whose image change or text change was zero (scored 0)."""


def directional_similarity(
    source_images: Float[Tensor, "V D"],
    edited_images: Float[Tensor, "V D"],
    source_text: Float[Tensor, " D"] | Float[Tensor, "V D"],
    target_text: Float[Tensor, " D"] | Float[Tensor, "V D"],
) -> DirectionalScore:
    """``cos(E_I(edited) - E_I(source), E_T(target) - E_T(source))`` per view.

    Args:
        source_images: embeddings of the views before the edit.
        edited_images: embeddings of the same views after it.
        source_text: embedding of the source prompt (one, or one per view).
        target_text: embedding of the target prompt (one, or one per view).
    """
    _check_pairs("directional_similarity", source_images, edited_images)
    for name, text in (("source_text", source_text), ("target_text", target_text)):
        if text.shape not in ((source_images.shape[1],), tuple(source_images.shape)):
            raise ValueError(f"directional_similarity: {name} must be [D] or [V, D], got {tuple(text.shape)}")
    d_image = edited_images.float() - source_images.float()
    d_text = (target_text.float() - source_text.float()).expand_as(d_image)
    norms = d_image.norm(dim=-1) * d_text.norm(dim=-1)
    defined = (d_image.norm(dim=-1) > _EPS) & (d_text.norm(dim=-1) > _EPS)
    score = torch.where(defined, (d_image * d_text).sum(-1) / norms.clamp_min(_EPS * _EPS), torch.zeros_like(norms))
    return DirectionalScore(float(score.mean()) if len(score) else 0.0, score.tolist(), int((~defined).sum()))


def image_text_similarity(
    images: Float[Tensor, "N D"], texts: Float[Tensor, " D"] | Float[Tensor, "N D"]
) -> Float[Tensor, " N"]:
    """Cosine between each image embedding and its text embedding (one text for all, or one each)."""
    if images.ndim != 2:
        raise ValueError(f"image_text_similarity: expected image embeddings [N, D], got {tuple(images.shape)}")
    texts = texts.float().expand_as(images)
    return torch.nn.functional.cosine_similarity(images.float(), texts, dim=-1)


@dataclass(frozen=True)
class RPrecision:
    """CLIP R-precision (top-1) of a set of objects, each seen in several views."""

    top1: float
    """Share of objects whose voted prompt is their own."""
    answers: list[int]
    """The prompt index each object's views voted for."""
    view_top1: float
    """Share of single views that retrieve their object's prompt (for reference)."""


def r_precision(
    views: Sequence[Float[Tensor, "V D"]], prompts: Float[Tensor, "P D"], truth: Sequence[int]
) -> RPrecision:
    """Retrieval of each object's prompt from ``prompts`` by a vote of its views.

    Args:
        views: one ``[V, D]`` embedding tensor per object (``V`` may differ between objects).
        prompts: embeddings of the candidate prompts.
        truth: index into ``prompts`` of each object's own prompt.
    """
    if len(views) != len(truth):
        raise ValueError(f"r_precision: {len(views)} objects but {len(truth)} true prompts")
    if any(not 0 <= t < len(prompts) for t in truth):
        raise ValueError(f"r_precision: true prompt indices must lie in [0, {len(prompts)})")
    answers, hits, total = [], 0, 0
    for emb, own in zip(views, truth, strict=True):
        if emb.ndim != 2 or len(emb) == 0:
            raise ValueError(f"r_precision: every object needs views [V, D], got {tuple(emb.shape)}")
        sims = emb.float() @ prompts.float().T  # [V, P]
        picks = sims.argmax(dim=1)
        votes = torch.bincount(picks, minlength=len(prompts))
        tied = torch.nonzero(votes == votes.max()).flatten()
        answer = int(tied[sims[:, tied].sum(dim=0).argmax()])
        answers.append(answer)
        hits += int((picks == own).sum())
        total += len(picks)
    top1 = sum(a == t for a, t in zip(answers, truth, strict=True)) / max(1, len(truth))
    return RPrecision(top1, answers, hits / max(1, total))


@dataclass(frozen=True)
class ModalityAgreement:
    """How well texts and the images made from them agree in the embedding space."""

    matched: float
    """Mean cosine of each text with its own image."""
    unrelated: float
    """Mean cosine of each text with the other texts' images."""
    retrieval: float
    """Share of images whose most similar text (among all given) is their own."""

    def as_dict(self) -> dict[str, float]:
        """The figures as a plain dict (for JSON)."""
        return asdict(self)


def modality_agreement(texts: Float[Tensor, "S D"], images: Float[Tensor, "S D"]) -> ModalityAgreement:
    """Matched vs. unrelated text/image similarity; ``texts[i]`` was turned into ``images[i]``."""
    _check_pairs("modality_agreement", texts, images)
    if len(texts) < 2:
        raise ValueError("modality_agreement needs at least two text/image pairs (unrelated pairs are the others)")
    sims = images.float() @ texts.float().T  # [S images, S texts]
    eye = torch.eye(len(texts), dtype=torch.bool, device=sims.device)
    retrieval = float((sims.argmax(dim=1) == torch.arange(len(texts), device=sims.device)).float().mean())
    return ModalityAgreement(float(sims[eye].mean()), float(sims[~eye].mean()), retrieval)
