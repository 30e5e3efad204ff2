"""Tests of the CLIP-space metrics (mmstyle_ns.metrics.clip_space) on hand-made and random embeddings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmstyle_ns.metrics.clip_space import (
    directional_similarity,
    image_text_similarity,
    modality_agreement,
    r_precision,
)


def _basis(dim: int = 6) -> torch.Tensor:
    """Orthonormal unit vectors ``e_0 .. e_{dim-1}`` as rows."""
    return torch.eye(dim)


def _random_unit(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


def _at_angle(degrees: float, dim: int = 4) -> torch.Tensor:
    """The unit vector ``cos(a) e_0 + sin(a) e_1``."""
    vector = torch.zeros(dim)
    vector[0], vector[1] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return vector


# ---------------------------------------------------------------- directional similarity


def test_directional_unedited_views_are_undefined_and_score_zero():
    """Identical source and edited images leave every view undefined, scored 0 without NaN."""
    images = _random_unit(4, 8)
    text = _random_unit(2, 8, seed=1)
    score = directional_similarity(images, images.clone(), text[0], text[1])
    assert score.undefined == 4
    assert score.per_view == [0.0, 0.0, 0.0, 0.0]
    assert score.mean == 0.0 and not math.isnan(score.mean)


def test_directional_equal_prompts_are_undefined():
    """Equal source and target prompts leave every (edited) view undefined, scored 0."""
    source, edited = _random_unit(3, 8), _random_unit(3, 8, seed=1)
    text = _random_unit(8, seed=2)
    score = directional_similarity(source, edited, text, text.clone())
    assert score.undefined == 3
    assert score.per_view == [0.0, 0.0, 0.0]
    assert score.mean == 0.0


def test_directional_parallel_antiparallel_orthogonal_and_a_half():
    """The image change along the text change scores 1, against it -1, across it 0; e1-e0 vs e2-e0 scores 1/2."""
    e = _basis()
    one = e[0:1]
    assert directional_similarity(one, e[1:2], e[0], e[1]).per_view == pytest.approx([1.0])
    assert directional_similarity(one, e[1:2], e[1], e[0]).per_view == pytest.approx([-1.0])
    assert directional_similarity(one, e[1:2], e[2], e[3]).per_view == pytest.approx([0.0], abs=1e-7)
    # cos(e1 - e0, e2 - e0) = 1 / (sqrt(2) sqrt(2))
    assert directional_similarity(one, e[1:2], e[0], e[2]).per_view == pytest.approx([0.5])
    # Parallel chords of the unit circle of different lengths (100->80 deg and 150->30 deg both run along e_0):
    # the score is a cosine, not a dot product.
    short = directional_similarity(_at_angle(100)[None], _at_angle(80)[None], _at_angle(150), _at_angle(30))
    assert short.per_view == pytest.approx([1.0])
    assert directional_similarity(one, e[1:2], e[0], e[1]).undefined == 0


def test_directional_per_view_list_and_mean():
    """One score per view; an unedited view counts 0 in the mean and once in ``undefined``."""
    e = _basis()
    source = torch.stack([e[0], e[2], e[0]])
    edited = torch.stack([e[1], e[2], e[2]])  # parallel, unedited, half-way
    score = directional_similarity(source, edited, e[0], e[1])
    assert len(score.per_view) == 3
    assert score.per_view == pytest.approx([1.0, 0.0, 0.5])
    assert score.mean == pytest.approx(0.5)
    assert score.undefined == 1


def test_directional_one_text_broadcasts_like_per_view_texts():
    """One source/target text gives the same scores as that text repeated for every view."""
    source, edited = _random_unit(5, 8), _random_unit(5, 8, seed=1)
    src_text, tgt_text = _random_unit(8, seed=2), _random_unit(8, seed=3)
    one = directional_similarity(source, edited, src_text, tgt_text)
    each = directional_similarity(source, edited, src_text.expand(5, 8), tgt_text.expand(5, 8))
    assert one.per_view == pytest.approx(each.per_view, abs=1e-6)
    assert one.mean == pytest.approx(each.mean, abs=1e-6)
    # Per-view texts really are per view: changing one view's target changes only that view.
    other = tgt_text.expand(5, 8).clone()
    other[2] = _random_unit(8, seed=4)
    changed = directional_similarity(source, edited, src_text.expand(5, 8), other)
    assert changed.per_view[:2] == pytest.approx(one.per_view[:2]) and changed.per_view[3:] == pytest.approx(
        one.per_view[3:]
    )
    assert changed.per_view[2] != pytest.approx(one.per_view[2])


def test_directional_shape_mismatch_raises():
    """Source and edited image embeddings of different shapes, or not ``[V, D]``, raise ValueError."""
    text = _random_unit(8)
    with pytest.raises(ValueError, match="directional_similarity"):
        directional_similarity(_random_unit(3, 8), _random_unit(4, 8), text, text)
    with pytest.raises(ValueError, match="directional_similarity"):
        directional_similarity(_random_unit(8), _random_unit(8, seed=1), text, text)


# ---------------------------------------------------------------- image-text similarity


def test_image_text_similarity_matches_torch_cosine():
    """The per-pair score is torch's cosine (and the dot product of unit vectors)."""
    images, texts = _random_unit(6, 8), _random_unit(6, 8, seed=1)
    sims = image_text_similarity(images, texts)
    assert sims.shape == (6,)
    torch.testing.assert_close(sims, F.cosine_similarity(images, texts, dim=-1))
    torch.testing.assert_close(sims, (images * texts).sum(-1), atol=1e-6, rtol=0)
    assert image_text_similarity(images, images) == pytest.approx([1.0] * 6)


