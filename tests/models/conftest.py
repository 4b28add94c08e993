"""Fixtures for the tests of models/ (the shared ones live in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from models.encoders.resnet import ResNetEncoder, build_encoder
from models.encoders.spec import EncoderSpec


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from two threads, and on a shared 2-core machine OpenMP's
    spin-waiting against other processes makes a width-8 forward pass 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_encoder(spec: EncoderSpec, seed: int = 0) -> ResNetEncoder:
    """A seeded encoder whose BatchNorm running statistics are not the defaults."""
    torch.manual_seed(seed)
    encoder = build_encoder(spec)
    encoder.train()
    size = spec.image_size
    with torch.no_grad():
        for _ in range(2):
            encoder(torch.randn(4, 3, size, size) * 2 + 0.5)
    return encoder.eval()


@pytest.fixture(scope="session")
def bn_encoder(tiny_spec: EncoderSpec) -> ResNetEncoder:
    """A width-8 CIFAR ResNet-18 with non-trivial BatchNorm statistics, in eval mode."""
    return make_encoder(tiny_spec)


@pytest.fixture(scope="session")
def probe_images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def make_bn_encoder():
    """``make_encoder`` as a fixture, so test modules need not import conftest."""
    return make_encoder
