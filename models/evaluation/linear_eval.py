"""The linear-evaluation pipeline: images in, a report and a calibrated feature set out.

Shared by ``qscore evaluate`` and the ``evaluate`` job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from models.data.corruptions import DESIGN_FAMILIES
from models.data.datasets import ProgressFn, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.encoders.resnet import ResNetEncoder
from models.evaluation import shift_fit
from models.evaluation.defaults import DEFAULT_SHIFT_SAMPLES
from models.evaluation.metrics import calibrate_alpha, compression_curve, linear_probe, score_power
from models.evaluation.shift_fit import (
    FIT_SEVERITIES,
    SignalSet,
    labelled_clean_set,
    measure,
    pool,
    signal_sets,
    with_mmd2,
)
from models.monitoring.drift import DriftReference
from models.monitoring.image_properties import held_out_properties
from models.scoring.compatibility import check_fits
from models.scoring.error_estimate import (
    ErrorEstimator,
    fit_atc,
    fit_cott,
    fit_set_correction,
    thresholded_transport,
)
from models.scoring.feature_set import FeatureSet
from models.scoring.probe import HeadInfo, LinearHead
from models.scoring.qscore import q_score_parts
from models.scoring.representations import extract_representations
from models.scoring.risk import RiskModel, fit_risk
from models.scoring.scorer import Scorer
from models.scoring.typicality import TypicalityModel


def run_evaluation(
    encoder: ResNetEncoder,
    encoder_fingerprint: str,
    feature_set: FeatureSet,
    train_dir: str | Path,
    test_dir: str | Path,
    *,
    train_samples: int | None = None,
    test_samples: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    target_precision: float | None = None,
    compression: bool = True,
    shift_samples: int = DEFAULT_SHIFT_SAMPLES,
    shift_families: Sequence[str] = DESIGN_FAMILIES,
    shift_severities: Sequence[int] = FIT_SEVERITIES,
    progress: bool = False,
    on_progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], FeatureSet]:
    """Probe, Q-Score power, compression curve, the risk model; return the report and the calibrated feature set.

    The linear probe (trained on the train sample) becomes the feature set's head. The risk
    model (models/scoring/risk.py) is fitted against the head's mistakes on the test sample and,
    with ``shift_samples`` > 0, on shifted copies of that many of its images
    (models/evaluation/shift_fit.py), cross-validated; the report gives each signal's
    AUROC/AUPRC, the combination's, the calibration (ECE, reliability table) on clean, shifted
    and gross images, and the error estimate of each shifted set by the mean risk, ATC and COTT;
    the best of them on those sets becomes the feature set's error estimator, with a set-level
    correction by each set's MMD^2 against the bank where it helps with each family left out
    (models/scoring/error_estimate.py).
    """
    check_fits(feature_set, encoder_fingerprint, encoder.spec)
    transform = eval_transform(encoder.spec)
    report_progress = on_progress or (lambda _: None)
    train = image_folder(train_dir, transform)
    train_h, train_y = extract_representations(
        encoder,
        subset(train, random_sample(len(train), train_samples, seed).indices),
        batch_size=batch_size,
        device=device,
        progress=progress,
        on_progress=lambda f: report_progress(0.3 * f),
        desc="train representations",
    )
    test = image_folder(test_dir)
    test_idx = random_sample(len(test), test_samples, seed).indices
    images, labels = _load(test, test_idx)
    plain = Scorer(encoder, encoder_fingerprint, feature_set.model_copy(update={"head": None}), str(device))
    measured = measure(plain, images, None, batch_size=batch_size, keep_h=True)
    plain_signals, test_h_np = measured.signals, measured.h
    test_h = torch.from_numpy(test_h_np)
    report_progress(0.4)
    probe = linear_probe(train_h, train_y, test_h, labels, seed=seed)
    registered = feature_set.head is not None and feature_set.head.registered
    if registered:  # a user's own head: its mistakes are what the risk model must predict
        head = feature_set.classifier
        names = list(test.classes)
        if head.classes != names:  # the folder's sorted class names, in the head's logit order
            raise ValueError(
                f"the registered head's classes {head.classes} must be the test folder's, in order: {names}"
            )
        predicted = head.logits(test_h).argmax(dim=1).numpy()
        info = feature_set.head.model_copy(update={"top1": float((predicted == labels).mean())})
    else:
        head = LinearHead.from_sklearn(probe.model, list(test.classes))
        info = HeadInfo(
            kind="linear",
            classes=head.classes,
            top1=probe.top1,
            source=f"linear probe (standardised logistic regression) on {len(train_y)} train representations",
        )
    with_head = feature_set.with_head(head, info)
    report_progress(0.45)
    parts = q_score_parts(test_h, feature_set.discriminative_indices, feature_set.eps)
    q = parts.q_score.numpy()
    alpha, alpha_source = calibrate_alpha(q, probe.correct, target_precision)
    report: dict[str, Any] = {
        "top1": probe.top1,
        "n_train": int(train_h.shape[0]),
        "n_test": int(test_h.shape[0]),
        "coverage_test": float((q > 0).mean()),
        "q_score": score_power(q, probe.correct),
        "components": {
            "mean_discriminative": score_power(parts.mean_active.numpy(), probe.correct),
            # Scored as -L1: a smaller norm (a sparser h) raises Q, so it should predict "correct".
            "negative_l1_norm": score_power(-parts.l1_norm.numpy(), probe.correct),
        },
        "alpha": alpha,
        "alpha_source": alpha_source,
        "flagged_share": float((q < alpha).mean()),
    }
    clean = labelled_clean_set(plain_signals, test_h_np, head, labels)
    shifted = []
    reference = None
    if shift_samples > 0:
        if feature_set.bank is not None:  # each set's distance from the bank, for the error estimate's correction
            reference = DriftReference(feature_set.bank.vectors.float().cpu().numpy())
        shifted_idx = np.sort(np.random.default_rng(seed).choice(len(images), min(shift_samples, len(images)), False))
        shifted = signal_sets(
            Scorer(encoder, encoder_fingerprint, with_head, str(device)),
            [images[i] for i in shifted_idx],
            labels[shifted_idx],
            families=shift_families,
            severities=shift_severities,
            seed=seed,
            batch_size=batch_size,
            clean=False,
            source=shifted_idx,  # groups: the held-out image each copy was made from
            drift_reference=reference,
            on_progress=lambda f: report_progress(0.45 + 0.4 * f),
        )
    if shifted and reference is not None:
        (clean,) = with_mmd2([clean], reference, drop_h=True)
    sets = [clean, *shifted]
    risk_model, estimator, report["risk"], report["error_estimate"] = fit_under_shift(sets, seed=seed)
    if "typicality" in clean.signals:
        report["atypical_share_test"] = float((clean.signals["typicality"] > 1).mean())
    if compression:
        points = compression_curve(train_h, train_y, test_h, labels, feature_set.counts)
        report["compression"] = [asdict(p) for p in points]
    report_progress(1.0)
    calibrated = with_head.model_copy(
        update={
            "alpha": alpha,
            "alpha_source": alpha_source,
            "risk_model": risk_model,
            "risk_curve": None,
            "error_estimator": estimator,
            "typicality": with_held_out_typicality(with_head.typicality, clean.signals.get("typicality")),
            "held_out_image_properties": held_out_properties(clean.signals),
        }
    )
    return report, calibrated


def with_held_out_typicality(model: TypicalityModel | None, typicality: np.ndarray | None) -> TypicalityModel | None:
    """``model`` keeping the held-out images' typicality, sorted, to 5 decimals (the drift test's reference)."""
    if model is None or typicality is None:
        return model
    return model.model_copy(update={"held_out": [round(float(v), 5) for v in np.sort(typicality)]})


#: What the clean weight is chosen for (issue 15's goals): the risk's ECE on clean and on shifted
#: images, and the chosen estimator's mean |estimate - error| over the shifted sets. A weight's
#: score is the largest of its cross-validated figures over these targets; the least wins, ties
#: (as when COTT's error, which no weight changes, is the largest) going to the least mean ratio.
FIT_TARGETS = {"ece_clean": 0.03, "ece_shifted": 0.08, "window_error": 0.05}


def fit_under_shift(
    sets: Sequence[SignalSet], *, seed: int = 0, clean_weights: Sequence[float] | None = None
) -> tuple[RiskModel, ErrorEstimator, dict[str, Any], dict[str, Any]]:
    """The risk model and the error estimator from measured sets (the clean one first), with their reports.

    The risk model is fitted on all sets pooled (models/evaluation/shift_fit.py), each set also
    reported apart, once per clean share of the weight in ``clean_weights`` (default
    ``shift_fit.CLEAN_WEIGHTS``), keeping the one whose out-of-fold figures best meet
    :data:`FIT_TARGETS`. ATC's threshold comes from the clean set, COTT's from the clean and the
    shifted sets (one number; compared in-sample, as the risk's mean is out of fold); the
    estimator is the best of the three on the shifted sets.
    """
    if not sets or sets[0].kind != "clean":
        raise ValueError("the first set must be the clean held-out set")
    clean = sets[0]
    candidates = {"atc": fit_atc(clean.signals["probe_max_softmax"], ~clean.misclassified)}
    if clean.probabilities is not None and clean.labels is not None:
        shifted = [(s.probabilities, s.error) for s in sets[1:] if s.probabilities is not None]
        candidates["cott"] = fit_cott(clean.probabilities, clean.labels, shifted)
    weights = tuple(shift_fit.CLEAN_WEIGHTS if clean_weights is None else clean_weights)
    if len(sets) == 1:
        weights = weights[:1]  # nothing shifted: the weight changes nothing
    fits, scores = [], {}
    for weight in weights:
        pooled = pool(sets, clean_weight=weight)
        risk_model, risk_report = fit_risk(
            pooled.signals,
            pooled.misclassified,
            seed=seed,
            sample_weight=pooled.weight,
            groups=pooled.groups,
            subsets=pooled.subsets,
            no_class=pooled.no_class,
            extra_scores={"probe_max_softmax": -pooled.signals["probe_max_softmax"]},
        )
        estimator, estimate_report = choose_estimator(sets, risk_report["subsets"], candidates)
        scores[weight] = _target_score(risk_report["subsets"], estimate_report)
        fits.append((scores[weight], risk_model, estimator, risk_report, estimate_report))
    best = weights.index(best_weight(scores))
    _, risk_model, estimator, risk_report, estimate_report = fits[best]
    risk_report["clean_weight"] = weights[best]
    risk_report["clean_weight_scores"] = {str(w): v for w, v in scores.items()}
    return risk_model, estimator, risk_report, estimate_report


def _target_score(subsets: dict[str, dict[str, Any]], estimate_report: dict[str, Any]) -> dict[str, float | None]:
    """A fit's cross-validated figures, each over its target in FIT_TARGETS, and the largest ratio."""
    figures = {
        "ece_clean": subsets.get("clean", {}).get("ece"),
        "ece_shifted": subsets.get("shifted", {}).get("ece"),
        "window_error": estimate_report["window_error"],
    }
    ratios = [v / FIT_TARGETS[k] for k, v in figures.items() if v is not None]
    return {**figures, "score": max(ratios) if ratios else 0.0, "mean_ratio": float(np.mean(ratios)) if ratios else 0.0}


def best_weight(scores: dict[float, dict[str, Any]]) -> float:
    """The weight of least score, then least mean ratio, then least weight."""
    return min(scores, key=lambda w: (scores[w]["score"], scores[w]["mean_ratio"], w))


def _candidate_estimate(estimator: ErrorEstimator, s: SignalSet) -> float | None:
    """A candidate's estimate of a fit set's error; COTT on the whole set, whatever its size (the
    serving window's minimum guards the traffic, where windows of a few images occur)."""
    if estimator.method == "cott":
        if s.probabilities is None:
            return None
        assert estimator.class_prior is not None and estimator.threshold is not None  # fit_cott sets them
        return thresholded_transport(s.probabilities, estimator.class_prior, estimator.threshold)
    return estimator.estimate(None, s.signals.get("probe_max_softmax"))


def choose_estimator(
    sets: Sequence[SignalSet], subsets: dict[str, dict[str, Any]], candidates: dict[str, ErrorEstimator]
) -> tuple[ErrorEstimator, dict[str, Any]]:
    """The mean risk (out of fold) or a fitted candidate (ATC, COTT), whichever estimates the
    shifted sets' errors best: least mean |estimate - error| over the sets every method estimates.

    Without shifted sets, the mean risk (calibrated in distribution, it is CBPE's estimate there).
    """
    methods = ["mean_risk", *candidates]
    rows = []
    for s in sets:
        if s.kind == "clean":
            continue
        row: dict[str, Any] = {"set": s.name, "error": s.error, "mean_risk": subsets[s.name]["mean_risk"]}
        row |= {name: _candidate_estimate(c, s) for name, c in candidates.items()}
        rows.append(row)
    usable = [m for m in methods if rows and all(r[m] is not None for r in rows)]
    mae = {m: float(np.mean([abs(r[m] - r["error"]) for r in rows])) if m in usable else None for m in methods}
    method = min(usable, key=lambda m: (mae[m], methods.index(m))) if rows else "mean_risk"
    source = "mean risk (no shifted sets)"
    if rows:
        others = ", ".join(f"{m} {mae[m]:.4f}" for m in methods if m != method and mae[m] is not None)
        source = f"{method}: mean |estimate - error| over {len(rows)} shifted sets {mae[method]:.4f} ({others})"
    chosen = candidates.get(method, ErrorEstimator(method="mean_risk")).model_copy(update={"source": source})
    thresholds = {f"{name}_threshold": c.threshold for name, c in candidates.items()}
    report = {"method": method, "mean_abs_error": mae, "sets": rows, **thresholds, "window_error": mae[method]}
    if rows and all(s.mmd2 is not None for s in sets):
        made = {r["set"]: r[method] for r in rows}  # the shifted sets' estimates, made above
        for s in sets:
            if s.kind == "clean":
                made[s.name] = subsets[s.name]["mean_risk"] if method == "mean_risk" else _candidate_estimate(chosen, s)
        estimates = [made[s.name] for s in sets]
        correction, figures = fit_set_correction(
            estimates, [s.mmd2 for s in sets], [s.error for s in sets], [s.shift_group for s in sets]
        )
        report["correction"] = {**figures, "kept": correction is not None}
        if correction is not None:
            chosen = chosen.model_copy(update={"correction": correction})
            report["correction"] |= correction.model_dump(exclude={"source"})
            report["window_error"] = figures["corrected_leave_one_family_out"]
    return chosen, report


def _load(folder: Any, indices: Sequence[int]) -> tuple[list[Image.Image], np.ndarray]:
    """Decoded RGB images and labels of an image folder (no transform) at ``indices``."""
    images, labels = [], []
    for i in indices:
        image, label = folder[i]
        images.append(image.convert("RGB"))
        labels.append(label)
    return images, np.asarray(labels)
