"""The error estimate of a set of images without labels: mean risk and ATC."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.error_estimate import ErrorEstimator, fit_atc


def test_atc_hand_case() -> None:
    confidence = np.arange(1, 11) / 10  # 0.1 .. 1.0
    correct = np.array([False, True, False, True, True, False, True, True, True, True])  # error 0.3
    atc = fit_atc(confidence, correct)
    assert atc.threshold == pytest.approx(0.4)  # three of ten below it
    assert atc.estimate(None, confidence) == pytest.approx(0.3)
    assert atc.estimate(None, np.array([0.05, 0.35, 0.5, 0.9])) == pytest.approx(0.5)
    assert atc.estimate(np.array([0.9]), None) is None  # ATC reads the confidence, not the risk


def test_atc_reproduces_the_source_error_property() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(5, 300))
        confidence = rng.uniform(size=n)
        correct = rng.uniform(size=n) < rng.uniform(0.05, 0.95)
        atc = fit_atc(confidence, correct)
        assert atc.estimate(None, confidence) == pytest.approx((~correct).mean(), abs=1.0 / n + 1e-12)


def test_mean_risk_and_missing_inputs() -> None:
    est = ErrorEstimator(method="mean_risk")
    assert est.estimate(np.array([0.1, 0.2, 0.6]), None) == pytest.approx(0.3)
    assert est.estimate(None, np.array([0.5])) is None
    assert est.estimate(np.array([]), None) is None
    with pytest.raises(ValueError, match="3 confidences for 2 correctness labels"):
        fit_atc(np.array([0.1, 0.2, 0.3]), np.array([True, False]))
