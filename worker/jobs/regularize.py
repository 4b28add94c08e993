"""The regularize job: Q-Score-regularised fine-tuning (paper eq. 4), resumable, then discovery
on the result.

Training writes a resumable checkpoint every ``checkpoint_every`` steps (only the attempt that
holds the job writes it), so a job delivered again goes on from there. The outputs are versions
``model-<job id>`` and ``features-<job id>``, reused when a job delivered twice finds them.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from models.training.loop import StepRecord
from models.training.regularize import prepare_regularization
from worker.jobs.context import JobContext, clean
from worker.jobs.discover import discover_in_process
from worker.jobs.lifecycle import Outcome, activate, params_of
from worker.params import DiscoverParams, RegularizeParams, dataset_folder


def regularize(ctx: JobContext) -> Outcome:
    """Fine-tune the job's model under its feature set's Q-Score term; then discover on the result."""
    p = params_of(ctx, RegularizeParams)
    registry = ctx.registry
    model_version, fs_version = f"model-{ctx.job_id}", f"features-{ctx.job_id}"
    checkpoint = ctx.checkpoint
    if not registry.model_dir(model_version).exists():
        imported = registry.load_model(p.model)  # not the cached copy: it is trained in place
        # The API refuses what cannot be trained before queueing; a task sent directly is refused here.
        run = prepare_regularization(
            imported,
            registry.load_feature_set(p.feature_set),
            dataset_folder(ctx.settings, p.dataset),
            name=f"model {p.model!r}",
            method=p.method,
            lambda_=p.lambda_,
            alpha=p.alpha,
            epochs=p.epochs,
            batch_size=p.batch_size,
            lr=p.lr,
            max_steps=p.max_steps,
            seed=p.seed,
            checkpoint_every=p.checkpoint_every,
        )

        def on_step(record: StepRecord, progress: float) -> None:
            if record.step % p.checkpoint_every == 0:
                ctx.fence()  # a checkpoint is written next: only by the attempt holding the job
            ctx.progress(0.85 * progress, {"phase": "training", **asdict(record)}, force=progress >= 1.0)

        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        result = run.run(device=ctx.device, checkpoint=checkpoint, on_step=on_step, should_stop=ctx.cancelled)
        training: dict[str, Any] = {
            "job": ctx.job_id,
            "method": p.method,
            "lambda": p.lambda_,
            "alpha": run.regularizer.alpha,
            "epochs": p.epochs,
            "batch_size": p.batch_size,
            "lr": p.lr,
            "steps": result.steps,
            "resumed_from": result.resumed_from,
            "feature_set": p.feature_set,
            "dataset": p.dataset,
        }
        ctx.merge_metrics({"steps": result.steps, "resumed_from": result.resumed_from})
        ctx.check_cancelled()
        registry.add_model(imported.encoder, version=model_version, parent=p.model, training=clean(training))
    record = registry.model_record(model_version)
    ctx.check_cancelled()
    ctx.progress(0.85, {"phase": "discovering"}, force=True)
    discover_params = p.discover or DiscoverParams(dataset=p.dataset, eps="auto", seed=p.seed)
    feature_set = discover_in_process(
        ctx, discover_params, model_version, fs_version, lambda f: ctx.progress(0.85 + 0.15 * f)
    )
    checkpoint.unlink(missing_ok=True)
    activated = activate(ctx, p.activate, model_version, fs_version)
    result_out = {
        "model": model_version,
        "parent": p.model,
        "fingerprint": record.fingerprint,
        "parent_fingerprint": registry.model_record(p.model).fingerprint,
        "feature_set": fs_version,
        "activated": activated,
        "training": record.training,
        "coverage": feature_set.coverage,
        "coverage_warning": feature_set.coverage_warning,  # as a discover job's result says it
        "eps": feature_set.eps,
        "alpha": feature_set.alpha,
    }
    return result_out, {"model": model_version, "feature_set": fs_version}
