"""Decoding untrusted image bytes to RGB (models/data/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from models.data.images import ImageDecodeError, decode_image


def _bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _rgb(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    return np.asarray(image)


def test_grayscale_png():
    gray = Image.new("L", (7, 5), 200)
    pixels = _rgb(decode_image(_bytes(gray, "PNG")), (7, 5))
    assert (pixels == 200).all()


def test_palette_without_transparency():
    img = Image.new("P", (6, 4))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 1)
    pixels = _rgb(decode_image(_bytes(img, "PNG")), (6, 4))
    assert tuple(pixels[0, 0]) == (200, 100, 50)
    assert tuple(pixels[1, 1]) == (10, 20, 30)


def test_palette_with_transparency_is_composited_on_white():
    img = Image.new("P", (6, 4))
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((0, 0), 1)
    data = _bytes(img, "PNG", transparency=0)  # palette entry 0 is transparent
    assert "transparency" in Image.open(io.BytesIO(data)).info
    pixels = _rgb(decode_image(data), (6, 4))
    assert tuple(pixels[1, 1]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (200, 100, 50)


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black on white -> grey
    pixels = _rgb(decode_image(_bytes(img, "PNG")), (4, 4))
    assert tuple(pixels[3, 3]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (255, 0, 0)
    assert all(120 <= v <= 135 for v in pixels[0, 1])


def test_cmyk_jpeg():
    img = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    data = _bytes(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    pixels = _rgb(decode_image(data), (16, 8)).astype(int)
    r, g, b = pixels[4, 8]
    assert r > 200 and g < 60 and b < 60


def test_16_bit_png_is_rescaled_not_clipped():
    values = np.array([[0, 32768, 65535, 25700]], dtype=np.uint16)
    img = Image.fromarray(values)
    data = _bytes(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = _rgb(decode_image(data), (4, 1))
    # 65535 / 257 = 255, 25700 / 257 = 100, 32768 / 257 = 127.5 -> 127; clipping would give 255
    assert pixels[0, :, 0].tolist() == [0, 127, 255, 100]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    data = _bytes(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    pixels = _rgb(decode_image(data), (8, 8))
    assert tuple(pixels[4, 4]) == (255, 0, 0)


def test_webp_and_bmp():
    img = Image.new("RGB", (10, 6), (0, 128, 255))
    for fmt, kwargs in (("WEBP", {"lossless": True}), ("BMP", {})):
        pixels = _rgb(decode_image(_bytes(img, fmt, **kwargs)), (10, 6))
        assert tuple(pixels[3, 5]) == (0, 128, 255), fmt


def test_jpeg_rgb_passes_through():
    img = Image.new("RGB", (33, 17), (40, 80, 120))
    pixels = _rgb(decode_image(_bytes(img, "JPEG", quality=95)), (33, 17)).astype(int)
    assert np.abs(pixels - [40, 80, 120]).max() <= 3


# --- errors ---------------------------------------------------------------------------------


def _code(data: bytes, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    return info.value


def test_empty_file():
    err = _code(b"")
    assert err.code == "empty_file" and "0 bytes" in err.message


def test_text_is_not_an_image():
    err = _code(b"this is a text file, not a picture\n" * 4)
    assert err.code == "not_an_image"
    assert "JPEG, PNG, WEBP, BMP, GIF" in str(err)


def test_disallowed_format_is_not_an_image():
    # TIFF is a real image format, but not one the service decodes
    err = _code(_bytes(Image.new("RGB", (4, 4)), "TIFF"))
    assert err.code == "not_an_image"


def test_truncated_jpeg_is_corrupt():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _bytes(img, "JPEG", quality=90)
    err = _code(data[: len(data) // 2])
    assert err.code == "corrupt_image"
    assert "could not be decoded" in err.message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_every_cut_of_an_image_is_corrupt_not_unknown(fmt: str) -> None:
    """A file cut anywhere after its magic number is a broken image of its format, not "not an
    image": Pillow cannot even identify a JPEG cut before its image data (at the SOS marker)."""
    rng = np.random.default_rng(1)
    data = _bytes(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), fmt)
    cuts = sorted(set(range(12, min(len(data), 200), 7)) | ({data.find(b"\xff\xda") + 2} if fmt == "JPEG" else set()))
    for cut in cuts:
        with pytest.raises(ImageDecodeError) as info:
            decode_image(data[:cut])
        assert info.value.code == "corrupt_image", (fmt, cut, info.value.message)


@pytest.mark.parametrize("text", [b"RIFF notes, not a WEBP\n" * 4, b"GIF8 is not enough", b"\xff\xd8 and text"])
def test_text_that_starts_like_a_format_is_not_an_image(text: bytes) -> None:
    assert _code(text).code == "not_an_image"


def test_huge_image_with_small_header_is_refused():
    # 10000 x 10000 one-bit pixels compress to a few kB; 1e8 pixels > the 4e7 default cap
    data = _bytes(Image.new("1", (10_000, 10_000)), "PNG")
    assert len(data) < 200_000
    err = _code(data)
    assert (err.code, err.limit) == ("too_many_pixels", 40_000_000)


def test_max_pixels_is_checked_before_decoding():
    data = _bytes(Image.new("RGB", (20, 20)), "PNG")
    err = _code(data, max_pixels=399)
    assert (err.code, err.limit) == ("too_many_pixels", 399)
    assert "20x20 = 400 pixels; the limit is 399 pixels" in err.message
    assert decode_image(data, max_pixels=400).size == (20, 20)
