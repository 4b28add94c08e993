"""Why an image's typicality and risk are what they are: the parts each verdict is made of.

The heatmaps and the decomposition explain the Q-Score; these explain the two other verdicts
from the same signals ``/score`` computed. Typicality is the largest of its components' scores
over the threshold (models/scoring/typicality.py), so each component's own ratio says which
made the image atypical. The risk is a calibrated logistic regression and, where the model has
one, a no-class term (models/scoring/risk.py): each signal's term of the two log-odds is exact,
so the signals are listed with what they added, largest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.scoring.feature_set import FeatureSet


@dataclass(frozen=True)
class TypicalityWhy:
    """Each component's score over the threshold (above 1: atypical by this component alone)."""

    components: dict[str, float]

    @property
    def driver(self) -> str:
        """The component that sets the typicality (the largest)."""
        return max(self.components, key=self.components.__getitem__)

    def row(self) -> dict[str, Any]:
        ranked = sorted(self.components.items(), key=lambda kv: -kv[1])
        return {
            "driver": self.driver,
            "components": [{"name": name, "typicality": value, "atypical": value > 1.0} for name, value in ranked],
        }


@dataclass(frozen=True)
class RiskWhy:
    """The risk's two parts and every signal's term of their log-odds."""

    of_a_class: float  # P(mis-classified) of an image of one of the head's classes
    no_class: float  # P(of none of the head's classes); 0 without a no-class term
    intercept: float
    no_class_intercept: float | None
    signals: list[dict[str, Any]]  # name, value, z, of_a_class, no_class

    def row(self) -> dict[str, Any]:
        return {
            "of_a_class": self.of_a_class,
            "no_class": self.no_class,
            "intercept": self.intercept,
            "no_class_intercept": self.no_class_intercept,
            "signals": self.signals,
        }


@dataclass(frozen=True)
class VerdictWhy:
    typicality: TypicalityWhy | None
    risk: RiskWhy | None

    def row(self) -> dict[str, Any]:
        return {
            "typicality": None if self.typicality is None else self.typicality.row(),
            "risk": None if self.risk is None else self.risk.row(),
        }


def why(feature_set: FeatureSet, signals: dict[str, np.ndarray], i: int = 0) -> VerdictWhy:
    """Why image ``i`` of a batch got its typicality and risk, from the batch's ``signals`` (each
    (N,), as :meth:`Scorer.signals` gives them); a part is None where the feature set has no model for it."""
    typicality = None
    model = feature_set.typicality
    if model is not None and set(model.components) <= set(signals):
        typicality = TypicalityWhy({k: float(v[i]) for k, v in model.component_typicality(signals).items()})
    risk = None
    rm = feature_set.risk_model
    if rm is not None and set(rm.signals) <= set(signals):
        one = {k: np.asarray(v)[i : i + 1] for k, v in signals.items() if np.ndim(v) == 1}
        parts = rm.contributions(one)
        rows = [
            {
                "name": name,
                "value": float(one[name][0]),
                "z": float(parts["z"][0, j]),
                "of_a_class": float(parts["of_a_class"][0, j]),
                "no_class": float(parts["no_class"][0, j]),
            }
            for j, name in enumerate(rm.signals)
        ]
        rows.sort(key=lambda r: -(abs(r["of_a_class"]) + abs(r["no_class"])))
        risk = RiskWhy(
            of_a_class=float(rm.predict_of_a_class(one)[0]),
            no_class=float(rm.predict_no_class(one)[0]),
            intercept=rm.intercept,
            no_class_intercept=rm.no_class_intercept if rm.no_class_coef else None,
            signals=rows,
        )
    return VerdictWhy(typicality, risk)
