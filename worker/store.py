"""Job records: what the API shows for a job and what its tasks report into.

Two stores with one interface: :class:`RedisJobStore` (records survive a restart of the API; the
workers write progress into it) and :class:`MemoryJobStore` (embedded mode, no Redis).

A record is a Redis hash ``qscore:job:<id>`` with one JSON-encoded value per field, so the API
(cancellation) and a task (progress) write different fields without overwriting each other; an
index ``qscore:jobs`` (sorted set by creation time) lists them. State changes that race, queued
to running against queued to cancelled, are single Lua scripts.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field

JobType = Literal["discover", "regularize", "evaluate"]
JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})


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
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None


def new_job_id() -> str:
    return uuid.uuid4().hex


class JobStore(Protocol):
    def ping(self) -> None: ...
    def create(self, type: JobType, params: dict[str, Any]) -> JobRecord: ...
    def get(self, job_id: str) -> JobRecord | None: ...
    def list(self, limit: int = 100, state: str | None = None) -> list[JobRecord]: ...
    def update(self, job_id: str, **fields: Any) -> None: ...
    def merge_metrics(self, job_id: str, metrics: dict[str, Any]) -> None: ...
    def begin(self, job_id: str) -> str: ...
    def request_cancel(self, job_id: str) -> JobRecord | None: ...
    def cancel_requested(self, job_id: str) -> bool: ...
    def finish(self, job_id: str, state: JobState, **fields: Any) -> bool: ...
    def incr(self, job_id: str, field: str) -> int: ...


# Outcomes of ``begin``: run it, or skip it (already finished, or cancelled while queued).
BEGIN_RUN, BEGIN_DONE, BEGIN_CANCELLED, BEGIN_MISSING = "run", "done", "cancelled", "missing"


# -- Redis -----------------------------------------------------------------------------------
_BEGIN = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
state = cjson.decode(state)
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 'done' end
if cjson.decode(redis.call('HGET', KEYS[1], 'cancel_requested') or 'false') then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished_at', ARGV[1],
             'error', '"cancelled before it started"')
  return 'cancelled'
end
local attempts = cjson.decode(redis.call('HGET', KEYS[1], 'attempts') or '0') + 1
redis.call('HSET', KEYS[1], 'state', '"running"', 'attempts', tostring(attempts))
if redis.call('HGET', KEYS[1], 'started_at') == 'null' then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
end
return 'run'
"""

_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
state = cjson.decode(state)
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 1 end
redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', '"cancelled"', 'finished_at', ARGV[1],
             'error', '"cancelled before it started"')
