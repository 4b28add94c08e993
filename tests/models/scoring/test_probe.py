"""The served head: folding the probe, signals, files, and the errors bad heads get."""

from __future__ import annotations

import math
import stat

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.scoring.probe import (
    HeadError,
    HeadInfo,
    LinearHead,
    TorchScriptHead,
    check_head,
    head_signals,
    load_head,
)


def _fitted(n_classes: int, seed: int = 0) -> tuple[object, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(120, 12)) * rng.uniform(0.5, 3, 12) + rng.normal(size=12)
    y = rng.integers(0, n_classes, 120)
    x[np.arange(120), y] += 2.0  # something to learn
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(x, y), x


@pytest.mark.parametrize("n_classes", [2, 3, 10])
def test_folded_probe_gives_the_pipelines_probabilities(n_classes: int) -> None:
    pipeline, x = _fitted(n_classes)
    classes = [f"c{i}" for i in range(n_classes)]
    head = LinearHead.from_sklearn(pipeline, classes)
    p = torch.softmax(head.logits(torch.from_numpy(x).float()), dim=1).numpy()
    assert np.allclose(p, pipeline.predict_proba(x), atol=1e-5)
    assert head.classes == classes


def test_head_signals_hand_cases() -> None:
    sig = head_signals(torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]))
    assert sig["probe_max_softmax"] == pytest.approx([0.5, 0.75])
    assert sig["probe_margin"] == pytest.approx([0.0, 0.5])
    assert sig["probe_entropy"] == pytest.approx([math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))])


def test_linear_head_round_trip_is_exact_and_readable(tmp_path) -> None:
    head = LinearHead(torch.randn(3, 5), torch.randn(3), ["a", "b", "c"])
    path = tmp_path / "x.head.safetensors"
    head.save(path)
    again = load_head(path, HeadInfo(kind="linear", classes=["a", "b", "c"], source="test"))
    h = torch.randn(7, 5)
    assert torch.equal(again.logits(h), head.logits(h))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # the api and the workers read it
    with pytest.raises(HeadError, match="the feature set records"):
        load_head(path, HeadInfo(kind="linear", classes=["x", "y", "z"], source="test"))
    path.write_bytes(b"not a head")
    with pytest.raises(HeadError, match="not a readable safetensors head"):
        LinearHead.load(path)


def test_bad_heads_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(HeadError, match="weight \\(C, r\\) and bias \\(C,\\)"):
        LinearHead(torch.randn(3, 5), torch.randn(4), ["a", "b", "c"])
    with pytest.raises(HeadError, match="3 rows of weights for 2 class names"):
        LinearHead(torch.randn(3, 5), torch.randn(3), ["a", "b"])
    with pytest.raises(HeadError, match="finite"):
        LinearHead(torch.full((2, 5), float("nan")), torch.zeros(2), ["a", "b"])
    head = LinearHead(torch.randn(2, 5), torch.zeros(2), ["a", "b"])
    with pytest.raises(HeadError, match="takes \\(B, 5\\) representations"):
        check_head(head, 8)
    scripted = TorchScriptHead(torch.jit.script(torch.nn.Linear(8, 3)), ["a", "b"])  # 3 logits, 2 names
    with pytest.raises(HeadError, match="expected \\(4, 2\\)"):
        check_head(scripted, 8)


def test_torchscript_head_round_trip(tmp_path) -> None:
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3)))
    head = TorchScriptHead(module, ["a", "b", "c"])
    path = tmp_path / "x.head.pt"
    head.save(path)
    again = load_head(path, HeadInfo(kind="torchscript", classes=["a", "b", "c"], source="test"))
    h = torch.randn(5, 8)
    assert torch.allclose(again.logits(h), head.logits(h))
    path.write_bytes(b"junk")
    with pytest.raises(HeadError, match="not a TorchScript module"):
        TorchScriptHead.load(path, ["a", "b", "c"])
