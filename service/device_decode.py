"""JPEG decoding on the encoder's device, in batches (``torchvision.io.decode_jpeg``; nvJPEG on CUDA).

On a GPU the forward pass is nearly free and decoding with Pillow on the host becomes the
ceiling; decoding a batch on the device moves that work to the GPU. The preprocessing mirrors
``Scorer.preprocess`` (resize of the short side with antialiasing, centre crop) on uint8 tensors;
the scorer's infer step normalises them as it does any batch. Pixels differ from Pillow's by
decoder and resampler rounding (a few 1/255 steps, see benchmarks/results), so it is opt-in
(``QSCORE_DEVICE_DECODE``): with it off, scores are exactly those of the CPU path.

Imports torch, torchvision, numpy and Pillow only (models.data.images), so the benchmark's
``--raw-only`` mode runs it anywhere.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from models.data.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image

JPEG_MAGIC = b"\xff\xd8\xff"


def is_jpeg(blob: bytes) -> bool:
    return blob[:3] == JPEG_MAGIC


def decode_jpegs(blobs: Sequence[bytes], device: torch.device | str, image_size: int) -> torch.Tensor:
    """JPEG files to (B, 3, image_size, image_size) uint8 pixels on ``device``: decoded, the short
    side resized with antialiasing, centre-cropped (what ``Scorer.preprocess`` does with Pillow).

    Raises RuntimeError when any file is not a decodable JPEG (the caller decodes those one by
    one on the host, where the error gets its code).
    """
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8, device=device)
    for i, image in enumerate(images):
        resized = F.resize(image, [image_size], antialias=True)
        out[i] = F.center_crop(resized, [image_size, image_size])
    return out


def decodable_on_device(blob: bytes, max_pixels: int) -> bool:
    """A baseline RGB or grayscale JPEG within the pixel cap, judged from its header alone; all
    else (other formats, CMYK, broken headers, too many pixels) takes the Pillow path, which
    answers with the service's error codes."""
    if not is_jpeg(blob):
        return False
    try:
        with Image.open(io.BytesIO(blob), formats=["JPEG"]) as image:
            return image.mode in ("RGB", "L") and image.size[0] * image.size[1] <= max_pixels
    except Exception:
        return False


def batch_pixels(
    scorer: Any, images: Sequence[np.ndarray | bytes], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor | None, list[ImageDecodeError | None]]:
    """uint8 pixels (B, 3, S, S) on ``scorer.device`` for a batch mixing preprocessed images
    (``Scorer.preprocess``) and JPEG files to decode there; files that fail to decode are left out.

    Returns (pixels of the images that decoded, in order; per image its decode error or None).
    """
    errors: list[ImageDecodeError | None] = [None] * len(images)
    size = scorer.image_size
    rows: dict[int, torch.Tensor] = {
        i: torch.tensor(x).permute(2, 0, 1) for i, x in enumerate(images) if isinstance(x, np.ndarray)
    }
    files = {i: x for i, x in enumerate(images) if isinstance(x, bytes)}
    if files:
        try:
            rows.update(zip(files, decode_jpegs(list(files.values()), scorer.device, size), strict=True))
        except RuntimeError:  # one bad file fails the batch call: decode them one by one
            for i, blob in files.items():
                try:
                    rows[i] = decode_jpegs([blob], scorer.device, size)[0]
                except RuntimeError:
                    try:  # Pillow names the problem with the service's error codes
                        rows[i] = torch.tensor(scorer.preprocess(decode_image(blob, max_pixels))).permute(2, 0, 1)
                    except ImageDecodeError as exc:
                        errors[i] = exc
    order = sorted(rows)
    if not order:
        return None, errors
    return torch.stack([rows[i].to(scorer.device) for i in order]), errors
