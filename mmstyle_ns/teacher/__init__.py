"""The toy teacher: a small text-conditioned latent diffusion model of the embedded scenes' world.

No Stable Diffusion weights can be had offline, so the score-distillation methods get a real, small model of a
small world instead, saved in the diffusers Stable Diffusion layout and loaded through the very same
:class:`~mmstyle_ns.guidance.DiffusionBackbone` code path. Modules:

* :mod:`~mmstyle_ns.teacher.vocab`: the vocabulary (colours, shapes, grounds, styles, materials) and the caption
  grammar — the single source for generator, checker, trainer and tests.
* :mod:`~mmstyle_ns.teacher.data` and :mod:`~mmstyle_ns.teacher.styles`: procedural (picture, caption) pairs.
* :mod:`~mmstyle_ns.teacher.checker`: an independent colour classifier and its accuracy on ground truth.
* :mod:`~mmstyle_ns.teacher.config`, :mod:`~mmstyle_ns.teacher.model`, :mod:`~mmstyle_ns.teacher.train`,
  :mod:`~mmstyle_ns.teacher.evaluate`, :mod:`~mmstyle_ns.teacher.cli`: networks, gated two-stage training,
  evaluation and the ``mmstyle-teacher`` command.

Importing this package imports nothing heavy (no torch, diffusers or transformers). See ``docs/teacher.md``.
"""
