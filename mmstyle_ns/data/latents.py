"""VAE latents of a dataset's training views, encoded once and cached on disk.

ED-NeRF (arXiv 2310.02712, section 3.1) trains its NeRF to render the latents of Stable Diffusion's VAE at
``1 / vae_scale_factor`` of the image resolution. :func:`encode_views` encodes the training images once with a
:class:`~mmstyle_ns.guidance.backbone.DiffusionBackbone` (``encode_images``, which already multiplies by the
VAE's ``scaling_factor``) and keeps them in a :class:`LatentCache`, so a re-run reads them back instead of
running the encoder again.

Cache keys hash contents, never paths or times:

* the **model key** (:func:`model_key_for`) hashes the VAE's config and the bytes of its loaded parameters and
  buffers (:func:`vae_fingerprint`), the backbone's precision and whether it samples the posterior. Hashing the
  loaded tensors rather than the weight files' names, sizes and mtimes means a copied or re-downloaded model
  keeps its entries while a retrained VAE saved over the old file -- same name, maybe the same size, an mtime
  that ``cp -p``/``rsync -t`` preserves -- gets new ones; it covers hub ids, safetensors or ``.bin``, sharded
  or variant files and a float16 load of float32 files alike, since it hashes exactly what encodes. The cost is
  one read of the weights per process (Stable Diffusion's VAE is 84M parameters, 335 MB: well under a second),
  memoised per loaded VAE.
* the **view key** (:func:`view_key_for`) hashes the view's raw pixels with their dtype and shape, the size
  fed to the VAE and, for RGBA views only, the background colour they are composited over.

Entries are stored by :class:`~mmstyle_ns.style.cache.StylizedViewCache`, which is a generic
``(namespace key, entry key) -> float32 array`` store despite its name: lossless ``.npy`` files with a SHA-256
of the array appended, written atomically (temporary file, then rename), so an interrupted run never leaves a
half-written entry and an entry that fails to load or verify is recomputed.

Image sizes: the VAE needs heights and widths that are multiples of its ``vae_scale_factor`` (8 for Stable
Diffusion). A view of another size is resized (bilinear, antialiased) to the nearest multiple on each axis
(:func:`vae_input_size`, at least one multiple), so its latent grid covers the whole image at a slightly
different scale per axis: a camera rendering these latents must be rescaled by ``w / W`` horizontally and
``h / H`` vertically, where ``(h, w)`` is the latent size and ``(H, W)`` the original image size.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mmstyle_ns.style.cache import StylizedViewCache

if TYPE_CHECKING:
    from mmstyle_ns.guidance.backbone import DiffusionBackbone

__all__ = [
    "LATENT_CACHE_VERSION",
    "LatentCache",
    "encode_dataset",
    "encode_views",
    "model_key_for",
    "prepare_view",
    "vae_fingerprint",
    "vae_input_size",
    "view_key_for",
]

LATENT_CACHE_VERSION = "1"
"""Bumped whenever the key recipe or the preprocessing (compositing, resizing) changes."""

ImageLike = Tensor | np.ndarray
"""One view, ``[H, W, 3]`` or ``[H, W, 4]`` (RGBA): uint8 in [0, 255] or floating point in [0, 1]."""

_RANGE_TOLERANCE = 1e-4
_fingerprints: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def vae_input_size(height: int, width: int, factor: int) -> tuple[int, int]:
    """The size an image of ``(height, width)`` is resized to before encoding: the nearest multiples of ``factor``.

    Halves round up; each side is at least ``factor``. An image whose sides are already multiples keeps its size.
    """
    if height < 1 or width < 1 or factor < 1:
        raise ValueError(f"Need positive sizes and factor, got {height}x{width}, factor {factor}")
    return tuple(max(factor, int((s + factor / 2) // factor) * factor) for s in (height, width))  # type: ignore[return-value]


def _as_tensor(image: ImageLike) -> Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    tensor = tensor.detach().cpu()
    if tensor.ndim != 3 or tensor.shape[-1] not in (3, 4):
        raise ValueError(f"Expected a view [H, W, 3] or [H, W, 4], got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8 and not tensor.is_floating_point():
        raise TypeError(f"Views must be uint8 or floating point, got {tensor.dtype}")
    return tensor


def _background_tensor(background: Sequence[float] | Tensor) -> Float[Tensor, "3"]:
    colour = torch.as_tensor(background, dtype=torch.float32).detach().cpu().reshape(-1)
    if colour.shape != (3,) or not bool(((colour >= 0) & (colour <= 1)).all()):
        raise ValueError(f"background must be 3 values in [0, 1], got {colour.tolist()}")
    return colour


def prepare_view(
    image: ImageLike, size: tuple[int, int], background: Sequence[float] | Tensor = (1.0, 1.0, 1.0)
) -> Float[Tensor, "3 H W"]:
    """One view as the VAE sees it: float32 RGB in [0, 1], alpha composited, resized to ``size``.

    Args:
        image: the view, ``[H, W, 3]`` or ``[H, W, 4]``; uint8 in [0, 255] or floating point in [0, 1].
        size: ``(height, width)`` to resize to (bilinear, antialiased when shrinking; untouched when equal).
        background: RGB colour in [0, 1] that RGBA views are composited over (``rgb * a + bg * (1 - a)``).

    Returns:
        The view, ``[3, height, width]`` float32 on the CPU.

    Raises:
        ValueError: wrong shape, or floating-point values outside [0, 1].
    """
    tensor = _as_tensor(image)
    if tensor.dtype == torch.uint8:
        pixels = tensor.float() / 255.0
    else:
        pixels = tensor.float()
        low, high = float(pixels.min()), float(pixels.max())
        if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
            raise ValueError(f"Floating-point views must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]")
        pixels = pixels.clamp(0.0, 1.0)
    if pixels.shape[-1] == 4:
        alpha = pixels[..., 3:]
        pixels = pixels[..., :3] * alpha + _background_tensor(background) * (1.0 - alpha)
    chw = pixels.permute(2, 0, 1).contiguous()  # [3, H, W]
    if tuple(chw.shape[1:]) != tuple(size):
        chw = F.interpolate(chw[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]
    return chw.clamp(0.0, 1.0)


def vae_fingerprint(vae: torch.nn.Module) -> str:
    """SHA-256 of a VAE's contents: its config (without private ``_`` keys such as its path) and every parameter
    and buffer (name, dtype, shape, bytes). Computed once per loaded VAE object.

    Args:
        vae: a diffusers ``AutoencoderKL`` (anything with a ``state_dict`` and, optionally, a ``config`` mapping).
    """
    cached = _fingerprints.get(vae)
    if cached is not None:
        return cached
    config = dict(getattr(vae, "config", {}) or {})
    public = {k: v for k, v in config.items() if not str(k).startswith("_")}
    digest = hashlib.sha256(f"vae|v{LATENT_CACHE_VERSION}|{type(vae).__name__}|".encode())
    digest.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().data)
    fingerprint = digest.hexdigest()
    _fingerprints[vae] = fingerprint
    return fingerprint


def model_key_for(backbone: DiffusionBackbone) -> str:
    """Cache namespace of a backbone's latents: the VAE's fingerprint, its precision and the posterior mode.

    The device is left out: a CPU and a GPU encoding differ only by rounding, and should share entries.
    """
    recipe = f"model|v{LATENT_CACHE_VERSION}|{backbone.dtype}|sample={bool(backbone.config.sample_latents)}|"
    return hashlib.sha256((recipe + vae_fingerprint(backbone.vae)).encode()).hexdigest()


def view_key_for(
    image: ImageLike, size: tuple[int, int], background: Sequence[float] | Tensor = (1.0, 1.0, 1.0)
) -> str:
    """Cache key of one view: its raw pixels (dtype, shape, bytes), the encoded ``size`` and, for RGBA views, the
    background colour (an RGB view's key does not depend on it)."""
    tensor = _as_tensor(image).contiguous()
    height, width = (int(s) for s in size)
    recipe = f"view|v{LATENT_CACHE_VERSION}|{height}x{width}|{tensor.dtype}|{tuple(tensor.shape)}|"
    if tensor.shape[-1] == 4:
        recipe += "bg=" + ",".join(repr(float(c)) for c in _background_tensor(background).tolist()) + "|"
    digest = hashlib.sha256(recipe.encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


class LatentCache:
    """Encoded views on disk, one float32 ``[c, h, w]`` entry per (model key, view key).

    Args:
        root: cache folder (created on first write); latents of every model live side by side in it.
    """

    model_key_for = staticmethod(model_key_for)
    view_key_for = staticmethod(view_key_for)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._store = StylizedViewCache(self.root)
        self.hits = 0
        """Distinct views :func:`encode_views` read from disk."""
        self.misses = 0
        """Distinct views :func:`encode_views` encoded and stored (absent, corrupt or of the wrong shape)."""

    def path(self, model_key: str, view_key: str) -> Path:
        """File of one entry (it may not exist)."""
        return self._store.path(model_key, view_key)

    def load(self, model_key: str, view_key: str) -> Float[Tensor, "c h w"] | None:
        """The stored latents, or ``None`` when the entry is absent or does not verify."""
        array = self._store.load(model_key, view_key)
        if array is None or array.ndim != 3:
            return None
        return torch.from_numpy(array)

    def store(self, model_key: str, view_key: str, latents: Float[Tensor, "c h w"]) -> Path:
        """Writes one entry atomically (lossless float32) and returns its path."""
        if latents.ndim != 3:
            raise ValueError(f"Expected latents [c, h, w], got {tuple(latents.shape)}")
        return self._store.store(model_key, view_key, latents.detach().float().cpu().numpy())


def encode_views(
    backbone: DiffusionBackbone,
    images: Float[Tensor, "N H W C"] | Sequence[ImageLike],
    cache: LatentCache | None = None,
    batch_size: int = 8,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    size: tuple[int, int] | None = None,
) -> Float[Tensor, "N c h w"]:
    """Scaled VAE latents of training views, read from ``cache`` where present and encoded (and stored) otherwise.

    Uses the posterior mean unless the backbone's ``sample_latents`` is set; a sampled latent is then drawn once,
    on the first encoding, and re-used from the cache afterwards. With a cache, identical views are encoded once.
    Only the missing views are encoded, in batches of their own: an encoding can depend on its batch's
    composition by float rounding (about 1e-7 on CPU), so a recomputed view matches its earlier batched encoding
    to rounding, not bit for bit; a cached view is returned exactly as first encoded.

    Args:
        backbone: the diffusion backbone whose VAE encodes (``encode_images``; latents are scaled by the VAE's
            ``scaling_factor``).
        images: ``N`` views, a ``[N, H, W, 3|4]`` tensor or a sequence of ``[H, W, 3|4]`` tensors or arrays;
            uint8 in [0, 255] or floating point in [0, 1]; channel 4 is alpha.
        cache: where latents are kept between runs; None encodes every view.
        batch_size: views per VAE call.
        background: RGB in [0, 1] that RGBA views are composited over.
        size: ``(H, W)`` every view is resized to before encoding (multiples of ``vae_scale_factor``); None resizes
            each view to the nearest multiples of its own size (:func:`vae_input_size`).

    Returns:
        Latents ``[N, latent_channels, H / f, W / f]`` (``f = vae_scale_factor``), float32 on the CPU.

    Raises:
        ValueError: no views, a bad view or background, a ``size`` that is not a multiple of the factor, or
            views whose sizes give different latent sizes (pass ``size``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _background_tensor(background)  # checked even when every view is RGB
    views = [images[i] for i in range(images.shape[0])] if isinstance(images, Tensor) else list(images)
    if not views:
        raise ValueError("No views to encode")
    factor = int(backbone.vae_scale_factor)
    if size is not None and (size[0] % factor or size[1] % factor or min(size) < 1):
        raise ValueError(f"size {tuple(size)} must be positive multiples of the VAE factor {factor}")
    sizes = [size if size is not None else vae_input_size(int(v.shape[0]), int(v.shape[1]), factor) for v in views]
    if len(set(sizes)) > 1:
        raise ValueError(f"Views map to different encoder sizes {sorted(set(sizes))}; pass size=(H, W)")
    target = sizes[0]
    expected = (int(backbone.latent_channels), target[0] // factor, target[1] // factor)

    model_key = model_key_for(backbone) if cache is not None else ""
    if cache is not None:
        keys = [view_key_for(v, target, background) for v in views]
    else:
        keys = [str(i) for i in range(len(views))]
    first: dict[str, int] = {}  # each distinct view once, at its first index
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    found: dict[str, Tensor] = {}
    if cache is not None:
        for key in first:
            latents = cache.load(model_key, key)
            if latents is not None and tuple(latents.shape) == expected:
                found[key] = latents
    todo = [(key, i) for key, i in first.items() if key not in found]
    if cache is not None:
        cache.hits += len(found)
        cache.misses += len(todo)

    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = torch.stack([prepare_view(views[i], target, background) for _, i in chunk])  # [b, 3, H, W]
        with torch.no_grad():
            encoded = backbone.encode_images(batch).float()  # [b, c, h, w]
        for (key, _), latents in zip(chunk, encoded, strict=True):
            found[key] = latents.contiguous()
            if cache is not None:
                cache.store(model_key, key, found[key])
    return torch.stack([found[key] for key in keys])


class ImageDataset(Protocol):
    """What :func:`encode_dataset` reads: a nerfstudio ``InputDataset`` or anything with these two methods."""

    def __len__(self) -> int: ...

    def get_image_float32(self, image_idx: int) -> Tensor: ...


def encode_dataset(
    backbone: DiffusionBackbone,
    dataset: ImageDataset,
    cache: LatentCache | None = None,
    batch_size: int = 8,
    background: Sequence[float] | Tensor = (1.0, 1.0, 1.0),
    size: tuple[int, int] | None = None,
) -> Float[Tensor, "N c h w"]:
    """Latents of every image of a nerfstudio dataset (``get_image_float32``), through :func:`encode_views`.

    Images the dataset already composited (its dataparser's ``alpha_color``) arrive as RGB; those still RGBA are
    composited over ``background``.
    """
    return encode_views(
        backbone,
        [dataset.get_image_float32(i) for i in range(len(dataset))],
        cache=cache,
        batch_size=batch_size,
        background=background,
        size=size,
    )
