"""Embedded mode: with no Redis configured, jobs run inside the service on one background thread.

The same job bodies as the Celery tasks (``worker.jobs``), one job at a time, records in memory
(they end with the process). Meant for the first README command and for trying the job API;
production runs workers on Redis. Time limits are not enforced here.
"""

from __future__ import annotations

import logging
import queue
import threading

from qscore_config.settings import Settings
from worker import jobs
from worker.store import JobRecord, MemoryJobStore

log = logging.getLogger(__name__)


class EmbeddedRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = MemoryJobStore()
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        # A daemon thread: a job still running never holds the service's exit.
        self._thread = threading.Thread(target=self._loop, name="qscore-job", daemon=True)
        self._thread.start()

    def enqueue(self, record: JobRecord) -> None:
        self._queue.put((record.id, record.type))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            job_id, job_type = item
            ctx = jobs.JobContext(job_id=job_id, store=self.store, settings=self.settings)
            try:
                jobs.run(ctx, jobs.BODIES[job_type])
            except jobs.JobAlreadyOver:
                pass
            except Exception:  # never lose the thread; the record already says why
                log.exception("embedded job %s", job_id)

    def shutdown(self) -> None:
        """Ask running jobs to stop; stop the thread after them."""
        for record in self.store.list(limit=10_000):
            if record.state in ("queued", "running"):
                self.store.request_cancel(record.id)
        self._queue.put(None)