def test_image_text_similarity_broadcasts_one_text():
    """One text is compared with every image."""
    images, text = _random_unit(4, 8), _random_unit(8, seed=1)
    torch.testing.assert_close(image_text_similarity(images, text), images @ text, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="image_text_similarity"):
        image_text_similarity(text, text)


# ---------------------------------------------------------------- R-precision


def _noisy_objects(prompts: torch.Tensor, truth: list[int], counts: list[int], noise: float) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [
        F.normalize(prompts[t] + noise * torch.randn(n, prompts.shape[1], generator=generator), dim=-1)
        for t, n in zip(truth, counts, strict=True)
    ]


def test_r_precision_invariant_to_prompt_order():
    """Permuting the prompt pool (truth remapped) keeps top-1 and view top-1 and maps the answers alike."""
    prompts = _random_unit(6, 16, seed=3)
    truth = [0, 1, 2, 3, 4, 5, 2, 4]
    views = _noisy_objects(prompts, truth, [3, 5, 1, 4, 2, 6, 3, 5], noise=0.45)
    base = r_precision(views, prompts, truth)
    assert 0.0 < base.view_top1 < 1.0  # noisy enough that some views miss: the check is not vacuous
    assert 0.0 < base.top1 <= 1.0
    perm = torch.tensor([4, 2, 5, 0, 3, 1])  # new prompt i is old prompt perm[i]
    new_index = {int(old): new for new, old in enumerate(perm)}
    moved = r_precision(views, prompts[perm], [new_index[t] for t in truth])
    assert moved.top1 == base.top1
    assert moved.view_top1 == base.view_top1
    assert moved.answers == [new_index[a] for a in base.answers]


def test_r_precision_majority_vote_beats_wrong_minority():
    """Three views on the own prompt outvote two on another one; view top-1 counts single views."""
    prompts = _basis(4)
    views = [torch.stack([prompts[0], prompts[0], prompts[1], prompts[0], prompts[1]])]
    result = r_precision(views, prompts, [0])
    assert result.answers == [0]
    assert result.top1 == 1.0
    assert result.view_top1 == pytest.approx(3 / 5)
    flipped = r_precision([torch.stack([prompts[1], prompts[0], prompts[1], prompts[2], prompts[1]])], prompts, [0])
    assert flipped.answers == [1] and flipped.top1 == 0.0


def test_r_precision_tie_goes_to_larger_summed_similarity():
    """A 1-1 vote goes to the prompt with the larger similarity summed over the object's views, whichever index."""
    prompts = torch.stack([_at_angle(0), _at_angle(90)])
    # view at 80 deg picks prompt 1 (sims 0.17 / 0.98), view at 40 deg picks prompt 0 (0.77 / 0.64): sums 0.94 / 1.63
    toward_second = [torch.stack([_at_angle(80), _at_angle(40)])]
    assert r_precision(toward_second, prompts, [1]).answers == [1]
    # mirrored: view at 10 deg picks 0 strongly, view at 50 deg picks 1 weakly: sums 1.63 / 0.94
    toward_first = [torch.stack([_at_angle(50), _at_angle(10)])]
    assert r_precision(toward_first, prompts, [0]).answers == [0]
    both = r_precision(toward_second + toward_first, prompts, [1, 0])
    assert both.answers == [1, 0] and both.top1 == 1.0 and both.view_top1 == pytest.approx(0.5)


