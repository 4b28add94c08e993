"""The evaluation transform: resize the short side, centre-crop, normalise (what an encoder is fed)."""

from __future__ import annotations

import logging

from PIL import Image
from torchvision import transforms

from models.encoders.spec import EncoderSpec

log = logging.getLogger(__name__)

#: Up to this ratio of long to short side an image takes torchvision's two steps (resize, then
#: crop) bit for bit, which then resize at most this many times ``size`` x ``size`` pixels;
#: beyond it :class:`ResizeCentreCrop` computes the crop alone.
MAX_TWO_STEP_ASPECT = 16.0


class ResizeCentreCrop:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image, at a bounded cost.

    The two steps resize the whole image before the crop keeps ``size`` x ``size`` of it: a 1 x
    200,000 strip (667 bytes as a PNG) became a 32 x 6,400,000 image first, 15 s and a gigabyte
    for an upload (a new-user journey). Beyond :data:`MAX_TWO_STEP_ASPECT` only the crop is
    computed, by one Pillow resize of the source box the crop covers: the same sample positions
    and the same filter, within one grey level of the two steps (the positions are rounded
    differently, which moves a filter weight that sits on a rounding tie).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._two_steps = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)])

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        short, long = min(w, h), max(w, h)
        if long <= MAX_TWO_STEP_ASPECT * short:
            return self._two_steps(image)
        # torchvision's arithmetic: the resized size (short side = size), then the crop's offset in it
        size = self.size
        new_long = int(size * long / short)
        new_w, new_h = (size, new_long) if w <= h else (new_long, size)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        sx, sy = w / new_w, h / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), Image.Resampling.BILINEAR, box=box)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def eval_transform(spec: EncoderSpec) -> transforms.Compose:
    """Resize (short side), centre-crop to the encoder's input size, normalise."""
    return transforms.Compose(
        [ResizeCentreCrop(spec.image_size), transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    )
