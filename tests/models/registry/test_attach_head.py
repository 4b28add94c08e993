"""A user's own head, registered with a feature set (a new version); bad heads are refused, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.registry.versions import Registry, RegistryError
from models.scoring.error_estimate import ErrorEstimator, SetCorrection
from models.scoring.probe import HeadError, LinearHead

CLASSES = [f"c{i}" for i in range(10)]


def test_linear_and_torchscript_heads_become_new_versions(tiny_registry: Registry, tmp_path: Path) -> None:
    dim = tiny_registry.load_feature_set("tiny").encoder.feature_dim
    linear = LinearHead(torch.randn(10, dim), torch.zeros(10), CLASSES)
    linear.save(tmp_path / "mine.safetensors")
    version = tiny_registry.attach_head("tiny", tmp_path / "mine.safetensors", version="tiny-mine")
    fs = tiny_registry.load_feature_set(version)
    assert fs.head is not None and fs.head.registered and fs.head.kind == "linear" and fs.head.classes == CLASSES
    h = torch.rand(3, dim)
    assert torch.equal(fs.classifier.logits(h), linear.logits(h))
    assert tiny_registry.load_feature_set("tiny").head is None  # the version attached to is unchanged
    scripted = torch.jit.script(torch.nn.Linear(dim, 10))
    torch.jit.save(scripted, str(tmp_path / "mine.pt"))
    version = tiny_registry.attach_head("tiny", tmp_path / "mine.pt", classes=CLASSES)
    assert tiny_registry.load_feature_set(version).classifier.logits(h).shape == (3, 10)


def test_bad_heads_are_refused_and_nothing_is_written(tiny_registry: Registry, tmp_path: Path) -> None:
    before = {p.name for p in tiny_registry.feature_sets_dir.iterdir()}
    LinearHead(torch.randn(10, 7), torch.zeros(10), CLASSES).save(tmp_path / "wrong-dim.safetensors")
    with pytest.raises(RegistryError, match="does not fit feature set 'tiny'.*takes \\(B, 7\\)"):
        tiny_registry.attach_head("tiny", tmp_path / "wrong-dim.safetensors")
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 2)), str(tmp_path / "h.pt"))
    with pytest.raises(HeadError, match="needs its class names"):
        tiny_registry.attach_head("tiny", tmp_path / "h.pt")
    with pytest.raises(HeadError, match="not the \\['a', 'b'\\] given"):
        tiny_registry.attach_head("tiny", tmp_path / "wrong-dim.safetensors", classes=["a", "b"])
    assert {p.name for p in tiny_registry.feature_sets_dir.iterdir()} == before


@pytest.mark.parametrize(
    ("estimator", "kept"),
    [
        (ErrorEstimator(method="cott", threshold=0.5, class_prior=[0.1] * 10), False),
        (ErrorEstimator(method="atc", threshold=0.5), False),
        (ErrorEstimator(method="mean_risk"), True),
        (
            ErrorEstimator(method="mean_risk", correction=SetCorrection(intercept=0.1, mmd2_coef=1, estimate_coef=0)),
            False,
        ),
    ],
)
def test_a_new_head_drops_an_estimator_whose_threshold_was_learnt_on_the_old_one(
    tiny_registry: Registry, tmp_path: Path, estimator: ErrorEstimator, kept: bool
) -> None:
    fs = tiny_registry.load_feature_set("tiny")
    tiny_registry.add_feature_set(fs.model_copy(update={"error_estimator": estimator}), version="tiny-est")
    LinearHead(torch.randn(10, fs.encoder.feature_dim), torch.zeros(10), CLASSES).save(tmp_path / "mine.safetensors")
    version = tiny_registry.attach_head("tiny-est", tmp_path / "mine.safetensors", version="tiny-est-mine")
    assert tiny_registry.load_feature_set(version).error_estimator == (estimator if kept else None)
