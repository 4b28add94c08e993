"""Heatmaps as pictures: PNG overlays on the image the encoder saw, and contact sheets.

An overlay is the (resized, centre-cropped) input image blended half and half with a colour
map of the heatmap's positive part (where the feature is present; for ``gradient_x_input``,
where the pixels raise ``h_j``), scaled to the map's own maximum unless ``vmax`` is given.
Pillow draws everything; matplotlib only lends its colour maps.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from models.explanation.heatmaps import upsample

#: Overlays are drawn at least this many pixels wide: a 32x32 CIFAR image is too small to read.
MIN_DISPLAY = 96
COLORMAP = "jet"
_BLEND = 0.5
# Looked up once: the registry hands out a fresh copy on every lookup (a few ms each).
_CMAP = colormaps[COLORMAP]


def display_size(image_size: int) -> int:
    """The size overlays of ``image_size`` images are drawn at (a whole multiple of it, at least MIN_DISPLAY)."""
    return image_size * max(1, -(-MIN_DISPLAY // image_size))


def normalised(heat: torch.Tensor | np.ndarray, vmax: float | None = None) -> np.ndarray:
    """The positive part of a (h, w) map over ``vmax`` (default: its maximum), clipped to [0, 1]."""
    values = np.clip(torch.as_tensor(heat, dtype=torch.float32).cpu().numpy(), 0, None)
    top = float(values.max(initial=0.0)) if vmax is None else float(vmax)
    if top <= 0:
        return np.zeros_like(values)
    return np.clip(values / top, 0.0, 1.0)


def overlay(
    image: np.ndarray, heat: torch.Tensor | np.ndarray, size: int | None = None, vmax: float | None = None
) -> Image.Image:
    """``image`` (S, S, 3) uint8 with ``heat`` (h', w') on top, as an RGB image of ``size`` pixels."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (S, S, 3) uint8, got {image.shape} {image.dtype}")
    size = size or display_size(image.shape[0])
    base = np.asarray(enlarged(image, size), dtype=np.float32)
    up = upsample(torch.as_tensor(heat, dtype=torch.float32), size)
    colour = _CMAP(normalised(up, vmax))[..., :3] * 255.0
    blended = (1 - _BLEND) * base + _BLEND * colour
    return Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8))


def enlarged(image: np.ndarray, size: int | None = None) -> Image.Image:
    """``image`` (S, S, 3) uint8 at the overlays' display size."""
    size = size or display_size(image.shape[0])
    picture = Image.fromarray(image)
    return (
        picture if image.shape[0] == size == image.shape[1] else picture.resize((size, size), Image.Resampling.BICUBIC)
    )


def png_bytes(picture: Image.Image, compress_level: int = 1) -> bytes:
    """PNG bytes; level 1 by default: small pictures written per request, where level 6 costs
    several times more and saves little (contact sheets, written once, take 6)."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=compress_level)
    return buffer.getvalue()


def png_base64(picture: Image.Image) -> str:
    return base64.b64encode(png_bytes(picture)).decode("ascii")


@dataclass(frozen=True)
class Tile:
    """One column of a contact sheet: the image, its heatmap and a caption of up to two lines."""

    image: np.ndarray
    heat: torch.Tensor | np.ndarray
    caption: str


def contact_sheet(title: str, tiles: Sequence[Tile], columns: int = 8, tile: int = 96) -> Image.Image:
    """A grid of (image above overlay) pairs with captions under a title line (paper figure 2)."""
    font = ImageFont.load_default(size=11)
    columns = max(1, min(columns, len(tiles) or 1))
    rows = -(-len(tiles) // columns) if tiles else 0
    pad, header, caption = 4, 18, 26
    cell_w, cell_h = tile + pad, 2 * tile + caption + pad
    empty = "no image in the reference sample has this feature dominant"
    # as wide as the title (and the empty note) too: a few tiles are narrower than a title line
    text_w = max(font.getlength(title), 0 if tiles else font.getlength(empty))
    width = max(pad + columns * cell_w, pad + int(np.ceil(text_w)) + pad)
    sheet = Image.new("RGB", (width, header + max(rows, 1) * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 3), title, fill="black", font=font)
    if not tiles:
        draw.text((pad, header + 4), empty, fill="gray", font=font)
    for n, t in enumerate(tiles):
        x = pad + (n % columns) * cell_w
        y = header + (n // columns) * cell_h
        sheet.paste(enlarged(t.image, tile), (x, y))
        sheet.paste(overlay(t.image, t.heat, tile), (x, y + tile))
        for line, text in enumerate(t.caption.split("\n")[:2]):
            draw.text((x, y + 2 * tile + 1 + 12 * line), text[: max(4, tile // 6)], fill="black", font=font)
    return sheet
