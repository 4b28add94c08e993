"""What the API talks to: a job store and a way to start jobs, with Redis or embedded.

``make_backend(settings)`` picks :class:`CeleryBackend` when ``QSCORE_REDIS_URL`` is set (records
in Redis, tasks to the Celery workers through the broker, ``QSCORE_BROKER_URL``) and
:class:`EmbeddedRunner` otherwise (records in SQLite, jobs in a child process of the service).
"""

from __future__ import annotations

from typing import Protocol

from qscore_config.settings import Settings
from worker.celery_app import TASK_NAMES, create_celery
from worker.embedded import EmbeddedRunner
from worker.store import JobRecord, JobStore, RedisJobStore


class JobBackend(Protocol):
    store: JobStore

    def enqueue(self, record: JobRecord) -> None: ...

    def shutdown(self) -> None: ...


class CeleryBackend:
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        self.store = RedisJobStore(settings.redis_url)
        self.celery = create_celery(settings)

    def enqueue(self, record: JobRecord) -> None:
        self.celery.send_task(TASK_NAMES[record.type], args=[record.id], task_id=record.id)

    def shutdown(self) -> None:
        self.store.client.close()


def make_backend(settings: Settings) -> JobBackend:
    if settings.redis_url:
        return CeleryBackend(settings)
    return EmbeddedRunner(settings)
