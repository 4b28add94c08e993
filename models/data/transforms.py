"""The evaluation transform: resize the short side, centre-crop, normalise (what an encoder is fed)."""

from __future__ import annotations

import logging

from torchvision import transforms

from models.encoders.spec import EncoderSpec

log = logging.getLogger(__name__)


def eval_transform(spec: EncoderSpec) -> transforms.Compose:
    """Resize (short side), centre-crop to the encoder's input size, normalise."""
    return transforms.Compose(
        [
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )
