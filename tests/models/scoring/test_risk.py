"""The calibrated risk model: fit, cross-validated report, JSON round trip, ECE."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.risk import RiskModel, expected_calibration_error, fit_risk


def _data(n: int = 400, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    knn = rng.normal(size=n)
    noise = rng.normal(size=n)
    miss = (knn + 0.5 * rng.normal(size=n)) > 0.3
    return {"knn": knn, "hoyer": noise, "q_score": -knn + rng.normal(size=n)}, miss


def test_expected_calibration_error_hand_case() -> None:
    ece, table = expected_calibration_error(np.array([0.2, 0.2, 0.8, 0.8]), np.array([0, 1, 1, 1]))
    assert ece == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)
    assert [(b["n"], b["observed"]) for b in table] == [(2, 0.5), (2, 1.0)]


def test_fit_ranks_and_calibrates() -> None:
    sig, miss = _data()
    model, report = fit_risk(sig, miss, signals=("knn", "hoyer", "q_score", "absent"))
    assert model.signals == ["knn", "hoyer", "q_score"]
    assert report["combined"]["auroc"] > 0.85
    assert report["per_signal"]["hoyer"]["auroc"] == pytest.approx(0.5, abs=0.1)
    assert report["combined"]["ece"] < 0.08
    p = model.predict(sig)
    assert p.shape == miss.shape and ((p >= 0) & (p <= 1)).all()
    # a fresh sample: the calibrated probabilities match the observed rate overall
    sig2, miss2 = _data(seed=1)
    assert model.predict(sig2).mean() == pytest.approx(miss2.mean(), abs=0.06)


def test_json_round_trip_is_exact_and_isotonic_variant_works() -> None:
    sig, miss = _data(n=200)
    for calibration in ("platt", "isotonic"):
        model, _ = fit_risk(sig, miss, calibration=calibration)
        again = RiskModel.model_validate_json(model.model_dump_json())
        assert np.array_equal(again.predict(sig), model.predict(sig))


def test_from_q_curve_matches_the_old_isotonic_curve() -> None:
    q, risk = [0.0, 0.01, 0.02], [0.9, 0.5, 0.2]
    model = RiskModel.from_q_curve(q, risk, "old curve")
    qs = np.array([0.0, 0.005, 0.015, 0.03])
    assert model.predict({"q_score": qs}) == pytest.approx(np.interp(qs, q, risk))


def test_errors_say_what_is_missing() -> None:
    sig, miss = _data(n=50)
    with pytest.raises(ValueError, match="none of the signals"):
        fit_risk(sig, miss, signals=("typicality",))
    with pytest.raises(ValueError, match="at least 5 correct and 5 mis-classified"):
        fit_risk({"knn": np.arange(20.0)}, np.arange(20) < 2)
    model, _ = fit_risk(sig, miss)
    with pytest.raises(ValueError, match="needs the signals"):
        model.predict({"knn": np.zeros(3)})
