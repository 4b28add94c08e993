"""The signal graph: the scorer's arithmetic after the forward pass as one ONNX Runtime session (issue 18).

It must give the torch path's signals, parts and verdicts (within 1e-5 relative, the same dominant
features), on real images and over random batches; and where it does not answer as torch does,
it is not used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from models.data.datasets import ensure_cifar10
from models.encoders.runtime import Runtime
from models.registry.versions import Registry
from models.scoring import signal_graph
from models.scoring.probe import HeadInfo, TorchScriptHead, head_probabilities
from models.scoring.scorer import PROBABILITIES, Inference, Scorer
from models.scoring.signal_graph import GRAPH_TOLERANCE, PARTS, build_signal_graph
from models.scoring.typicality import pixel_signals

ORT = Runtime("onnxruntime", intra_op_threads=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    registry = Registry(tmp_path_factory.mktemp("graph") / "registry")
    registry.seed_demo()
    return registry.load_model("demo"), registry.load_feature_set("demo")


@pytest.fixture(scope="module")
def demo_scorers(demo):
    imported, fs = demo
    return (
        Scorer(imported.encoder, imported.fingerprint, fs, "cpu"),
        Scorer(imported.encoder, imported.fingerprint, fs, "cpu", runtime=ORT),
    )


def real_pixels(scorer: Scorer) -> list[np.ndarray]:
    """24 CIFAR-10 test images (every 400th) and 4 inputs of no class: a solid colour, noise, a stripe."""
    paths = sorted((ensure_cifar10() / "test").rglob("*.jpg"))[::400]
    rng = np.random.default_rng(0)
    images = [Image.open(p).convert("RGB") for p in paths]
    images += [
        Image.new("RGB", (32, 32), (200, 30, 90)),
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)),
        Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((16, 16), np.uint8))).convert("RGB"),
        Image.new("RGB", (32, 32), (0, 0, 0)),
    ]
    return [scorer.preprocess(im) for im in images]


def torch_path(scorer: Scorer, inference: Inference, pixels: list[np.ndarray]) -> Inference:
    """The same representations without the graph's outputs: :meth:`Scorer.signals` runs on torch."""
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float().div(255)
    return Inference(inference.h, pixel_signals(x))


def test_the_graph_gives_the_torch_paths_signals_and_verdicts_on_real_images(demo_scorers) -> None:
    by_torch, by_ort = demo_scorers
    assert by_torch.signal_graph is None and by_ort.signal_graph is not None
    assert by_ort.signal_graph.inputs == {"pixels", "h"}  # the demo's typicality reads the pixels
    pixels = real_pixels(by_ort)
    inference = by_ort.infer(pixels)
    assert inference.graph is not None and inference.pixel_stats is None
    parts, sig = by_ort.signals(inference)
    want_parts, want = by_ort.signals(torch_path(by_ort, inference, pixels))
    assert set(sig) == set(want) and {"knn", "pix_fine", "proto_conf_64", "probe_margin", "typicality"} <= set(sig)
    for name in want:
        # the graph's own contract (signal_graph.check): within GRAPH_TOLERANCE of the larger of 1 and
        # the signal's largest |value|, absolute for a margin, a difference of nearly equal probabilities
        scale = max(float(np.max(np.abs(want[name]), initial=0.0)), 1.0)
        np.testing.assert_allclose(sig[name], want[name], rtol=0, atol=GRAPH_TOLERANCE * scale, err_msg=name)
    np.testing.assert_array_equal(sig["probe_prediction"], want["probe_prediction"])
    # the head's class probabilities ride along for the monitor's COTT, and are no signal
    assert PROBABILITIES not in sig and torch_path(by_ort, inference, pixels).probabilities is None
    want_p = head_probabilities(by_ort.head, inference.h)
    np.testing.assert_allclose(inference.probabilities, want_p, rtol=0, atol=GRAPH_TOLERANCE)
    assert torch.equal(parts.dominant, want_parts.dominant) and torch.equal(parts.active, want_parts.active)
    for name in ("q_score", "mean_active", "l1_norm"):
        torch.testing.assert_close(getattr(parts, name), getattr(want_parts, name), rtol=1e-5, atol=1e-7)

    # and the verdicts against the torch runtime's, end to end
    got_scores, want_scores = by_ort.score(pixels), by_torch.score(pixels)
    for got, w in zip(got_scores, want_scores, strict=True):
        for field in ("q_score", "l1_norm"):
            assert getattr(got, field) == pytest.approx(getattr(w, field), rel=1e-5, abs=1e-7), field
        for field in ("risk", "typicality", "confidence"):  # unit scale: absolute at least, as above
            assert getattr(got, field) == pytest.approx(getattr(w, field), rel=1e-5, abs=GRAPH_TOLERANCE), field
        assert (got.predicted_class, got.low_quality, got.atypical) == (w.predicted_class, w.low_quality, w.atypical)
        assert [f.index for f in got.dominant] == [f.index for f in w.dominant]
    assert any(s.atypical for s in want_scores) and any(s.q_score > 0 for s in want_scores)


@given(st.integers(1, 17), st.integers(0, 2**31 - 1))
@settings(max_examples=25, deadline=None)
def test_the_graph_equals_its_torch_function_on_random_batches(demo_scorers, n: int, seed: int) -> None:
    """Any batch size (the graph was traced at 2), any sparse non-negative representations."""
    _, scorer = demo_scorers
    pixels, h = signal_graph._probe(n, 32, scorer.encoder.feature_dim, seed)
    got = scorer.signal_graph.run(pixels, h)
    with torch.no_grad():
        parts, want = scorer._signal_tensors(h, pixels.float().div(255), head=True, probabilities=True)
    assert set(got.signals) == set(want)
    for name, t in want.items():
        # absolute for the unit-scale ones: a margin is a difference of nearly equal probabilities
        np.testing.assert_allclose(got.signals[name], t.numpy(), rtol=1e-5, atol=1e-5, err_msg=name)
    assert torch.equal(got.parts.dominant, parts.dominant) and torch.equal(got.parts.active, parts.active)


