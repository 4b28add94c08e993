"""Job records: what the API shows for a job and what its tasks report into.

Two stores with one interface and one set of state transitions (:class:`TransitionStore`):
:class:`RedisJobStore` (Celery workers; records survive a restart of the API) and
:class:`SqliteJobStore` (embedded mode: a SQLite file in the registry root, so records survive
a restart of the service). Every change of a record is one transaction on it (Redis
``WATCH``/``MULTI``, SQLite ``BEGIN IMMEDIATE``): the API (cancellation) and the attempts
running a job never overwrite each other.

**Attempts and fencing.** Each delivery of a job that starts it is an *attempt*: ``begin``
numbers it (``attempts``) and appends it to ``history``. Only the latest attempt may write:
every write of a running job names its attempt and is refused when a later attempt took over
(a worker cut off from the broker comes back while its job runs elsewhere). The refused attempt
stops, writes nothing more, and says why in its ``history`` entry.

**Counters.** ``qscore_jobs{state, type}`` is read from counters moved in the same transaction
as every state change, never from a scan of the records. The number of queued jobs also bounds
admission (``QSCORE_MAX_QUEUED_JOBS``).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import redis
from pydantic import BaseModel, Field

JobType = Literal["discover", "regularize", "evaluate", "atlas"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_TYPES: tuple[str, ...] = ("discover", "regularize", "evaluate", "atlas")
STATES: tuple[str, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

T = TypeVar("T")


class Attempt(BaseModel):
    """One delivery of a job that ran it (``outcome`` None while it runs)."""

    attempt: int
    worker: str | None = None
    started_at: float
    ended_at: float | None = None
    outcome: str | None = None  # succeeded, failed, cancelled, lost, superseded, interrupted
    reason: str | None = None


class JobRecord(BaseModel):
    id: str
    type: JobType
    state: JobState = "queued"
    params: dict[str, Any] = Field(default_factory=dict)
    progress: float = Field(0.0, ge=0.0, le=1.0)
    metrics: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    artifacts: dict[str, str] = Field(default_factory=dict)
    error: str | None = None
    cancel_requested: bool = False
    attempts: int = 0
    history: list[Attempt] = Field(default_factory=list, description="Every attempt that ran the job, oldest first.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


class TooManyQueuedJobs(Exception):
    """``QSCORE_MAX_QUEUED_JOBS`` jobs are waiting already."""

    def __init__(self, queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs are queued, the limit is {limit} (QSCORE_MAX_QUEUED_JOBS)")
        self.queued, self.limit = queued, limit


class JobEnded(Exception):
    """A cancel of a job that had already ended (succeeded, failed or cancelled): nothing to cancel."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(f"job {record.id} already ended ({record.state}): nothing to cancel")
        self.record = record


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore(Protocol):
    def ping(self) -> None: ...
    def create(self, type: JobType, params: dict[str, Any], max_queued: int | None = None) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def list(self, limit: int = 100, state: str | None = None) -> list[JobRecord]: ...
    def begin(self, job_id: str, worker: str) -> tuple[str, int]: ...
    def holds(self, job_id: str, attempt: int) -> tuple[bool, bool]: ...
    def update(self, job_id: str, attempt: int, **fields: Any) -> bool: ...
    def merge_metrics(self, job_id: str, attempt: int, metrics: dict[str, Any]) -> bool: ...
    def end_attempt(self, job_id: str, attempt: int, outcome: str, reason: str) -> None: ...
    def request_cancel(self, job_id: str) -> JobRecord | None: ...
    def finish(self, job_id: str, state: JobState, attempt: int | None = None, **fields: Any) -> bool: ...
    def discard(self, job_id: str) -> bool: ...
    def incr(self, job_id: str, field: str) -> int: ...
    def complete_step(self, job_id: str, attempt: int, step: str) -> bool: ...
    def step_done(self, job_id: str, attempt: int, step: str) -> bool: ...
    def state_counts(self) -> dict[tuple[str, str], int]: ...


