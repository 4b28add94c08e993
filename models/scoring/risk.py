"""The calibrated risk: P(mis-classified) from label-free signals (issue 10, item 3).

A logistic regression on standardised signals (scikit-learn), calibrated on its *out-of-fold*
decision values (cross-validated calibration, as scikit-learn's
``CalibratedClassifierCV(ensemble=False)``), then refitted on all the data. Calibration is Platt
scaling by default (a 1-D logistic fit: strictly monotone, so it keeps the ranking; isotonic steps
tie many images and cost AUROC) or isotonic. Stored as JSON (means, scales, coefficients, the
calibration's parameters or step points), never pickled.

Under shift (issue 15) the model is fitted on clean *and* shifted held-out images, and two
guards keep it from extrapolating downwards on inputs unlike anything it saw: every signal is
clipped to the range it was fitted on, except the ``monotone`` ones (``log_typicality``), whose
coefficients are constrained to be >= 0 and which are left unclipped, so the risk can only rise
as an image gets more atypical, however far beyond the reference's range it lies.

The report of :func:`fit_risk` is cross-validated: the AUROC/AUPRC of the combination from
out-of-fold decision values, the calibration (ECE, reliability) from an outer cross-validation in
which every sample's probability comes from a regression and a calibration that never saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy.optimize import minimize
from scipy.special import expit, log_expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

#: Signals the risk model may use, all label-free (see models.scoring.typicality and models.scoring.qscore).
RISK_SIGNALS = (
    "q_score",
    "mean_active",
    "log_l1",
    "hoyer",
    "log_max",
    "knn",
    "log_typicality",
    "proto_conf_8",
    "proto_conf_16",
    "proto_conf_32",
    "proto_conf_64",
    # the served head's confidence (models/scoring/probe.py), when the feature set has one
    "probe_max_softmax",
    "probe_entropy",
    "probe_margin",
)


#: Signals whose coefficient must be >= 0 and which are never clipped: the more atypical, the riskier.
MONOTONE_SIGNALS = ("log_typicality",)


#: The L2 penalty of the logistic regression, as scikit-learn's C.
PENALTY_C = 0.1


DEFAULT_FOLDS = 5


MAX_ISOTONIC_POINTS = 200


ECE_BINS = 10


class RiskModel(BaseModel):
    """``P(mis-classified) = calibrate(coef . (s - mean) / scale + intercept)`` over ``signals``.

    ``calibrate`` is ``sigmoid(platt_a * d + platt_b)`` (Platt) or the isotonic step curve
    through ``(iso_x, iso_y)``.
    """

    model_config = ConfigDict(extra="forbid")

    signals: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    calibration: Literal["platt", "isotonic"] = "platt"
    platt_a: float = 1.0
    platt_b: float = 0.0
    iso_x: list[float] = Field(default_factory=list)
    iso_y: list[float] = Field(default_factory=list)
    #: Clip bounds per signal (the fitted range; None: unbounded). Empty in models made before issue 15.
    lower: list[float | None] = Field(default_factory=list)
    upper: list[float | None] = Field(default_factory=list)
    monotone: list[str] = Field(default_factory=list)
    #: P(the image is of no class at all) = sigmoid(no_class_coef . z + no_class_intercept) over the
    #: same clipped, standardised signals z (issue 15): such an image is wrong whatever the classifier
    #: says, so risk = 1 - (1 - P(wrong | of a class)) * (1 - P(no class)). Empty: no such term.
    no_class_coef: list[float] = Field(default_factory=list)
    no_class_intercept: float = 0.0
    source: str
    n_train: int = Field(ge=0)
    metrics: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shapes(self) -> RiskModel:
        n = len(self.signals)
        if n == 0 or not len(self.mean) == len(self.scale) == len(self.coef) == n:
            raise ValueError("a risk model needs one mean, scale and coefficient per signal")
        if any(s <= 0 for s in self.scale):
            raise ValueError("signal scales must be positive")
        if len(self.iso_x) != len(self.iso_y) or (self.calibration == "isotonic" and not self.iso_x):
            raise ValueError("isotonic calibration needs as many (non-zero) x points as y points")
        if any(b < a for a, b in zip(self.iso_x, self.iso_x[1:], strict=False)):
            raise ValueError("calibration x points must be sorted")
        if len(self.lower) not in (0, n) or len(self.upper) != len(self.lower):
            raise ValueError("a risk model needs no clip bounds or one lower and one upper per signal")
        if not set(self.monotone) <= set(self.signals):
            raise ValueError(f"monotone signals {self.monotone} must be among the signals {self.signals}")
        for name in self.monotone:
            if self.coef[self.signals.index(name)] < 0:
                raise ValueError(f"the coefficient of monotone signal {name!r} must be >= 0")
        if len(self.no_class_coef) not in (0, n):
            raise ValueError("a no-class term needs one coefficient per signal")
        for name in self.monotone if self.no_class_coef else ():
            if self.no_class_coef[self.signals.index(name)] < 0:
                raise ValueError(f"the no-class coefficient of monotone signal {name!r} must be >= 0")
        if self.calibration == "platt" and self.platt_a < 0:
            raise ValueError("Platt's slope must be >= 0 (the calibration keeps the ranking)")
        return self

    def decision(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        return self.standardised(sig) @ np.asarray(self.coef) + self.intercept

    def standardised(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """(N, len(signals)): the signals clipped to their fitted range (monotone ones not), standardised."""
        missing = [s for s in self.signals if s not in sig]
        if missing:
            raise ValueError(f"the risk model needs the signals {missing}; got {sorted(sig)}")
        x = np.stack([np.asarray(sig[s], dtype=np.float64) for s in self.signals], axis=1)
        if self.lower:
            lo = np.array([-np.inf if v is None else v for v in self.lower])
            hi = np.array([np.inf if v is None else v for v in self.upper])
            x = np.clip(x, lo, hi)
        return (x - np.asarray(self.mean)) / np.asarray(self.scale)

    def predict(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) calibrated probabilities of mis-classification, in [0, 1]."""
        p = self.predict_of_a_class(sig)
        if not self.no_class_coef:
            return p
        return 1.0 - (1.0 - p) * (1.0 - self.predict_no_class(sig))

    def predict_no_class(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """P(the image is of none of the head's classes); zeros without a no-class term."""
        z = self.standardised(sig)
        if not self.no_class_coef:
            return np.zeros(len(z))
        return expit(z @ np.asarray(self.no_class_coef) + self.no_class_intercept)

    def predict_of_a_class(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """P(mis-classified) of an image that is of one of the head's classes (no no-class term)."""
        d = self.decision(sig)
        if self.calibration == "isotonic":
            return np.clip(np.interp(d, self.iso_x, self.iso_y), 0.0, 1.0)
        return 1.0 / (1.0 + np.exp(-(self.platt_a * d + self.platt_b)))

    def contributions(self, sig: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Why the risk is what it is: (N, len(signals)) arrays, a column per signal.

        ``z``: the signal clipped and standardised as the model reads it; ``of_a_class``: its term
        ``coef * z`` of the decision value (the log-odds of a mistake before calibration, which is
        monotone: a positive term raises the risk); ``no_class``: its term of P(no class)'s log-odds
        (zeros without a no-class term). Each row of a part plus its intercept is that decision.
        """
        z = self.standardised(sig)
        no_class = z * np.asarray(self.no_class_coef) if self.no_class_coef else np.zeros_like(z)
        return {"z": z, "of_a_class": z * np.asarray(self.coef), "no_class": no_class}

    @classmethod
    def from_q_curve(cls, q: Sequence[float], risk: Sequence[float], source: str) -> RiskModel:
        """The older Q-only isotonic curve (``RiskCurve``) as a risk model on ``q_score``."""
        order = np.argsort(-np.asarray(q, dtype=float), kind="stable")
        return cls(
            signals=["q_score"],
            mean=[0.0],
            scale=[1.0],
            coef=[-1.0],
            intercept=0.0,
            calibration="isotonic",
            iso_x=(-np.asarray(q, dtype=float)[order]).tolist(),
            iso_y=np.asarray(risk, dtype=float)[order].tolist(),
            source=source,
            n_train=0,
        )


def _matrix(sig: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    missing = [s for s in names if s not in sig]
    if missing:
        raise ValueError(f"missing signals {missing}; got {sorted(sig)}")
    x = np.stack([np.asarray(sig[s], dtype=np.float64) for s in names], axis=1)
    if not np.isfinite(x).all():
        raise ValueError("signals must be finite")
    return x


class SignConstrainedLogistic(ClassifierMixin, BaseEstimator):
    """L2-penalised binary logistic regression whose coefficients in ``nonnegative`` are >= 0.

    Hand-written (a few lines over scipy's L-BFGS-B) because scikit-learn's LogisticRegression
    takes no sign constraints. Same objective as scikit-learn's:
    ``0.5 ||w||^2 + C * sum_i s_i * logloss_i`` (the intercept unpenalised).
    """

    def __init__(self, C: float = PENALTY_C, nonnegative: tuple[int, ...] = ()) -> None:
        self.C = C
        self.nonnegative = nonnegative

    def fit(self, x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray | None = None) -> SignConstrainedLogistic:
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y).astype(bool)
        self.classes_ = np.array([False, True])
        w = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        sign = np.where(y, 1.0, -1.0)
        d = x.shape[1]

        def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
            margin = sign * (x @ theta[:d] + theta[d])
            loss = -(w * log_expit(margin)).sum()
            g = -w * sign * expit(-margin)  # d loss / d decision
            grad = np.append(x.T @ g * self.C + theta[:d], g.sum() * self.C)
            return 0.5 * theta[:d] @ theta[:d] + self.C * loss, grad

        bounds = [(0.0, None) if j in self.nonnegative else (None, None) for j in range(d)] + [(None, None)]
        result = minimize(objective, np.zeros(d + 1), jac=True, method="L-BFGS-B", bounds=bounds)
        self.coef_ = result.x[:d].reshape(1, -1)
        self.intercept_ = result.x[d:]
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef_[0] + self.intercept_[0]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes_[(self.decision_function(x) > 0).astype(int)]


def _pipeline(nonnegative: tuple[int, ...] = ()) -> Pipeline:
    return Pipeline([("scale", StandardScaler()), ("logistic", SignConstrainedLogistic(PENALTY_C, nonnegative))])


class _Calibrator:
    """Platt or isotonic, fitted on 1-D decision values."""

    def __init__(self, method: str, d: np.ndarray, miss: np.ndarray, weight: np.ndarray | None = None) -> None:
        self.method = method
        if method == "isotonic":
            self.iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0)
            self.iso.fit(d, miss, sample_weight=weight)
        elif method == "platt":
            lr = LogisticRegression(C=1e6, max_iter=1000).fit(d.reshape(-1, 1), miss, sample_weight=weight)
            self.a, self.b = max(0.0, float(lr.coef_[0, 0])), float(lr.intercept_[0])
        else:
            raise ValueError(f"calibration must be 'platt' or 'isotonic', got {method!r}")

    def predict(self, d: np.ndarray) -> np.ndarray:
        if self.method == "isotonic":
            return self.iso.predict(d)
        return 1.0 / (1.0 + np.exp(-(self.a * d + self.b)))


Folds = list[tuple[np.ndarray, np.ndarray]]


def _folds(miss: np.ndarray, folds: int, seed: int, groups: np.ndarray | None) -> Folds:
    """Stratified (train, test) folds; with ``groups`` (e.g. the source image of shifted copies) a
    group never straddles two."""
    if groups is None:
        return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(miss, miss))
    return list(StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(miss, miss, groups))


def _decisions_out_of_fold(
    x: np.ndarray,
    miss: np.ndarray,
    cv: Folds,
    weight: np.ndarray | None,
    nonnegative: tuple[int, ...],
) -> np.ndarray:
    """Each sample's decision value from the regression fitted on the other folds."""
    out = np.empty(len(miss))
    for train, test in cv:
        out[test] = _fitted(
            x[train], miss[train], None if weight is None else weight[train], nonnegative
        ).decision_function(x[test])
    return out


def _fitted(x: np.ndarray, miss: np.ndarray, weight: np.ndarray | None, nonnegative: tuple[int, ...]) -> Pipeline:
    """The regression on ``x``, with the log odds of its (weighted) error rate taken out of its
    intercept; the calibration fitted on these decisions puts the rate back.

    Why: groups keep folds from being balanced. A fold that holds out a group of mostly wrong
    copies trains on fewer errors, and its regression says "right" of every image it is shown,
    so pooled out-of-fold values rank images by the fold they fell in. Measured with signals
    independent of the label (10 groups of 82 copies beside 300 lone images, 8 seeds): the lone
    images' AUROC was 0.33 on average and 0.24 at worst, the copies' 0.56; with the rate taken
    out, 0.47 and 0.50."""
    pipeline = _pipeline(nonnegative).fit(x, miss, logistic__sample_weight=weight)
    rate = float(np.clip(np.average(miss, weights=weight), 1e-6, 1 - 1e-6))
    logistic = pipeline.named_steps["logistic"]
    logistic.intercept_ = logistic.intercept_ - np.log(rate / (1 - rate))
    return pipeline


def _fit_once(
    x: np.ndarray,
    miss: np.ndarray,
    folds: int,
    seed: int,
    method: str,
    weight: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    nonnegative: tuple[int, ...] = (),
) -> tuple[Pipeline, _Calibrator]:
    oof = _decisions_out_of_fold(x, miss, _folds(miss, folds, seed, groups), weight, nonnegative)
    return _fitted(x, miss, weight, nonnegative), _Calibrator(method, oof, miss, weight)


def _subset_report(
    subsets: dict[str, np.ndarray], miss: np.ndarray, ranking: np.ndarray, p: np.ndarray
) -> dict[str, dict[str, Any]]:
    out = {}
    for name, mask in subsets.items():
        mask = np.asarray(mask, dtype=bool)
        both = 0 < miss[mask].sum() < mask.sum()
        out[name] = {
            "n": int(mask.sum()),
            "error": float(miss[mask].mean()) if mask.any() else None,
            "mean_risk": float(p[mask].mean()) if mask.any() else None,
            "auroc": float(roc_auc_score(miss[mask], ranking[mask])) if both else None,
            "ece": expected_calibration_error(p[mask], miss[mask])[0] if mask.any() else None,
        }
    return out


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """ECE over ``bins`` equal-width bins of ``p``, and the reliability table (non-empty bins)."""
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        conf, freq = float(p[sel].mean()), float(y[sel].mean())
        ece += sel.mean() * abs(conf - freq)
        table.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "mean_predicted": conf,
                "observed": freq,
                "n": int(sel.sum()),
            }
        )
    return float(ece), table


def signal_power(score: np.ndarray, miss: np.ndarray) -> dict[str, float]:
    """AUROC/AUPRC of ``score`` read as "higher = mis-classified"; ``auroc`` below 0.5 means reversed."""
    return {
        "auroc": float(roc_auc_score(miss, score)),
        "auprc": float(average_precision_score(miss, score)),
    }


def fit_risk(
    sig: dict[str, np.ndarray],
    misclassified: np.ndarray,
    signals: Sequence[str] = RISK_SIGNALS,
    *,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    calibration: str = "platt",
    extra_scores: dict[str, np.ndarray] | None = None,
    monotone: Sequence[str] = MONOTONE_SIGNALS,
    sample_weight: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    subsets: dict[str, np.ndarray] | None = None,
    no_class: np.ndarray | None = None,
) -> tuple[RiskModel, dict[str, Any]]:
    """Fit the risk model on labelled held-out samples; return it and its cross-validated report.

    ``sig``: (N,) arrays by name; ``misclassified``: (N,) bool, True where the probe was wrong.
    ``signals`` present in ``sig`` are used (others are skipped; at least one is needed);
    those in ``monotone`` get coefficients >= 0 and no clipping. ``sample_weight`` weighs the
    samples (e.g. clean against shifted copies); ``groups`` keeps samples of one group (the
    shifted copies of one image) in one fold. ``subsets`` (name -> (N,) bool mask) are reported
    apart (AUROC and ECE of the out-of-fold values on each). ``extra_scores`` (e.g.
    ``{"probe_max_softmax": -p_max}``) are reported beside, oriented "higher = mis-classified".
    ``no_class`` (N,) bool marks images of no class at all (mis-classified by definition): the
    regression and its calibration are fitted on the others, and a second sign-constrained
    logistic regression of ``no_class`` on the same standardised signals (all samples, weighted)
    gives P(no class), joined as a noisy OR. The no-class images' out-of-fold values come from the
    regression fitted on all the others (which never saw them).
    """
    common = {"folds": folds, "seed": seed, "calibration": calibration, "monotone": monotone}
    if no_class is not None and np.asarray(no_class).any():
        return _fit_with_no_class(
            sig, misclassified, signals, np.asarray(no_class, dtype=bool),
            sample_weight=sample_weight, groups=groups, subsets=subsets, extra_scores=extra_scores, **common,
        )  # fmt: skip
    model, report, d_oof, p_oof = _fit_core(sig, misclassified, signals, sample_weight=sample_weight, groups=groups,
                                            extra_scores=extra_scores, **common)  # fmt: skip
    if subsets:
        report["subsets"] = _subset_report(subsets, np.asarray(misclassified, dtype=bool), d_oof, p_oof)
    return model, report


def _fit_core(
    sig: dict[str, np.ndarray],
    misclassified: np.ndarray,
    signals: Sequence[str],
    *,
    folds: int,
    seed: int,
    calibration: str,
    monotone: Sequence[str],
    sample_weight: np.ndarray | None,
    groups: np.ndarray | None,
    extra_scores: dict[str, np.ndarray] | None,
) -> tuple[RiskModel, dict[str, Any], np.ndarray, np.ndarray]:
    """The regression and its calibration, with the report and the out-of-fold decisions and probabilities."""
    miss = np.asarray(misclassified, dtype=bool)
    names = [s for s in signals if s in sig]
    if not names:
        raise ValueError(f"none of the signals {list(signals)} is available; got {sorted(sig)}")
    x = _matrix(sig, names)
    if x.shape[0] != miss.shape[0]:
        raise ValueError(f"{x.shape[0]} samples of signals for {miss.shape[0]} labels")
    minority = int(min(miss.sum(), (~miss).sum()))
    if minority < folds:
        raise ValueError(
            f"the risk model needs at least {folds} correct and {folds} mis-classified samples "
            f"(one per fold); got {int((~miss).sum())} and {int(miss.sum())}"
        )
    weight = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weight is not None and (weight.shape != miss.shape or (weight < 0).any()):
        raise ValueError(f"sample_weight must be (N,) non-negative, got shape {weight.shape}")
    nonnegative = tuple(i for i, name in enumerate(names) if name in monotone)
    # Ranking: out-of-fold decision values of one cross-validation (pooling calibrated
    # probabilities of different folds would reorder images by each fold's calibration).
    cv = _folds(miss, folds, seed + 1, groups)
    d_oof = _decisions_out_of_fold(x, miss, cv, weight, nonnegative)
    # Calibration: an outer cross-validation, every probability from a regression and a
    # calibration that never saw the image.
    p_oof = np.zeros(len(miss))
    for train, test in cv:
        sub_groups = None if groups is None else groups[train]
        sub_weight = None if weight is None else weight[train]
        probe, cal = _fit_once(x[train], miss[train], folds, seed, calibration, sub_weight, sub_groups, nonnegative)
        p_oof[test] = cal.predict(probe.decision_function(x[test]))
    ece, reliability = expected_calibration_error(p_oof, miss)
    report: dict[str, Any] = {
        "n": int(len(miss)),
        "base_rate_misclassified": float(miss.mean()),
        "signals": names,
        "monotone": [names[i] for i in nonnegative],
        "per_signal": {name: signal_power(x[:, i], miss) for i, name in enumerate(names)},
        "combined": {**signal_power(d_oof, miss), "ece": ece, "reliability": reliability},
        "folds": folds,
    }
    for name, score in (extra_scores or {}).items():
        report[name] = signal_power(np.asarray(score, dtype=float), miss)
    probe, cal = _fit_once(x, miss, folds, seed, calibration, weight, groups, nonnegative)
    scaler, lr = probe.named_steps["scale"], probe.named_steps["logistic"]
    xs, ys = np.zeros(0), np.zeros(0)
    if calibration == "isotonic":
        xs, ys = cal.iso.X_thresholds_, cal.iso.y_thresholds_
        if len(xs) > MAX_ISOTONIC_POINTS:
            keep = np.unique(np.linspace(0, len(xs) - 1, MAX_ISOTONIC_POINTS).round().astype(int))
            xs, ys = xs[keep], ys[keep]
    lower = [None if i in nonnegative else float(x[:, i].min()) for i in range(len(names))]
    upper = [None if i in nonnegative else float(x[:, i].max()) for i in range(len(names))]
    model = RiskModel(
        signals=names,
        mean=scaler.mean_.tolist(),
        scale=[float(v) if v > 0 else 1.0 for v in scaler.scale_],
        coef=[max(0.0, c) if i in nonnegative else c for i, c in enumerate(lr.coef_[0].tolist())],
        intercept=float(lr.intercept_[0]),
        calibration=calibration,  # type: ignore[arg-type]
        platt_a=getattr(cal, "a", 1.0),
        platt_b=getattr(cal, "b", 0.0),
        iso_x=xs.tolist(),
        iso_y=ys.tolist(),
        lower=lower,
        upper=upper,
        monotone=[names[i] for i in nonnegative],
        source=f"logistic regression on {', '.join(names)} (coefficients >= 0 and unclipped: "
        f"{', '.join(names[i] for i in nonnegative) or 'none'}), {calibration} calibration on {folds}-fold "
        f"out-of-fold decisions, {len(miss)} labelled samples",
        n_train=int(len(miss)),
        metrics={"auroc": report["combined"]["auroc"], "auprc": report["combined"]["auprc"], "ece": ece},
    )
    return model, report, d_oof, p_oof


def _fit_with_no_class(
    sig: dict[str, np.ndarray],
    misclassified: np.ndarray,
    signals: Sequence[str],
    no_class: np.ndarray,
    *,
    sample_weight: np.ndarray | None,
    groups: np.ndarray | None,
    subsets: dict[str, np.ndarray] | None,
    extra_scores: dict[str, np.ndarray] | None,
    **kwargs: Any,
) -> tuple[RiskModel, dict[str, Any]]:
    """:func:`fit_risk` on the images of a class, joined with P(no class) by a noisy OR."""
    miss = np.asarray(misclassified, dtype=bool)
    if no_class.shape != miss.shape:
        raise ValueError(f"no_class must be (N,) like the labels, got {no_class.shape}")
    core = ~no_class
    weight = np.ones(len(miss)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    model, report, _, p_core = _fit_core(
        {k: np.asarray(v)[core] for k, v in sig.items()},
        miss[core],
        signals,
        sample_weight=weight[core],
        groups=None if groups is None else groups[core],
        extra_scores=None,
        **kwargs,
    )
    # clip bounds over all the images both parts were fitted on (the no-class ones lie outside the others' range)
    x = _matrix(sig, model.signals)
    model = model.model_copy(
        update={
            "lower": [None if v is None else float(x[:, i].min()) for i, v in enumerate(model.lower)],
            "upper": [None if v is None else float(x[:, i].max()) for i, v in enumerate(model.upper)],
        }
    )
    z = model.standardised(sig)
    nonnegative = tuple(model.signals.index(name) for name in model.monotone)
    none_fit = SignConstrainedLogistic(PENALTY_C, nonnegative).fit(z, no_class, sample_weight=weight)
    model = model.model_copy(
        update={
            "no_class_coef": [max(0.0, c) if i in nonnegative else c for i, c in enumerate(none_fit.coef_[0].tolist())],
            "no_class_intercept": float(none_fit.intercept_[0]),
            "source": model.source + f"; P(no class) a logistic regression over the same signals (coefficients "
            f">= 0: {', '.join(model.monotone) or 'none'}) on {int(no_class.sum())} images of no class among "
            f"{len(miss)}, joined by a noisy OR",
            "n_train": len(miss),
        }
    )
    # out-of-fold: the class part from the cross-validation (core) or the regression that never saw them (no class)
    p_class = np.empty(len(miss))
    p_class[core] = p_core
    p_class[no_class] = model.predict_of_a_class({k: np.asarray(v)[no_class] for k, v in sig.items()})
    none = model.predict_no_class(sig)  # in-sample: one small regression, the class part is the held-out one
    p_all = 1.0 - (1.0 - p_class) * (1.0 - none)
    ece, reliability = expected_calibration_error(p_all, miss)
    report["n"], report["base_rate_misclassified"] = int(len(miss)), float(miss.mean())
    report["no_class"] = {"n": int(no_class.sum()), "auroc": signal_power(none, no_class)["auroc"]}
    report["combined_of_a_class"] = report.pop("combined")
    report["combined"] = {**signal_power(p_all, miss), "ece": ece, "reliability": reliability}
    if subsets:
        report["subsets"] = _subset_report(subsets, miss, p_all, p_all)
    for name, score in (extra_scores or {}).items():
        report[name] = signal_power(np.asarray(score, dtype=float), miss)
    model.metrics = {"auroc": report["combined"]["auroc"], "auprc": report["combined"]["auprc"], "ece": ece}
    return model, report
