"""Embedded mode: with no Redis configured, jobs run next to the service, one at a time.

The same job bodies as the Celery tasks (``worker.jobs.BODIES``), with what the workers give them:

- Records in SQLite (``<registry root>/jobs.sqlite3``, :class:`worker.store.SqliteJobStore`):
  they survive a restart. A job that was running when the service stopped (or was killed) is
  queued again at the next start and resumes from its checkpoint (regularize) or starts over
  (the others); its interrupted attempt stays in ``history`` with the reason. A job started more
  than ``MAX_ATTEMPTS`` times (``worker.jobs.lifecycle``) fails with the reason.
- The workers' time limits: each job runs in a child process (``spawn``: no CUDA state crosses a
  fork), which gets ``SoftTimeLimitExceeded`` at ``QSCORE_JOB_TIME_LIMIT_S`` (the job ends
  ``failed`` with the reason, like on a worker) and is killed at the hard limit (+60 s).
- The child dies with the service (``PR_SET_PDEATHSIG``), and fencing (the attempt number in
  the record) stops a copy that outlived it anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from pathlib import Path

import torch
from celery.exceptions import SoftTimeLimitExceeded

from qscore_config.settings import Settings
from worker import metrics
from worker.jobs import BODIES
from worker.jobs.context import JobAlreadyOver, JobContext
from worker.jobs.lifecycle import run
from worker.store import TERMINAL, JobRecord, SqliteJobStore

log = logging.getLogger(__name__)

DB_NAME = "jobs.sqlite3"


def job_db(settings: Settings) -> Path:
    return Path(settings.registry_root) / DB_NAME


class EmbeddedRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = SqliteJobStore(job_db(settings))
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._stopping = threading.Event()
        self._child: multiprocessing.process.BaseProcess | None = None
        self._resume()
        # A daemon thread: it only waits on the job's process, which dies with the service.
        self._thread = threading.Thread(target=self._loop, name="qscore-job", daemon=True)
        self._thread.start()

    def _resume(self) -> None:
        """Queue again what a previous run of the service left queued or running."""
        for record in self.store.unfinished():
            if record.state == "running":
                self.store.requeue_interrupted(
                    record.id, "the service stopped while this attempt ran; resumed when it started again"
                )
                log.warning("job %s was running when the service stopped: queued again", record.id)
            self._queue.put((record.id, record.type))

    def enqueue(self, record: JobRecord) -> None:
        self._queue.put((record.id, record.type))

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            job_id, job_type = item
            try:
                self._run(job_id, job_type)
            except Exception:  # never lose the thread; the record says why where it can
                log.exception("embedded job %s", job_id)

    def _run(self, job_id: str, job_type: str) -> None:
        record = self.store.get(job_id)
        if record is None or record.state in TERMINAL or self._stopping.is_set():
            return
        settings = self.settings
        started = time.time()
        context = multiprocessing.get_context("spawn")
        child = context.Process(
            target=run_job_process,
            args=(settings, job_id, job_type, started + settings.job_time_limit_s, os.getpid()),
            name=f"qscore-job-{job_id[:8]}",
            daemon=True,
        )
        self._child = child
        child.start()
        child.join(max(0.0, started + settings.job_hard_time_limit_s - time.time()))
        killed = child.is_alive()
        if killed:
            child.kill()
            child.join(10)
        self._child = None
        record = self.store.get(job_id)
        if record is None:
            return
        if killed and record.state == "running":
            self.store.finish(
                job_id,
                "failed",
                record.attempts or None,
                error=f"hard time limit of {settings.job_hard_time_limit_s} s exceeded: the job's process was killed",
            )
        elif record.state == "running" and not self._stopping.is_set():
            # Its process died (a crash, the kernel's OOM killer): run it again, as a worker
            # re-delivers a job whose process died (``start`` caps the attempts).
            self.store.requeue_interrupted(job_id, f"the job's process died (exit code {child.exitcode})")
            self._queue.put((job_id, job_type))
            return
        record = self.store.get(job_id)
        if record is not None and record.state in TERMINAL:
            duration = (record.finished_at or time.time()) - (record.started_at or record.created_at)
            metrics.job_finished(record.type, record.state, duration)

    def shutdown(self) -> None:
        """Stop: the running job's process ends and its job is queued again for the next start."""
        self._stopping.set()
        child = self._child
        if child is not None and child.is_alive():
            child.terminate()
            child.join(10)
            if child.is_alive():
                child.kill()
                child.join(5)
        for record in self.store.unfinished():
            if record.state == "running":
                self.store.requeue_interrupted(
                    record.id, "the service stopped while this attempt ran; resumed when it starts again"
                )
        self._queue.put(None)
        self._thread.join(15)


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel sends SIGKILL to this process when the service's process ends."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # it ended before the call above
        os._exit(1)


def run_job_process(settings: Settings, job_id: str, job_type: str, soft_deadline: float, parent_pid: int) -> None:
    """The child process of one embedded job: soft time limit by SIGALRM, like Celery's workers."""
    _die_with_parent(parent_pid)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def soft_limit(signum: int, frame: object) -> None:
        raise SoftTimeLimitExceeded(f"soft time limit of {settings.job_time_limit_s} s exceeded")

    if settings.worker_torch_threads:
        torch.set_num_threads(settings.worker_torch_threads)
    signal.signal(signal.SIGALRM, soft_limit)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, soft_deadline - time.time()))
    store = SqliteJobStore(job_db(settings))
    ctx = JobContext(job_id=job_id, store=store, settings=settings)
    try:
        run(ctx, BODIES[job_type], f"embedded:{os.getpid()}")
    except JobAlreadyOver:
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        store.close()
