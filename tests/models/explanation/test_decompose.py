"""The Q-Score decomposition (eq. 3) on hand-worked cases, against q_score_parts, and the feature groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.explanation.decompose import decompose, feature_groups, ranked_features
from models.scoring.dominance import select_discriminative
from models.scoring.qscore import q_score_parts


def test_feature_groups_follow_discoverys_order() -> None:
    # ever dominant, by count ascending: 2 (1), 6 (2), 3 (3), 4 (3), 1 (5), 5 (9); feature 0 never.
    counts = [0, 5, 1, 3, 3, 9, 2]
    d = select_discriminative(torch.tensor(counts), 0.25, 0.75)
    assert d.tolist() == [3, 4, 6]
    groups = feature_groups(counts, d.tolist())
    assert groups.tolist() == [
        "never_dominant",
        "upper_tail",
        "lower_tail",
        "discriminative",
        "discriminative",
        "upper_tail",
        "discriminative",
    ]


def test_feature_groups_break_ties_by_index_as_discovery_does() -> None:
    counts = [2, 2, 2, 2]  # all tied: discovery's order is the index order
    d = select_discriminative(torch.tensor(counts), size=2)
    assert d.tolist() == [1, 2]
    assert feature_groups(counts, d.tolist()).tolist() == [
        "lower_tail",
        "discriminative",
        "discriminative",
        "upper_tail",
    ]


def test_feature_groups_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\)"):
        feature_groups([1, 2, 3], [3])
    with pytest.raises(ValueError, match="must be 1-D"):
        feature_groups([[1, 2]], [0])


def test_decomposition_of_hand_worked_images() -> None:
    h = torch.tensor(
        [
            [6.0, 0, 0, 3, 0, 0, 0, 1],  # mu 1.25, sigma 2.046: dominant {0, 3} at eps 0.5
            [0.0, 0, 0, 4, 0, 0, 0, 4],  # mu 1, sigma 1.732: dominant {3, 7}
            [0.0, 0, 0, 0, 0, 0, 0, 0],
        ]
    )
    d = [3, 7]
    groups = np.array(["upper_tail"] * 3 + ["discriminative"] + ["lower_tail"] * 3 + ["discriminative"], dtype=object)
    first, second, empty = decompose(h, d, groups, eps=0.5)

    assert first.q_score == pytest.approx(3 / (1 * 10))
    assert (first.numerator, first.l1_norm, first.mean_active) == (3.0, 10.0, 3.0)
    assert (first.discriminative_mass, first.noisy_mass, first.noisy_share) == (4.0, 6.0, 0.6)
    assert [(c.index, c.value, c.share) for c in first.active] == [(3, 3.0, 1.0)]
    assert [(c.index, c.group) for c in first.noisy_dominant] == [(0, "upper_tail")]
    assert first.noisy_mass_by_group == {"upper_tail": 6.0, "lower_tail": 0.0, "never_dominant": 0.0}

    assert second.q_score == pytest.approx(8 / (2 * 8))
    assert [c.share for c in second.active] == [0.5, 0.5]
    assert second.noisy_dominant == () and second.noisy_mass == 0.0

    assert (empty.q_score, empty.l1_norm, empty.noisy_share, empty.active) == (0.0, 0.0, 0.0, ())
    row = first.row()
    assert row["n_active"] == 1 and row["active"][0] == {
        "index": 3,
        "value": 3.0,
        "group": "discriminative",
        "dominant": True,
        "share": 1.0,
    }


def test_decomposition_matches_q_score_parts_on_random_representations() -> None:
    generator = torch.Generator().manual_seed(0)
    h = torch.relu(torch.randn(64, 40, generator=generator)) ** 2
    counts = torch.randint(0, 50, (40,), generator=generator)
    d = select_discriminative(counts)
    groups = feature_groups(counts, d.tolist())
    parts = q_score_parts(h, d, 1.5)
    for i, dec in enumerate(decompose(h, d, groups, eps=1.5)):
        assert dec.q_score == pytest.approx(float(parts.q_score[i]), abs=0)
        assert dec.l1_norm == pytest.approx(dec.discriminative_mass + dec.noisy_mass, rel=1e-6)
        assert sum(dec.noisy_mass_by_group.values()) == pytest.approx(dec.noisy_mass, rel=1e-9)
        assert {c.index for c in dec.active} == set(torch.nonzero(parts.active[i]).flatten().tolist())
        if dec.active:
            assert sum(c.share for c in dec.active) == pytest.approx(1.0)
            assert dec.q_score == pytest.approx(dec.numerator / (len(dec.active) * dec.l1_norm), rel=1e-6)
        values = [c.value for c in dec.active]
        assert values == sorted(values, reverse=True)


def test_ranked_features_take_active_then_noisy_then_the_rest() -> None:
    h = torch.tensor([[6.0, 0.5, 0, 3, 0.25, 0, 0, 1]])
    groups = np.array(["upper_tail"] * 3 + ["discriminative"] + ["lower_tail"] * 3 + ["discriminative"], dtype=object)
    dec = decompose(h, [3, 7], groups, eps=0.5)[0]
    ranked = ranked_features(dec, h[0].numpy(), groups, 5)
    assert [(c.index, c.dominant) for c in ranked] == [(3, True), (0, True), (7, False), (1, False), (4, False)]
    assert [c.index for c in ranked_features(dec, h[0].numpy(), groups, 1)] == [3]
    with pytest.raises(ValueError, match="top must be at least 1"):
        ranked_features(dec, h[0].numpy(), groups, 0)
