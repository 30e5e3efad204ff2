"""The toy CLIP and the package's one CLIP loader.

* :mod:`~mmstyle_ns.clip.loader` — :func:`load_clip` / :func:`check_clip`: any open_clip model through
  ``open_clip.create_model_and_transforms``; a model config shipped beside the weights is registered first.
* :mod:`~mmstyle_ns.clip.train` — the toy CLIP: a small contrastive image-text model trained on the toy world
  (``mmstyle-clip train``), saved so that open_clip's own loader reads it.
* :mod:`~mmstyle_ns.clip.evaluate` — zero-shot attributes, caption retrieval, embedded-scene renders and the toy
  teacher's samples (``mmstyle-clip evaluate``).

Importing this package loads neither torch nor open_clip.
"""

from mmstyle_ns.clip.config import TOY_CLIP_NAME, TOY_CLIP_WEIGHTS, ClipEvalConfig, ClipTrainConfig, ToyClipArchitecture

__all__ = ["TOY_CLIP_NAME", "TOY_CLIP_WEIGHTS", "ClipEvalConfig", "ClipTrainConfig", "ToyClipArchitecture"]
