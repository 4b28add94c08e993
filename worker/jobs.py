"""The bodies of the job types, written against a :class:`JobContext` (the atlas's in ``worker/atlas_job.py``).

The same functions run in a Celery worker (``worker/tasks.py``) and in-process in embedded mode
(``worker/embedded.py``). Everything they write is idempotent: output versions are named after
the job (``model-<job id>``, ``features-<job id>``) and a version that already exists is reused,
so a job delivered twice never writes twice; every version folder is written atomically by the
registry, so a killed job leaves no half-written version.

Discovery is sharded (SPEC section 2): the reference sample is split into shards whose dominance
counts are computed apart and summed, then the Q-Scores of every shard under the summed ``D``,
then the feature set is assembled. Shard representations from the first pass are kept in the
job's scratch folder so the second pass does not run the encoder again when it lands on a
worker that can see them.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from qscore_config.settings import Settings
from worker.params import DiscoverParams, EvaluateParams, RegularizeParams
from worker.store import BEGIN_RUN, JobState, JobStore

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # deliveries of one job before it is failed (its worker keeps dying)


class JobCancelled(Exception):
    """The job's cancel flag was seen; the job stops and says so."""


class JobAlreadyOver(Exception):
    """A shard of a job that already ended (failed, cancelled): nothing left to do."""


class JobSuperseded(Exception):
    """A later attempt holds the job (this one's worker was cut off, then came back): stop, write nothing."""


@dataclass
class JobContext:
    job_id: str
    store: JobStore
    settings: Settings
    attempt: int = 0  # set by ``start``; carried by the shard tasks of a discovery
    _last_write: float = field(default=0.0, repr=False)

    @property
    def registry(self) -> Any:
        from models.registry.versions import Registry

        return Registry(self.settings.registry_root)

    @property
    def scratch(self) -> Path:
        return Path(self.settings.job_checkpoint_dir) / self.job_id

    def cancelled(self) -> bool:
        """Cancellation requested? Raises :class:`JobSuperseded` when a later attempt holds the job.

        Asked between training steps, before checkpoints and before every write of an output.
        """
        holds, cancel = self.store.holds(self.job_id, self.attempt)
        if not holds:
            raise JobSuperseded(self._superseded_reason())
        return cancel

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise JobCancelled("cancelled by request")

    def fence(self) -> None:
        """Go on only while this attempt holds the job (before checkpoints and output writes)."""
        self.cancelled()

    def _superseded_reason(self) -> str:
        record = self.store.get(self.job_id)
        if record is None:
            return "the job record is gone"
        if record.attempts != self.attempt:
            later = record.history[-1] if record.history else None
            where = f" on {later.worker}" if later is not None and later.worker else ""
            return (
                f"attempt {record.attempts}{where} took the job over while this attempt was cut off; "
                "stopped without writing"
            )
        return f"the job ended ({record.state}) while this attempt was cut off; stopped without writing"

    def progress(self, fraction: float, metrics: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """Record progress (0..1) and metrics so far; at most a few writes a second."""
        now = time.monotonic()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        if not self.store.update(self.job_id, self.attempt, progress=round(min(max(fraction, 0.0), 1.0), 4)):
            raise JobSuperseded(self._superseded_reason())
        if metrics:
            self.merge_metrics(metrics)

    def merge_metrics(self, metrics: dict[str, Any]) -> None:
        if not self.store.merge_metrics(self.job_id, self.attempt, clean(metrics)):
            raise JobSuperseded(self._superseded_reason())


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


def worker_name() -> str:
    import os
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


# -- running a job and recording its outcome -------------------------------------------------
def start(ctx: JobContext, worker: str | None = None) -> bool:
    """Start an attempt (a delivery more); False when it must not run (over, cancelled)."""
    outcome, attempt = ctx.store.begin(ctx.job_id, worker or worker_name())
    if outcome != BEGIN_RUN:
        log.info("job %s not run: %s", ctx.job_id, outcome)
        return False
    ctx.attempt = attempt
    if attempt > MAX_ATTEMPTS:
        finish(
            ctx,
            "failed",
            error=f"the job was started {attempt} times (its worker kept dying or losing the broker); not retried",
        )
        return False
    if attempt > 1:
        log.warning("job %s delivered again (attempt %d): resuming", ctx.job_id, attempt)
    return True


def run(ctx: JobContext, body: Callable[[JobContext], tuple[dict[str, Any], dict[str, str]]]) -> None:
    """Start the job (unless over or cancelled), run ``body`` and record the outcome."""
    if start(ctx):
        guarded(ctx, lambda: succeed(ctx, *body(ctx)))


def oom_message(exc: BaseException, batch_size: int | None) -> str | None:
    """The job's error for a device out-of-memory error (None for any other error).

    ``torch.OutOfMemoryError`` (CUDA, alias ``torch.cuda.OutOfMemoryError``), the MPS/XPU
    "out of memory" and the CPU allocator's "can't allocate memory" RuntimeErrors: the message
    names the batch size to lower.
    """
    import torch

    text = str(exc)
    device_oom = isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
    )
    if not device_oom:
        return None
    first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    if batch_size is not None:
        advice = f"lower batch_size (it was {batch_size}; try {max(1, batch_size // 2)})"
    else:
        advice = "lower batch_size"
    return f"the device ran out of memory: {advice} and submit the job again ({first_line[:300]})"


