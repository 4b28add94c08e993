"""Celery tasks: thin wrappers that take a job id (and shard numbers) and call ``worker.jobs``.

Parameters live in the job record (``worker.store``), written by the API after validation; a
task reads them by id. Discovery runs as a chain of chords (SPEC section 2)::

    discover ─► chord(count_shard × n) ─► discover_select ─► chord(q_shard × n) ─► discover_finalize

so that shards are counted in parallel by as many workers as there are.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import chord
from celery.exceptions import Ignore

from qscore_config.settings import get_settings
from worker import jobs
from worker.celery_app import app
from worker.store import RedisJobStore


@lru_cache
def _store() -> RedisJobStore:
    url = get_settings().redis_url
    if url is None:
        raise RuntimeError("QSCORE_REDIS_URL is not set")
    return RedisJobStore(url)


def _ctx(job_id: str) -> jobs.JobContext:
    return jobs.JobContext(job_id=job_id, store=_store(), settings=get_settings())


def _step(ctx: jobs.JobContext, fn: Any, *args: Any) -> Any:
    """One step of a job; when the job is over (failed, cancelled), end the chain quietly."""
    try:
        return jobs.guarded(ctx, lambda: fn(ctx, *args))
    except jobs.JobAlreadyOver:
        raise Ignore() from None


@app.task(name="qscore.regularize")
def regularize(job_id: str) -> None:
    ctx = _ctx(job_id)
    if jobs.start(ctx):
        _step(ctx, lambda c: jobs.succeed(c, *jobs.regularize(c)))


@app.task(name="qscore.evaluate")
def evaluate(job_id: str) -> None:
    ctx = _ctx(job_id)
    if jobs.start(ctx):
        _step(ctx, lambda c: jobs.succeed(c, *jobs.evaluate(c)))


@app.task(name="qscore.discover")
def discover(job_id: str) -> None:
    ctx = _ctx(job_id)
    if not jobs.start(ctx):
        return
    plan = _step(ctx, jobs.discover_plan)
    if ctx.store.get(job_id).metrics.get("counting_launched"):  # type: ignore[union-attr]
        return  # delivered again after the shards were sent: they are on their way
    header = [count_shard.s(job_id, plan.n_shards, plan.n_available, k) for k in range(plan.n_shards)]
    chord(header)(discover_select.s(job_id, plan.n_shards, plan.n_available))
    ctx.store.merge_metrics(job_id, {"counting_launched": True})


@app.task(name="qscore.discover.count_shard")
def count_shard(job_id: str, n_shards: int, n_available: int, k: int) -> dict[str, Any]:
    ctx = _ctx(job_id)
    return _step(ctx, jobs.count_shard, jobs.DiscoverPlan(n_shards, n_available), k)


@app.task(name="qscore.discover.select")
def discover_select(shard_counts: list[dict[str, Any]], job_id: str, n_shards: int, n_available: int) -> None:
    ctx = _ctx(job_id)
    counts, selections = _step(ctx, jobs.discover_select, shard_counts)
    if ctx.store.get(job_id).metrics.get("scoring_launched"):  # type: ignore[union-attr]
        return  # delivered again after the shards were sent
    header = [q_shard.s(job_id, n_shards, n_available, k, selections) for k in range(n_shards)]
    chord(header)(discover_finalize.s(job_id, n_shards, n_available, counts, selections))
    ctx.store.merge_metrics(job_id, {"scoring_launched": True})


@app.task(name="qscore.discover.q_shard")
def q_shard(
    job_id: str, n_shards: int, n_available: int, k: int, selections: dict[str, list[int]]
) -> dict[str, list[float]]:
    ctx = _ctx(job_id)
    return _step(ctx, jobs.q_shard, jobs.DiscoverPlan(n_shards, n_available), k, selections)


@app.task(name="qscore.discover.finalize")
def discover_finalize(
    q_parts: list[dict[str, list[float]]],
    job_id: str,
    n_shards: int,
    n_available: int,
    counts: dict[str, Any],
    selections: dict[str, list[int]],
) -> None:
    ctx = _ctx(job_id)
    plan = jobs.DiscoverPlan(n_shards, n_available)
    _step(
        ctx,
        lambda c: jobs.succeed(c, *jobs.discover_finalize(c, plan, counts, selections, q_parts)),
    )
