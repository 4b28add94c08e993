"""The error estimate of a set of images without labels: mean risk, ATC and COTT."""

from __future__ import annotations

import numpy as np
import pytest

from models.scoring.error_estimate import (
    COTT_MIN_IMAGES,
    ErrorEstimator,
    SetCorrection,
    fit_atc,
    fit_cott,
    fit_set_correction,
    thresholded_transport,
    transport,
)


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


# -- COTT (thresholded confidence optimal transport) ------------------------------------------
def test_transport_hand_case() -> None:
    # Both images lean to class 0, but half the labels are class 1: one image must be moved there.
    p = np.array([[0.9, 0.1], [0.8, 0.2]])
    plan, cost = transport(p, [0.5, 0.5])
    # image 0 -> class 0 and image 1 -> class 1 cost 0.5 (0.1 + 0.8) / 2; the swap costs 0.55
    assert plan == pytest.approx(np.array([[0.5, 0.0], [0.0, 0.5]]))
    assert (plan * cost).sum() == pytest.approx(0.45)
    assert thresholded_transport(p, [0.5, 0.5], 0.5) == pytest.approx(0.5)  # the moved image's cost 0.8 >= 0.5
    assert thresholded_transport(p, [0.5, 0.5], 0.05) == pytest.approx(1.0)
    assert thresholded_transport(p, [0.5, 0.5], 0.85) == 0.0


def test_cott_sees_a_window_piled_onto_one_class() -> None:
    # Confident predictions, all of class 0: per image nothing looks wrong, but with ten classes in
    # equal shares nine tenths of them cannot be right.
    p = np.zeros((COTT_MIN_IMAGES, 10))
    p[:, 0] = 1.0
    cott = ErrorEstimator(method="cott", threshold=0.5, class_prior=[0.1] * 10)
    assert cott.estimate(None, None, p) == pytest.approx(0.9)
    atc = ErrorEstimator(method="atc", threshold=0.5)
    assert atc.estimate(None, p.max(axis=1)) == 0.0


def test_fit_cott_reproduces_the_held_out_error_property() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n, c = int(rng.integers(20, 300)), int(rng.integers(2, 8))
        labels = rng.integers(0, c, n)
        labels[:c] = np.arange(c)  # every class present
        logits = rng.normal(size=(n, c)) * rng.uniform(0.5, 4)
        logits[np.arange(n), labels] += rng.uniform(0, 3)
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        cott = fit_cott(p, labels)
        error = float((p.argmax(axis=1) != labels).mean())
        assert cott.class_prior == pytest.approx(np.bincount(labels, minlength=c) / n)
        # the threshold is a cost the plan moves mass at: the estimate overshoots by at most one image's mass
        estimate = thresholded_transport(p, cott.class_prior, cott.threshold)  # type: ignore[arg-type]
        assert error - 1e-9 <= estimate <= error + 1.0 / n + 1e-9
        assert 0.0 <= estimate <= 1.0
        # the rows' order does not matter
        order = rng.permutation(n)
        assert thresholded_transport(p[order], cott.class_prior, cott.threshold) == pytest.approx(estimate)  # type: ignore[arg-type]


def test_cott_on_a_small_window_is_the_mean_risk() -> None:
    cott = ErrorEstimator(method="cott", threshold=0.5, class_prior=[0.5, 0.5])
    p = np.tile([[1.0, 0.0]], (COTT_MIN_IMAGES - 1, 1))
    assert cott.estimate(np.array([0.2, 0.4]), None, p) == pytest.approx(0.3)
    assert cott.estimate(np.array([0.2, 0.4]), None, None) == pytest.approx(0.3)
    assert cott.estimate(None, None, p) is None
    assert cott.estimate(None, None, np.vstack([p, [[1.0, 0.0]]])) == pytest.approx(0.5)


