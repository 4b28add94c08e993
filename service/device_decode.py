"""JPEG decoding on the encoder's device, in batches (``torchvision.io.decode_jpeg``; nvJPEG on CUDA).

On a GPU the forward pass is nearly free and decoding with Pillow on the host becomes the
ceiling; decoding a batch on the device moves that work to the GPU. The preprocessing mirrors
models.data.transforms.eval_transform (resize of the short side with antialiasing, centre crop, scale to
[0, 1], normalise) on tensors. Pixels differ from Pillow's by decoder and resampler rounding (a
few 1/255 steps, see benchmarks/results), so it is opt-in (``QSCORE_DEVICE_DECODE``): with it
off, scores are exactly those of the CPU path.

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


def decode_jpegs(
    blobs: Sequence[bytes],
    device: torch.device | str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """JPEG files to the encoder's (B, 3, image_size, image_size) float input, on ``device``.

    Raises RuntimeError when any file is not a decodable JPEG (the caller decodes those one by
    one on the host, where the error gets its code).
    """
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.float32, device=device)
    for i, image in enumerate(images):
        resized = F.resize(image, [image_size], antialias=True)
        out[i] = F.center_crop(resized, [image_size, image_size])
    out.div_(255.0)
    return F.normalize(out, list(mean), list(std), inplace=True)


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


def batch_inputs(
    scorer: Any, images: Sequence[np.ndarray | bytes], max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[torch.Tensor | None, list[ImageDecodeError | None]]:
    """The encoder's input for a batch mixing prepared images (``Scorer.prepare``) and JPEG files
    to decode on ``scorer.device``; rows of files that fail to decode are left out.

    Returns (inputs of the images that decoded, in order; per image its decode error or None).
    """
    errors: list[ImageDecodeError | None] = [None] * len(images)
    spec = scorer.encoder.spec
    arrays = {i: x for i, x in enumerate(images) if isinstance(x, np.ndarray)}
    files = {i: x for i, x in enumerate(images) if isinstance(x, bytes)}
    rows: dict[int, torch.Tensor] = {}
    if arrays:
        for i, row in zip(arrays, scorer.inputs(list(arrays.values())), strict=True):
            rows[i] = row
    if files:
        try:
            decoded = decode_jpegs(list(files.values()), scorer.device, spec.image_size, spec.mean, spec.std)
            rows.update(zip(files, decoded, strict=True))
        except RuntimeError:  # one bad file fails the batch call: decode them one by one
            for i, blob in files.items():
                try:
                    rows[i] = decode_jpegs([blob], scorer.device, spec.image_size, spec.mean, spec.std)[0]
                except RuntimeError:
                    try:  # Pillow names the problem with the service's error codes
                        rows[i] = scorer.inputs([scorer.prepare(decode_image(blob, max_pixels))])[0]
                    except ImageDecodeError as exc:
                        errors[i] = exc
    order = sorted(rows)
    if not order:
        return None, errors
    return torch.stack([rows[i].to(scorer.device) for i in order]), errors
