"""Tests of contact sheets (mmstyle_ns.metrics.sheets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmstyle_ns.metrics.sheets import as_uint8_rgb, contact_sheet, save_png, sheet_layout


def _tile(height: int, width: int, value: int) -> np.ndarray:
    """A uint8 image with a distinct colour and a marked top-left pixel (to catch flips and offsets)."""
    image = np.full((height, width, 3), (value, 255 - value, (3 * value) % 256), dtype=np.uint8)
    image[0, 0] = (1, 2, 3)
    return image


def test_grid_without_labels_places_every_image():
    pad = 3
    rows = [[_tile(10, 12, 40), _tile(6, 8, 80), _tile(10, 5, 120)], [_tile(4, 12, 160), _tile(7, 16, 200)]]
    sheet = contact_sheet(rows, pad=pad)
    # Row heights (10, 7), column widths (12, 16, 5).
    assert sheet.dtype == np.uint8
    assert sheet.shape == (pad * 3 + 10 + 7, pad * 4 + 12 + 16 + 5, 3)
    # Cell corners: rows at pad and 2 pad + 10; columns at pad, 2 pad + 12, 3 pad + 28. Images are centred in
    # their cell: the 6 x 8 image in the 10 x 16 cell sits 2 rows down and 4 columns right.
    expected = {
        (0, 0): (pad, pad),
        (0, 1): (pad + 2, 2 * pad + 12 + 4),
        (0, 2): (pad, 3 * pad + 28),
        (1, 0): (2 * pad + 10 + 1, pad),
        (1, 1): (2 * pad + 10, 2 * pad + 12),
    }
    covered = np.zeros(sheet.shape[:2], dtype=bool)
    for (r, c), (top, left) in expected.items():
        image = rows[r][c]
        np.testing.assert_array_equal(sheet[top : top + image.shape[0], left : left + image.shape[1]], image)
        covered[top : top + image.shape[0], left : left + image.shape[1]] = True
    assert (sheet[~covered] == 255).all()  # padding, centring margins and the missing cell are background
    layout = sheet_layout([[(im.shape[0], im.shape[1]) for im in row] for row in rows], pad=pad)
    assert {(r, c): layout.image_origins[r][c] for r, c in expected} == expected
    assert layout.row_heights == [10, 7] and layout.col_widths == [12, 16, 5]


def test_layout_arithmetic_with_label_strips():
    layout = sheet_layout(
        [[(20, 24), (20, 24)], [(20, 24), None]],
        row_label_sizes=[(30, 11), (18, 25)],
        col_label_sizes=[(26, 11), (10, 9)],
        pad=2,
    )
    assert (layout.label_width, layout.label_height) == (32, 13)  # widest / tallest text + pad
    assert layout.col_widths == [26, 24] and layout.row_heights == [20, 25]  # labels can widen cells
    assert (layout.width, layout.height) == (32 + 3 * 2 + 26 + 24, 13 + 3 * 2 + 20 + 25)
    assert layout.cell_origins[1][1] == (13 + 2 * 2 + 20, 32 + 2 * 2 + 26)
    assert layout.image_origins[0][0] == (13 + 2, 32 + 2 + 1)  # centred in the widened column
    assert layout.image_origins[1][0] == (13 + 2 * 2 + 20 + 2, 32 + 2 + 1)  # centred in the taller row, too
    assert layout.image_origins[1][1] is None


def test_labels_are_drawn_in_strips_and_shift_the_grid():
    from mmstyle_ns.metrics.sheets import _font, _text_size

    rows = [[_tile(20, 40, 50), _tile(20, 40, 100)], [_tile(20, 40, 150), None]]
    row_labels, col_labels = ["style A", "style B"], ["view 0", "view 1"]
    plain = contact_sheet(rows, pad=2)
    labelled = contact_sheet(rows, row_labels=row_labels, col_labels=col_labels, pad=2)
    font = _font(None)
    layout = sheet_layout(
        [[(20, 40), (20, 40)], [(20, 40), None]],
        [_text_size(text, font) for text in row_labels],
        [_text_size(text, font) for text in col_labels],
        pad=2,
    )
    assert labelled.shape == (layout.height, layout.width, 3)
    top, left = layout.label_height, layout.label_width
    assert top > 6 and left > 20  # room for a line of text and for "style A"
    # The labels fit in the cells, so the grid is the unlabelled sheet shifted by the strips.
    np.testing.assert_array_equal(labelled[top:, left:], plain)
    np.testing.assert_array_equal(labelled[top + 2 : top + 22, left + 44 : left + 84], rows[0][1])
    # Text is drawn in the strips: dark pixels beside each row and above each column, none in the corner.
    dark = labelled.min(axis=-1) < 128
    for r in range(2):
        assert dark[top + 2 + r * 22 : top + 22 + r * 22, :left].any()
    for c in range(2):
        assert dark[:top, left + 2 + c * 42 : left + 42 + c * 42].any()
    assert not dark[:top, :left].any()
    other = contact_sheet(rows, row_labels=["style A", "other"], col_labels=col_labels, pad=2)
    assert not np.array_equal(other, labelled)
    bigger = contact_sheet(rows, row_labels=row_labels, col_labels=col_labels, pad=2, font_size=24)
    assert bigger.shape[0] > labelled.shape[0] and bigger.shape[1] > labelled.shape[1]


def test_input_formats_are_converted():
    grey = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    rgba = np.zeros((3, 4, 4), dtype=np.float32)
    rgba[..., 0] = 1.0
    rgba[..., 3] = 0.5  # half-transparent red over white
    sheet = contact_sheet([[grey, torch.from_numpy(rgba)]], pad=0)
    assert sheet.shape == (3, 8, 3)
    np.testing.assert_array_equal(sheet[:, :4, 0], sheet[:, :4, 2])
    np.testing.assert_array_equal(sheet[:, :4, 0], (grey * 255 + 0.5).astype(np.uint8))
    np.testing.assert_array_equal(sheet[0, 4], [255, 128, 128])
    np.testing.assert_array_equal(as_uint8_rgb(np.array([[[-0.5, 2.0, 0.5]]])), [[[0, 255, 128]]])


def test_rejects_bad_layouts():
    image = _tile(4, 4, 10)
    with pytest.raises(ValueError, match="row labels"):
        contact_sheet([[image], [image]], row_labels=["only one"])
    with pytest.raises(ValueError, match="column labels"):
        contact_sheet([[image, image]], col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet([])
    with pytest.raises(ValueError, match="images must be"):
        contact_sheet([[np.zeros((4, 4, 2))]])


def test_save_png_round_trip(tmp_path: Path):
    image = np.random.default_rng(0).uniform(size=(5, 7, 3)).astype(np.float32)
    path = save_png(tmp_path / "nested" / "sheet.png", image)
    assert path.is_file()
    with Image.open(path) as read:
        assert read.format == "PNG" and read.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(read), as_uint8_rgb(image))
