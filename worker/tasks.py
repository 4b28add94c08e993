"""Celery tasks: thin wrappers that take a job id (and shard numbers) and call the job bodies in
``worker.jobs``.

Parameters live in the job record (``worker.store``), written by the API after validation; a
task reads them by id. Discovery runs as a chain of chords (SPEC section 2)::

    discover ─► chord(count_shard × n) ─► discover_select ─► chord(q_shard × n) ─► discover_finalize

so that shards are counted in parallel by as many workers as there are. Every task of the chain
carries the attempt that launched it and stops quietly once a later attempt holds the job; each
shard completes once per attempt (``_once``), even when a cut-off worker's copy comes back late.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from celery import chord
from celery.exceptions import Ignore

from qscore_config.settings import get_settings
from worker.celery_app import app
from worker.jobs import atlas as atlas_job
from worker.jobs import discover as discover_job
from worker.jobs import evaluate as evaluate_job
from worker.jobs import regularize as regularize_job
from worker.jobs.context import JobAlreadyOver, JobContext
from worker.jobs.lifecycle import guarded, start, succeed
from worker.store import RedisJobStore


@lru_cache
def _store() -> RedisJobStore:
    url = get_settings().redis_url
    if url is None:
        raise RuntimeError("QSCORE_REDIS_URL is not set")
    return RedisJobStore(url)


def _ctx(job_id: str, attempt: int = 0) -> JobContext:
    return JobContext(job_id=job_id, store=_store(), settings=get_settings(), attempt=attempt)


def _step(ctx: JobContext, fn: Any, *args: Any) -> Any:
    """One step of a job; when the job is over (failed, cancelled, superseded), end the chain quietly."""
    try:
        return guarded(ctx, lambda: fn(ctx, *args))
    except JobAlreadyOver:
        raise Ignore() from None


def _start(task: Any, job_id: str) -> JobContext | None:
    ctx = _ctx(job_id)
    worker = f"{task.request.hostname or 'worker'}:{os.getpid()}"
    return ctx if start(ctx, worker) else None


def _once(ctx: JobContext, step: str) -> None:
    """Claim a step of this attempt; a copy of it that already completed (its worker was cut off,
    then came back) makes this one end quietly, so a chord counts every shard once."""
    if not ctx.store.complete_step(ctx.job_id, ctx.attempt, step):
        raise Ignore()


def _skip_if_done(ctx: JobContext, step: str) -> None:
    if ctx.store.step_done(ctx.job_id, ctx.attempt, step):
        raise Ignore()


@app.task(name="qscore.regularize", bind=True)
def regularize(self: Any, job_id: str) -> None:
    ctx = _start(self, job_id)
    if ctx is not None:
        _step(ctx, lambda c: succeed(c, *regularize_job.regularize(c)))


@app.task(name="qscore.evaluate", bind=True)
def evaluate(self: Any, job_id: str) -> None:
    ctx = _start(self, job_id)
    if ctx is not None:
        _step(ctx, lambda c: succeed(c, *evaluate_job.evaluate(c)))


@app.task(name="qscore.atlas", bind=True)
def atlas(self: Any, job_id: str) -> None:
    ctx = _start(self, job_id)
    if ctx is not None:
        _step(ctx, lambda c: succeed(c, *atlas_job.atlas(c)))


@app.task(name="qscore.discover", bind=True)
def discover(self: Any, job_id: str) -> None:
    ctx = _start(self, job_id)
    if ctx is None:
        return
    plan = _step(ctx, discover_job.discover_plan)
    _step(ctx, lambda c: c.fence())
    _once(ctx, "launch-counting")
    a = ctx.attempt
    header = [count_shard.s(job_id, plan.n_shards, plan.n_available, k, a) for k in range(plan.n_shards)]
    chord(header)(discover_select.s(job_id, plan.n_shards, plan.n_available, a))


@app.task(name="qscore.discover.count_shard")
def count_shard(job_id: str, n_shards: int, n_available: int, k: int, attempt: int) -> dict[str, Any]:
    ctx = _ctx(job_id, attempt)
    _skip_if_done(ctx, f"count-{k}")
    counts = _step(ctx, discover_job.count_shard, discover_job.DiscoverPlan(n_shards, n_available), k)
    _once(ctx, f"count-{k}")
    return counts


@app.task(name="qscore.discover.select")
def discover_select(
    shard_counts: list[dict[str, Any]], job_id: str, n_shards: int, n_available: int, attempt: int
) -> None:
    ctx = _ctx(job_id, attempt)
    _skip_if_done(ctx, "launch-scoring")
    counts, selections = _step(ctx, discover_job.discover_select, shard_counts)
    _step(ctx, lambda c: c.fence())
    _once(ctx, "launch-scoring")
    header = [q_shard.s(job_id, n_shards, n_available, k, selections, attempt) for k in range(n_shards)]
    chord(header)(discover_finalize.s(job_id, n_shards, n_available, counts, selections, attempt))


@app.task(name="qscore.discover.q_shard")
def q_shard(
    job_id: str, n_shards: int, n_available: int, k: int, selections: dict[str, list[int]], attempt: int
) -> dict[str, list[float]]:
    ctx = _ctx(job_id, attempt)
    _skip_if_done(ctx, f"score-{k}")
    q = _step(ctx, discover_job.q_shard, discover_job.DiscoverPlan(n_shards, n_available), k, selections)
    _once(ctx, f"score-{k}")
    return q


@app.task(name="qscore.discover.finalize")
def discover_finalize(
    q_parts: list[dict[str, list[float]]],
    job_id: str,
    n_shards: int,
    n_available: int,
    counts: dict[str, Any],
    selections: dict[str, list[int]],
    attempt: int,
) -> None:
    ctx = _ctx(job_id, attempt)
    plan = discover_job.DiscoverPlan(n_shards, n_available)
    _step(
        ctx,
        lambda c: succeed(c, *discover_job.discover_finalize(c, plan, counts, selections, q_parts)),
    )