def free_device_memory() -> None:
    """Give the caching allocator's blocks back, so the next job on this device starts clean."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def guarded(ctx: JobContext, step: Callable[[], Any]) -> Any:
    """Run one step of a job; a cancellation or an error ends the job with the reason."""
    from celery.exceptions import SoftTimeLimitExceeded

    from models.training.loop import TrainingCancelled

    try:
        return step()
    except JobSuperseded as exc:
        log.warning("job %s attempt %d stopped: %s", ctx.job_id, ctx.attempt, exc)
        ctx.store.end_attempt(ctx.job_id, ctx.attempt, "superseded", str(exc))
        raise JobAlreadyOver(ctx.job_id) from None
    except (JobCancelled, TrainingCancelled) as exc:
        finish(ctx, "cancelled", error=f"cancelled by request ({exc})")
        raise JobAlreadyOver(ctx.job_id) from None
    except SoftTimeLimitExceeded:
        finish(ctx, "failed", error=f"time limit of {ctx.settings.job_time_limit_s} s exceeded")
        raise JobAlreadyOver(ctx.job_id) from None
    except JobAlreadyOver:
        raise
    except Exception as exc:
        record = ctx.store.get(ctx.job_id)
        message = oom_message(exc, record.params.get("batch_size") if record is not None else None)
        if message is None:
            log.exception("job %s failed", ctx.job_id)
            finish(ctx, "failed", error=f"{type(exc).__name__}: {exc}")
            raise JobAlreadyOver(ctx.job_id) from None
    # Out of device memory. Out of the except block, so that the traceback, whose frames hold
    # the tensors, is gone before the cache is emptied: the next job gets the device back.
    log.error("job %s: %s", ctx.job_id, message)
    free_device_memory()
    finish(ctx, "failed", error=message)
    raise JobAlreadyOver(ctx.job_id)


def succeed(ctx: JobContext, result: dict[str, Any], artifacts: dict[str, str]) -> None:
    finish(ctx, "succeeded", result=clean(result), artifacts=artifacts)


def finish(ctx: JobContext, state: JobState, **fields: Any) -> None:
    """End the job with ``state``, only while this attempt holds it (else nothing is written)."""
    from worker import metrics

    if ctx.store.finish(ctx.job_id, state, ctx.attempt or None, **fields):
        record = ctx.store.get(ctx.job_id)
        if record is not None:
            duration = (record.finished_at or time.time()) - (record.started_at or record.created_at)
            metrics.job_finished(record.type, state, duration)
        # The job is over for good: its scratch shards and training checkpoint go.
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        (Path(ctx.settings.job_checkpoint_dir) / f"{ctx.job_id}.ckpt").unlink(missing_ok=True)


def params_of(ctx: JobContext, model: type[Any]) -> Any:
    record = ctx.store.get(ctx.job_id)
    if record is None:
        raise JobAlreadyOver(ctx.job_id)
    return model.model_validate(record.params)


def _activate(ctx: JobContext, wanted: bool | None, model: str, feature_set: str) -> bool:
    ctx.fence()
    if wanted if wanted is not None else ctx.settings.auto_switch:
        ctx.registry.set_active(model, feature_set)
        return True
    return False


@lru_cache(maxsize=4)
def _cached_model(root: str, version: str) -> Any:
    """Encoders read once per worker process (lazily: never before the pool forks)."""
    from models.registry.versions import Registry

    return Registry(root).load_model(version)


def forget_models() -> None:
    _cached_model.cache_clear()


def _device(ctx: JobContext) -> Any:
    from models.encoders.device import resolve_device

    return resolve_device(ctx.settings.device)


# -- discover ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiscoverPlan:
    n_shards: int
    n_available: int


def discover_plan(ctx: JobContext) -> DiscoverPlan:
    """Draw the reference sample (seeded) and decide the shards."""
    from models.data.datasets import image_folder, random_sample, shard
    from worker.params import dataset_folder

    p: DiscoverParams = params_of(ctx, DiscoverParams)
    ctx.check_cancelled()
    dataset = image_folder(dataset_folder(ctx.settings, p.dataset))
    sample = random_sample(len(dataset), p.sample_size, p.seed)
    wanted = p.shards or math.ceil(len(sample.indices) / ctx.settings.discover_shard_size)
    n_shards = len(shard(sample.indices, wanted))
    ctx.progress(
        0.0,
        {
            "images": len(sample.indices),
            "shards": n_shards,
            "shards_counted": 0,
            "shards_scored": 0,
            "phase": "counting",
        },
        force=True,
    )
    return DiscoverPlan(n_shards=n_shards, n_available=len(dataset))


def _shard_representations(ctx: JobContext, p: DiscoverParams, plan: DiscoverPlan, k: int) -> Any:
    """(n_k, r) representations of shard ``k``: from the scratch folder, or the encoder."""
    import torch

    from models.data.datasets import image_folder, random_sample, shard, subset
    from models.data.transforms import eval_transform
    from models.scoring.representations import extract_with_pixels
    from models.storage.atomic import atomic_path
    from worker.params import dataset_folder

    cached = ctx.scratch / f"shard-{k}-of-{plan.n_shards}.pt"
    pixels_file = ctx.scratch / f"shard-{k}-of-{plan.n_shards}-pixels.pt"
    if cached.is_file() and pixels_file.is_file():
        return torch.load(cached, weights_only=True)
    imported = _cached_model(str(ctx.settings.registry_root), p.model)
    dataset = image_folder(dataset_folder(ctx.settings, p.dataset), eval_transform(imported.encoder.spec))
    if len(dataset) != plan.n_available:
        raise ValueError(
            f"data set {p.dataset!r} changed while the job ran "
            f"({plan.n_available} images at the start, {len(dataset)} now)"
        )
    indices = shard(random_sample(len(dataset), p.sample_size, p.seed).indices, plan.n_shards)[k]
    h, _, pixels = extract_with_pixels(
        imported.encoder, subset(dataset, indices), batch_size=p.batch_size, device=_device(ctx)
    )
    ctx.scratch.mkdir(parents=True, exist_ok=True)
    # The pixel statistics of typicality (issue 10) first: a shard counts as cached once both are there.
    with atomic_path(pixels_file) as tmp:
        torch.save(pixels, tmp)
    with atomic_path(cached) as tmp:
        torch.save(h, tmp)
    return h


def _shard_reference(ctx: JobContext, p: DiscoverParams, plan: DiscoverPlan) -> tuple[Any, Any]:
    """The whole reference sample's representations and pixel statistics, shard by shard."""
    import torch

    hs, pix = [], []
    for k in range(plan.n_shards):
        hs.append(_shard_representations(ctx, p, plan, k))
        pix.append(torch.load(ctx.scratch / f"shard-{k}-of-{plan.n_shards}-pixels.pt", weights_only=True))
    return torch.cat(hs), {name: torch.cat([part[name] for part in pix]) for name in pix[0]}


