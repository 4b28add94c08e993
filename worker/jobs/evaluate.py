"""The evaluate job: linear evaluation of a model under a feature set (``run_evaluation``, as
``qscore evaluate``); the feature set with calibrated alpha and risk becomes ``features-<job id>``."""

from __future__ import annotations

from models.evaluation.linear_eval import run_evaluation
from worker.jobs.context import JobContext
from worker.jobs.lifecycle import Outcome, activate, params_of
from worker.params import EvaluateParams, dataset_folder


def evaluate(ctx: JobContext) -> Outcome:
    """Linear evaluation; writes the calibrated feature set as ``features-<job id>``."""
    p = params_of(ctx, EvaluateParams)
    registry = ctx.registry
    version = f"features-{ctx.job_id}"
    imported = ctx.cached_model(p.model)
    feature_set = registry.load_feature_set(p.feature_set)

    def on_progress(fraction: float) -> None:
        ctx.check_cancelled()
        ctx.progress(0.95 * fraction, {"phase": "evaluating"})

    report, calibrated = run_evaluation(
        imported.encoder,
        imported.fingerprint,
        feature_set,
        dataset_folder(ctx.settings, p.train_dataset, "train_dataset"),
        dataset_folder(ctx.settings, p.test_dataset, "test_dataset"),
        train_samples=p.train_samples,
        test_samples=p.test_samples,
        seed=p.seed,
        batch_size=p.batch_size,
        device=ctx.device,
        target_precision=p.target_precision,
        compression=p.compression,
        shift_samples=p.shift_samples,
        on_progress=on_progress,
    )
    ctx.check_cancelled()
    if not registry.feature_set_dir(version).exists():
        registry.add_feature_set(calibrated, version=version)
    ctx.merge_metrics(
        {
            "top1": report["top1"],
            "auroc": report["q_score"]["auroc"],
            "auprc": report["q_score"]["auprc"],
            "risk_auroc": report["risk"]["combined"]["auroc"],
            "risk_ece": report["risk"]["combined"]["ece"],
            "error_estimator": report["error_estimate"]["method"],
            "error_estimate_window_error": report["error_estimate"]["window_error"],
            "error_estimate_corrected": report["error_estimate"].get("correction", {}).get("kept", False),
            "risk_clean_weight": report["risk"].get("clean_weight"),
        }
    )
    activated = activate(ctx, p.activate, p.model, version)
    return (
        {
            "model": p.model,
            "evaluated_feature_set": p.feature_set,
            "feature_set": version,
            "activated": activated,
            "report": report,
        },
        {"feature_set": version},
    )
