"""The linear-evaluation pipeline: images in, a report and a calibrated feature set out.

Shared by ``qscore evaluate`` and the ``evaluate`` job.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from models.data import ProgressFn, eval_transform, extract_representations, image_folder, random_sample, subset
from models.encoders import Encoder
from models.evaluation import calibrate_alpha, calibrate_risk, compression_curve, linear_probe, score_power
from models.features import FeatureSet, preprocessing_mismatch
from models.qscore import q_score_parts


def run_evaluation(
    encoder: Encoder,
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
    """Probe, Q-Score power, compression curve; return the report and the calibrated feature set."""
    if feature_set.encoder.fingerprint != encoder_fingerprint:
        raise ValueError("the feature set was not found on this encoder")
    mismatch = preprocessing_mismatch(encoder.spec, feature_set)
    if mismatch is not None:
        raise ValueError(mismatch)
    transform = eval_transform(encoder.spec)
    report_progress = on_progress or (lambda _: None)
    splits = {}
    for i, (name, folder, n) in enumerate((("train", train_dir, train_samples), ("test", test_dir, test_samples))):
        dataset = image_folder(folder, transform)
        sample = random_sample(len(dataset), n, seed)
        splits[name] = extract_representations(
            encoder,
            subset(dataset, sample.indices),
            batch_size=batch_size,
            device=device,
            progress=progress,
            on_progress=lambda f, i=i: report_progress(0.4 * (i + f)),
            desc=f"{name} representations",
        )
    (train_h, train_y), (test_h, test_y) = splits["train"], splits["test"]
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
    if compression:
        points = compression_curve(train_h, train_y, test_h, test_y, feature_set.counts)
        report["compression"] = [asdict(p) for p in points]
    report_progress(1.0)
    calibrated = feature_set.model_copy(
        update={"alpha": alpha, "alpha_source": alpha_source, "risk_curve": calibrate_risk(q, probe.correct)}
    )
    return report, calibrated