def test_r_precision_objects_with_different_view_counts():
    """View top-1 pools the views of all objects (not a mean of per-object shares)."""
    prompts = _basis(3)
    views = [prompts[0:1], torch.stack([prompts[2]] * 3), torch.stack([prompts[1], prompts[1], prompts[0]])]
    result = r_precision(views, prompts, [0, 1, 1])
    assert result.answers == [0, 2, 1]
    assert result.top1 == pytest.approx(2 / 3)
    assert result.view_top1 == pytest.approx(3 / 7)  # 1 + 0 + 2 hits of 7 views


def test_r_precision_rejects_bad_input():
    """A truth index outside the pool, a truth list of another length, or an object without views raise."""
    prompts = _basis(3)
    views = [prompts[0:2]]
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        r_precision(views, prompts, [3])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        r_precision(views, prompts, [-1])
    with pytest.raises(ValueError, match="2 true prompts"):
        r_precision(views, prompts, [0, 1])
    with pytest.raises(ValueError, match="needs views"):
        r_precision([torch.zeros(0, 6)], prompts, [0])
    with pytest.raises(ValueError, match="needs views"):
        r_precision([prompts[0]], prompts, [0])


def test_r_precision_is_a_vote_not_an_averaged_cosine():
    """Two views weakly preferring A outvote one strongly preferring B, though the mean cosine prefers B."""
    prompts = torch.stack([_at_angle(0), _at_angle(90)])  # A, B
    views = torch.stack([_at_angle(44), _at_angle(44), _at_angle(90)])
    averaged_answer = int((views @ prompts.T).mean(dim=0).argmax())
    assert averaged_answer == 1  # mean sims: A 0.48, B 0.80
    result = r_precision([views], prompts, [0])
    assert result.answers == [0]
    assert result.top1 == 1.0
    assert result.view_top1 == pytest.approx(2 / 3)


# ---------------------------------------------------------------- modality agreement


def test_modality_agreement_aligned_pairs():
    """Texts equal to their images: matched 1, retrieval 1, unrelated the mean off-diagonal cosine."""
    texts = _random_unit(5, 16)
    result = modality_agreement(texts, texts.clone())
    assert result.matched == pytest.approx(1.0)
    assert result.retrieval == 1.0
    sims = texts @ texts.T
    assert result.unrelated == pytest.approx(float(sims[~torch.eye(5, dtype=torch.bool)].mean()), abs=1e-6)
    assert result.unrelated < 0.9
    assert result.as_dict() == {"matched": result.matched, "unrelated": result.unrelated, "retrieval": 1.0}


def test_modality_agreement_shuffled_pairs():
    """Pairing each text with another text's image lowers matched and retrieval (exact on an orthonormal set)."""
    texts = _basis(8)[:4]
    aligned = modality_agreement(texts, texts)
    shuffled = modality_agreement(texts, texts.roll(1, dims=0))
    assert (aligned.matched, aligned.unrelated, aligned.retrieval) == pytest.approx((1.0, 0.0, 1.0))
    assert shuffled.matched == pytest.approx(0.0)
    assert shuffled.unrelated == pytest.approx(1 / 3)  # each image equals one of the three other texts
    assert shuffled.retrieval == 0.0
    # A partial shuffle (swap two of four pairs) halves retrieval.
    partial = modality_agreement(texts, texts[[1, 0, 2, 3]])
    assert partial.retrieval == pytest.approx(0.5)
    assert partial.matched == pytest.approx(0.5)


def test_modality_agreement_needs_two_matching_pairs():
    """One pair, or texts and images of different shapes, raise ValueError."""
    texts = _random_unit(3, 8)
    with pytest.raises(ValueError, match="at least two"):
        modality_agreement(texts[:1], texts[:1])
    with pytest.raises(ValueError, match="modality_agreement"):
        modality_agreement(texts, texts[:2])
