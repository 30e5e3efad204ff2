"""On-disk cache of stylized training views: each (style, view) pair is stylized once, never per step.

Keys hash the actual content — the style image, the stylizer's weights and strength, the view's pixels and
output size — so a changed style image or a re-generated scene invalidates the entries by itself. Entries
are float32 ``.npy`` files (lossless) followed by a SHA-256 of the array, written to a temporary file and
renamed into place, so an interrupted run never leaves a half-written entry; an entry that fails to load or
to verify is recomputed.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from jaxtyping import Float

if TYPE_CHECKING:
    from mmstyle_ns.style.extractor import PreparedStyle

CACHE_FORMAT_VERSION = "1"
"""Bumped whenever the entry format or the key recipe changes."""

_DIGEST_BYTES = 32
_SUFFIX = ".npy"


def _array_digest(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(array.tobytes())
    return digest.digest()


def style_key_for(prepared_style: PreparedStyle, stylizer_id: str, strength: float) -> str:
    """Cache key of a style as the stylizer sees it: hash of its style image, the stylizer and the strength.

    The style's name is left out: renaming a style keeps its entries, changing its image does not.
    """
    image = np.asarray(prepared_style.image, dtype=np.float32)
    digest = hashlib.sha256(f"style|v{CACHE_FORMAT_VERSION}|{stylizer_id}|{float(strength)!r}|".encode())
    digest.update(_array_digest(image))
    return digest.hexdigest()


def view_key_for(image_array: Float[np.ndarray, "H W 3"], size: tuple[int, int]) -> str:
    """Cache key of a training view: hash of its pixels and the ``(height, width)`` of the stylized output."""
    height, width = (int(s) for s in size)
    digest = hashlib.sha256(f"view|v{CACHE_FORMAT_VERSION}|{height}x{width}|".encode())
    digest.update(_array_digest(np.asarray(image_array)))
    return digest.hexdigest()


class StylizedViewCache:
    """Stylized views on disk, keyed by style and view.

    Args:
        root: cache folder (created on first write); entries of every style live side by side in it.
    """

    style_key_for = staticmethod(style_key_for)
    view_key_for = staticmethod(view_key_for)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.hits = 0
        """Entries served from disk by :meth:`get_or_compute`."""
        self.misses = 0
        """Entries computed (absent or corrupt) by :meth:`get_or_compute`."""

    @staticmethod
    def key(style_key: str, view_key: str) -> str:
        """Entry name of one (style, view) pair (a hex SHA-256 prefix)."""
        return hashlib.sha256(f"{style_key}\0{view_key}".encode()).hexdigest()[:40]

    def path(self, style_key: str, view_key: str) -> Path:
        """File of one entry (it may not exist)."""
        key = self.key(style_key, view_key)
        return self.root / key[:2] / f"{key}{_SUFFIX}"

    def load(self, style_key: str, view_key: str) -> Float[np.ndarray, "H W C"] | None:
        """The stored image, or ``None`` when the entry is absent or does not verify."""
        path = self.path(style_key, view_key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(raw) <= _DIGEST_BYTES:
            return None
        body, digest = raw[:-_DIGEST_BYTES], raw[-_DIGEST_BYTES:]
        try:
            array = np.load(io.BytesIO(body), allow_pickle=False)
        except (ValueError, OSError, EOFError):
            return None
        if array.dtype != np.float32 or _array_digest(array) != digest:
            return None
        return array

    def store(self, style_key: str, view_key: str, image: Float[np.ndarray, "H W C"]) -> Path:
        """Writes an entry atomically (temporary file, then rename) and returns its path."""
        array = np.ascontiguousarray(image, dtype=np.float32)
        path = self.path(style_key, view_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
                handle.write(_array_digest(array))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get_or_compute(
        self, style_key: str, view_key: str, compute: Callable[[], np.ndarray]
    ) -> Float[np.ndarray, "H W C"]:
        """The cached image of a (style, view) pair; ``compute`` runs only when it is absent or corrupt.

        The result is stored and returned as float32 (the same values ``compute`` returned, losslessly).
        """
        cached = self.load(style_key, view_key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        result = np.asarray(compute())
        if not np.issubdtype(result.dtype, np.floating):
            raise TypeError(f"compute must return a float image array, got dtype {result.dtype}")
        array = np.ascontiguousarray(result, dtype=np.float32)
        self.store(style_key, view_key, array)
        return array

    def __contains__(self, keys: tuple[str, str]) -> bool:
        return self.load(*keys) is not None
