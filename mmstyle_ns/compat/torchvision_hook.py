"""Lets ``import torchvision`` succeed on CPU-only PyTorch when torchvision's compiled ops cannot load.

The only torchvision wheels that resolve next to a CPU build of torch link ``libtorch_cuda``. Their ``_C``
extension then fails to load, torchvision's Python side carries on, and ``torchvision/_meta_registrations.py``
raises ``RuntimeError: operator torchvision::nms does not exist`` while registering fake kernels for ops
that were never defined. nerfstudio, open_clip, transformers and diffusers all import torchvision, so the
whole stack would be unusable.

:func:`install` puts a meta-path finder in front of the import system. The first time ``torchvision`` is
imported it tries to load the real ``_C`` library; only if that fails does it define the schemas of the
ops torchvision registers fake kernels for, so the pure-Python parts (transforms, ``make_grid``, model
definitions) work. The ops themselves (``nms``, ``roi_align``, ...) stay unavailable and raise if called.
Nothing is imported at interpreter start-up: ``torch`` is only touched when torchvision is imported.

A one-line ``.pth`` file written into the environment's ``site-packages`` by ``mmstyle-setup-env`` calls
:func:`install` in every process, tests included.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

# Schemas of the torchvision ops that ``torchvision/_meta_registrations.py`` registers fake kernels for.
_OP_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
    "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, "
    "SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)

# Keeps the op library alive: dropping a ``torch.library.Library`` removes its definitions.
_LIBRARY: Any = None
# Why the compiled ops could not be loaded, or ``None`` when they loaded (or torchvision was never imported).
load_error: str | None = None


def _prepare_torchvision(package_dir: Path) -> None:
    """Loads torchvision's compiled ops, or defines their schemas when the library cannot be loaded."""
    global _LIBRARY, load_error
    import torch

    libs = sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd"))
    if libs:
        try:
            torch.ops.load_library(str(libs[0]))
            return
        except (OSError, RuntimeError) as err:
            load_error = str(err)
    else:
        load_error = "torchvision ships no compiled _C library"
    try:
        torch.ops.torchvision.nms  # noqa: B018 - defined already by someone else
        return
    except (AttributeError, RuntimeError):
        pass
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for schema in _OP_SCHEMAS:
        _LIBRARY.define(schema)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`_prepare_torchvision` once, right before ``torchvision`` itself is imported."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.submodule_search_locations:
            _prepare_torchvision(Path(next(iter(spec.submodule_search_locations))))
        return spec


def install() -> None:
    """Installs the import hook (idempotent; a no-op once torchvision has been imported)."""
    if "torchvision" in sys.modules:
        return
    if any(isinstance(finder, _TorchvisionFinder) for finder in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
