"""Overlays and contact sheets: sizes, the blend, and PNG round trips."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.explanation.render import (
    Tile,
    contact_sheet,
    display_size,
    normalised,
    overlay,
    png_base64,
    png_bytes,
)


def test_normalised_takes_the_positive_part_over_the_maximum() -> None:
    assert normalised(np.array([[-2.0, 1.0], [2.0, 4.0]])).tolist() == [[0.0, 0.25], [0.5, 1.0]]
    assert normalised(np.array([[1.0, 3.0]]), vmax=2.0).tolist() == [[0.5, 1.0]]
    assert normalised(np.array([[-1.0, 0.0]])).tolist() == [[0.0, 0.0]]


def test_overlay_blends_half_and_half_with_the_colour_map() -> None:
    from matplotlib import colormaps

    image = np.full((32, 32, 3), 200, dtype=np.uint8)
    picture = overlay(image, torch.zeros(4, 4), 32)  # a zero map: the colour map's lowest colour everywhere
    low = np.array(colormaps["jet"](0.0)[:3]) * 255
    expected = np.clip(0.5 * 200 + 0.5 * low + 0.5, 0, 255).astype(np.uint8)
    assert picture.size == (32, 32) and picture.mode == "RGB"
    assert np.asarray(picture)[0, 0].tolist() == expected.tolist()
    assert overlay(image, torch.rand(4, 4)).size == (display_size(32),) * 2 == (96, 96)
    with pytest.raises(ValueError, match=r"image must be \(S, S, 3\) uint8"):
        overlay(np.zeros((32, 32), dtype=np.uint8), torch.zeros(4, 4))


def test_png_round_trips() -> None:
    picture = overlay(np.zeros((8, 8, 3), dtype=np.uint8), torch.rand(2, 2), 8)
    back = Image.open(io.BytesIO(base64.b64decode(png_base64(picture))))
    assert back.format == "PNG" and np.array_equal(np.asarray(back), np.asarray(picture))
    assert png_bytes(picture, 6)[:8] == b"\x89PNG\r\n\x1a\n"


def test_contact_sheet_lays_out_image_and_overlay_columns() -> None:
    tiles = [Tile(np.zeros((32, 32, 3), dtype=np.uint8), torch.rand(4, 4), f"cat\n{v:.2f}") for v in range(5)]
    sheet = contact_sheet("feature 3", tiles, columns=4, tile=64)
    # 4 columns of 64 + 4 px; 2 rows of (2 x 64 + 26 + 4) px under an 18 px title line, 4 px margin
    assert sheet.size == (4 + 4 * 68, 18 + 2 * 158 + 4)
    assert contact_sheet("feature 9", [], tile=64).size[1] == 18 + 158 + 4


@pytest.mark.parametrize("n_tiles", [0, 1, 4])
def test_contact_sheet_is_as_wide_as_its_text(n_tiles: int) -> None:
    """A title longer than a few tiles ("... dominant for 61 of 1000 images") was cut at the sheet's edge."""
    title = "feature 91 (upper tail): dominant for 61 of 1000 images, purity 0.31 (ship)"
    tiles = [Tile(np.zeros((32, 32, 3), dtype=np.uint8), torch.rand(4, 4), "x") for _ in range(n_tiles)]
    sheet = np.asarray(contact_sheet(title, tiles, columns=4, tile=32).convert("L"))
    header = sheet[:18] if n_tiles else sheet  # without tiles, the note under the title too
    ink = np.nonzero((header < 128).any(axis=0))[0]
    assert ink.size and ink.max() < sheet.shape[1] - 2  # the text ends before the right margin
