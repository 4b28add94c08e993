"""Decoding untrusted image bytes into RGB, with the pixel cap checked before decoding.

Used by the service for uploads and by ``qscore score`` for files, so both see the same pixels.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

#: Formats accepted; Pillow is told to try no other decoder.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")


DEFAULT_MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """An upload that is not a usable image; ``code`` is stable for clients and metrics; ``limit``
    the limit it exceeded, for ``too_many_pixels``."""

    def __init__(self, code: str, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.limit = limit


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` to an RGB image (first frame of animations).

    Grayscale, palette, RGBA (composited on white), CMYK and 16-bit images are converted.
    Raises :class:`ImageDecodeError` with code ``empty_file``, ``not_an_image``,
    ``too_many_pixels`` or ``corrupt_image``.
    """
    if not data:
        raise ImageDecodeError("empty_file", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb guard warns first; make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    "too_many_pixels",
                    f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} pixels",
                    max_pixels,
                )
            image.seek(0)
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            started_as = _signature_format(data)
            if started_as is not None:  # Pillow cannot identify a JPEG cut before its image data, say
                raise ImageDecodeError(
                    "corrupt_image", f"the file starts as a {started_as} but could not be read: truncated or broken"
                ) from exc
            raise ImageDecodeError(
                "not_an_image", f"not a decodable image; accepted formats: {', '.join(ALLOWED_FORMATS)}"
            ) from exc
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS) can be the lower of the two limits
        limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
        raise ImageDecodeError("too_many_pixels", f"decompression bomb refused: {exc}", limit) from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError("corrupt_image", f"the image could not be decoded: {exc}") from exc
    return to_rgb(image)


#: The first bytes of the accepted formats (their specifications' magic numbers).
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


def _signature_format(data: bytes) -> str | None:
    """The accepted format ``data`` starts as, by its magic number (WebP: RIFF....WEBP; BMP: BM and
    its zero reserved bytes, as two letters alone start many a text); None if none."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == bytes(4):
        return "BMP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert() clips 16-bit values at 255; rescale instead.
        values = np.asarray(image, dtype=np.float64)
        scale = 257.0 if values.max(initial=0) > 255 or image.mode.startswith("I;16") else 1.0
        image = Image.fromarray(np.clip(values / scale, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")
