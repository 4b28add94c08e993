"""The estimated error rate of a set of images without labels (issue 15, item 3).

Two estimators, chosen by measurement (``experiments/shift_report.py``) and recorded with the
feature set:

- ``mean_risk``: the mean of the per-image calibrated risk (the averaged calibrated confidence of
  NannyML's CBPE). Sound when the risk model stays calibrated under the shift it meets, which is
  what fitting it on shifted copies is for.
- ``atc``: average thresholded confidence (Garg et al., ICLR 2022): a confidence threshold ``t``
  learnt on labelled held-out data so that the share of images below it equals the error there;
  the estimate on new data is the share of its images below ``t``. It needs the head's
  confidence (``probe_max_softmax``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class ErrorEstimator(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["mean_risk", "atc"]
    threshold: float | None = Field(None, description="ATC's confidence threshold (method 'atc').")
    source: str = ""

    def estimate(self, risk: np.ndarray | None, confidence: np.ndarray | None) -> float | None:
        """The estimated error rate of the images whose ``risk`` and head ``confidence`` are given.

        None when the estimator's input is missing (no risk model, no head) or there are no images.
        """
        values = risk if self.method == "mean_risk" else confidence
        if values is None or len(values) == 0:
            return None
        values = np.asarray(values, dtype=np.float64)
        if self.method == "mean_risk":
            return float(values.mean())
        assert self.threshold is not None  # internal invariant: fit_atc sets it
        return float((values < self.threshold).mean())


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
