"""Contact sheets: images composed into a labelled grid (e.g. styles x views), written as PNG.

Layout (all in pixels): column ``c`` is as wide as its widest image or label, row ``r`` as tall as its tallest
image or label; cells are separated and surrounded by ``pad``. Row labels sit in a strip on the left, column
labels in a strip on the top, each ``text size + pad`` wide/tall. The sheet is
``W = L + pad (C + 1) + sum_c w_c`` wide and ``H = T + pad (R + 1) + sum_r h_r`` tall, with ``L`` and ``T`` the
strip sizes (0 without labels), and image ``(r, c)`` is centred in the cell whose top-left corner is
``(T + pad (r + 1) + sum_{r' < r} h_r', L + pad (c + 1) + sum_{c' < c} w_c')``. :func:`sheet_layout` gives these
numbers, :func:`contact_sheet` draws the sheet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from jaxtyping import UInt8
from torch import Tensor


def as_uint8_rgb(image: Any, background: int = 255) -> UInt8[np.ndarray, "H W 3"]:
    """An image as uint8 RGB ``[H, W, 3]``.

    Floats are taken in ``[0, 1]`` (clipped, rounded); grey ``[H, W]`` / ``[H, W, 1]`` is repeated; an alpha
    channel is composited over a grey level ``background``.
    """
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must be [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {tuple(array.shape)}")
    values = array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else np.clip(array.astype(np.float64), 0, 1)
    if values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    elif values.shape[-1] == 4:
        alpha = values[..., 3:]
        values = values[..., :3] * alpha + (background / 255.0) * (1.0 - alpha)
    return (values * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of a contact sheet (see the module docstring for the formulas)."""

    height: int
    """Sheet height."""
    width: int
    """Sheet width."""
    row_heights: list[int]
    """Height ``h_r`` of each row's cells."""
    col_widths: list[int]
    """Width ``w_c`` of each column's cells."""
    label_width: int
    """Width ``L`` of the row-label strip (0 without row labels)."""
    label_height: int
    """Height ``T`` of the column-label strip (0 without column labels)."""
    cell_origins: list[list[tuple[int, int]]]
    """``(top, left)`` of every cell, ``[row][column]``."""
    image_origins: list[list[tuple[int, int] | None]]
    """``(top, left)`` of every image (centred in its cell), ``None`` for empty cells."""


def _font(font_size: int | None) -> Any:
    """PIL's default font (scalable when FreeType is available and a size is asked for)."""
    from PIL import ImageFont

    if font_size is None:
        return ImageFont.load_default()
    try:
        return ImageFont.load_default(size=font_size)
    except (ImportError, OSError, TypeError):  # no FreeType (or an old Pillow): the fixed bitmap font
        return ImageFont.load_default()


def _text_size(text: str, font: Any) -> tuple[int, int]:
    """Width and height a text drawn at ``(0, 0)`` covers (including the font's top offset)."""
    from PIL import Image, ImageDraw

    if not text:
        return 0, 0
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)
    return int(np.ceil(max(right, 0))), int(np.ceil(max(bottom, 0)))


