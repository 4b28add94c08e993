"""Discovery: assembling a feature set from the counting and Q passes, eps auto or fixed, and
``discover`` on a seeded random sample (SPEC sections 2, 3, 3b)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.discovery.discover import build_feature_set, count_pass, discover, make_selection, q_pass, select_per_eps
from models.scoring.dominance import AUTO_EPS_GRID, default_alpha, select_discriminative
from models.scoring.feature_set import DataProvenance, EncoderRef
from models.scoring.qscore import coverage, q_score

# --- assembling a feature set (eps auto) ----------------------------------------------------


def _synthetic_h(n=400, r=32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, r, generator=g) ** 3 * 10


def test_build_feature_set_auto_picks_largest_eps_reaching_target():
    h = _synthetic_h()
    shards = list(torch.split(h, 64))
    counts = count_pass(shards, AUTO_EPS_GRID)
    selection = make_selection()
    selections = select_per_eps(counts, selection)
    q_by_eps = q_pass(shards, selections)
    ref = EncoderRef(fingerprint="f" * 64, arch="resnet18", feature_dim=32)
    data = DataProvenance(dataset="synthetic", n_available=400, n_reference=400, sampling="all samples")
    fs = build_feature_set(
        counts=counts,
        selections=selections,
        q_by_eps=q_by_eps,
        eps="auto",
        selection=selection,
        encoder=ref,
        data=data,
    )
    # independent: coverage per eps from the q_score API
    cov = {e: coverage(h, selections[e], e) for e in AUTO_EPS_GRID}
    reaching = [e for e, c in cov.items() if c >= 0.9]
    assert reaching, cov  # the synthetic data has a well-covered eps
    assert fs.eps == max(reaching)
    assert fs.eps_mode == "auto"
    assert fs.coverage == pytest.approx(cov[fs.eps])
    assert fs.coverage_by_eps == {f"{e:g}": pytest.approx(c) for e, c in cov.items()}
    assert fs.discriminative == selections[fs.eps].tolist()
    assert fs.counts == counts.for_eps(fs.eps).tolist()
    q = q_score(h, selections[fs.eps], fs.eps).numpy()
    assert fs.alpha == pytest.approx(default_alpha(q))
    assert fs.reference_q_percentiles["p50"] == pytest.approx(float(np.median(q)))


def test_build_feature_set_fixed_eps_keeps_it_and_warns(caplog):
    h = _synthetic_h()
    counts = count_pass([h], (8.0,))
    selections = select_per_eps(counts, make_selection())
    q_by_eps = q_pass([h], selections)
    fs = build_feature_set(
        counts=counts,
        selections=selections,
        q_by_eps=q_by_eps,
        eps=8.0,
        selection=make_selection(),
        encoder=EncoderRef(fingerprint="f" * 64, arch="resnet18", feature_dim=32),
        data=DataProvenance(dataset="s", n_available=400, n_reference=400, sampling="all samples"),
    )
    assert fs.eps == 8.0 and fs.eps_mode == "fixed"
    assert fs.coverage < 0.5
    assert fs.alpha > 0
    assert "LOW COVERAGE" in caplog.text


class _TensorDataset(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0


def test_discover_samples_at_random_and_records_provenance():
    # identity "encoder" over pre-made representations: discovery sees h as they are
    h = _synthetic_h(n=300, r=16)

    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    ref = EncoderRef(fingerprint="f" * 64, arch="resnet18", feature_dim=16)
    fs = discover(
        Identity(),
        _TensorDataset(h),
        dataset_name="syn",
        encoder_ref=ref,
        eps=1.0,
        sample_size=100,
        seed=3,
        batch_size=32,
    )
    assert fs.data.n_available == 300 and fs.data.n_reference == 100 and fs.data.seed == 3
    assert "random sample" in fs.data.sampling
    # the same as running the passes by hand on the same seeded sample
    idx = np.sort(np.random.default_rng(3).choice(300, size=100, replace=False))
    counts = count_pass([h[idx]], (1.0,))
    assert fs.counts == counts.for_eps(1.0).tolist()
    assert fs.discriminative == select_discriminative(counts.for_eps(1.0)).tolist()