def test_cott_errors() -> None:
    with pytest.raises(ValueError, match="needs a class_prior"):
        ErrorEstimator(method="cott", threshold=0.5)
    with pytest.raises(ValueError, match="needs a class_prior"):
        ErrorEstimator(method="cott", threshold=0.5, class_prior=[0.5, 0.6])
    with pytest.raises(ValueError, match="'atc' needs a threshold"):
        ErrorEstimator(method="atc")
    with pytest.raises(ValueError, match=r"probabilities must be \(n >= 1, 3\), got \(4, 2\)"):
        transport(np.full((4, 2), 0.5), [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="must be finite"):
        transport(np.array([[np.nan, 1.0]]), [0.5, 0.5])
    with pytest.raises(ValueError, match="3 probability rows for 2 labels"):
        fit_cott(np.full((3, 2), 0.5), np.array([0, 1]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        fit_cott(np.full((2, 2), 0.5), np.array([0, 2]))


def test_fit_cott_under_shift_hand_case() -> None:
    # held out: right on every image (error 0); its transport costs 0.1, 0.4 (class 0) and 0.3, 0.2 (class 1)
    clean = np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]])
    labels = np.array([0, 0, 1, 1])
    # shifted: every image confidently class 0, half of them wrong; half its mass moves at cost 0.9
    piled = np.tile([[0.9, 0.1]], (4, 1))
    alone = fit_cott(clean, labels)
    assert alone.threshold > 1.0  # no error to reproduce: nothing counts
    assert thresholded_transport(piled, alone.class_prior, alone.threshold) == 0.0  # type: ignore[arg-type]
    fitted = fit_cott(clean, labels, [(piled, 0.5)])
    # both errors are exact for any threshold in (0.4, 0.9]: the grid's first is 0.401
    assert fitted.threshold == pytest.approx(0.401)
    assert thresholded_transport(clean, [0.5, 0.5], fitted.threshold) == 0.0  # type: ignore[arg-type]
    assert thresholded_transport(piled, [0.5, 0.5], fitted.threshold) == pytest.approx(0.5)  # type: ignore[arg-type]
    assert "fitted on it and 1 shifted sets (mean |estimate - error| 0.0000)" in fitted.source


def test_fit_cott_under_shift_beats_the_held_out_threshold_on_its_sets_property() -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        c = int(rng.integers(2, 6))
        sets = []
        for temperature in (1.0, *rng.uniform(0.3, 3.0, 4)):
            labels = rng.integers(0, c, 250)
            logits = rng.normal(size=(250, c)) / temperature
            logits[np.arange(250), labels] += 2.0 / temperature
            p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            sets.append((p, labels, float((p.argmax(1) != labels).mean())))
        (p0, y0, e0), shifted = sets[0], [(p, e) for p, _, e in sets[1:]]
        alone, fitted = fit_cott(p0, y0), fit_cott(p0, y0, shifted)
        # the grid (steps of 0.001) may miss the held-out threshold's exact cost: allow one image of slack

        labelled = [(p0, e0), *shifted]
        assert _mae(fitted, labelled) <= _mae(alone, labelled) + 1.0 / 250


def _mae(est: ErrorEstimator, sets: list[tuple[np.ndarray, float]]) -> float:
    assert est.class_prior is not None and est.threshold is not None
    return float(np.mean([abs(thresholded_transport(p, est.class_prior, est.threshold) - e) for p, e in sets]))


# -- the set-level correction ----------------------------------------------------------------
def test_set_correction_hand_case() -> None:
    c = SetCorrection(intercept=0.01, mmd2_coef=0.5, estimate_coef=-0.1)
    assert c.apply(0.4, 0.2) == pytest.approx(0.4 + 0.01 + 0.1 - 0.04)
    assert c.apply(0.95, 1.0) == 1.0  # clipped
    assert SetCorrection(intercept=-0.3, mmd2_coef=0.0, estimate_coef=0.0).apply(0.1, 0.0) == 0.0


def test_estimate_is_corrected_only_with_the_windows_mmd2_and_the_chosen_method() -> None:
    correction = SetCorrection(intercept=0.0, mmd2_coef=1.0, estimate_coef=0.0)
    risk = np.array([0.1, 0.3])
    est = ErrorEstimator(method="mean_risk", correction=correction)
    assert est.estimate(risk, None) == pytest.approx(0.2)  # no MMD^2: uncorrected
    assert est.estimate(risk, None, mmd2=0.25) == pytest.approx(0.45)
    assert est.estimate(risk, None, mmd2=float("nan")) == pytest.approx(0.2)
    assert est.estimate(None, None, mmd2=0.25) is None
    # COTT's fallback on a small window is the mean risk, for which the correction was not fitted
    cott = ErrorEstimator(method="cott", threshold=0.5, class_prior=[0.5, 0.5], correction=correction)
    assert cott.estimate(risk, None, np.full((2, 2), 0.5), mmd2=0.25) == pytest.approx(0.2)
    p = np.tile([[0.9, 0.1]], (COTT_MIN_IMAGES, 1))  # all on class 0, half the prior on class 1
    assert cott.estimate(None, None, p) == pytest.approx(0.5)
    assert cott.estimate(None, None, p, mmd2=0.25) == pytest.approx(0.75)
    # and it survives the feature set's JSON
    assert ErrorEstimator.model_validate_json(cott.model_dump_json()) == cott


