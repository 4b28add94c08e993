"""Shift sets made from CIFAR-10 test images, nothing downloaded (issue 10, item 6).

Each shift is a function ``(image, rng) -> image`` on 8-bit RGB PIL images; the same seed gives
the same pixels. ``corruptions`` keep the content and change the pixels (noise, blur, contrast,
JPEG, inversion, grayscale); ``gross`` shifts replace the image by something unlike any
photograph (solid colours, uniform noise, glyphs drawn with Pillow on plain backgrounds).
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from models.atomic import write_bytes_atomic

Shift = Callable[[Image.Image, np.random.Generator], Image.Image]

GLYPHS = string.ascii_letters + string.digits


def gaussian_noise(image: Image.Image, rng: np.random.Generator, sigma: float = 40.0) -> Image.Image:
    """Additive Gaussian noise of standard deviation ``sigma`` (in 0..255 units), clipped."""
    x = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(x + rng.normal(0.0, sigma, x.shape), 0, 255).astype(np.uint8))


def blur(image: Image.Image, rng: np.random.Generator, radius: float = 2.0) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius))


def low_contrast(image: Image.Image, rng: np.random.Generator, factor: float = 0.3) -> Image.Image:
    """Pixels pulled towards the image's mean grey: ``mean + factor * (x - mean)``."""
    x = np.asarray(image, dtype=np.float32)
    return Image.fromarray(np.clip(x.mean() + factor * (x - x.mean()), 0, 255).astype(np.uint8))


def jpeg_q5(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=5)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def invert(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return ImageOps.invert(image.convert("RGB"))


def grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.convert("L").convert("RGB")


def solid_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One uniform random RGB colour over the whole image (the input gives only the size)."""
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    return Image.new("RGB", image.size, colour)


def uniform_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Independent uniform 0..255 values for every pixel and channel."""
    return Image.fromarray(rng.integers(0, 256, (image.size[1], image.size[0], 3), dtype=np.uint8))


def glyphs(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One or two letters or digits in Pillow's default font on a plain background.

    Background and ink are random colours at least 96 grey levels apart (so the glyph shows);
    the glyph fills most of the image, as a digit does in MNIST.
    """
    width, height = image.size
    background = rng.integers(0, 256, 3)
    ink = rng.integers(0, 256, 3)
    while np.abs(ink.astype(int) - background.astype(int)).sum() < 96 * 3 // 2:
        ink = rng.integers(0, 256, 3)
    canvas = Image.new("RGB", (width, height), tuple(int(c) for c in background))
    draw = ImageDraw.Draw(canvas)
    n = int(rng.integers(1, 3))
    text = "".join(GLYPHS[int(i)] for i in rng.integers(0, len(GLYPHS), n))
    font = ImageFont.load_default(size=max(8, int(height * (0.8 if n == 1 else 0.55))))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = (width - (right - left)) / 2 - left + rng.integers(-2, 3)
    y = (height - (bottom - top)) / 2 - top + rng.integers(-2, 3)
    draw.text((x, y), text, font=font, fill=tuple(int(c) for c in ink))
    return canvas


#: Every shift set, in report order. "gross" ones are what the goals hold to >= 90% atypical.
SHIFTS: dict[str, Shift] = {
    "gaussian_noise": gaussian_noise,
    "blur": blur,
    "low_contrast": low_contrast,
    "jpeg_q5": jpeg_q5,
    "invert": invert,
    "grayscale": grayscale,
    "solid_colour": solid_colour,
    "uniform_noise": uniform_noise,
    "glyphs": glyphs,
}
GROSS_SHIFTS = ("solid_colour", "uniform_noise", "glyphs")


def apply_shift(name: str, images: Iterable[Image.Image], seed: int = 0) -> Iterator[Image.Image]:
    """Shifted copies of ``images`` (RGB), seeded: one generator per shift and seed."""
    if name not in SHIFTS:
        raise ValueError(f"unknown shift {name!r}; known: {', '.join(SHIFTS)}")
    fn = SHIFTS[name]
    rng = np.random.default_rng([seed, list(SHIFTS).index(name)])
    for image in images:
        yield fn(image.convert("RGB"), rng)


def write_shift_set(name: str, sources: Iterable[Path], out: str | Path, seed: int = 0) -> list[Path]:
    """Write the shifted copies of image files ``sources`` as PNGs under ``out/<name>/``."""
    folder = Path(out) / name
    paths = [Path(p) for p in sources]
    written = []
    for path, shifted in zip(paths, apply_shift(name, (Image.open(p) for p in paths), seed), strict=True):
        buffer = io.BytesIO()
        shifted.save(buffer, format="PNG")
        target = folder / f"{path.parent.name}-{path.stem}.png"
        write_bytes_atomic(target, buffer.getvalue())
        written.append(target)
    return written
