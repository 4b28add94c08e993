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


def test_sign_constrained_logistic_equals_scikit_learn_without_constraints() -> None:
    from sklearn.linear_model import LogisticRegression

    from models.scoring.risk import PENALTY_C, SignConstrainedLogistic

    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(size=300)) > 0
    ours = SignConstrainedLogistic(PENALTY_C).fit(x, y)
    theirs = LogisticRegression(C=PENALTY_C, max_iter=1000, tol=1e-8).fit(x, y)
    assert np.allclose(ours.coef_, theirs.coef_, atol=1e-4)
    assert np.allclose(ours.intercept_, theirs.intercept_, atol=1e-4)
    constrained = SignConstrainedLogistic(PENALTY_C, nonnegative=(1,)).fit(x, y)
    assert constrained.coef_[0, 1] == 0.0  # the data want -2: the bound holds it at 0


def test_risk_never_falls_as_typicality_rises_and_other_signals_are_clipped() -> None:
    """Even where the data say the opposite, the monotone signal's coefficient stays >= 0."""
    rng = np.random.default_rng(0)
    for trial in range(8):
        n = 200
        knn, log_typ = rng.normal(size=n), rng.exponential(size=n)
        sign = rng.choice([-1.0, 1.0])  # half the trials: atypical images look *safer* in the data
        miss = (knn + sign * log_typ + rng.normal(size=n)) > 0.5
        model, _ = fit_risk({"knn": knn, "log_typicality": log_typ}, miss, signals=("knn", "log_typicality"))
        assert model.monotone == ["log_typicality"]
        assert model.coef[model.signals.index("log_typicality")] >= 0
        grid = np.linspace(0, 50, 200)  # far beyond the fitted range (exponential: max ~7)
        p = model.predict({"knn": np.full(200, rng.normal()), "log_typicality": grid})
        assert (np.diff(p) >= -1e-12).all(), trial
        # knn beyond its fitted range reads as its bound: no extrapolation
        far = model.predict({"knn": np.array([knn.max() + 100.0]), "log_typicality": np.array([1.0])})
        edge = model.predict({"knn": np.array([knn.max()]), "log_typicality": np.array([1.0])})
        assert far == pytest.approx(edge)


def test_grouped_weighted_fit_reports_subsets() -> None:
    sig, miss = _data(n=300)
    groups = np.arange(300) // 3  # three copies of each source image
    weight = np.where(np.arange(300) < 100, 2.0, 0.5)
    subsets = {"first": np.arange(300) < 100, "rest": np.arange(300) >= 100}
    model, report = fit_risk(sig, miss, groups=groups, sample_weight=weight, subsets=subsets)
    assert report["subsets"]["first"]["n"] == 100
    assert report["subsets"]["first"]["error"] == pytest.approx(miss[:100].mean())
    assert 0 <= report["subsets"]["rest"]["mean_risk"] <= 1
    with pytest.raises(ValueError, match="sample_weight must be"):
        fit_risk(sig, miss, sample_weight=-np.ones(300))


def test_a_negative_monotone_coefficient_is_refused_on_load() -> None:
    with pytest.raises(ValueError, match="must be >= 0"):
        RiskModel(signals=["log_typicality"], mean=[0.0], scale=[1.0], coef=[-1.0], intercept=0.0,
                  monotone=["log_typicality"], source="test", n_train=0)  # fmt: skip


def test_images_of_no_class_get_a_noisy_or_that_only_raises_risk() -> None:
    rng = np.random.default_rng(1)
    n, k = 300, 60
    knn = rng.normal(size=n + k)
    log_typ = np.concatenate([rng.exponential(0.5, n), rng.uniform(3, 8, k)])  # no-class images: far out
    no_class = np.arange(n + k) >= n
    miss = ((knn + rng.normal(size=n + k)) > 0.5) | no_class
    sig = {"knn": knn, "log_typicality": log_typ}
    model, report = fit_risk(sig, miss, signals=("knn", "log_typicality"), no_class=no_class,
                             subsets={"none": no_class, "some": ~no_class})  # fmt: skip
    assert len(model.no_class_coef) == 2 and report["no_class"]["n"] == k
    assert model.no_class_coef[model.signals.index("log_typicality")] >= 0
    p, of_a_class = model.predict(sig), model.predict_of_a_class(sig)
    assert (p >= of_a_class - 1e-12).all()
    assert report["subsets"]["none"]["mean_risk"] > 0.9 and report["subsets"]["none"]["error"] == 1.0
    grid = np.linspace(0, 40, 300)
    assert (np.diff(model.predict({"knn": np.zeros(300), "log_typicality": grid})) >= -1e-12).all()
    again = RiskModel.model_validate_json(model.model_dump_json())
    assert np.array_equal(again.predict(sig), p)


def test_signals_independent_of_the_label_rank_no_subset_backwards() -> None:
    # 300 lone images beside 10 groups of 82 copies whose error rates differ by group (as
    # `qscore evaluate --shift-samples 10` makes them): folds cannot be balanced, and before the
    # fold's error rate was taken out of its intercept the lone images' pooled out-of-fold AUROC
    # was 0.33 on average (0.24 at worst) with signals that carry nothing.
    clean_auroc, copies_auroc = [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        n_clean, n_groups, per_group = 300, 10, 82
        n = n_clean + n_groups * per_group
        sig = {s: rng.normal(size=n) for s in ("q_score", "log_l1", "hoyer", "knn")}
        miss = np.concatenate(
            [
                rng.random(n_clean) < 0.77,
                rng.random(n - n_clean) < np.repeat(rng.choice([0.5, 0.95], n_groups), per_group),
            ]
        )
        groups = np.concatenate([np.arange(n_clean), np.repeat(np.arange(n_groups) + n_clean, per_group)])
        clean = np.arange(n) < n_clean
        weight = np.where(clean, 0.5 / n_clean, 0.5 / (n - n_clean)) * n
        _, report = fit_risk(sig, miss, sample_weight=weight, groups=groups, subsets={"clean": clean, "copies": ~clean})
        clean_auroc.append(report["subsets"]["clean"]["auroc"])
        copies_auroc.append(report["subsets"]["copies"]["auroc"])
    assert abs(np.mean(clean_auroc) - 0.5) < 0.05, clean_auroc
    assert abs(np.mean(copies_auroc) - 0.5) < 0.05, copies_auroc