def _guard_shard(ctx: JobContext) -> None:
    """Go on only while the job runs under this shard's attempt (else end the chain quietly)."""
    holds, cancel = ctx.store.holds(ctx.job_id, ctx.attempt)
    if not holds:
        raise JobAlreadyOver(ctx.job_id)
    if cancel:
        raise JobCancelled("cancelled by request")


def count_shard(ctx: JobContext, plan: DiscoverPlan, k: int) -> dict[str, Any]:
    """Dominance counts of shard ``k`` (JSON: :meth:`DominanceCounts.to_dict`)."""
    import torch

    from models.discovery.discover import count_pass, eps_grid

    p: DiscoverParams = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    h = _shard_representations(ctx, p, plan, k)
    counts = count_pass(torch.split(h, p.batch_size), eps_grid(p.eps))
    done = ctx.store.incr(ctx.job_id, "shards_counted")
    ctx.progress(
        0.5 * min(done, plan.n_shards) / plan.n_shards,
        {"shards_counted": min(done, plan.n_shards)},
        force=True,
    )
    return counts.to_dict()


def discover_select(ctx: JobContext, shard_counts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Sum the shards' counts and choose ``D`` for every eps: (counts, {eps: indices})."""
    from models.discovery.discover import make_selection, select_per_eps
    from models.scoring.dominance import DominanceCounts

    p: DiscoverParams = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    parts = [DominanceCounts.from_dict(c) for c in shard_counts]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    selections = select_per_eps(total, make_selection(p.lo, p.hi, p.size))
    ctx.progress(0.5, {"phase": "scoring"}, force=True)
    return total.to_dict(), {repr(eps): d.tolist() for eps, d in selections.items()}


def q_shard(ctx: JobContext, plan: DiscoverPlan, k: int, selections: dict[str, list[int]]) -> dict[str, list[float]]:
    """Reference Q-Scores of shard ``k`` under the summed ``D``, per eps."""
    import torch

    from models.discovery.discover import q_pass

    p: DiscoverParams = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    h = _shard_representations(ctx, p, plan, k)
    d = {float(e): torch.tensor(ix, dtype=torch.int64) for e, ix in selections.items()}
    q = q_pass(torch.split(h, p.batch_size), d)
    done = ctx.store.incr(ctx.job_id, "shards_scored")
    ctx.progress(
        0.5 + 0.45 * min(done, plan.n_shards) / plan.n_shards,
        {"shards_scored": min(done, plan.n_shards)},
        force=True,
    )
    return {repr(eps): values.tolist() for eps, values in q.items()}


def discover_finalize(
    ctx: JobContext,
    plan: DiscoverPlan,
    counts: dict[str, Any],
    selections: dict[str, list[int]],
    q_parts: list[dict[str, list[float]]],
) -> tuple[dict[str, Any], dict[str, str]]:
    """Assemble the feature set and write it as version ``features-<job id>``."""
    import numpy as np
    import torch

    from models.data.datasets import random_sample
    from models.discovery.discover import build_feature_set, make_selection, with_typicality
    from models.scoring.dominance import DominanceCounts
    from models.scoring.feature_set import DataProvenance, EncoderRef, Preprocessing

    p: DiscoverParams = params_of(ctx, DiscoverParams)
    _guard_shard(ctx)
    registry = ctx.registry
    version = f"features-{ctx.job_id}"
    if not registry.feature_set_dir(version).exists():
        record = registry.model_record(p.model)
        sample = random_sample(plan.n_available, p.sample_size, p.seed)
        feature_set = build_feature_set(
            counts=DominanceCounts.from_dict(counts),
            selections={float(e): torch.tensor(ix, dtype=torch.int64) for e, ix in selections.items()},
            q_by_eps={
                float(e): np.concatenate([np.asarray(part[e], dtype=np.float32) for part in q_parts])
                for e in selections
            },
            eps=p.eps,
            selection=make_selection(p.lo, p.hi, p.size),
            encoder=EncoderRef(
                fingerprint=record.fingerprint,
                arch=record.spec.arch,
                feature_dim=record.spec.feature_dim,
                model_version=p.model,
                preprocessing=Preprocessing.of(record.spec),
            ),
            data=DataProvenance(
                dataset=p.dataset,
                n_available=sample.n_available,
                n_reference=len(sample.indices),
                sampling=sample.description,
                seed=p.seed,
            ),
        )
        # The reference bank and typicality, written with the feature set (issue 10).
        feature_set = with_typicality(feature_set, *_shard_reference(ctx, p, plan))
        ctx.fence()
        registry.add_feature_set(feature_set, version=version)
    feature_set = registry.load_feature_set(version)
    activated = _activate(ctx, p.activate, p.model, version)
    result = {
        "model": p.model,
        "feature_set": version,
        "activated": activated,
        "eps": feature_set.eps,
        "coverage": feature_set.coverage,
        "coverage_by_eps": feature_set.coverage_by_eps,
        "discriminative": len(feature_set.discriminative),
        "alpha": feature_set.alpha,
        "n_reference": feature_set.data.n_reference,
        "shards": plan.n_shards,
        "coverage_warning": feature_set.coverage_warning,
        "negative_share": feature_set.negative_share,
        "signed_warning": feature_set.signed_warning,
        "bank_vectors": 0 if feature_set.bank is None else feature_set.bank.size,
        "typicality_threshold": None if feature_set.typicality is None else feature_set.typicality.threshold,
    }
    return result, {"feature_set": version}


def discover_local(ctx: JobContext) -> tuple[dict[str, Any], dict[str, str]]:
    """The whole discovery in this process, shard after shard (embedded mode)."""
    plan = discover_plan(ctx)
    counts = [count_shard(ctx, plan, k) for k in range(plan.n_shards)]
    total, selections = discover_select(ctx, counts)
    q_parts = [q_shard(ctx, plan, k, selections) for k in range(plan.n_shards)]
    return discover_finalize(ctx, plan, total, selections, q_parts)


def _discover_in_process(
    ctx: JobContext,
    p: DiscoverParams,
    model: str,
    version: str,
    on_progress: Callable[[float], None],
) -> Any:
    """One-process discovery on ``model`` (after training), written as ``version``."""
    from models.data.datasets import image_folder
    from models.data.transforms import eval_transform
    from models.discovery.discover import discover, make_selection
    from models.scoring.feature_set import EncoderRef
    from worker.params import dataset_folder

    registry = ctx.registry
    if not registry.feature_set_dir(version).exists():
        imported = registry.load_model(model)
        spec = imported.encoder.spec
        dataset = image_folder(dataset_folder(ctx.settings, p.dataset), eval_transform(spec))
        feature_set = discover(
            imported.encoder,
            dataset,
            dataset_name=p.dataset,
            encoder_ref=EncoderRef(
                fingerprint=imported.fingerprint,
                arch=spec.arch,
                feature_dim=spec.feature_dim,
                model_version=model,
            ),
            eps=p.eps,
            selection=make_selection(p.lo, p.hi, p.size),
            sample_size=p.sample_size,
            seed=p.seed,
            batch_size=p.batch_size,
            device=_device(ctx),
            on_progress=on_progress,
        )
        ctx.fence()
        registry.add_feature_set(feature_set, version=version)
    return registry.load_feature_set(version)


# -- regularize -------------------------------------------------------------------------------
def regularize(ctx: JobContext) -> tuple[dict[str, Any], dict[str, str]]:
    """Q-Score-regularised fine-tuning (paper eq. 4), resumable; then discover on the result."""
    from models.data.datasets import image_folder
    from models.training.loop import Regularizer, TrainConfig, train
    from models.training.objectives import build_method
    from worker.params import dataset_folder

    p: RegularizeParams = params_of(ctx, RegularizeParams)
    registry = ctx.registry
    model_version, fs_version = f"model-{ctx.job_id}", f"features-{ctx.job_id}"
    checkpoint = Path(ctx.settings.job_checkpoint_dir) / f"{ctx.job_id}.ckpt"
    training: dict[str, Any] = {}
    if not registry.model_dir(model_version).exists():
        imported = registry.load_model(p.model)  # not the cached copy: it is trained in place
        reason = imported.encoder.not_trainable_reason()
        if reason is not None:  # the API refuses these before queueing; a direct task is refused here
            raise ValueError(f"cannot regularize model {p.model!r}: {reason}")
        feature_set = registry.load_feature_set(p.feature_set)
        ssl = build_method(p.method, imported.encoder)
        ssl.train()
        dataset = image_folder(dataset_folder(ctx.settings, p.dataset), ssl.view_transform(imported.encoder.spec))
        regularizer = Regularizer(
            feature_set.discriminative_indices,
            p.alpha or feature_set.alpha,
            p.lambda_,
            feature_set.eps,
        )
        config = TrainConfig(
            epochs=p.epochs,
            batch_size=p.batch_size,
            lr=p.lr,
            max_steps=p.max_steps,
            seed=p.seed,
            checkpoint_every=p.checkpoint_every,
        )

        def on_step(record: Any, progress: float) -> None:
            if record.step % p.checkpoint_every == 0:
                ctx.fence()  # a checkpoint is written next: only by the attempt holding the job
            ctx.progress(0.85 * progress, {"phase": "training", **asdict(record)}, force=progress >= 1.0)

        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        result = train(
            ssl,
            dataset,
            config,
            device=_device(ctx),
            regularizer=regularizer,
            checkpoint=checkpoint,
            on_step=on_step,
            should_stop=ctx.cancelled,
        )
        training = {
            "job": ctx.job_id,
            "method": p.method,
            "lambda": p.lambda_,
            "alpha": regularizer.alpha,
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
    feature_set = _discover_in_process(
        ctx, discover_params, model_version, fs_version, lambda f: ctx.progress(0.85 + 0.15 * f)
    )
    checkpoint.unlink(missing_ok=True)
    activated = _activate(ctx, p.activate, model_version, fs_version)
    result_out = {
        "model": model_version,
        "parent": p.model,
        "fingerprint": record.fingerprint,
        "parent_fingerprint": registry.model_record(p.model).fingerprint,
        "feature_set": fs_version,
        "activated": activated,
        "training": record.training,
        "coverage": feature_set.coverage,
        "eps": feature_set.eps,
        "alpha": feature_set.alpha,
    }
    return result_out, {"model": model_version, "feature_set": fs_version}


# -- evaluate ---------------------------------------------------------------------------------
def evaluate(ctx: JobContext) -> tuple[dict[str, Any], dict[str, str]]:
    """Linear evaluation; writes the calibrated feature set as ``features-<job id>``."""
    from models.evaluation.linear_eval import run_evaluation
    from worker.params import dataset_folder

    p: EvaluateParams = params_of(ctx, EvaluateParams)
    registry = ctx.registry
    version = f"features-{ctx.job_id}"
    imported = _cached_model(str(ctx.settings.registry_root), p.model)
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
        device=_device(ctx),
        target_precision=p.target_precision,
        compression=p.compression,
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
        }
    )
    activated = _activate(ctx, p.activate, p.model, version)
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


def atlas(ctx: JobContext) -> tuple[dict[str, Any], dict[str, str]]:
    """The feature atlas (issue 16): its body is ``worker/atlas_job.py``."""
    from worker.atlas_job import atlas as body

    return body(ctx)


BODIES: dict[str, Callable[[JobContext], tuple[dict[str, Any], dict[str, str]]]] = {
    "discover": discover_local,
    "regularize": regularize,
    "evaluate": evaluate,
    "atlas": atlas,
}
