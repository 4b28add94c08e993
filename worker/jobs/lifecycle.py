"""The life cycle every job shares: start an attempt, run its body guarded, record the outcome.

:func:`start` begins an attempt (at most :data:`MAX_ATTEMPTS` deliveries), :func:`guarded` runs
one step and turns a cancellation, a lost hold on the job, a time limit or an error into the
job's end with the reason (an out-of-memory error names the batch size to lower), and
:func:`finish` ends the job once, only while this attempt holds it. The Celery tasks
(``worker/tasks.py``) call these around every step; the embedded runner calls :func:`run`.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from celery.exceptions import SoftTimeLimitExceeded
from pydantic import BaseModel

from models.registry.versions import ActivePair
from models.training.loop import TrainingCancelled
from worker import metrics
from worker.jobs.context import JobAlreadyOver, JobCancelled, JobContext, JobSuperseded, clean
from worker.store import BEGIN_RUN, JobState

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # deliveries of one job before it is failed (its worker keeps dying)

Outcome = tuple[dict[str, Any], dict[str, str]]  # (result, artifacts): what a job body returns
Body = Callable[[JobContext], Outcome]
P = TypeVar("P", bound=BaseModel)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


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


def run(ctx: JobContext, body: Body, worker: str | None = None) -> None:
    """Start the job (unless over or cancelled), run ``body`` and record the outcome."""
    if start(ctx, worker):
        guarded(ctx, lambda: succeed(ctx, *body(ctx)))


def oom_message(exc: BaseException, batch_size: int | None) -> str | None:
    """The job's error for a device out-of-memory error (None for any other error).

    ``torch.OutOfMemoryError`` (CUDA, alias ``torch.cuda.OutOfMemoryError``), the MPS/XPU
    "out of memory" and the CPU allocator's "can't allocate memory" RuntimeErrors: the message
    names the batch size to lower.
    """
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
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def guarded(ctx: JobContext, step: Callable[[], Any]) -> Any:
    """Run one step of a job; a cancellation or an error ends the job with the reason."""
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
    if ctx.store.finish(ctx.job_id, state, ctx.attempt or None, **fields):
        record = ctx.store.get(ctx.job_id)
        if record is not None:
            duration = (record.finished_at or time.time()) - (record.started_at or record.created_at)
            metrics.job_finished(record.type, state, duration)
        # The job is over for good: its scratch shards and training checkpoint go.
        shutil.rmtree(ctx.scratch, ignore_errors=True)
        ctx.checkpoint.unlink(missing_ok=True)


def params_of(ctx: JobContext, model: type[P]) -> P:
    """The job's parameters (from its record), checked again by ``model``."""
    record = ctx.store.get(ctx.job_id)
    if record is None:
        raise JobAlreadyOver(ctx.job_id)
    return model.model_validate(record.params)


def activate(ctx: JobContext, wanted: bool | None, model: str, feature_set: str) -> bool:
    """Make (model, feature set) the registry's active pair when asked (default: QSCORE_AUTO_SWITCH)."""
    ctx.fence()
    if wanted if wanted is not None else ctx.settings.auto_switch:
        ctx.registry.set_active(model, feature_set, set_by=ActivePair.by_job(ctx.job_id))
        return True
    return False