# Outcomes of ``begin``: run it, or skip it (already finished, or cancelled while queued).
BEGIN_RUN, BEGIN_DONE, BEGIN_CANCELLED, BEGIN_MISSING = "run", "done", "cancelled", "missing"

Rec = dict[str, Any]  # a record as JSON-ready values


# -- the transitions, on plain dicts (one transaction each) ------------------------------------
def _begin(rec: Rec | None, worker: str, now: float) -> tuple[str, int]:
    if rec is None:
        return BEGIN_MISSING, 0
    if rec["state"] in TERMINAL:
        return BEGIN_DONE, 0
    if rec.get("cancel_requested"):
        rec.update(state="cancelled", finished_at=now, error="cancelled before it started")
        return BEGIN_CANCELLED, 0
    attempt = int(rec.get("attempts") or 0) + 1
    history = list(rec.get("history") or [])
    for entry in history:
        if entry.get("outcome") is None:
            # Still running as far as the record knows: its process or its worker died, or the
            # worker was cut off; the broker delivered the job again.
            entry.update(
                outcome="lost",
                ended_at=now,
                reason=f"the job was delivered again (attempt {attempt}, on {worker}) while this attempt "
                "ran: its process or worker died, or was cut off from the broker",
            )
    history.append({"attempt": attempt, "worker": worker, "started_at": now})
    rec.update(state="running", attempts=attempt, history=history)
    if rec.get("started_at") is None:
        rec["started_at"] = now
    return BEGIN_RUN, attempt


def _holds(rec: Rec | None, attempt: int) -> bool:
    return rec is not None and rec["state"] == "running" and int(rec.get("attempts") or 0) == attempt


def _set_outcome(rec: Rec, attempt: int, outcome: str, reason: str | None, now: float) -> None:
    history = list(rec.get("history") or [])
    for entry in history:
        if entry.get("attempt") == attempt:
            entry.update(outcome=outcome, ended_at=now)
            if reason is not None:
                entry["reason"] = reason
    rec["history"] = history


def _finish(rec: Rec | None, state: str, attempt: int | None, fields: dict[str, Any], now: float) -> bool:
    if rec is None or rec["state"] in TERMINAL:
        return False
    if attempt is not None and not _holds(rec, attempt):
        return False  # a later attempt holds the job: this one may not end it
    rec.update(fields, state=state, finished_at=now)
    if state == "succeeded":
        rec["progress"] = 1.0
    if attempt is not None:
        _set_outcome(rec, attempt, state, fields.get("error"), now)
    return True


def _cancel(rec: Rec | None, now: float) -> bool | None:
    """None: no such job; False: it had ended already; True: cancel requested (a queued job ends now)."""
    if rec is None:
        return None
    if rec["state"] in TERMINAL:
        return False
    rec["cancel_requested"] = True
    if rec["state"] == "queued":
        rec.update(state="cancelled", finished_at=now, error="cancelled before it started")
    return True


def _requeue_interrupted(rec: Rec | None, reason: str, now: float) -> bool:
    """A job left ``running`` by a service that stopped: back to ``queued``, to resume."""
    if rec is None or rec["state"] != "running":
        return False
    _set_outcome(rec, int(rec.get("attempts") or 0), "interrupted", reason, now)
    rec["state"] = "queued"
    return True


