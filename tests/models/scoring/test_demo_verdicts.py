"""The packaged demo gives every verdict out of the box: typicality from its bank, a calibrated risk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.registry.versions import Registry
from models.scoring.scorer import Scorer


def test_demo_scores_cifar_typical_and_solid_colours_atypical(tmp_path: Path, cifar_slice: Path) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.seed_demo()
    imported, fs = registry.load_model("demo"), registry.load_feature_set("demo")
    assert fs.bank is not None and fs.bank.size == fs.typicality.n_bank == 5000
    assert (registry.feature_set_dir("demo") / "feature_set.bank.safetensors").stat().st_size < 2_000_000
    scorer = Scorer(imported.encoder, imported.fingerprint, fs, "cpu")
    cifar = [Image.open(p).convert("RGB") for p in sorted((cifar_slice / "test").rglob("*.jpg"))]
    rng = np.random.default_rng(0)
    solid = [Image.new("RGB", (32, 32), tuple(int(c) for c in rng.integers(0, 256, 3))) for _ in range(20)]
    scores = scorer.score_images(cifar + solid)
    real, shifted = scores[: len(cifar)], scores[len(cifar) :]
    assert np.mean([s.atypical for s in real]) <= 0.05
    assert all(s.atypical and "atypical" in s.reasons for s in shifted)
    assert all(s.risk is not None and 0.0 <= s.risk <= 1.0 for s in scores)


def test_feature_set_without_typicality_or_risk_answers_none(tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.seed_demo()
    imported, fs = registry.load_model("demo"), registry.load_feature_set("demo")
    bare = type(fs).model_validate(fs.model_dump() | {"typicality": None, "risk_model": None})
    scorer = Scorer(imported.encoder, imported.fingerprint, bare, "cpu")
    assert scorer.bank is None and scorer.bank_bytes == 0
    scores = scorer.score(torch.zeros(3, 3, 32, 32, dtype=torch.uint8))
    assert all(s.typicality is None and s.atypical is None and s.risk is None for s in scores)
    assert all(s.reasons == (("q_below_alpha",) if s.low_quality else ()) for s in scores)
