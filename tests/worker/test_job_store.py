"""The job stores (Redis and SQLite: one set of transitions), fencing of attempts, state counters,
admission (503 beyond QSCORE_MAX_QUEUED_JOBS) and the out-of-memory message.

A CUDA out-of-memory error cannot be produced on a CPU machine: the message is checked on a real
``torch.OutOfMemoryError`` instance and, end to end through ``lifecycle.guarded``, on a real
allocation failure of the CPU allocator (the same handling path).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.app import create_app
from tests.worker.conftest import make_settings
from worker.jobs import lifecycle
from worker.jobs.context import JobAlreadyOver, JobContext
from worker.store import BEGIN_RUN, RedisJobStore, SqliteJobStore, TooManyQueuedJobs


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        yield SqliteJobStore(tmp_path / "jobs.sqlite3")
    else:
        yield RedisJobStore(request.getfixturevalue("redis_url"))


def test_a_later_attempt_fences_the_first_which_writes_nothing(store: Any) -> None:
    job = store.create("regularize", {"batch_size": 8})
    assert store.begin(job.id, "w1@a:1") == (BEGIN_RUN, 1)
    assert store.update(job.id, 1, progress=0.2) and store.merge_metrics(job.id, 1, {"step": 3})
    assert store.begin(job.id, "w2@b:2") == (BEGIN_RUN, 2)  # the broker delivered it again
    record = store.get(job.id)
    assert record.attempts == 2 and record.history[0].outcome == "lost"
    assert "attempt 2, on w2@b:2" in record.history[0].reason
    # The first attempt comes back: every write of it is refused.
    assert store.holds(job.id, 1) == (False, False) and store.holds(job.id, 2) == (True, False)
    assert not store.update(job.id, 1, progress=0.9)
    assert not store.merge_metrics(job.id, 1, {"step": 99})
    assert not store.finish(job.id, "succeeded", 1, result={"from": "stale"})
    store.end_attempt(job.id, 1, "superseded", "attempt 2 took the job over")
    assert store.finish(job.id, "succeeded", 2, result={"from": "attempt 2"})
    assert not store.finish(job.id, "failed", 2, error="twice")  # ends once
    record = store.get(job.id)
    assert record.state == "succeeded" and record.result == {"from": "attempt 2"}
    assert record.progress == 1.0 and record.metrics == {"step": 3}
    assert [(a.attempt, a.worker, a.outcome) for a in record.history] == [
        (1, "w1@a:1", "superseded"),
        (2, "w2@b:2", "succeeded"),
    ]
    assert store.begin(job.id, "w3@c:3") == ("done", 0)


def test_counters_follow_every_state_change_and_bound_admission(store: Any) -> None:
    first = store.create("discover", {}, max_queued=2)
    second = store.create("regularize", {}, max_queued=2)
    with pytest.raises(TooManyQueuedJobs) as excinfo:
        store.create("discover", {}, max_queued=2)
    assert excinfo.value.queued == 2 and excinfo.value.limit == 2
    assert store.state_counts() == {("queued", "discover"): 1, ("queued", "regularize"): 1}
    store.request_cancel(first.id)
    store.begin(second.id, "w")
    counts = store.state_counts()
    assert counts[("queued", "discover")] == 0 and counts[("cancelled", "discover")] == 1
    assert counts[("queued", "regularize")] == 0 and counts[("running", "regularize")] == 1
    store.finish(second.id, "failed", 1, error="boom")
    assert store.state_counts()[("failed", "regularize")] == 1
    assert store.state_counts()[("running", "regularize")] == 0
    store.create("evaluate", {}, max_queued=2)  # room again
    assert sum(n for (state, _), n in store.state_counts().items() if state == "queued") == 1
    # The counters agree with the records.
    for state in ("queued", "running", "failed", "cancelled"):
        assert len(store.list(state=state)) == sum(n for (s, _), n in store.state_counts().items() if s == state)


def test_a_step_of_an_attempt_completes_once(store: Any) -> None:
    job = store.create("discover", {})
    assert not store.step_done(job.id, 1, "count-0")
    assert store.complete_step(job.id, 1, "count-0")
    assert not store.complete_step(job.id, 1, "count-0")  # a late copy of the shard
    assert store.step_done(job.id, 1, "count-0") and not store.step_done(job.id, 2, "count-0")


def test_superseded_attempt_stops_at_its_next_write_and_says_why(tmp_path: Path, job_env: dict[str, str]) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    settings = make_settings(job_env)
    job = store.create("regularize", {"batch_size": 8})
    late = JobContext(job_id=job.id, store=store, settings=settings)
    assert lifecycle.start(late, "w1@a:1") and late.attempt == 1
    current = JobContext(job_id=job.id, store=store, settings=settings)
    assert lifecycle.start(current, "w2@b:2") and current.attempt == 2
    checkpoints: list[int] = []

    def body() -> None:
        late.progress(0.5, force=True)  # refused: raises JobSuperseded
        checkpoints.append(1)

    with pytest.raises(JobAlreadyOver):
        lifecycle.guarded(late, body)
    assert checkpoints == []
    record = store.get(job.id)
    assert record.state == "running" and record.attempts == 2
    assert record.history[0].outcome == "superseded"
    assert record.history[0].reason.startswith("attempt 2 on w2@b:2 took the job over")


def test_out_of_memory_message_names_the_batch_size() -> None:
    message = lifecycle.oom_message(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 256)
    assert message is not None
    assert "lower batch_size (it was 256; try 128)" in message and "CUDA out of memory" in message
    assert lifecycle.oom_message(ValueError("bad value"), 256) is None
    assert lifecycle.oom_message(RuntimeError("shape mismatch"), 256) is None


def test_allocation_failure_fails_the_job_with_the_batch_size_to_lower(tmp_path: Path, job_env: dict[str, str]) -> None:
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    job = store.create("discover", {"batch_size": 64})
    ctx = JobContext(job_id=job.id, store=store, settings=make_settings(job_env))
    assert lifecycle.start(ctx, "w")

    def too_big() -> None:
        torch.empty(1 << 62, dtype=torch.uint8)  # a real allocator failure, 4 EiB

    with pytest.raises(JobAlreadyOver):
        lifecycle.guarded(ctx, too_big)
    record = store.get(job.id)
    assert record.state == "failed"
    assert record.error.startswith("the device ran out of memory: lower batch_size (it was 64; try 32)")
    assert record.history[0].outcome == "failed"


def test_submit_beyond_max_queued_jobs_gets_503_with_retry_after(job_env: dict[str, str], redis_url: str) -> None:
    settings = make_settings({**job_env, "QSCORE_REDIS_URL": redis_url}, max_queued_jobs=2)
    with TestClient(create_app(settings)) as client:  # no worker: the jobs stay queued
        ids = [client.post("/jobs/discover", json={"dataset": "slice-train"}).json()["job_id"] for _ in range(2)]
        response = client.post("/jobs/discover", json={"dataset": "slice-train"})
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert detail["code"] == "too_many_queued_jobs" and detail["limit"] == 2
        assert "2 jobs are queued, the limit is 2" in detail["message"]
        assert int(response.headers["Retry-After"]) > 0
        assert [j["id"] for j in client.get("/jobs").json()["jobs"]] == ids[::-1]  # nothing queued by it

        text = client.get("/metrics").text
        assert 'qscore_jobs{state="queued",type="discover"} 2.0' in text
        assert client.delete(f"/jobs/{ids[0]}").json()["state"] == "cancelled"
        again = client.delete(f"/jobs/{ids[0]}")  # it has ended: nothing to cancel, and the answer says so
        assert again.status_code == 409 and again.json()["detail"]["code"] == "job_finished", again.text
        assert "already ended (cancelled)" in again.json()["detail"]["message"]
        text = client.get("/metrics").text
        assert 'qscore_jobs{state="queued",type="discover"} 1.0' in text
        assert 'qscore_jobs{state="cancelled",type="discover"} 1.0' in text
        assert client.post("/jobs/discover", json={"dataset": "slice-train"}).status_code == 202


def test_discard_removes_only_a_record_never_started(store: Any) -> None:
    job, started = store.create("discover", {}), store.create("discover", {})
    assert store.begin(started.id, "w1@a:1") == (BEGIN_RUN, 1)
    assert store.discard(job.id) and store.get(job.id) is None
    assert not store.discard(job.id) and not store.discard(started.id)  # gone already; begun: kept
    assert store.get(started.id).state == "running" and [r.id for r in store.list()] == [started.id]
    assert store.state_counts().get(("queued", "discover"), 0) == 0


def test_a_submission_the_broker_refuses_is_503_and_leaves_no_job(job_env: dict[str, str], redis_url: str) -> None:
    """A broker outage answers 503 with no job id: no record, no failed count, for a client that never heard of it."""
    env = {**job_env, "QSCORE_REDIS_URL": redis_url, "QSCORE_BROKER_URL": "amqp://guest:guest@127.0.0.1:1//"}
    with TestClient(create_app(make_settings(env))) as client:
        response = client.post("/jobs/discover", json={"dataset": "slice-train"})
        assert response.status_code == 503, response.text
        assert response.json()["detail"]["code"] == "job_store_unavailable" and response.headers["Retry-After"]
        assert client.get("/jobs").json() == {"jobs": []}
        text = client.get("/metrics").text
        assert 'qscore_jobs{state="failed",type="discover"} 0.0' in text
        assert 'qscore_jobs{state="queued",type="discover"} 0.0' in text


def test_broker_settings_are_checked_at_start() -> None:
    from pydantic import ValidationError

    from qscore_config.settings import Settings

    settings = Settings(redis_url="redis://127.0.0.1:6379/0")
    assert settings.broker == "redis://127.0.0.1:6379/0" and not settings.broker_is_amqp
    settings = Settings(redis_url="redis://r:6379/0", broker_url="amqp://u:p@rabbitmq:5672/qscore")
    assert settings.broker == "amqp://u:p@rabbitmq:5672/qscore" and settings.broker_is_amqp
    with pytest.raises(ValidationError, match="QSCORE_BROKER_URL needs QSCORE_REDIS_URL"):
        Settings(broker_url="amqp://u:p@rabbitmq:5672/qscore")
    with pytest.raises(ValidationError, match="must be an amqp:// or redis:// URL"):
        Settings(redis_url="redis://r:6379/0", broker_url="sqs://queue")
    with pytest.raises(ValidationError):
        Settings(max_queued_jobs=0)


def test_celery_app_declares_the_queue_with_a_consumer_timeout_above_the_hard_limit() -> None:
    from qscore_config.settings import Settings
    from worker.celery_app import create_celery

    settings = Settings(redis_url="redis://r:6379/0", broker_url="amqp://u:p@rabbitmq:5672/qscore")
    app = create_celery(settings)
    (queue,) = app.conf.task_queues
    timeout_ms = queue.queue_arguments["x-consumer-timeout"]
    assert timeout_ms == 1000 * settings.visibility_timeout_s > 1000 * settings.job_hard_time_limit_s
    assert app.conf.broker_heartbeat == 20.0 and app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.result_backend == "redis://r:6379/0"
