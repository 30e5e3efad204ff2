"""Data-parallel training over torch.distributed (nerfstudio's ``--machine.num-devices``) with growing grids.

nerfstudio wraps a multi-device model in ``DistributedDataParallel``, which fixes its gradient buckets to the
parameters that exist when it is built. Our grids are replaced by larger ones at every coarse-to-fine step and
the stylization stage adds and freezes parameters, so DDP would go on reducing parameters that no longer exist
and never reduce the new ones. Instead, our pipelines do what DDP does at the one place that always sees the
current parameters — just before the optimizers step:

* :func:`average_gradients` averages every gradient over the processes (one flat all-reduce), so each process
  takes the step of the whole, larger batch;
* :func:`broadcast_module` copies rank 0's parameters and buffers to the other processes when the model is built
  and whenever parameters are created (random initialisations differ per process, as nerfstudio seeds each
  process differently so that their ray batches differ).

Outside a process group (the usual single-device run) every function here is a no-op.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes training together (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Overwrites every parameter and buffer of ``module`` with process ``src``'s values (in place)."""
    if world_size() == 1:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        if tensor.numel() > 0:  # empty tables (a style without residual grid) hold nothing to send
            dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def average_gradients(params: Iterable[Tensor]) -> None:
    """Replaces each parameter's gradient by its mean over the processes, in one all-reduce.

    A parameter takes part when any process has a gradient for it (a missing one counts as zero there); a
    parameter without a gradient on every process keeps ``grad = None``, so optimizers skip it exactly as they
    would on one device. Every process must pass the same parameters in the same order.
    """
    size = world_size()
    if size == 1:
        return
    unique: dict[int, Tensor] = {}
    for param in params:
        unique.setdefault(id(param), param)
    tensors = list(unique.values())
    if not tensors:
        return
    device = tensors[0].device
    has_grad = torch.tensor([p.grad is not None for p in tensors], dtype=torch.float32, device=device)
    dist.all_reduce(has_grad)
    active = [p for p, flag in zip(tensors, has_grad.tolist(), strict=True) if flag > 0]
    if not active:
        return
    for param in active:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([p.grad.reshape(-1) for p in active])  # type: ignore[union-attr]
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for param in active:
        grad = param.grad
        assert grad is not None
        count = grad.numel()
        grad.copy_(flat[offset : offset + count].view_as(grad))
        offset += count
