"""Linear evaluation on frozen representations (SPEC section 5; paper figs. 4, 7, A.2, A.4).

scikit-learn does the probes and the metrics. Positive class = correctly classified, as in the
paper; the other orientation (positive = mis-classified, score = -Q) is reported too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from models.scoring.dominance import select_discriminative

log = logging.getLogger(__name__)


DEFAULT_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 0.75)


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    correct: np.ndarray  # (N_test,) bool
    predictions: np.ndarray  # (N_test,) int
    max_probability: np.ndarray  # (N_test,) float: the probe's maximum softmax probability
    model: Any = None  # the fitted scikit-learn pipeline (standardise, logistic regression)


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def linear_probe(
    train_h: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    test_h: torch.Tensor | np.ndarray,
    test_y: torch.Tensor | np.ndarray,
    features: Sequence[int] | np.ndarray | None = None,
    *,
    c: float = 1.0,
    max_iter: int = 500,
    seed: int = 0,
) -> ProbeResult:
    """Multinomial logistic regression on standardised frozen features; top-1 on the test set."""
    xtr, xte = _numpy(train_h), _numpy(test_h)
    ytr, yte = _numpy(train_y).astype(int), _numpy(test_y).astype(int)
    if xtr.ndim != 2 or xte.ndim != 2 or xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"train and test representations must be (N, r) alike, got {xtr.shape} and {xte.shape}")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValueError("each representation needs exactly one label")
    if len(np.unique(ytr)) < 2:
        raise ValueError("the probe needs at least two classes in the training labels")
    if features is not None:
        idx = np.asarray(features, dtype=int)
        if idx.size == 0:
            raise ValueError("the feature subset is empty")
        xtr, xte = xtr[:, idx], xte[:, idx]
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter, random_state=seed))
    probe.fit(xtr, ytr)
    proba = probe.predict_proba(xte)
    predictions = probe.classes_[proba.argmax(axis=1)]
    correct = predictions == yte
    return ProbeResult(float(correct.mean()), correct, predictions, proba.max(axis=1), probe)


def score_power(scores: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """AUROC and AUPRC of a score separating correct (positive) from mis-classified samples."""
    scores, correct = np.asarray(scores, dtype=float), np.asarray(correct, dtype=bool)
    if scores.shape != correct.shape:
        raise ValueError(f"{scores.shape[0]} scores for {correct.shape[0]} correctness labels")
    if correct.all() or not correct.any():
        raise ValueError("AUROC needs both correct and mis-classified samples")
    return {
        "auroc": float(roc_auc_score(correct, scores)),
        "auprc": float(average_precision_score(correct, scores)),
        "base_rate": float(correct.mean()),
        "auroc_misclassified": float(roc_auc_score(~correct, -scores)),
        "auprc_misclassified": float(average_precision_score(~correct, -scores)),
        "base_rate_misclassified": float((~correct).mean()),
    }


@dataclass(frozen=True)
class CompressionPoint:
    subset: str  # "discriminative", "random", "lower_tail", "upper_tail" or "all"
    size: int
    top1: float
    seed: int | None = None


def compression_curve(
    train_h: torch.Tensor | np.ndarray,
    train_y: torch.Tensor | np.ndarray,
    test_h: torch.Tensor | np.ndarray,
    test_y: torch.Tensor | np.ndarray,
    counts: Sequence[int] | torch.Tensor,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    random_seeds: int = 3,
    max_iter: int = 500,
) -> list[CompressionPoint]:
    """Probe accuracy on discriminative, random, lower- and upper-tail subsets (figs. 4, A.2).

    Subsets of ``fraction * r`` features each: the discriminative band centred on the middle of
    the count-sorted features, ``random_seeds`` random subsets, the lowest-count and the
    highest-count features; plus one probe on all features.
    """
    counts_t = torch.as_tensor(counts)
    r = counts_t.numel()
    order = torch.sort(counts_t, stable=True).indices.numpy()
    ever = int((counts_t > 0).sum())
    points = [CompressionPoint("all", r, linear_probe(train_h, train_y, test_h, test_y, max_iter=max_iter).top1)]
    for fraction in fractions:
        size = max(1, int(round(fraction * r)))
        subsets: list[tuple[str, np.ndarray, int | None]] = [
            ("lower_tail", order[:size], None),
            ("upper_tail", order[-size:], None),
        ]
        if size <= ever:
            subsets.append(("discriminative", select_discriminative(counts_t, size=size).numpy(), None))
        rng = np.random.default_rng(0)
        for seed in range(random_seeds):
            subsets.append(("random", rng.choice(r, size=size, replace=False), seed))
        for name, idx, seed in subsets:
            top1 = linear_probe(train_h, train_y, test_h, test_y, idx, max_iter=max_iter).top1
            points.append(CompressionPoint(name, size, top1, seed))
    return points


def calibrate_alpha(q: np.ndarray, correct: np.ndarray, target_precision: float | None = None) -> tuple[float, str]:
    """The Q threshold below which samples are flagged, from the Q/correctness curve.

    With ``target_precision``, the largest threshold whose flagged samples are mis-classified at
    least that often; otherwise (or when none reaches it) the threshold maximising Youden's J
    for detecting mis-classification. Always > 0, so Q = 0 samples are flagged (SPEC section 3).
    """
    q, miss = np.asarray(q, dtype=float), ~np.asarray(correct, dtype=bool)
    if miss.all() or not miss.any():
        raise ValueError("calibration needs both correct and mis-classified samples")
    candidates = np.unique(q)
    thresholds = np.append(candidates[1:], candidates[-1] + 1e-12)  # flag q < t
    if target_precision is not None:
        ok = [t for t in thresholds if (q < t).any() and miss[q < t].mean() >= target_precision]
        if ok:
            return float(max(ok)), f"largest alpha with mis-classification precision >= {target_precision:g}"
        log.warning("no alpha reaches precision %.2f; using Youden's J", target_precision)
    fpr, tpr, roc_thresholds = roc_curve(miss, -q)
    best = int(np.argmax(tpr - fpr))
    # roc_curve flags score >= thr, i.e. q <= -thr; the next representable q is the strict bound.
    alpha = float(np.nextafter(-roc_thresholds[best], np.inf)) if np.isfinite(roc_thresholds[best]) else float(q.max())
    alpha = max(alpha, float(np.nextafter(0.0, 1.0)))
    return alpha, "alpha maximising Youden's J (TPR - FPR) for mis-classification"
