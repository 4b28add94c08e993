"""The linear-evaluation pipeline: images in, a report and a calibrated feature set out.

Shared by ``qscore evaluate`` and the ``evaluate`` job.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.data.datasets import ProgressFn, image_folder, random_sample, subset
from models.data.transforms import eval_transform
from models.encoders.resnet import ResNetEncoder
from models.evaluation.metrics import calibrate_alpha, compression_curve, linear_probe, score_power
from models.scoring.compatibility import check_fits
from models.scoring.feature_set import FeatureSet
from models.scoring.qscore import q_score_parts
from models.scoring.representations import extract_representations, extract_with_pixels
from models.scoring.risk import fit_risk
from models.scoring.signals import label_free_signals


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
    progress: bool = False,
    on_progress: ProgressFn | None = None,
) -> tuple[dict[str, Any], FeatureSet]:
    """Probe, Q-Score power, compression curve, the risk model; return the report and the calibrated feature set.

    The risk model (models/scoring/risk.py) is fitted on the test sample's label-free signals against the
    probe's mistakes, cross-validated; the report gives each signal's AUROC/AUPRC, the
    combination's, the probe's maximum softmax's and the calibration (ECE, reliability table).
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
        on_progress=lambda f: report_progress(0.4 * f),
        desc="train representations",
    )
    test = image_folder(test_dir, transform)
    test_h, test_y, test_pixels = extract_with_pixels(
        encoder,
        subset(test, random_sample(len(test), test_samples, seed).indices),
        batch_size=batch_size,
        device=device,
        on_progress=lambda f: report_progress(0.4 + 0.4 * f),
    )
    probe = linear_probe(train_h, train_y, test_h, test_y, seed=seed)
    report_progress(0.85)
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
    signals = label_free_signals(test_h, test_pixels, parts, feature_set.typicality, feature_set.bank)
    risk_model, report["risk"] = fit_risk(
        signals, ~probe.correct, seed=seed, extra_scores={"probe_max_softmax": -probe.max_probability}
    )
    if "typicality" in signals:
        report["atypical_share_test"] = float((signals["typicality"] > 1).mean())
    if compression:
        points = compression_curve(train_h, train_y, test_h, test_y, feature_set.counts)
        report["compression"] = [asdict(p) for p in points]
    report_progress(1.0)
    calibrated = feature_set.model_copy(
        update={"alpha": alpha, "alpha_source": alpha_source, "risk_model": risk_model, "risk_curve": None}
    )
    return report, calibrated
