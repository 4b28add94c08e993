"""The estimated error rate of a set of images without labels (issue 15, item 3).

Three estimators, chosen by measurement on the evaluation's shifted sets (``choose_estimator`` in
``models/evaluation/linear_eval.py``; compared in ``experiments/shift_report.py``) and recorded
with the feature set:

- ``mean_risk``: the mean of the per-image calibrated risk (the averaged calibrated confidence of
  NannyML's CBPE). Sound when the risk model stays calibrated under the shift it meets, which is
  what fitting it on shifted copies is for.
- ``atc``: average thresholded confidence (Garg et al., ICLR 2022): a confidence threshold ``t``
  learnt on labelled held-out data so that the share of images below it equals the error there;
  the estimate on new data is the share of its images below ``t``. It needs the head's
  confidence (``probe_max_softmax``).
- ``cott``: thresholded confidence optimal transport (COTT; Lu et al., NeurIPS 2023). The
  window's softmax vectors are transported onto the classes in the proportions of the held-out
  labels (cost ``1 - p_c``: the total-variation distance between a softmax vector and class
  ``c``'s one-hot vector); the estimate is the transported mass whose cost is at least a
  threshold learnt, as ATC's, on labelled held-out images. Unlike a per-image score it sees a
  window whose predictions pile onto a few classes, which is how a classifier fails under many
  shifts while staying confident. It assumes the traffic's class mix is the held-out one: under
  label shift it over-estimates. It needs the head's class probabilities and a window of at
  least ``COTT_MIN_IMAGES``; on fewer images (a request batch) it gives the mean risk instead.

Any of them can carry a **set-level correction** (:class:`SetCorrection`, in the spirit of
AutoEval, Deng & Zheng 2021: a set's distribution shift predicts its accuracy): a robust linear
regression of the residual ``error - estimate`` of the evaluation's labelled sets on the window's
MMD^2 against the reference bank (what the drift test computes) and the estimate itself. Every
estimator above assumes the head's confidence keeps its meaning under shift; far from the bank it
does not (a supervised ResNet-20 on inverted or upside-down images stays confident and is wrong
two times in three), and the MMD^2 says how far the window is. The evaluation keeps the correction
only where it lowers the error of its own estimates with each shift family left out of the fit
(:func:`fit_set_correction`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import ot
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.linear_model import HuberRegressor

#: Fewest images COTT estimates on: a small window's class mix strays from the prior, and the forced
#: mismatches bias it upwards (clean CIFAR-10, supervised ResNet-20: +0.09 at 50 images, +0.05 at 100,
#: +0.02 at 200, 0.00 at 500; experiments/shift_report.py's sets).
COTT_MIN_IMAGES = 200


class SetCorrection(BaseModel):
    """``estimate + intercept + mmd2_coef * MMD^2 + estimate_coef * estimate``, clipped to [0, 1]."""

    model_config = ConfigDict(extra="forbid")

    intercept: float
    mmd2_coef: float
    estimate_coef: float
    source: str = ""

    def apply(self, estimate: float, mmd2: float) -> float:
        shift = self.intercept + self.mmd2_coef * mmd2 + self.estimate_coef * estimate
        return float(np.clip(estimate + shift, 0.0, 1.0))


class ErrorEstimator(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["mean_risk", "atc", "cott"]
    threshold: float | None = Field(
        None, description="ATC's confidence threshold (method 'atc') or COTT's cost threshold (method 'cott')."
    )
    class_prior: list[float] | None = Field(
        None, description="COTT's class proportions (the held-out labels'), in the head's class order."
    )
    correction: SetCorrection | None = Field(
        None, description="The set-level correction of the window estimate by the window's MMD^2, when kept."
    )
    source: str = ""

    @model_validator(mode="after")
    def _parameters(self) -> ErrorEstimator:
        if self.method in ("atc", "cott") and self.threshold is None:
            raise ValueError(f"method {self.method!r} needs a threshold")
        if self.method == "cott":
            prior = np.asarray(self.class_prior or [], dtype=np.float64)
            if prior.size < 2 or (prior < 0).any() or abs(prior.sum() - 1.0) > 1e-6:
                raise ValueError("method 'cott' needs a class_prior of two or more proportions summing to 1")
        return self

    def estimate(
        self,
        risk: np.ndarray | None,
        confidence: np.ndarray | None,
        probabilities: np.ndarray | None = None,
        mmd2: float | None = None,
    ) -> float | None:
        """The estimated error rate of the images whose ``risk``, head ``confidence`` (max softmax)
        and head ``probabilities`` (n, C) are given; with the window's ``mmd2`` against the
        reference bank, corrected by :attr:`correction` when there is one.

        None when the estimator's input is missing (no risk model, no head) or there are no images.
        COTT on fewer than :data:`COTT_MIN_IMAGES` images (or without probabilities) is the mean
        risk, uncorrected (the correction was fitted on the chosen method's estimates).
        """
        return self.corrected(self._uncorrected(risk, confidence, probabilities), probabilities, mmd2)

    def corrected(self, estimate: float | None, probabilities: np.ndarray | None, mmd2: float | None) -> float | None:
        """An uncorrected ``estimate`` (of images with these head ``probabilities``) with
        :attr:`correction` applied at the window's ``mmd2``; as it was where none applies."""
        added = self.correction_added(estimate, probabilities, mmd2)
        return estimate if added is None else estimate + added  # type: ignore[operator]

    def correction_added(
        self, estimate: float | None, probabilities: np.ndarray | None, mmd2: float | None
    ) -> float | None:
        """What :attr:`correction` adds to ``estimate`` at ``mmd2``; None where it does not apply (no
        estimate, MMD^2 or correction, or COTT's small-window fallback, for which none was fitted)."""
        if estimate is None or mmd2 is None or self.correction is None:
            return None
        if self.method_for(probabilities) != self.method or not np.isfinite(mmd2):
            return None
        return self.correction.apply(estimate, mmd2) - estimate

    def _uncorrected(
        self, risk: np.ndarray | None, confidence: np.ndarray | None, probabilities: np.ndarray | None
    ) -> float | None:
        method = self.method_for(probabilities)
        if method == "cott":
            assert self.threshold is not None and self.class_prior is not None  # validated
            return thresholded_transport(probabilities, self.class_prior, self.threshold)  # type: ignore[arg-type]
        if method == "mean_risk":
            return _mean(risk)
        if confidence is None or len(confidence) == 0:
            return None
        assert self.threshold is not None  # validated
        return float((np.asarray(confidence, dtype=np.float64) < self.threshold).mean())

    def method_for(self, probabilities: np.ndarray | None) -> str:
        """The method :meth:`estimate` uses on images with these head ``probabilities``: COTT's is the
        mean risk on fewer than :data:`COTT_MIN_IMAGES` images (or without probabilities)."""
        if self.method == "cott" and (probabilities is None or len(probabilities) < COTT_MIN_IMAGES):
            return "mean_risk"
        return self.method


def _mean(values: np.ndarray | None) -> float | None:
    if values is None or len(values) == 0:
        return None
    return float(np.asarray(values, dtype=np.float64).mean())


def fit_atc(confidence: np.ndarray, correct: np.ndarray) -> ErrorEstimator:
    """ATC's threshold: the ``error``-quantile of the held-out confidences (share below = error)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape or confidence.size == 0:
        raise ValueError(f"{confidence.size} confidences for {correct.size} correctness labels")
    error = float((~correct).mean())
    # The smallest t with share(confidence < t) >= error: a sorted confidence value.
    ordered = np.sort(confidence)
    k = int(np.ceil(error * len(ordered)))
    threshold = float(ordered[k]) if k < len(ordered) else float(np.nextafter(ordered[-1], np.inf))
    return ErrorEstimator(
        method="atc",
        threshold=threshold,
        source=f"ATC on the head's maximum softmax: held-out error {error:.4f} over {len(ordered)} images",
    )


def transport(probabilities: np.ndarray, class_prior: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray]:
    """The optimal transport of ``probabilities`` (n, C; each image mass 1/n) onto the classes in
    the proportions ``class_prior`` (C,), cost ``1 - p_ic``: (plan (n, C) summing to 1, costs (n, C))."""
    p = np.asarray(probabilities, dtype=np.float64)
    prior = np.asarray(class_prior, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0 or p.shape[1] != prior.size:
        raise ValueError(f"probabilities must be (n >= 1, {prior.size}), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities must be finite")
    cost = 1.0 - p
    # exact (network simplex); the default iteration cap stops short on windows of many thousand images
    plan = ot.emd(np.full(p.shape[0], 1.0 / p.shape[0]), prior / prior.sum(), cost, numItermax=10_000_000)
    return plan, cost


def thresholded_transport(probabilities: np.ndarray, class_prior: np.ndarray | list[float], threshold: float) -> float:
    """COTT's estimate: the transported mass whose cost is at least ``threshold``."""
    plan, cost = transport(probabilities, class_prior)
    return float(min(1.0, plan[cost >= threshold].sum()))


#: The thresholds a fit under shift tries (costs lie in [0, 1]).
COTT_THRESHOLD_GRID = np.linspace(0.0, 1.0, 1001)


class _TransportedMass:
    """One set's transported mass at or above any threshold: its plan's costs sorted, highest first."""

    def __init__(self, probabilities: np.ndarray, class_prior: np.ndarray | list[float]) -> None:
        plan, cost = transport(probabilities, class_prior)
        order = np.argsort(-cost.ravel(), kind="stable")
        self.costs = cost.ravel()[order]
        self.above = np.cumsum(plan.ravel()[order])  # mass at or above each cost, from the highest down

    def at(self, thresholds: np.ndarray) -> np.ndarray:
        """The mass whose cost is >= each threshold."""
        k = np.searchsorted(-self.costs, -np.asarray(thresholds), side="right")  # entries with cost >= t
        return np.where(k > 0, self.above[np.maximum(k - 1, 0)], 0.0).clip(0.0, 1.0)


def fit_cott(
    probabilities: np.ndarray, labels: np.ndarray, shifted: Sequence[tuple[np.ndarray, float]] = ()
) -> ErrorEstimator:
    """COTT's threshold from labelled held-out images (the prior: the labels' class proportions).

    Alone, the cost at which the transported mass at or above it reaches the held-out error (as in
    the paper). With ``shifted`` sets (each: the head's probabilities on it and its true error,
    e.g. the evaluation's shifted copies), the threshold of :data:`COTT_THRESHOLD_GRID` with the
    least mean |estimate - error| over the held-out set and those: the error is known there too, as
    the risk model is fitted on them (supervised ResNet-20, design families left out in turn:
    mean abs error 0.059 with the held-out threshold, 0.051 fitted under shift; docs/shift.md).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels)
    if p.ndim != 2 or p.shape[0] != labels.shape[0] or p.shape[0] == 0:
        raise ValueError(f"{p.shape[0] if p.ndim == 2 else p.shape} probability rows for {labels.shape[0]} labels")
    if labels.min() < 0 or labels.max() >= p.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]})")
    prior = np.bincount(labels.astype(int), minlength=p.shape[1]) / len(labels)
    error = float((p.argmax(axis=1) != labels).mean())
    clean = _TransportedMass(p, prior)
    if shifted:
        sets = [(clean, error)] + [(_TransportedMass(q, prior), float(e)) for q, e in shifted]
        mae = np.mean([np.abs(mass.at(COTT_THRESHOLD_GRID) - e) for mass, e in sets], axis=0)
        best = int(np.argmin(mae))
        threshold = float(COTT_THRESHOLD_GRID[best])
        how = f"threshold fitted on it and {len(shifted)} shifted sets (mean |estimate - error| {mae[best]:.4f})"
    else:
        k = int(np.searchsorted(clean.above, error - 1e-12))
        threshold = float(clean.costs[k]) if k < len(clean.costs) and error > 0 else float(np.nextafter(1.0, 2.0))
        how = "threshold fitted on it"
    return ErrorEstimator(
        method="cott",
        threshold=threshold,
        class_prior=prior.tolist(),
        source=f"COTT on the head's softmax: held-out error {error:.4f} over {len(labels)} images, {how}",
    )


#: The least sets a correction is fitted on: two statistics and an intercept, fitted robustly.
CORRECTION_MIN_SETS = 10


#: The clean held-out set's share of the correction fit's weight: it is the largest labelled set by
#: far, and in distribution the estimate must stay what it was (unweighted, a demo fit whose
#: shifted sets' errors barely vary learnt to replace the estimate by their mean, moving the clean
#: window's estimate from 0.60 to 0.67 against a true 0.61).
CORRECTION_CLEAN_WEIGHT = 0.5


def fit_set_correction(
    estimates: Sequence[float],
    mmd2: Sequence[float],
    errors: Sequence[float],
    groups: Sequence[str],
    clean_weight: float = CORRECTION_CLEAN_WEIGHT,
) -> tuple[SetCorrection | None, dict[str, float | None]]:
    """A :class:`SetCorrection` fitted on labelled sets, and whether it is worth keeping.

    Each set: its uncorrected ``estimates``, its ``mmd2`` against the reference bank, its true
    ``errors`` and its ``groups`` (the shift family: copies of one family at several severities
    are not independent; the clean set is ``"clean"``). The residual is regressed on (MMD^2,
    estimate) by scikit-learn's Huber regression (a set on which every estimator fails should not
    set the slope), the clean set(s) carrying ``clean_weight`` of the weight and anchoring the
    fit where MMD^2 is near 0. The correction is judged **leave one group out**: each shifted
    group's sets corrected by a fit on the others, the clean set always in the fit; it is kept
    (fitted on all sets) only when its mean |corrected - error| over the shifted sets is below the
    uncorrected one's. Returns (the correction or None, the two figures).
    """
    x = np.column_stack([np.asarray(mmd2, dtype=np.float64), np.asarray(estimates, dtype=np.float64)])
    error = np.asarray(errors, dtype=np.float64)
    groups = np.asarray(groups)
    if not (len(x) == len(error) == len(groups)):
        raise ValueError(f"{len(x)} estimates and MMD^2 for {len(error)} errors and {len(groups)} groups")
    if not np.isfinite(x).all() or not np.isfinite(error).all():
        raise ValueError("estimates, MMD^2 and errors must be finite")
    if not 0.0 <= clean_weight < 1.0:
        raise ValueError(f"clean_weight must be in [0, 1), got {clean_weight}")
    shifted = groups != "clean"
    uncorrected = float(np.abs(x[shifted, 1] - error[shifted]).mean()) if shifted.any() else None
    figures: dict[str, float | None] = {"uncorrected": uncorrected, "corrected_leave_one_family_out": None}
    families = sorted(set(groups[shifted].tolist()))
    if len(x) < CORRECTION_MIN_SETS or len(families) < 2:
        return None, figures
    residual = error - x[:, 1]

    def fit(keep: np.ndarray) -> HuberRegressor:
        clean, others = ~shifted[keep], shifted[keep]
        share = clean_weight if clean.any() else 0.0
        weight = np.where(others, (1.0 - share) / others.sum(), share / max(int(clean.sum()), 1))
        return HuberRegressor().fit(x[keep], residual[keep], sample_weight=weight * keep.sum())

    gaps = []
    for family in families:
        test = groups == family
        corrected = np.clip(x[test, 1] + fit(~test).predict(x[test]), 0.0, 1.0)
        gaps.append(np.abs(corrected - error[test]))
    lofo = float(np.concatenate(gaps).mean())
    figures["corrected_leave_one_family_out"] = lofo
    if uncorrected is None or lofo >= uncorrected:
        return None, figures
    final = fit(np.ones(len(x), dtype=bool))
    correction = SetCorrection(
        intercept=float(final.intercept_),
        mmd2_coef=float(final.coef_[0]),
        estimate_coef=float(final.coef_[1]),
        source=(
            f"Huber regression of error - estimate on (MMD^2, estimate) over {len(x)} labelled sets "
            f"(the clean one {clean_weight:.0%} of the weight); "
            f"mean |estimate - error| over the shifted ones, each family left out of the fit: "
            f"{lofo:.4f} corrected, {uncorrected:.4f} uncorrected"
        ),
    )
    return correction, figures