class TransitionStore:
    """The store's operations, written once over ``_modify`` (one transaction on one record)."""

    def _modify(self, job_id: str, change: Callable[[Rec | None], T]) -> T:
        raise NotImplementedError

    def _load(self, job_id: str) -> Rec | None:
        raise NotImplementedError

    def get(self, job_id: str) -> JobRecord | None:
        rec = self._load(job_id)
        return JobRecord.model_validate(rec) if rec else None

    def begin(self, job_id: str, worker: str) -> tuple[str, int]:
        """Start an attempt: (outcome, attempt number); an attempt still running is marked lost."""
        now = time.time()
        return self._modify(job_id, lambda rec: _begin(rec, worker, now))

    def holds(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        """(this attempt still holds the running job, cancellation requested)."""
        rec = self._load(job_id)
        return _holds(rec, attempt), bool(rec and rec.get("cancel_requested"))

    def update(self, job_id: str, attempt: int, **fields: Any) -> bool:
        """Write fields of a running job, only while ``attempt`` holds it."""
        values = json.loads(json.dumps(fields))

        def change(rec: Rec | None) -> bool:
            if not _holds(rec, attempt):
                return False
            rec.update(values)  # type: ignore[union-attr]
            return True

        return self._modify(job_id, change)

    def merge_metrics(self, job_id: str, attempt: int, metrics: dict[str, Any]) -> bool:
        values = json.loads(json.dumps(metrics))

        def change(rec: Rec | None) -> bool:
            if not _holds(rec, attempt):
                return False
            rec["metrics"] = {**(rec.get("metrics") or {}), **values}  # type: ignore[index]
            return True

        return self._modify(job_id, change)

    def end_attempt(self, job_id: str, attempt: int, outcome: str, reason: str) -> None:
        """Say how an attempt ended when it no longer holds the job (it wrote nothing)."""
        now = time.time()

        def change(rec: Rec | None) -> None:
            if rec is not None:
                _set_outcome(rec, attempt, outcome, reason, now)

        self._modify(job_id, change)

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Ask the job to stop (a queued one never starts); None for an unknown id, :class:`JobEnded`
        for one that had ended already, told apart in the same transaction."""
        now = time.time()
        requested = self._modify(job_id, lambda rec: _cancel(rec, now))
        record = None if requested is None else self.get(job_id)
        if record is not None and not requested:
            raise JobEnded(record)
        return record

    def finish(self, job_id: str, state: JobState, attempt: int | None = None, **fields: Any) -> bool:
        """End the job (once); with ``attempt``, only while that attempt holds it."""
        now = time.time()
        values = json.loads(json.dumps(fields))
        return self._modify(job_id, lambda rec: _finish(rec, state, attempt, values, now))

    def incr(self, job_id: str, field: str) -> int:
        def change(rec: Rec | None) -> int:
            if rec is None:
                return 0
            rec[field] = int(rec.get(field) or 0) + 1
            return int(rec[field])

        return self._modify(job_id, change)


def _attempt_step(attempt: int, step: str) -> str:
    return f"{attempt}:{step}"


# -- Redis -----------------------------------------------------------------------------------
class RedisJobStore(TransitionStore):
    """Job records in Redis: ``qscore:job:<id>`` hashes (one JSON value per field), the
    ``qscore:jobs`` index (sorted by creation time), ``qscore:job-states`` counters
    (``<state>|<type>``) and ``qscore:job:<id>:steps`` (steps of a sharded job done once)."""

    def __init__(self, url: str, prefix: str = "qscore", ttl_s: int = 30 * 24 * 3600) -> None:
        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=3.0,
            retry_on_timeout=False,
            health_check_interval=10,
        )
        self.prefix = prefix
        self.ttl_s = ttl_s

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def _counts(self) -> str:
        return f"{self.prefix}:job-states"

    def ping(self) -> None:
        self.client.ping()

    def _load(self, job_id: str) -> Rec | None:
        raw = self.client.hgetall(self._key(job_id))
        return {k.decode(): json.loads(v) for k, v in raw.items()} if raw else None

    def _modify(self, job_id: str, change: Callable[[Rec | None], T]) -> T:
        key = self._key(job_id)

        def transaction(pipe: Any) -> T:
            raw = pipe.hgetall(key)
            before = {k.decode(): v for k, v in raw.items()} if raw else None
            rec = {k: json.loads(v) for k, v in before.items()} if before is not None else None
            result = change(rec)
            pipe.multi()
            if rec is not None and before is not None:
                changed = {k: json.dumps(v) for k, v in rec.items()}
                changed = {k: v for k, v in changed.items() if before.get(k) != v.encode()}
                if changed:
                    pipe.hset(key, mapping=changed)
                old_state = json.loads(before["state"])
                if rec["state"] != old_state:
                    pipe.hincrby(self._counts, f"{old_state}|{rec['type']}", -1)
                    pipe.hincrby(self._counts, f"{rec['state']}|{rec['type']}", 1)
            return result

        return self.client.transaction(transaction, key, value_from_callable=True)

    def create(self, type: JobType, params: dict[str, Any], max_queued: int | None = None) -> JobRecord:
        """A queued record; :class:`TooManyQueuedJobs` when ``max_queued`` jobs are queued already."""
        record = JobRecord(id=new_job_id(), type=type, params=params, created_at=time.time())
        key = self._key(record.id)

        def transaction(pipe: Any) -> None:
            if max_queued is not None:
                queued = sum(int(pipe.hget(self._counts, f"queued|{t}") or 0) for t in JOB_TYPES)
                if queued >= max_queued:
                    raise TooManyQueuedJobs(queued, max_queued)
            pipe.multi()
            pipe.hset(key, mapping={k: json.dumps(v) for k, v in record.model_dump(mode="json").items()})
            pipe.expire(key, self.ttl_s)
            pipe.zadd(self._index, {record.id: record.created_at})
            pipe.hincrby(self._counts, f"queued|{type}", 1)

        self.client.transaction(transaction, self._counts)
        return record

    def discard(self, job_id: str) -> bool:
        """Remove a record that was never started (its submission failed to reach the broker): no
        job, no count. False, and nothing removed, for an unknown id or a job that has begun."""
        key = self._key(job_id)

        def transaction(pipe: Any) -> bool:
            state, job_type, attempts = pipe.hmget(key, "state", "type", "attempts")
            if state is None or json.loads(state) != "queued" or int(attempts or 0) != 0:
                return False
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(self._index, job_id)
            pipe.hincrby(self._counts, f"queued|{json.loads(job_type)}", -1)
            return True

        return self.client.transaction(transaction, key, value_from_callable=True)

    def list(self, limit: int = 100, state: str | None = None) -> list[JobRecord]:
        ids = [i.decode() for i in self.client.zrevrange(self._index, 0, -1)]
        out: list[JobRecord] = []
        stale = []
        for job_id in ids:
            record = self.get(job_id)
            if record is None:
                stale.append(job_id)  # expired
                continue
            if state is None or record.state == state:
                out.append(record)
            if len(out) >= limit:
                break
        if stale:
            self.client.zrem(self._index, *stale)
        return out

    def holds(self, job_id: str, attempt: int) -> tuple[bool, bool]:
        state, attempts, cancel = self.client.hmget(self._key(job_id), "state", "attempts", "cancel_requested")
        if state is None:
            return False, False
        holds = json.loads(state) == "running" and int(json.loads(attempts or b"0")) == attempt
        return holds, bool(cancel and json.loads(cancel))

    def complete_step(self, job_id: str, attempt: int, step: str) -> bool:
        """Mark a step of ``attempt`` done; False when another execution of it did so first."""
        key = f"{self._key(job_id)}:steps"
        pipe = self.client.pipeline()
        pipe.hsetnx(key, _attempt_step(attempt, step), json.dumps(time.time()))
        pipe.expire(key, self.ttl_s)
        return bool(pipe.execute()[0])

    def step_done(self, job_id: str, attempt: int, step: str) -> bool:
        return bool(self.client.hexists(f"{self._key(job_id)}:steps", _attempt_step(attempt, step)))

    def state_counts(self) -> dict[tuple[str, str], int]:
        raw = self.client.hgetall(self._counts)
        out: dict[tuple[str, str], int] = {}
        for field, value in raw.items():
            state, _, job_type = field.decode().partition("|")
            out[(state, job_type)] = int(value)
        return out


# -- SQLite (embedded mode) -------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, type TEXT NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
    record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
CREATE TABLE IF NOT EXISTS job_states (
    state TEXT NOT NULL, type TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY (state, type));
CREATE TABLE IF NOT EXISTS job_steps (job_id TEXT NOT NULL, step TEXT NOT NULL, PRIMARY KEY (job_id, step));
"""


class SqliteJobStore(TransitionStore):
    """Job records in a SQLite file (embedded mode): they survive a restart of the service.

    Safe across threads and processes (the job runs in a child process): every change is one
    ``BEGIN IMMEDIATE`` transaction; WAL journal, so readers do not wait for the writer.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def ping(self) -> None:
        self._conn().execute("SELECT 1")

    @staticmethod
    def _move(conn: sqlite3.Connection, state: str, job_type: str, delta: int) -> None:
        conn.execute(
            "INSERT INTO job_states (state, type, n) VALUES (?, ?, ?) "
            "ON CONFLICT (state, type) DO UPDATE SET n = n + excluded.n",
            (state, job_type, delta),
        )

    def _load(self, job_id: str) -> Rec | None:
        row = self._conn().execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def _modify(self, job_id: str, change: Callable[[Rec | None], T]) -> T:
        with self._connect() as conn:
            row = conn.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            rec = json.loads(row[0]) if row else None
            old_state = rec["state"] if rec else None
            result = change(rec)
            if rec is not None:
                conn.execute(
                    "UPDATE jobs SET state = ?, record = ? WHERE id = ?", (rec["state"], json.dumps(rec), job_id)
                )
                if rec["state"] != old_state:
                    self._move(conn, str(old_state), rec["type"], -1)
                    self._move(conn, rec["state"], rec["type"], 1)
            return result

    def create(self, type: JobType, params: dict[str, Any], max_queued: int | None = None) -> JobRecord:
        record = JobRecord(id=new_job_id(), type=type, params=params, created_at=time.time())
        with self._connect() as conn:
            if max_queued is not None:
                queued = conn.execute("SELECT COALESCE(SUM(n), 0) FROM job_states WHERE state = 'queued'").fetchone()[0]
                if queued >= max_queued:
                    raise TooManyQueuedJobs(int(queued), max_queued)
            conn.execute(
                "INSERT INTO jobs (id, type, state, created_at, record) VALUES (?, ?, ?, ?, ?)",
                (record.id, type, "queued", record.created_at, record.model_dump_json()),
            )
            self._move(conn, "queued", type, 1)
        return record

    def discard(self, job_id: str) -> bool:
        """See :meth:`RedisJobStore.discard`."""
        with self._connect() as conn:
            row = conn.execute("SELECT type, record FROM jobs WHERE id = ? AND state = 'queued'", (job_id,)).fetchone()
            if row is None or json.loads(row[1]).get("attempts", 0) != 0:
                return False
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._move(conn, "queued", row[0], -1)
        return True

    def list(self, limit: int = 100, state: str | None = None) -> list[JobRecord]:
        if state is None:
            rows = self._conn().execute("SELECT record FROM jobs ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        else:
            rows = (
                self._conn()
                .execute("SELECT record FROM jobs WHERE state = ? ORDER BY created_at DESC LIMIT ?", (state, limit))
                .fetchall()
            )
        return [JobRecord.model_validate_json(r[0]) for r in rows]

    def complete_step(self, job_id: str, attempt: int, step: str) -> bool:
        with self._connect() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO job_steps (job_id, step) VALUES (?, ?)", (job_id, _attempt_step(attempt, step))
            )
            return cursor.rowcount == 1

    def step_done(self, job_id: str, attempt: int, step: str) -> bool:
        row = (
            self._conn()
            .execute("SELECT 1 FROM job_steps WHERE job_id = ? AND step = ?", (job_id, _attempt_step(attempt, step)))
            .fetchone()
        )
        return row is not None

    def state_counts(self) -> dict[tuple[str, str], int]:
        rows = self._conn().execute("SELECT state, type, n FROM job_states").fetchall()
        return {(s, t): int(n) for s, t, n in rows}

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first (to resume after a restart)."""
        rows = (
            self._conn()
            .execute("SELECT record FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at")
            .fetchall()
        )
        return [JobRecord.model_validate_json(r[0]) for r in rows]

    def requeue_interrupted(self, job_id: str, reason: str) -> bool:
        now = time.time()
        return self._modify(job_id, lambda rec: _requeue_interrupted(rec, reason, now))
