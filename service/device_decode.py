"""JPEG decoding on the encoder's device, in batches (``torchvision.io.decode_jpeg``; nvJPEG on CUDA).

On a GPU the forward pass is nearly free and decoding with Pillow on the host becomes the
ceiling; decoding a batch on the device moves that work to the GPU. The preprocessing mirrors
models.data.eval_transform (resize of the short side with antialiasing, centre crop, scale to
[0, 1], normalise) on tensors. Pixels differ from Pillow's by decoder and resampler rounding (a
few 1/255 steps, see benchmarks/results), so it is opt-in (``QSCORE_DEVICE_DECODE``): with it
off, scores are exactly those of the CPU path.

Imports torch and torchvision only, so the benchmark's ``--raw-only`` mode runs it anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

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
