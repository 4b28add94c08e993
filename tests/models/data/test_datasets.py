"""The data helpers discovery and jobs rely on: seeded random samples and contiguous shards."""

from __future__ import annotations

import numpy as np
import pytest

from models.data.datasets import random_sample, shard


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
