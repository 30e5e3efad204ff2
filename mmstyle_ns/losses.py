"""Losses shared by the methods."""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor


def _exclusive_cumsum_per_ray(values: Float[Tensor, " S"], ray_indices: Int[Tensor, " S"]) -> Float[Tensor, " S"]:
    """Sum of ``values`` over the earlier samples of the same ray (samples sorted by ray)."""
    total = torch.cumsum(values.double(), dim=0)
    exclusive = total - values.double()
    is_first = torch.ones_like(ray_indices, dtype=torch.bool)
    is_first[1:] = ray_indices[1:] != ray_indices[:-1]
    positions = torch.arange(len(ray_indices), device=ray_indices.device)
    first_index = torch.cummax(torch.where(is_first, positions, 0), 0)[0]
    return (exclusive - exclusive[first_index]).to(values.dtype)


def packed_distortion_loss(
    weights: Float[Tensor, " S"],
    t_starts: Float[Tensor, " S"],
    t_ends: Float[Tensor, " S"],
    ray_indices: Int[Tensor, " S"],
    num_rays: int,
) -> Float[Tensor, ""]:
    """Distortion loss of mip-NeRF 360 (Barron et al. 2022, Eq. 15) for packed samples sorted by ray, averaged
    over rays:

    ``L = sum_{i,j} w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 (t_end_i - t_start_i)``, with ``m`` the interval
    midpoints, computed in linear time as ``2 sum_i w_i (m_i W_i - M_i) + 1/3 sum_i w_i^2 delta_i``, where
    ``W_i`` and ``M_i`` are the sums of ``w_j`` and ``w_j m_j`` over the earlier samples ``j < i`` of the ray.
    It is small when each ray's weight sits in one short stretch (a sharp surface) and large when it is spread.
    """
    if weights.numel() == 0:
        return weights.sum()
    mids = (t_starts + t_ends) / 2
    before_w = _exclusive_cumsum_per_ray(weights, ray_indices)
    before_wm = _exclusive_cumsum_per_ray(weights * mids, ray_indices)
    pairs = 2.0 * (weights * (mids * before_w - before_wm)).sum()
    own = (weights.square() * (t_ends - t_starts)).sum() / 3.0
    return (pairs + own) / max(num_rays, 1)
