"""Shared fixtures: small CIFAR-10 slices and a tiny trained-enough encoder in a registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from models.data.datasets import class_slice, ensure_cifar10, image_folder
from models.data.transforms import eval_transform
from models.discovery.discover import discover, make_selection
from models.encoders.resnet import build_encoder
from models.encoders.spec import EncoderSpec
from models.registry.versions import Registry
from models.scoring.feature_set import EncoderRef, FeatureSet

# Two cores on CI: keep torch from oversubscribing when pytest and servers run side by side.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The extracted CIFAR-10 JPEG folder (train/, test/), extracted once into .cache/."""
    return ensure_cifar10()


@pytest.fixture(scope="session")
def cifar_slice(cifar_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small labelled slice: train/ 30 and test/ 10 images per class (300 + 100)."""
    root = tmp_path_factory.mktemp("cifar_slice")
    class_slice(cifar_root / "train", root / "train", per_class=30, seed=0)
    class_slice(cifar_root / "test", root / "test", per_class=10, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_spec() -> EncoderSpec:
    return EncoderSpec(arch="resnet18", cifar_stem=True, width=8, image_size=32)


@pytest.fixture(scope="session")
def tiny_model(tiny_spec: EncoderSpec, cifar_slice: Path) -> tuple:
    """(encoder, fingerprint, feature set): a seeded width-8 ResNet-18 and features found on the slice."""
    from models.encoders.spec import fingerprint

    torch.manual_seed(0)
    encoder = build_encoder(tiny_spec).eval()
    digest = fingerprint(encoder.backbone_state_dict())
    dataset = image_folder(cifar_slice / "train", eval_transform(tiny_spec))
    feature_set = discover(
        encoder,
        dataset,
        dataset_name="cifar-slice-train",
        encoder_ref=EncoderRef(fingerprint=digest, arch="resnet18", feature_dim=tiny_spec.feature_dim),
        eps="auto",
        selection=make_selection(),
        sample_size=None,
        batch_size=100,
    )
    return encoder, digest, feature_set


@pytest.fixture()
def tiny_registry(tmp_path: Path, tiny_model: tuple) -> Registry:
    """A fresh registry holding the tiny model as version 'tiny' with feature set 'tiny', active."""
    encoder, _, feature_set = tiny_model
    registry = Registry(tmp_path / "registry")
    registry.add_model(encoder, version="tiny")
    fs: FeatureSet = feature_set.model_copy(deep=True)
    fs.encoder.model_version = "tiny"
    registry.add_feature_set(fs, version="tiny")
    registry.set_active("tiny", "tiny")
    return registry
