"""The drift test: the MMD permutation test (an exact small case, calibration under the null, power under a
shift), the typicality and image property tests beside it and their combination."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.monitoring.drift import (
    DriftReference,
    combined_p_value,
    gaussian_kernel,
    median_bandwidth,
    mmd2_unbiased,
    permutation_test,
    split_statistics,
    squared_distances,
    typicality_p_value,
)
from models.monitoring.image_properties import PROPERTIES


def _pooled_kernel(x: np.ndarray, y: np.ndarray, bandwidth: float) -> np.ndarray:
    z = np.concatenate([x, y])
    kernel = gaussian_kernel(squared_distances(z, z), bandwidth)
    np.fill_diagonal(kernel, 0.0)
    return kernel


def test_mmd2_of_three_against_three_points_by_hand() -> None:
    x, y = np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [0.0], [3.0]])
    e = math.exp
    # s = 1: k(d) = exp(-d^2 / 2). X pairs at 1, 2, 1; Y pairs at 0, 3, 3; X-Y: 0 0 3 / 1 1 2 / 2 2 1.
    kxx = 2 * (2 * e(-0.5) + e(-2)) / 6
    kyy = 2 * (1 + 2 * e(-4.5)) / 6
    kxy = (2 + e(-4.5) + 3 * e(-0.5) + 3 * e(-2)) / 9
    expected = kxx + kyy - 2 * kxy
    assert mmd2_unbiased(x, y, 1.0) == pytest.approx(expected, rel=1e-12)
    mask = np.array([[1.0], [1.0], [1.0], [0.0], [0.0], [0.0]])
    assert split_statistics(_pooled_kernel(x, y, 1.0), mask)[0] == pytest.approx(expected, rel=1e-12)


def test_split_statistics_equal_the_direct_mmd2_of_every_split() -> None:
    rng = np.random.default_rng(0)
    for trial in range(20):
        n, m = int(rng.integers(2, 8)), int(rng.integers(2, 8))
        z = rng.normal(size=(n + m, 3))
        bandwidth = float(rng.uniform(0.5, 2.0))
        kernel = _pooled_kernel(z[:n], z[n:], bandwidth)
        masks = np.zeros((n + m, 5))
        splits = [rng.permutation(n + m)[:n] for _ in range(5)]
        for s, members in enumerate(splits):
            masks[members, s] = 1.0
        stats = split_statistics(kernel, masks)
        for s, members in enumerate(splits):
            rest = np.setdiff1d(np.arange(n + m), members)
            assert stats[s] == pytest.approx(mmd2_unbiased(z[members], z[rest], bandwidth), abs=1e-12), trial


def test_median_bandwidth_is_the_median_pairwise_distance() -> None:
    assert median_bandwidth(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(2.0)  # distances 1, 3, 2
    assert median_bandwidth(np.ones((4, 2))) == 1.0  # no scale to read


def test_p_values_are_roughly_uniform_when_both_samples_share_a_distribution() -> None:
    p = []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        reference = DriftReference(rng.normal(size=(60, 4)), size=60)
        p.append(reference.test(rng.normal(size=(40, 4)), permutations=200, seed=seed).p_value)
    p = np.array(p)
    assert (p < 0.05).mean() <= 0.1  # about 0.05 expected: an exact test
    assert 0.3 <= (p < 0.5).mean() <= 0.7
    assert p.min() >= 1 / 201


def test_a_shifted_gaussian_is_detected() -> None:
    rng = np.random.default_rng(1)
    reference = DriftReference(rng.normal(size=(200, 4)), size=200)
    result = reference.test(rng.normal(size=(100, 4)) + 0.5, permutations=200)
    assert result.p_value == pytest.approx(1 / 201)  # no permutation reaches the observed MMD^2
    assert result.mmd2 > 0 and result.window_count == 100 and result.reference_count == 200


def test_each_test_draws_its_own_seeded_sample_of_the_bank() -> None:
    bank = np.random.default_rng(2).normal(size=(500, 3))
    reference = DriftReference(bank, size=100, seed=0)
    a, b = reference.sample(1), reference.sample(2)
    assert a.shape == (100, 3) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, reference.sample(1))
    assert {tuple(v) for v in a} <= {tuple(v) for v in bank}
    assert reference.bandwidth == median_bandwidth(reference.sample(0))
    small = DriftReference(bank[:50], size=100)  # a smaller bank is used whole, every time
    assert small.size == 50 and small.sample(7) is small.bank
    window = np.random.default_rng(3).normal(size=(30, 3))
    assert reference.test(window, seed=4) == reference.test(window, seed=4)  # seeded: the same p-value twice
    assert small.test(window, seed=4) == small.test(window, seed=4)  # the whole bank's kernel is kept


def test_bad_inputs_say_what_is_wrong() -> None:
    reference = DriftReference(np.random.default_rng(0).normal(size=(10, 3)))
    with pytest.raises(ValueError, match=r"the window must be \(n, 3\)"):
        reference.test(np.zeros((5, 2)))
    with pytest.raises(ValueError, match="at least 2 vectors in each sample, got 1 and 10"):
        reference.test(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="N >= 2"):
        DriftReference(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="permutations must be positive"):
        permutation_test(np.zeros((4, 4)), 2, 0, np.random.default_rng(0))


def test_combined_p_value_is_bonferroni_over_the_tests_that_ran() -> None:
    assert combined_p_value(0.004, 0.3) == pytest.approx(0.008)
    assert combined_p_value(0.3, 0.0) == 0.0
    assert combined_p_value(0.6, None) == 0.6  # the typicality test did not run: the MMD's p alone
    assert combined_p_value(0.7, 0.9) == 1.0  # capped
    with pytest.raises(ValueError, match="no test ran"):
        combined_p_value(None, None)


def test_typicality_p_value_of_two_separated_pairs_by_hand() -> None:
    # Kolmogorov-Smirnov, exact: D = 1 only for the 2 of the 6 splits of {0,1,2,3} that keep {0,1} together.
    assert typicality_p_value(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == pytest.approx(1 / 3)
    # unknown (NaN) typicality is left out; under 2 known values there is no test
    assert typicality_p_value(np.array([0.0, np.nan, 1.0]), np.array([2.0, 3.0])) == pytest.approx(1 / 3)
    assert typicality_p_value(np.array([0.5, np.nan]), np.array([2.0, 3.0])) is None
    assert typicality_p_value(np.array([0.5, 1.0]), np.array([2.0])) is None


def test_a_typicality_shift_the_directions_do_not_show_is_detected() -> None:
    rng = np.random.default_rng(5)
    bank = rng.normal(size=(300, 4))
    held_out = rng.gamma(4.0, 0.2, size=1000)
    reference = DriftReference(bank, size=300, held_out_typicality=held_out)
    window = bank[rng.choice(300, 100, replace=False)] + rng.normal(scale=0.05, size=(100, 4))  # the bank's own
    shifted = reference.test(window, permutations=200, seed=1, typicality=rng.gamma(4.0, 0.2, 100) + 0.5)
    assert shifted.mmd_p_value > 0.05 and shifted.typicality_p_value < 1e-6
    assert shifted.p_value == pytest.approx(2 * shifted.typicality_p_value)
    same = reference.test(window, permutations=200, seed=1, typicality=rng.gamma(4.0, 0.2, 100))
    assert same.typicality_p_value > 0.01
    assert same.p_value == pytest.approx(min(1.0, 2 * min(same.mmd_p_value, same.typicality_p_value)))
    without = DriftReference(bank, size=300).test(window, permutations=200, seed=1, typicality=held_out[:100])
    assert without.typicality_p_value is None and without.p_value == without.mmd_p_value == shifted.mmd_p_value


def test_combined_p_values_stay_calibrated_when_nothing_shifts() -> None:
    p = []
    for seed in range(50):
        rng = np.random.default_rng(100 + seed)
        reference = DriftReference(rng.normal(size=(60, 4)), size=60, held_out_typicality=rng.normal(size=500))
        p.append(reference.test(rng.normal(size=(40, 4)), 200, seed, typicality=rng.normal(size=40)).p_value)
    assert (np.array(p) < 0.05).mean() <= 0.1  # Bonferroni: at most about 0.05


def test_mmd2_alone_is_the_tests_statistic_for_the_same_seed() -> None:
    rng = np.random.default_rng(5)
    reference = DriftReference(rng.normal(size=(400, 6)), size=100)
    window = rng.normal(0.3, 1.0, size=(40, 6))
    for seed in (0, 3):
        assert reference.mmd2(window, seed) == pytest.approx(reference.test(window, 10, seed=seed).mmd2, rel=1e-9)
    with pytest.raises(ValueError, match="the window must be \\(n, 6\\)"):
        reference.mmd2(window[:, :5])


def _properties(rng: np.random.Generator, n: int, red_shift: float = 0.0) -> np.ndarray:
    """(len(PROPERTIES), n) image properties: every row N(0.3, 0.05), red_intensity moved by red_shift."""
    rows = rng.normal(0.3, 0.05, size=(len(PROPERTIES), n))
    rows[PROPERTIES.index("red_intensity")] += red_shift
    return rows


def test_an_image_property_shift_the_representations_do_not_show_is_detected_and_named() -> None:
    rng = np.random.default_rng(6)
    bank = rng.normal(size=(300, 4))
    held_out = {name: row for name, row in zip(PROPERTIES, _properties(rng, 1000), strict=True)}
    reference = DriftReference(
        bank, size=300, held_out_typicality=rng.gamma(4.0, 0.2, 1000), held_out_properties=held_out
    )
    window = bank[rng.choice(300, 100, replace=False)] + rng.normal(scale=0.05, size=(100, 4))
    typicality = rng.gamma(4.0, 0.2, 100)
    shifted = reference.test(window, 200, 1, typicality=typicality, properties=_properties(rng, 100, red_shift=0.05))
    per = shifted.property_p_values
    assert per is not None and set(per) == set(PROPERTIES)
    assert min(per, key=per.get) == "red_intensity" and per["red_intensity"] < 1e-8  # what moved, by name
    assert shifted.property_p_value == pytest.approx(min(1.0, 6 * per["red_intensity"]))  # Bonferroni over 6
    assert shifted.mmd_p_value > 0.05 and shifted.typicality_p_value > 0.01  # type: ignore[operator]
    assert shifted.p_value == pytest.approx(3 * shifted.property_p_value)  # and over the three tests
    # NaN properties (a batch recorded without its pixels) are left out of the test
    partly = _properties(rng, 100)
    partly[:, :60] = np.nan
    same = reference.test(window, 200, 1, typicality=typicality, properties=partly)
    assert same.property_p_value > 0.01  # type: ignore[operator]
    assert same.p_value == pytest.approx(
        min(1.0, 3 * min(same.mmd_p_value, same.typicality_p_value, same.property_p_value))
    )  # type: ignore[type-var]
    # without held-out properties, or without the window's, no property test
    for test in (
        DriftReference(bank, size=300).test(window, 200, 1, properties=_properties(rng, 100, 0.05)),
        reference.test(window, 200, 1),
    ):
        assert test.property_p_value is None and test.property_p_values is None


def test_only_known_image_properties_are_held_out() -> None:
    with pytest.raises(ValueError, match=r"unknown image properties \['hue'\]; known: \['brightness'"):
        DriftReference(np.zeros((4, 2)), held_out_properties={"hue": np.ones(5)})


def test_three_tests_stay_calibrated_when_nothing_shifts() -> None:
    p = []
    for seed in range(50):
        rng = np.random.default_rng(300 + seed)
        held_out = dict(zip(PROPERTIES, _properties(rng, 500), strict=True))
        reference = DriftReference(
            rng.normal(size=(60, 4)), size=60, held_out_typicality=rng.normal(size=500), held_out_properties=held_out
        )
        window = rng.normal(size=(40, 4))
        p.append(
            reference.test(window, 200, seed, typicality=rng.normal(size=40), properties=_properties(rng, 40)).p_value
        )
    assert (np.array(p) < 0.05).mean() <= 0.1  # Bonferroni: at most about 0.05
