"""mmstyle_ns: multimodal 3D stylization and text-guided editing for nerfstudio.

This module is imported at interpreter start-up by the torchvision compatibility hook, so it must stay
free of heavy imports.
"""

__version__ = "0.1.0"
