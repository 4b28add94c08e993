"""The Scorer (what /score and `qscore score` return)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from models.data.transforms import eval_transform
from models.encoders.runtime import Runtime
from models.scoring import scorer as scorer_module
from models.scoring.compatibility import FeatureSetMismatch
from models.scoring.qscore import q_score
from models.scoring.result import FeatureValue
from models.scoring.scorer import Scorer, _feature_values


def test_scorer_matches_q_score(tiny_model):
    encoder, digest, fs = tiny_model
    scorer = Scorer(encoder, digest, fs, device="cpu")
    images = [Image.new("RGB", (48, 40), (i * 40, 255 - i * 30, 90)) for i in range(4)]
    pixels = [scorer.preprocess(im) for im in images]
    assert all(p.shape == (32, 32, 3) and p.dtype == np.uint8 for p in pixels)
    scores = scorer.score(pixels)
    # The scorer's input is eval_transform's, bit for bit: ToTensor then Normalize of the same pixels.
    batch = torch.stack([eval_transform(encoder.spec)(im) for im in images])
    with torch.inference_mode():
        h = encoder(batch)
    q = q_score(h, fs.discriminative_indices, fs.eps)
    assert [s.q_score for s in scores] == pytest.approx(q.tolist(), abs=1e-7)
    for s, hi in zip(scores, h, strict=True):
        assert s.low_quality == (s.q_score < fs.alpha)
        assert s.risk is None  # uncalibrated feature set
        assert s.l1_norm == pytest.approx(float(hi.abs().sum()), rel=1e-5)
        assert {f.index for f in s.discriminative_active} <= set(fs.discriminative)
        assert {f.index for f in s.discriminative_active} <= {f.index for f in s.dominant}
        assert all(f.value == pytest.approx(float(hi[f.index])) for f in s.dominant)


@given(st.integers(0, 2**31 - 1), st.sampled_from([(32, 32), (33, 32), (32, 40), (64, 64), (31, 31)]))
@settings(max_examples=30, deadline=None)
def test_preprocess_gives_resize_and_crop_pixels_whatever_the_size(tiny_model, seed, size):
    """Images already at the encoder's size skip resize and crop, which would give the same pixels."""
    encoder, digest, fs = tiny_model
    scorer = Scorer(encoder, digest, fs, device="cpu")
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = scorer.preprocess(image)
    assert got.shape == (32, 32, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.asarray(scorer._geometry(image)))


def test_scorer_refuses_foreign_feature_set_and_bad_precision(tiny_model):
    encoder, digest, fs = tiny_model
    with pytest.raises(FeatureSetMismatch, match="found on encoder"):
        Scorer(encoder, "0" * 64, fs, device="cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Scorer(encoder, digest, fs, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="only supported on a CUDA device"):
        Scorer(encoder, digest, fs, device="cpu", precision="float16")


def test_with_onnxruntime_on_the_cpu_the_scorers_torch_work_runs_on_one_thread(tiny_model, tmp_path, monkeypatch):
    """ONNX Runtime's pool runs the encoder; torch's spinning OpenMP threads would take its cores."""
    encoder, digest, fs = tiny_model
    torch_scorer = Scorer(encoder, digest, fs, device="cpu")
    scorer = Scorer(encoder, digest, fs, device="cpu", runtime=Runtime("onnxruntime", 2, tmp_path))
    assert (scorer.engine.name, scorer.engine.torch_threads, torch_scorer.engine.torch_threads) == (
        "onnxruntime",
        1,
        None,
    )
    seen: list[tuple[str, int]] = []

    def recording(step: str, run):
        def wrapped(*args):
            seen.append((step, torch.get_num_threads()))
            return run(*args)

        return wrapped

    monkeypatch.setattr(
        scorer, "engine", dataclasses.replace(scorer.engine, forward=recording("forward", scorer.engine.forward))
    )
    monkeypatch.setattr(scorer, "signals", recording("signals", scorer.signals))
    # the feature lists too: one torch op on the full pool leaves its threads spinning into the next forward
    monkeypatch.setattr(scorer_module, "_feature_values", recording("features", scorer_module._feature_values))
    pixels = [np.full((32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    torch.set_num_threads(2)
    try:
        scores = scorer.score(pixels)
        assert torch.get_num_threads() == 2  # restored after each step
    finally:
        torch.set_num_threads(1)
    assert seen == [("forward", 1), ("signals", 1), ("features", 1), ("features", 1)]
    assert [s.q_score for s in scores] == pytest.approx([s.q_score for s in torch_scorer.score(pixels)], rel=1e-5)


def test_feature_values_lists_each_wanted_images_set_features_in_index_order():
    h = torch.tensor([[0.5, 0.0, 2.0], [1.0, 3.0, 0.0], [4.0, 0.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False], [False, True, True]])
    got = _feature_values(h, mask, [True, True, False])
    assert got == [[FeatureValue(0, 0.5), FeatureValue(2, 2.0)], [], None]
    assert _feature_values(h, mask, [False, False, True]) == [None, None, [(1, 0.0), (2, 6.0)]]


@given(st.integers(1, 9), st.integers(1, 12), st.integers(0, 2**31 - 1))
@settings(max_examples=60, deadline=None)
def test_feature_values_equal_a_per_image_nonzero(b, r, seed):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(b, r, generator=gen)
    mask = torch.rand(b, r, generator=gen) < 0.4
    wanted = (torch.rand(b, generator=gen) < 0.7).tolist()
    want = [
        [FeatureValue(j, float(h[i, j])) for j in torch.nonzero(mask[i]).flatten().tolist()] if wanted[i] else None
        for i in range(b)
    ]
    assert _feature_values(h, mask, wanted) == want
