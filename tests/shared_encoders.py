"""The shared third-party encoder of ``../shared/models`` (see its README), for the tests that use it.

It is a supervised CIFAR-10 ResNet-20 (not self-supervised): it stands in for a strong encoder.
CI runs from a clean clone with ``../shared/`` beside it; the tests skip, saying why, without it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_MODELS = Path(__file__).resolve().parents[2] / "shared" / "models"
RESNET20_TORCHSCRIPT = SHARED_MODELS / "cifar10-resnet20-supervised.pt"
RESNET20_CHECKPOINT = SHARED_MODELS / "resnet20-12fca82f.th"
#: Its preprocessing: RGB in [0, 1] at 32x32, normalisation inside the module.
RESNET20_FLAGS = ["--image-size", "32", "--mean", "0,0,0", "--std", "1,1,1"]
RESNET20_PREPROCESSING = {"image_size": 32, "mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}


def shared_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared folder ../shared/models beside the checkout)")
    return path
