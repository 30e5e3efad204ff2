"""Loading nerfstudio checkpoints under torch's ``weights_only=True`` default (torch >= 2.6).

``ns-render``, ``ns-eval``, ``ns-viewer`` and ``--load-dir`` call ``torch.load`` without ``weights_only``.
Checkpoints written by nerfstudio's trainer hold a few numpy objects (scalars and dtypes in optimizer and
scheduler state), which the safe unpickler refuses. Rather than switching the check off for every load,
:func:`register_safe_globals` allow-lists exactly those numpy types. Every mmstyle_ns model module calls
it at import, and nerfstudio imports the model class while it reads a run's ``config.yml``, before it
loads the checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_REGISTERED = False


def register_safe_globals() -> None:
    """Allow-lists the numpy types found in nerfstudio checkpoints for ``torch.load(weights_only=True)``."""
    global _REGISTERED
    if _REGISTERED:
        return
    import numpy as np
    import torch

    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is None:  # torch < 2.4 has no weights_only default to satisfy
        _REGISTERED = True
        return
    try:  # numpy >= 2
        from numpy._core.multiarray import scalar  # pyright: ignore
    except ImportError:
        from numpy.core.multiarray import scalar  # pyright: ignore[reportAttributeAccessIssue]
    dtype_classes = [type(np.dtype(name)) for name in ("float16", "float32", "float64", "int32", "int64", "bool")]
    add([scalar, np.dtype, *dtype_classes])
    _REGISTERED = True


def find_checkpoint(path: Path) -> Path | None:
    """The newest nerfstudio checkpoint at ``path``: the file itself, else the highest ``step-*.ckpt`` in the folder
    or in its ``nerfstudio_models`` subfolder (a run folder); None if there is none."""
    if path.is_file():
        return path
    for folder in (path, path / "nerfstudio_models"):
        found = sorted(folder.glob("step-*.ckpt")) if folder.is_dir() else []
        if found:
            return found[-1]
    return None


def load_pipeline_state(path: Path) -> dict[str, Any]:
    """The pipeline state dict of the newest checkpoint at ``path`` (see :func:`find_checkpoint`), on the CPU."""
    import torch

    checkpoint = find_checkpoint(path)
    if checkpoint is None:
        raise ValueError(f"{path} holds no nerfstudio checkpoint (step-*.ckpt, or a run's nerfstudio_models folder)")
    register_safe_globals()
    loaded = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return dict(loaded["pipeline"])
