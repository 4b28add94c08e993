"""Image properties: one number per image that a person can read, for the drift test of the inputs.

The representation test (:mod:`models.monitoring.drift`) cannot see what the encoder was trained
to ignore: a SimCLR encoder learns invariance to colour jitter, so a hue shift of 40 degrees moves
its representations no more than chance (the demo: MMD p 0.33, ``docs/shift.md``) while every
pixel changed. These properties are Deepchecks' default image properties for drift (its
``ImagePropertyDrift``) that apply to images already resized to the encoder's input: brightness,
RMS contrast, the mean relative intensity of each colour channel and the texture level; each
window's distribution of each is compared with the evaluation's held-out images, and the one that
moved says what changed ("brightness", "red_intensity").

Written here rather than taken from Deepchecks: it is AGPL-licensed and pulls in OpenCV and
scikit-image for what is six reductions of a (B, H, W, 3) array.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

#: A batch of images as the scorer takes them: (B, H, W, 3) uint8 arrays, or a (B, 3, H, W) uint8 tensor.
Pixels = np.ndarray | torch.Tensor | Sequence[np.ndarray]

#: In the row order of :func:`image_properties`.
PROPERTIES = ("brightness", "rms_contrast", "red_intensity", "green_intensity", "blue_intensity", "texture")

#: Largest side of the pixel grid the properties are measured on (see :func:`image_properties`).
GRID = 32

#: scikit-image's ``rgb2gray`` weights (ITU-R BT.709 luma), as Deepchecks' brightness and contrast use.
LUMA = np.array([0.2125, 0.7154, 0.0721], dtype=np.float32)


def image_properties(pixels: Pixels) -> np.ndarray:
    """(len(PROPERTIES), B) float32 properties of a batch of RGB images.

    ``pixels``: (B, H, W, 3) uint8 (the scorer's preprocessed images; a list of (H, W, 3) arrays
    is stacked), or a (B, 3, H, W) uint8 tensor (the device decoder's). Values are taken in [0, 1]:

    - ``brightness``: the mean of the grey image (:data:`LUMA`);
    - ``rms_contrast``: its standard deviation;
    - ``red_intensity``, ``green_intensity``, ``blue_intensity``: the mean over pixels of each
      channel's share of the pixel's R + G + B (a black pixel counts a third each);
    - ``texture``: the variance of the grey image's 4-neighbour Laplacian over the interior
      (Deepchecks' texture level; the border is left out rather than reflected).

    Images larger than :data:`GRID` pixels a side are read on a grid of every s-th pixel (s the
    least stride that leaves at most GRID rows and columns), so that the cost per image is bounded
    on the inference thread whatever the input size (a batch of 32 at 224x224 would take 35 ms read
    whole; the demo's 32x32 inputs are read whole). Held-out and served images go through the same
    function, so their properties stay comparable.
    """
    x = _as_bhwc(pixels)
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < 3:
        raise ValueError(f"image properties need (B, H, W, 3) RGB images with H, W >= 3, got shape {x.shape}")
    # in 0..255 (a float array is taken as 0..1), one channel at a time: a third of the time of
    # whole-array arithmetic on the inference thread (0.7 ms a batch of 64 at 32x32)
    unit = 1.0 / 255.0 if x.dtype == np.uint8 else 1.0
    x = x[:, :: -(-x.shape[1] // GRID), :: -(-x.shape[2] // GRID)]  # strides ceil(H / GRID), ceil(W / GRID)
    r, g, b = (x[..., c].astype(np.float32) for c in range(3))
    grey = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b  # (B, H, W)
    total = r + g + b
    dark = total == 0
    total[dark] = 1.0
    shares = [np.where(dark, 1.0 / 3.0, c / total).mean(axis=(1, 2)) for c in (r, g, b)]
    centre = grey[:, 1:-1, 1:-1]
    laplacian = grey[:, :-2, 1:-1] + grey[:, 2:, 1:-1] + grey[:, 1:-1, :-2] + grey[:, 1:-1, 2:] - 4.0 * centre
    return np.stack(
        [
            grey.mean(axis=(1, 2)) * unit,
            grey.std(axis=(1, 2)) * unit,
            *shares,
            laplacian.var(axis=(1, 2)) * unit**2,
        ]
    ).astype(np.float32)


#: Where a measured set keeps them among its signals (models/evaluation/shift_fit.py): ``image_<name>``.
SIGNAL_PREFIX = "image_"


def property_signals(pixels: Pixels) -> dict[str, np.ndarray]:
    """:func:`image_properties` as signals: ``image_<name>`` -> (B,) float32."""
    rows = image_properties(pixels)
    return {SIGNAL_PREFIX + name: rows[i] for i, name in enumerate(PROPERTIES)}


def held_out_properties(signals: dict[str, np.ndarray]) -> dict[str, list[float]] | None:
    """The image properties among a held-out set's ``signals``, each sorted, to 5 significant digits
    (what a feature set keeps for the drift test); None when the set has none."""
    out = {
        name: [float(f"{v:.5g}") for v in np.sort(signals[SIGNAL_PREFIX + name])]
        for name in PROPERTIES
        if SIGNAL_PREFIX + name in signals
    }
    return out or None


def _as_bhwc(pixels: Pixels) -> np.ndarray:
    if isinstance(pixels, torch.Tensor):
        return pixels.detach().cpu().permute(0, 2, 3, 1).numpy() if pixels.dim() == 4 else pixels.numpy()
    if isinstance(pixels, np.ndarray):
        return pixels
    return np.stack([np.asarray(p) for p in pixels])