def test_without_typicality_or_risk_the_graph_holds_the_q_score_alone(tiny_model) -> None:
    encoder, digest, fs = tiny_model
    fs = fs.model_copy(update={"typicality": None, "risk_model": None})  # nothing reads the other signals
    scorer = Scorer(encoder, digest, fs, "cpu", runtime=ORT)
    assert scorer.signal_graph is not None
    assert set(scorer.signal_graph.names) == {f"parts.{p}" for p in PARTS} | {"q_score", "mean_active"}
    pixels = [np.full((32, 32, 3), 30 * i, np.uint8) for i in range(5)]
    got, want = scorer.score(pixels), Scorer(encoder, digest, fs, "cpu").score(pixels)
    assert [s.q_score for s in got] == pytest.approx([s.q_score for s in want], rel=1e-5, abs=1e-9)
    assert [s.risk for s in got] == [None] * 5


def test_a_users_torchscript_head_runs_on_torch_after_the_graph(demo) -> None:
    imported, fs = demo
    linear = fs.classifier
    module = torch.jit.script(torch.nn.Linear(linear.dim, len(linear.classes)))
    with torch.no_grad():
        module.weight.copy_(linear.weight)
        module.bias.copy_(linear.bias)
    scripted = fs.with_head(
        TorchScriptHead(module, linear.classes), HeadInfo(kind="torchscript", classes=linear.classes, source="test")
    )
    scorer = Scorer(imported.encoder, imported.fingerprint, scripted, "cpu", runtime=ORT)
    assert scorer.signal_graph is not None
    assert not any(name.startswith("probe_") for name in scorer.signal_graph.names)
    pixels = real_pixels(scorer)[:8]
    _, sig = scorer.signals(scorer.infer(pixels))
    by_torch = Scorer(imported.encoder, imported.fingerprint, fs, "cpu")
    _, want = by_torch.signals(by_torch.infer(pixels))
    for name in ("probe_max_softmax", "probe_entropy", "probe_margin", "log_typicality"):
        np.testing.assert_allclose(sig[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(sig["probe_prediction"], want["probe_prediction"])


def test_a_graph_that_answers_otherwise_is_not_used(monkeypatch, caplog) -> None:
    """The check compares the traced graph with the function eagerly: a graph that froze a value
    the function no longer has is refused, and the scorer stays on torch."""
    offset = [0.0]

    def compute(h: torch.Tensor, pixels: torch.Tensor | None):
        from models.scoring.qscore import q_score_parts

        parts = q_score_parts(h, torch.ones(h.shape[1], dtype=torch.bool))
        return parts, {"q_score": parts.q_score + offset[0]}

    traced = signal_graph._trace

    def trace_then_change(*args):
        model = traced(*args)
        offset[0] = 0.5  # after the trace: the graph holds 0.0
        return model

    monkeypatch.setattr(signal_graph, "_trace", trace_then_change)
    with caplog.at_level(logging.WARNING, logger="models.scoring.signal_graph"):
        graph = build_signal_graph(compute, needs_pixels=False, image_size=8, feature_dim=16, intra_op_threads=1)
    assert graph is None
    assert "signals run on torch" in caplog.text and "q_score differs from torch's by" in caplog.text
    offset[0] = 0.0
    monkeypatch.setattr(signal_graph, "_trace", traced)
    assert build_signal_graph(compute, needs_pixels=False, image_size=8, feature_dim=16, intra_op_threads=1)


def test_a_function_that_does_not_trace_leaves_the_scorer_on_torch(tiny_model, monkeypatch, caplog) -> None:
    encoder, digest, fs = tiny_model

    def untraceable(*args: object) -> bytes:
        raise RuntimeError("Unsupported: data-dependent control flow")

    monkeypatch.setattr(signal_graph, "_trace", untraceable)
    with caplog.at_level(logging.WARNING, logger="models.scoring.signal_graph"):
        scorer = Scorer(encoder, digest, fs, "cpu", runtime=ORT)
    assert scorer.signal_graph is None and "data-dependent control flow" in caplog.text
    pixels = [np.full((32, 32, 3), 90, np.uint8)]
    assert scorer.infer(pixels).graph is None
    assert scorer.score(pixels)[0].q_score == pytest.approx(Scorer(encoder, digest, fs, "cpu").score(pixels)[0].q_score)


def test_the_graph_is_built_for_onnxruntime_on_the_cpu_only(tiny_model, tmp_path: Path) -> None:
    encoder, digest, fs = tiny_model
    assert Scorer(encoder, digest, fs, "cpu", runtime=Runtime("torch")).signal_graph is None
    assert Scorer(encoder, digest, fs, "cpu", runtime=Runtime("onnxruntime", 1, tmp_path)).signal_graph is not None


def test_a_large_bank_keeps_the_scorer_on_torch(demo, monkeypatch, caplog) -> None:
    """The graph would hold a second copy of the bank: over the limit it is not made."""
    imported, fs = demo
    monkeypatch.setattr(signal_graph, "MAX_BANK_BYTES", fs.bank.nbytes // 2)
    with caplog.at_level(logging.WARNING, logger="models.scoring.signal_graph"):
        scorer = Scorer(imported.encoder, imported.fingerprint, fs, "cpu", runtime=ORT)
    assert scorer.signal_graph is None and "second copy of the 2.5 MiB reference bank" in caplog.text