def sheet_layout(
    sizes: Sequence[Sequence[tuple[int, int] | None]],
    row_label_sizes: Sequence[tuple[int, int]] | None = None,
    col_label_sizes: Sequence[tuple[int, int]] | None = None,
    pad: int = 2,
) -> SheetLayout:
    """Where everything goes on a sheet.

    Args:
        sizes: ``(height, width)`` of each image, ``[row][column]``; ``None`` for an empty cell; rows may have
            different lengths.
        row_label_sizes: ``(width, height)`` of each row label's text, or ``None`` for no label strip.
        col_label_sizes: ``(width, height)`` of each column label's text, or ``None`` for no label strip.
        pad: gap between cells and around the grid.
    """
    if pad < 0:
        raise ValueError(f"pad must be non-negative, got {pad}")
    num_rows = len(sizes)
    num_cols = max((len(row) for row in sizes), default=0)
    if num_rows == 0 or num_cols == 0:
        raise ValueError("a contact sheet needs at least one image")
    if row_label_sizes is not None and len(row_label_sizes) != num_rows:
        raise ValueError(f"got {len(row_label_sizes)} row labels for {num_rows} rows")
    if col_label_sizes is not None and len(col_label_sizes) != num_cols:
        raise ValueError(f"got {len(col_label_sizes)} column labels for {num_cols} columns")
    row_heights = [max((s[0] for s in row if s is not None), default=0) for row in sizes]
    col_widths = [0] * num_cols
    for row in sizes:
        for c, size in enumerate(row):
            if size is not None:
                col_widths[c] = max(col_widths[c], size[1])
    label_width = label_height = 0
    if row_label_sizes is not None:
        row_heights = [max(h, text[1]) for h, text in zip(row_heights, row_label_sizes, strict=True)]
        label_width = max(text[0] for text in row_label_sizes) + pad
    if col_label_sizes is not None:
        col_widths = [max(w, text[0]) for w, text in zip(col_widths, col_label_sizes, strict=True)]
        label_height = max(text[1] for text in col_label_sizes) + pad
    tops = [label_height + pad * (r + 1) + sum(row_heights[:r]) for r in range(num_rows)]
    lefts = [label_width + pad * (c + 1) + sum(col_widths[:c]) for c in range(num_cols)]
    cells = [[(top, left) for left in lefts] for top in tops]
    images: list[list[tuple[int, int] | None]] = []
    for r, row in enumerate(sizes):
        placed: list[tuple[int, int] | None] = []
        for c, size in enumerate(row):
            if size is None:
                placed.append(None)
            else:
                placed.append((tops[r] + (row_heights[r] - size[0]) // 2, lefts[c] + (col_widths[c] - size[1]) // 2))
        images.append(placed)
    return SheetLayout(
        height=label_height + pad * (num_rows + 1) + sum(row_heights),
        width=label_width + pad * (num_cols + 1) + sum(col_widths),
        row_heights=row_heights,
        col_widths=col_widths,
        label_width=label_width,
        label_height=label_height,
        cell_origins=cells,
        image_origins=images,
    )


def contact_sheet(
    rows: Sequence[Sequence[Any]],
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    pad: int = 2,
    background: int = 255,
    text_color: tuple[int, int, int] = (0, 0, 0),
    font_size: int | None = None,
) -> UInt8[np.ndarray, "H W 3"]:
    """Composes images into a grid, with labels drawn in PIL's default font on strips left and top.

    Args:
        rows: images ``[row][column]`` (numpy or torch; float in ``[0, 1]`` or uint8; grey, RGB or RGBA; any
            sizes; ``None`` leaves a cell empty; rows may be ragged).
        row_labels: one text per row (``None``: no left strip).
        col_labels: one text per column (``None``: no top strip).
        pad: gap between cells and around the grid, in pixels.
        background: grey level of the sheet.
        text_color: RGB colour of the labels.
        font_size: size of the scalable default font; ``None`` uses Pillow's default size.

    Returns:
        The sheet, uint8 ``[H, W, 3]`` with ``H, W`` from :func:`sheet_layout`.
    """
    from PIL import Image, ImageDraw

    images = [[None if image is None else as_uint8_rgb(image, background) for image in row] for row in rows]
    font = _font(font_size) if row_labels is not None or col_labels is not None else None
    row_text = None if row_labels is None else [_text_size(str(text), font) for text in row_labels]
    col_text = None if col_labels is None else [_text_size(str(text), font) for text in col_labels]
    sizes = [[None if image is None else (image.shape[0], image.shape[1]) for image in row] for row in images]
    layout = sheet_layout(sizes, row_text, col_text, pad)

    sheet = np.full((layout.height, layout.width, 3), background, dtype=np.uint8)
    for row, origins in zip(images, layout.image_origins, strict=True):
        for image, origin in zip(row, origins, strict=True):
            if image is not None and origin is not None:
                top, left = origin
                sheet[top : top + image.shape[0], left : left + image.shape[1]] = image
    if row_labels is None and col_labels is None:
        return sheet
    canvas = Image.fromarray(sheet)
    draw = ImageDraw.Draw(canvas)
    if row_labels is not None and row_text is not None:
        for r, (text, (_, text_h)) in enumerate(zip(row_labels, row_text, strict=True)):
            top = layout.cell_origins[r][0][0] + (layout.row_heights[r] - text_h) // 2
            draw.multiline_text((pad, top), str(text), fill=text_color, font=font)
    if col_labels is not None and col_text is not None:
        for c, (text, (text_w, _)) in enumerate(zip(col_labels, col_text, strict=True)):
            left = layout.cell_origins[0][c][1] + (layout.col_widths[c] - text_w) // 2
            draw.multiline_text((left, pad), str(text), fill=text_color, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_png(path: str | Path, image: Any) -> Path:
    """Writes an image (see :func:`as_uint8_rgb` for accepted inputs) as an 8-bit RGB PNG, creating folders.

    Returns:
        The path written.
    """
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(as_uint8_rgb(image)).save(path, format="PNG")
    return path


def zoomed_crop(
    image: Any, centre: tuple[float, float] = (0.5, 0.5), fraction: float = 0.35, factor: int = 3
) -> UInt8[np.ndarray, "h w 3"]:
    """A square crop of ``image`` enlarged ``factor`` times with nearest-neighbour pixels (texture stays crisp).

    Args:
        image: any image :func:`as_uint8_rgb` takes.
        centre: crop centre as ``(row, column)`` fractions of the image size.
        fraction: crop side as a fraction of the image's shorter side.
        factor: integer enlargement.
    """
    if factor < 1 or not 0 < fraction <= 1:
        raise ValueError(f"need factor >= 1 and 0 < fraction <= 1, got {factor} and {fraction}")
    array = as_uint8_rgb(image)
    height, width = array.shape[:2]
    side = max(1, round(min(height, width) * fraction))
    top = int(np.clip(round(centre[0] * height - side / 2), 0, height - side))
    left = int(np.clip(round(centre[1] * width - side / 2), 0, width - side))
    crop = array[top : top + side, left : left + side]
    return np.repeat(np.repeat(crop, factor, axis=0), factor, axis=1)
