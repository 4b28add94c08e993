"""The Scorer (what /score and `qscore score` return) and the data helpers it relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from models.data.datasets import random_sample, shard
from models.data.transforms import eval_transform
from models.scoring.compatibility import FeatureSetMismatch
from models.scoring.qscore import q_score
from models.scoring.scorer import Scorer


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


def test_scorer_refuses_foreign_feature_set_and_bad_precision(tiny_model):
    encoder, digest, fs = tiny_model
    with pytest.raises(FeatureSetMismatch, match="found on encoder"):
        Scorer(encoder, "0" * 64, fs, device="cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        Scorer(encoder, digest, fs, device="cpu", precision="int8")
    with pytest.raises(ValueError, match="only supported on a CUDA device"):
        Scorer(encoder, digest, fs, device="cpu", precision="float16")


def test_random_sample_is_seeded_and_uniform():
    a, b = random_sample(1000, 100, seed=4), random_sample(1000, 100, seed=4)
    assert a.indices == b.indices and a.indices == sorted(a.indices)
    assert len(set(a.indices)) == 100
    assert random_sample(1000, 100, seed=5).indices != a.indices
    # not "the first N": a class-sorted folder would otherwise give one class
    assert max(a.indices) > 500
    assert "seed 4" in a.description
    everything = random_sample(10, None)
    assert everything.indices == list(range(10)) and everything.description == "all samples"
    assert random_sample(10, 50).indices == list(range(10))
    with pytest.raises(ValueError, match="sample size must be positive"):
        random_sample(10, 0)


def test_shard_splits_contiguously():
    parts = shard(list(range(10)), 3)
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert shard([1, 2], 5) == [[1], [2]]
    assert shard([], 3) == []
    assert np.concatenate(shard(list(range(97)), 7)).tolist() == list(range(97))
    with pytest.raises(ValueError, match="n_shards must be at least 1"):
        shard([1], 0)
