"""Discriminative features and the feature-set artifact (SPEC sections 2, 3, 3b)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from models.discovery.discover import (
    count_pass,
    eps_grid,
    make_selection,
    parse_eps,
    q_pass,
    select_per_eps,
)
from models.scoring.dominance import (
    AUTO_EPS_GRID,
    DominanceCounts,
    choose_auto_eps,
    default_alpha,
    select_discriminative,
)
from models.scoring.feature_set import DataProvenance, EncoderRef, FeatureSet, RiskCurve, Selection
from models.scoring.qscore import dominant_mask

# --- DominanceCounts ------------------------------------------------------------------------


def test_dominance_counts_hand_case():
    # eps 1: row 0 = [0,0,0,8]: mu 2, sigma sqrt(12) = 3.46, thr 5.46 -> {3}
    #        row 1 = [6,0,0,2]: mu 2, sigma sqrt((16+4+4+0)/4) = 2.45, thr 4.45 -> {0}
    #        row 2 = [0,0,0,8] again -> {3}
    h = torch.tensor([[0.0, 0, 0, 8], [6, 0, 0, 2], [0, 0, 0, 8]])
    counts = DominanceCounts.of(h, [1.0, 10.0])
    assert counts.for_eps(1.0).tolist() == [1, 0, 0, 2]
    assert counts.for_eps(10.0).tolist() == [0, 0, 0, 0]
    assert counts.n_samples == 3
    assert counts.r == 4


_matrices = st.integers(1, 40).flatmap(
    lambda n: st.integers(2, 24).flatmap(
        lambda r: st.lists(st.lists(st.integers(0, 50), min_size=r, max_size=r), min_size=n, max_size=n)
    )
)


@settings(max_examples=150, deadline=None)
@given(rows=_matrices, data=st.data())
def test_streamed_counts_over_any_split_equal_one_shot(rows, data):
    h = torch.tensor(rows, dtype=torch.float32) / 4
    n = h.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(1, max(1, n - 1)), max_size=5, unique=True)))
    cuts = [c for c in cuts if 0 < c < n]
    shards = [s for s in torch.tensor_split(h, cuts) if s.shape[0]]
    grid = (0.5, 1.0, 2.0)
    one_shot = DominanceCounts.of(h, grid)
    # shards added with +
    summed = DominanceCounts.of(shards[0], grid)
    for s in shards[1:]:
        summed = summed + DominanceCounts.of(s, grid)
    assert torch.equal(summed.counts, one_shot.counts)
    assert summed.n_samples == n
    # shards streamed through update()
    streamed = DominanceCounts.zeros(grid, h.shape[1])
    for s in shards:
        streamed.update(s)
    assert torch.equal(streamed.counts, one_shot.counts)
    # count_pass + selection == single pass + selection
    selection = make_selection(0.25, 0.75)
    counted = count_pass(shards, grid)
    single = count_pass([h], grid)
    assert torch.equal(counted.counts, single.counts)
    per_shard = select_per_eps(counted, selection)
    per_single = select_per_eps(single, selection)
    for eps in grid:
        assert torch.equal(per_shard[eps], per_single[eps])
        # and the counts are the column sums of the dominance mask
        assert counted.for_eps(eps).tolist() == dominant_mask(h, eps).sum(dim=0).tolist()
    # the reference Q pass is shard-independent too
    q_shards, q_single = q_pass(shards, per_shard), q_pass([h], per_single)
    for eps in grid:
        np.testing.assert_array_equal(q_shards[eps], q_single[eps])


def test_dominance_counts_round_trip_dict():
    counts = DominanceCounts.of(torch.rand(10, 6), (1.0, 2.0))
    again = DominanceCounts.from_dict(json.loads(json.dumps(counts.to_dict())))
    assert again.eps == counts.eps and again.n_samples == 10
    assert torch.equal(again.counts, counts.counts)


def test_dominance_counts_errors():
    counts = DominanceCounts.zeros((1.0,), 6)
    with pytest.raises(ValueError, match=r"shape \(N, 6\), got \(3, 5\)"):
        counts.update(torch.rand(3, 5))
    with pytest.raises(ValueError, match="cannot add counts over eps"):
        _ = counts + DominanceCounts.zeros((2.0,), 6)
    with pytest.raises(ValueError, match="cannot add counts.*r=6.*r=7"):
        _ = counts + DominanceCounts.zeros((1.0,), 7)
    with pytest.raises(ValueError, match=r"eps 3.0 was not counted; counted: \(1.0,\)"):
        counts.for_eps(3.0)
    with pytest.raises(ValueError, match="at least one eps"):
        DominanceCounts.zeros((), 6)
    with pytest.raises(ValueError, match="no representations to count"):
        count_pass([], (1.0,))


# --- select_discriminative ------------------------------------------------------------------

# index:           0  1  2  3  4  5  6  7  8  9
HAND_COUNTS = [0, 5, 3, 0, 9, 1, 7, 2, 4, 6]
# ever dominant: 1 2 4 5 6 7 8 9 (m = 8); 0 and 3 never.
# sorted by count ascending: 5(1) 7(2) 2(3) 8(4) 1(5) 9(6) 6(7) 4(9)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        # band [0.25, 0.75): ranks floor(2) .. floor(6) -> 2, 8, 1, 9
        ({"lo": 0.25, "hi": 0.75}, [1, 2, 8, 9]),
        # band [0, 0.5): ranks 0..4 -> 5, 7, 2, 8
        ({"lo": 0.0, "hi": 0.5}, [2, 5, 7, 8]),
        # band [0.5, 1): ranks 4..8 -> 1, 9, 6, 4
        ({"lo": 0.5, "hi": 1.0}, [1, 4, 6, 9]),
        # everything ever dominant, never 0 or 3
        ({"lo": 0.0, "hi": 1.0}, [1, 2, 4, 5, 6, 7, 8, 9]),
        # size 4, centred: start (8 - 4) // 2 = 2 -> ranks 2..6
        ({"size": 4}, [1, 2, 8, 9]),
        # size 3: start (8 - 3) // 2 = 2 -> ranks 2..5 -> 2, 8, 1
        ({"size": 3}, [1, 2, 8]),
        # size 1: start 3 -> 8
        ({"size": 1}, [8]),
        # size 8: all the ever-dominant features
        ({"size": 8}, [1, 2, 4, 5, 6, 7, 8, 9]),
    ],
)
def test_select_discriminative_hand_cases(kwargs, expected):
    chosen = select_discriminative(torch.tensor(HAND_COUNTS), **kwargs)
    assert chosen.dtype == torch.int64
    assert chosen.tolist() == expected


def test_select_discriminative_breaks_ties_by_index():
    # all counts equal: order is 0 1 2 3, band [0.25, 0.75) -> ranks 1, 2
    assert select_discriminative(torch.tensor([2, 2, 2, 2])).tolist() == [1, 2]


def test_select_discriminative_empty_when_nothing_dominates():
    assert select_discriminative(torch.zeros(8, dtype=torch.int64)).tolist() == []


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(0, 20), min_size=1, max_size=64),
    lo=st.floats(0.0, 0.99),
    width=st.floats(0.01, 1.0),
)
def test_select_discriminative_never_selects_never_dominant(counts, lo, width):
    hi = min(1.0, lo + width)
    if not lo < hi:
        return
    c = torch.tensor(counts)
    chosen = select_discriminative(c, lo, hi)
    assert bool((c[chosen] > 0).all())
    assert chosen.tolist() == sorted(set(chosen.tolist()))
    m = int((c > 0).sum())
    assert len(chosen) == int(np.floor(hi * m)) - int(np.floor(lo * m))
    ever = int((c > 0).sum())
    if ever:
        size = max(1, ever // 2)
        sized = select_discriminative(c, size=size)
        assert len(sized) == size and bool((c[sized] > 0).all())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"size": 0}, "size must be between 1 and the 8 features"),
        ({"size": 9}, "size must be between 1 and the 8 features.*got 9"),
        ({"lo": 0.8, "hi": 0.2}, "0 <= lo < hi <= 1, got lo=0.8, hi=0.2"),
        ({"lo": 0.5, "hi": 0.5}, "0 <= lo < hi <= 1"),
        ({"lo": -0.1, "hi": 0.5}, "0 <= lo < hi <= 1"),
        ({"lo": 0.1, "hi": 1.5}, "0 <= lo < hi <= 1"),
    ],
)
def test_select_discriminative_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_discriminative(torch.tensor(HAND_COUNTS), **kwargs)


def test_select_discriminative_rejects_2d_counts():
    with pytest.raises(ValueError, match=r"1-D tensor, got shape \(2, 5\)"):
        select_discriminative(torch.ones(2, 5))


def test_make_selection_and_select_per_eps():
    assert make_selection().model_dump() == {
        "method": "quantile_band",
        "lo": 0.25,
        "hi": 0.75,
        "size": None,
    }
    assert make_selection(size=3).method == "size"
    with pytest.raises(ValueError, match="size must be at least 1"):
        make_selection(size=0)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        make_selection(0.9, 0.1)
    counts = DominanceCounts((1.0, 2.0), torch.tensor([HAND_COUNTS, [0, 0, 0, 0, 3, 0, 0, 0, 1, 0]]), 20)
    # size is capped at the number of ever-dominant features for each eps
    chosen = select_per_eps(counts, make_selection(size=4))
    assert chosen[1.0].tolist() == [1, 2, 8, 9]
    assert chosen[2.0].tolist() == [4, 8]


# --- eps parsing and the auto choice -------------------------------------------------------


def test_parse_eps():
    assert parse_eps("auto") == "auto"
    assert parse_eps(" AUTO ") == "auto"
    assert parse_eps("2.5") == 2.5
    assert parse_eps(3) == 3.0
    with pytest.raises(ValueError, match="positive number or 'auto', got 'four'"):
        parse_eps("four")
    with pytest.raises(ValueError, match="eps must be positive"):
        parse_eps("-1")
    assert eps_grid("auto") == AUTO_EPS_GRID
    assert eps_grid(4) == (4.0,)


@pytest.mark.parametrize(
    ("coverages", "expected"),
    [
        # the largest eps whose coverage reaches 90%
        ({4.0: 0.2, 3.0: 0.85, 2.0: 0.95, 1.5: 0.99}, 2.0),
        ({4.0: 0.91, 3.0: 0.95, 2.0: 0.99}, 4.0),
        ({4.0: 0.9, 3.0: 0.95}, 4.0),  # exactly the target counts as reaching it
        # nothing reaches it: the best-covered eps, ties to the larger eps
        ({4.0: 0.5, 3.0: 0.7, 2.0: 0.7}, 3.0),
        ({4.0: 0.0, 3.0: 0.0}, 4.0),
    ],
)
def test_choose_auto_eps_hand_cases(coverages, expected):
    assert choose_auto_eps(coverages) == expected


def test_choose_auto_eps_other_target():
    assert choose_auto_eps({4.0: 0.6, 3.0: 0.8}, target=0.5) == 4.0
    assert choose_auto_eps({4.0: 0.6, 3.0: 0.8}, target=0.7) == 3.0


# --- default_alpha ------------------------------------------------------------------------


def test_default_alpha_is_tenth_percentile_of_nonzero():
    # non-zero scores 0.1, 0.2, ..., 1.0; numpy's linear percentile: position 0.1 * 9 = 0.9
    # -> 0.1 + 0.9 * (0.2 - 0.1) = 0.19. The zeros are ignored.
    q = np.array([0.0] * 30 + [i / 10 for i in range(1, 11)])
    assert default_alpha(q) == pytest.approx(0.19)
    assert (q[q == 0] < default_alpha(q)).all()


def test_default_alpha_all_zero_is_one():
    assert default_alpha(np.zeros(10)) == 1.0


# --- FeatureSet ---------------------------------------------------------------------------


def _feature_set(**overrides) -> FeatureSet:
    values = {
        "encoder": EncoderRef(fingerprint="ab" * 32, arch="resnet18", feature_dim=8),
        "eps": 2.0,
        "selection": Selection(method="quantile_band", lo=0.25, hi=0.75),
        "counts": [0, 3, 1, 4, 0, 2, 5, 6],
        "discriminative": [1, 3, 5],
        "coverage": 0.75,
        "reference_q_percentiles": {"p50": 0.1},
        "reference_q_nonzero_percentiles": {"p50": 0.12},
        "alpha": 0.05,
        "data": DataProvenance(dataset="x", n_available=10, n_reference=10, sampling="all samples"),
    }
    values.update(overrides)
    return FeatureSet(**values)


def test_feature_set_round_trip_is_atomic(tmp_path):
    fs = _feature_set(risk_curve=RiskCurve(q=[0.0, 0.5], risk=[0.9, 0.1], source="test"))
    assert fs.risk_curve is None and fs.risk_model is not None  # converted: one notion of risk
    target = tmp_path / "sub" / "fs.json"
    fs.save(target)
    assert FeatureSet.load(target) == fs
    assert [p.name for p in target.parent.iterdir()] == ["fs.json"]  # no temporaries left
    # overwriting replaces the file whole
    fs2 = fs.model_copy(update={"alpha": 0.07})
    fs2.save(target)
    assert FeatureSet.load(target).alpha == 0.07
    assert [p.name for p in target.parent.iterdir()] == ["fs.json"]
    assert fs.discriminative_indices.tolist() == [1, 3, 5]
    assert fs.reference_median == 0.1


def test_a_selection_by_size_that_got_fewer_features_says_so():
    short = _feature_set(selection=Selection(method="size", size=5))  # D holds 3
    assert short.selection_warning == (
        "SELECTION: 5 features asked for, only 3 are dominant for any reference sample at eps=2: D holds those 3."
    )
    assert _feature_set(selection=Selection(method="size", size=3)).selection_warning is None
    assert _feature_set().selection_warning is None  # a band: nothing was asked for by number


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"counts": [1, 2, 3]}, "3 counts for an encoder of 8 features"),
        ({"discriminative": [3, 1]}, "sorted and unique"),
        ({"discriminative": [1, 1, 3]}, "sorted and unique"),
        ({"discriminative": [1, 8]}, r"lie in \[0, 8\)"),
        ({"discriminative": [-1, 2]}, r"lie in \[0, 8\)"),
        ({"alpha": 0.0}, "greater than 0"),
        ({"coverage": 1.5}, "less than or equal to 1"),
        ({"format": "qscore.feature_set/v2"}, "qscore.feature_set/v1"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"held_out_image_properties": {"hue": [0.1, 0.2]}}, "unknown image property 'hue'; known: .'brightness'"),
        ({"held_out_image_properties": {"texture": [0.1]}}, "'texture' needs at least 2 finite held-out values"),
        ({"held_out_image_properties": {"texture": [0.1, float("nan")]}}, "at least 2 finite held-out values"),
    ],
)
def test_feature_set_validation_errors(overrides, match):
    with pytest.raises(ValidationError, match=match):
        _feature_set(**overrides)


def test_feature_set_load_rejects_tampered_file(tmp_path):
    path = tmp_path / "fs.json"
    _feature_set().save(path)
    data = json.loads(path.read_text())
    data["counts"] = data["counts"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(ValidationError, match="7 counts for an encoder of 8 features"):
        FeatureSet.load(path)


def test_coverage_warning_below_half():
    assert _feature_set(coverage=0.5).coverage_warning is None
    warning = _feature_set(coverage=0.49).coverage_warning
    assert warning is not None
    assert "LOW COVERAGE" in warning and "49%" in warning and "eps=2" in warning


def test_an_old_risk_curve_becomes_a_risk_model_with_the_same_values():
    fs = _feature_set(risk_curve=RiskCurve(q=[0.0, 0.5, 1.0], risk=[0.8, 0.4, 0.0], source="t"))
    risk = fs.risk({"q_score": np.array([0.0, 0.25, 0.5, 0.75, 2.0, -1.0])})
    np.testing.assert_allclose(risk, [0.8, 0.6, 0.4, 0.2, 0.0, 0.8])
    assert _feature_set().risk({"q_score": np.array([0.1])}) is None
    # signals the model needs but that are missing: no number rather than a wrong one
    assert fs.risk({"knn": np.array([0.1])}) is None


def test_risk_curve_validation():
    with pytest.raises(ValidationError, match="as many"):
        RiskCurve(q=[0.0, 1.0], risk=[0.5], source="t")
    with pytest.raises(ValidationError, match="as many"):
        RiskCurve(q=[], risk=[], source="t")
