"""The calibrated risk: P(mis-classified) from label-free signals (issue 10, item 3).

A logistic regression on standardised signals (scikit-learn), calibrated on its *out-of-fold*
decision values (cross-validated calibration, as scikit-learn's
``CalibratedClassifierCV(ensemble=False)``), then refitted on all the data. Calibration is Platt
scaling by default (a 1-D logistic fit: strictly monotone, so it keeps the ranking; isotonic steps
tie many images and cost AUROC) or isotonic. Stored as JSON (means, scales, coefficients, the
calibration's parameters or step points), never pickled.

The report of :func:`fit_risk` is cross-validated: the AUROC/AUPRC of the combination from
out-of-fold decision values, the calibration (ECE, reliability) from an outer cross-validation in
which every sample's probability comes from a regression and a calibration that never saw it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

#: Signals the risk model may use, all label-free (see models.scoring.typicality and models.scoring.qscore).
RISK_SIGNALS = (
    "q_score",
    "mean_active",
    "log_l1",
    "hoyer",
    "log_max",
    "knn",
    "typicality",
    "proto_conf_8",
    "proto_conf_16",
    "proto_conf_32",
    "proto_conf_64",
)


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
        return self

    def decision(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        missing = [s for s in self.signals if s not in sig]
        if missing:
            raise ValueError(f"the risk model needs the signals {missing}; got {sorted(sig)}")
        x = np.stack([np.asarray(sig[s], dtype=np.float64) for s in self.signals], axis=1)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return z @ np.asarray(self.coef) + self.intercept

    def predict(self, sig: dict[str, np.ndarray]) -> np.ndarray:
        """(N,) calibrated probabilities of mis-classification, in [0, 1]."""
        d = self.decision(sig)
        if self.calibration == "isotonic":
            return np.clip(np.interp(d, self.iso_x, self.iso_y), 0.0, 1.0)
        return 1.0 / (1.0 + np.exp(-(self.platt_a * d + self.platt_b)))

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


def _pipeline(seed: int) -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000, random_state=seed))


class _Calibrator:
    """Platt or isotonic, fitted on 1-D decision values."""

    def __init__(self, method: str, d: np.ndarray, miss: np.ndarray) -> None:
        self.method = method
        if method == "isotonic":
            self.iso = IsotonicRegression(increasing=True, out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(d, miss)
        elif method == "platt":
            lr = LogisticRegression(C=1e6, max_iter=1000).fit(d.reshape(-1, 1), miss)
            self.a, self.b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        else:
            raise ValueError(f"calibration must be 'platt' or 'isotonic', got {method!r}")

    def predict(self, d: np.ndarray) -> np.ndarray:
        if self.method == "isotonic":
            return self.iso.predict(d)
        return 1.0 / (1.0 + np.exp(-(self.a * d + self.b)))


def _fit_once(x: np.ndarray, miss: np.ndarray, folds: int, seed: int, method: str) -> tuple[Any, _Calibrator]:
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    oof = cross_val_predict(_pipeline(seed), x, miss, cv=cv, method="decision_function")
    return _pipeline(seed).fit(x, miss), _Calibrator(method, oof, miss)


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
) -> tuple[RiskModel, dict[str, Any]]:
    """Fit the risk model on labelled held-out samples; return it and its cross-validated report.

    ``sig``: (N,) arrays by name; ``misclassified``: (N,) bool, True where the probe was wrong.
    ``signals`` present in ``sig`` are used (others are skipped; at least one is needed).
    ``extra_scores`` (e.g. ``{"probe_max_softmax": -p_max}``) are reported beside, oriented
    "higher = mis-classified".
    """
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
    # Ranking: out-of-fold decision values of one cross-validation (pooling calibrated
    # probabilities of different folds would reorder images by each fold's calibration).
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed + 1)
    d_oof = cross_val_predict(_pipeline(seed), x, miss, cv=cv, method="decision_function")
    # Calibration: an outer cross-validation, every probability from a regression and a
    # calibration that never saw the image.
    p_oof = np.zeros(len(miss))
    for train, test in cv.split(x, miss):
        probe, cal = _fit_once(x[train], miss[train], folds, seed, calibration)
        p_oof[test] = cal.predict(probe.decision_function(x[test]))
    ece, reliability = expected_calibration_error(p_oof, miss)
    report: dict[str, Any] = {
        "n": int(len(miss)),
        "base_rate_misclassified": float(miss.mean()),
        "signals": names,
        "per_signal": {name: signal_power(x[:, i], miss) for i, name in enumerate(names)},
        "combined": {**signal_power(d_oof, miss), "ece": ece, "reliability": reliability},
        "folds": folds,
    }
    for name, score in (extra_scores or {}).items():
        p = np.asarray(score, dtype=float)
        report[name] = signal_power(p, miss)
    probe, cal = _fit_once(x, miss, folds, seed, calibration)
    scaler, lr = probe.named_steps["standardscaler"], probe.named_steps["logisticregression"]
    xs, ys = np.zeros(0), np.zeros(0)
    if calibration == "isotonic":
        xs, ys = cal.iso.X_thresholds_, cal.iso.y_thresholds_
        if len(xs) > MAX_ISOTONIC_POINTS:
            keep = np.unique(np.linspace(0, len(xs) - 1, MAX_ISOTONIC_POINTS).round().astype(int))
            xs, ys = xs[keep], ys[keep]
    model = RiskModel(
        signals=names,
        mean=scaler.mean_.tolist(),
        scale=scaler.scale_.tolist(),
        coef=lr.coef_[0].tolist(),
        intercept=float(lr.intercept_[0]),
        calibration=calibration,  # type: ignore[arg-type]
        platt_a=getattr(cal, "a", 1.0),
        platt_b=getattr(cal, "b", 0.0),
        iso_x=xs.tolist(),
        iso_y=ys.tolist(),
        source=f"logistic regression on {', '.join(names)}, {calibration} calibration on {folds}-fold out-of-fold "
        f"decisions, {len(miss)} labelled samples",
        n_train=int(len(miss)),
        metrics={"auroc": report["combined"]["auroc"], "auprc": report["combined"]["auprc"], "ece": ece},
    )
    return model, report