end
return 1
"""

_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 0 end
state = cjson.decode(state)
if state == 'succeeded' or state == 'failed' or state == 'cancelled' then return 0 end
for i = 1, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class RedisJobStore:
    """Job records in Redis (``qscore:job:<id>`` hashes and the ``qscore:jobs`` index)."""

    def __init__(self, url: str, prefix: str = "qscore", ttl_s: int = 30 * 24 * 3600) -> None:
        import redis

        self.client = redis.Redis.from_url(
            url,
            socket_connect_timeout=1.0,
            socket_timeout=3.0,
            retry_on_timeout=False,
            health_check_interval=10,
        )
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._begin = self.client.register_script(_BEGIN)
        self._cancel = self.client.register_script(_CANCEL)
        self._finish = self.client.register_script(_FINISH)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    @property
    def _index(self) -> str:
        return f"{self.prefix}:jobs"

    def ping(self) -> None:
        self.client.ping()

    def create(self, type: JobType, params: dict[str, Any]) -> JobRecord:
        record = JobRecord(id=new_job_id(), type=type, params=params, created_at=time.time())
        pipe = self.client.pipeline()
        pipe.hset(self._key(record.id), mapping=_encode(record.model_dump(mode="json")))
        pipe.expire(self._key(record.id), self.ttl_s)
        pipe.zadd(self._index, {record.id: record.created_at})
        pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.client.hgetall(self._key(job_id))
        if not raw:
            return None
        return JobRecord.model_validate({k.decode(): json.loads(v) for k, v in raw.items()})

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

    def update(self, job_id: str, **fields: Any) -> None:
        self.client.hset(self._key(job_id), mapping=_encode(fields))

    def merge_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        # One writer per job at a time (its running task), so read-modify-write is safe here.
        raw = self.client.hget(self._key(job_id), "metrics")
        current = json.loads(raw) if raw else {}
        current.update(metrics)
        self.client.hset(self._key(job_id), "metrics", json.dumps(current))

    def begin(self, job_id: str) -> str:
        return self._begin(keys=[self._key(job_id)], args=[json.dumps(time.time())]).decode()

    def request_cancel(self, job_id: str) -> JobRecord | None:
        if not self._cancel(keys=[self._key(job_id)], args=[json.dumps(time.time())]):
            return None
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        raw = self.client.hget(self._key(job_id), "cancel_requested")
        return bool(raw and json.loads(raw))

    def finish(self, job_id: str, state: JobState, **fields: Any) -> bool:
        fields = {**fields, "state": state, "finished_at": time.time()}
        if state == "succeeded":
            fields["progress"] = 1.0
        args = [item for pair in _encode(fields).items() for item in pair]
        return bool(self._finish(keys=[self._key(job_id)], args=args))

    def incr(self, job_id: str, field: str) -> int:
        return int(self.client.hincrby(self._key(job_id), field, 1))


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}


# -- in memory (embedded mode) ---------------------------------------------------------------
class MemoryJobStore:
    """The same interface over a dict, for embedded mode; records end with the process."""

    def __init__(self) -> None:
        self._records: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def ping(self) -> None:
        return None

    def create(self, type: JobType, params: dict[str, Any]) -> JobRecord:
        record = JobRecord(id=new_job_id(), type=type, params=params, created_at=time.time())
        with self._lock:
            self._records[record.id] = record.model_dump(mode="json")
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            data = self._records.get(job_id)
            return JobRecord.model_validate(json.loads(json.dumps(data))) if data else None

    def list(self, limit: int = 100, state: str | None = None) -> list[JobRecord]:
        with self._lock:
            rows = sorted(self._records.values(), key=lambda r: r["created_at"], reverse=True)
        return [JobRecord.model_validate(r) for r in rows if state is None or r["state"] == state][:limit]

    def update(self, job_id: str, **fields: Any) -> None:
        with self._lock:
            self._records[job_id].update(json.loads(json.dumps(fields)))

    def merge_metrics(self, job_id: str, metrics: dict[str, Any]) -> None:
        with self._lock:
            self._records[job_id]["metrics"].update(json.loads(json.dumps(metrics)))

    def begin(self, job_id: str) -> str:
        with self._lock:
            record = self._records.get(job_id)
            if record is None:
                return BEGIN_MISSING
            if record["state"] in TERMINAL:
                return BEGIN_DONE
            if record["cancel_requested"]:
                record.update(state="cancelled", finished_at=time.time(), error="cancelled before it started")
                return BEGIN_CANCELLED
            record.update(state="running", attempts=record["attempts"] + 1)
            record["started_at"] = record["started_at"] or time.time()
            return BEGIN_RUN

    def request_cancel(self, job_id: str) -> JobRecord | None:
        with self._lock:
            record = self._records.get(job_id)
            if record is None:
                return None
            if record["state"] not in TERMINAL:
                record["cancel_requested"] = True
                if record["state"] == "queued":
                    record.update(
                        state="cancelled",
                        finished_at=time.time(),
                        error="cancelled before it started",
                    )
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            return bool(self._records.get(job_id, {}).get("cancel_requested"))

    def finish(self, job_id: str, state: JobState, **fields: Any) -> bool:
        with self._lock:
            record = self._records.get(job_id)
            if record is None or record["state"] in TERMINAL:
                return False
            record.update(json.loads(json.dumps(fields)), state=state, finished_at=time.time())
            if state == "succeeded":
                record["progress"] = 1.0
            return True

    def incr(self, job_id: str, field: str) -> int:
        with self._lock:
            record = self._records[job_id]
            record[field] = int(record.get(field, 0)) + 1
            return record[field]