def test_fit_set_correction_recovers_a_linear_residual_property() -> None:
    rng = np.random.default_rng(3)
    for _ in range(30):
        a, b, c = rng.uniform(0.1, 1.0), rng.uniform(-0.3, 0.3), rng.uniform(-0.05, 0.05)
        families = [f"f{i}" for i in range(int(rng.integers(4, 10)))]
        groups = ["clean"] + [f for f in families for _ in range(3)]
        mmd2 = np.concatenate([[0.0], rng.uniform(0.0, 0.5, len(groups) - 1)])
        estimate = rng.uniform(0.1, 0.6, len(groups))
        error = np.clip(estimate + c + a * mmd2 + b * estimate, 0.0, 1.0)
        correction, figures = fit_set_correction(estimate, mmd2, error, groups)
        assert correction is not None
        assert figures["corrected_leave_one_family_out"] < 1e-3 < figures["uncorrected"]
        assert correction.mmd2_coef == pytest.approx(a, abs=1e-3)
        assert correction.estimate_coef == pytest.approx(b, abs=1e-3)
        assert correction.apply(0.3, 0.2) == pytest.approx(0.3 + c + 0.2 * a + 0.3 * b, abs=1e-3)


def test_fit_set_correction_is_not_kept_where_it_cannot_help() -> None:
    groups = ["clean"] + [f"f{i}" for i in range(5) for _ in range(3)]
    rng = np.random.default_rng(0)
    estimate = rng.uniform(0.1, 0.6, len(groups))
    mmd2 = rng.uniform(0.0, 0.5, len(groups))
    # exact estimates: nothing to correct (the corrected error cannot go below 0)
    correction, figures = fit_set_correction(estimate, mmd2, estimate, groups)
    assert correction is None and figures["uncorrected"] == 0.0
    assert figures["corrected_leave_one_family_out"] >= 0.0
    # too few sets, or one family only: not fitted at all
    few, few_figures = fit_set_correction(estimate[:5], mmd2[:5], estimate[:5] + 0.1, groups[:5])
    assert few is None and few_figures["corrected_leave_one_family_out"] is None
    one = ["clean"] + ["f0"] * (len(groups) - 1)
    assert fit_set_correction(estimate, mmd2, estimate + mmd2, one)[0] is None


def test_fit_set_correction_errors() -> None:
    with pytest.raises(ValueError, match="3 estimates and MMD\\^2 for 2 errors and 3 groups"):
        fit_set_correction([0.1, 0.2, 0.3], [0.0, 0.1, 0.2], [0.1, 0.2], ["clean", "a", "b"])
    with pytest.raises(ValueError, match="must be finite"):
        fit_set_correction([0.1, np.nan], [0.0, 0.1], [0.1, 0.2], ["clean", "a"])


def test_the_clean_set_anchors_the_correction_where_shifted_errors_do_not_follow_the_estimate() -> None:
    # shifted sets whose error is about 0.66 whatever the estimate says: unanchored, the fit learns
    # to replace the estimate by 0.66, and the clean window (error 0.61) is moved with them
    rng = np.random.default_rng(4)
    groups = ["clean"] + [f"f{i}" for i in range(8) for _ in range(4)]
    n = len(groups)
    estimate = np.concatenate([[0.60], rng.uniform(0.55, 0.8, n - 1)])
    mmd2 = np.concatenate([[0.0], rng.uniform(0.0, 0.2, n - 1)])
    error = np.concatenate([[0.61], 0.66 + rng.normal(0, 0.005, n - 1)])
    anchored, _ = fit_set_correction(estimate, mmd2, error, groups)
    loose, _ = fit_set_correction(estimate, mmd2, error, groups, clean_weight=0.0)
    assert anchored is not None and loose is not None
    assert anchored.apply(0.60, 0.0) == pytest.approx(0.61, abs=0.01)
    assert loose.apply(0.60, 0.0) > 0.64
    with pytest.raises(ValueError, match="clean_weight must be in"):
        fit_set_correction(estimate, mmd2, error, groups, clean_weight=1.0)
