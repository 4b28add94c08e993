"""Prometheus metrics of jobs: durations and outcomes (workers), job states (API).

A Celery worker runs tasks in forked children, so its metrics use prometheus_client's
multiprocess mode: the worker's parent wipes and names ``PROMETHEUS_MULTIPROC_DIR`` before it
imports the task modules, and with them this one (``worker.celery_app``), and
:func:`serve_worker_metrics` serves a ``MultiProcessCollector`` over the children's files.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from worker.store import JOB_TYPES, STATES

log = logging.getLogger(__name__)

JOB_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 21600, 43200)

JOBS_FINISHED = Counter("qscore_jobs_finished", "Jobs that ended, by type and outcome.", ["type", "outcome"])
JOB_SECONDS = Histogram(
    "qscore_job_duration_seconds",
    "Wall time of a job from start to end.",
    ["type", "outcome"],
    buckets=JOB_BUCKETS,
)
TASK_SECONDS = Histogram(
    "qscore_worker_task_duration_seconds",
    "Wall time of one Celery task.",
    ["task"],
    buckets=JOB_BUCKETS,
)
TASKS_RUNNING = Gauge(
    "qscore_worker_tasks_running",
    "Celery tasks running now.",
    ["task"],
    multiprocess_mode="livesum",
)


def job_finished(job_type: str, outcome: str, seconds: float) -> None:
    JOBS_FINISHED.labels(job_type, outcome).inc()
    JOB_SECONDS.labels(job_type, outcome).observe(max(seconds, 0.0))


def serve_worker_metrics(port: int) -> None:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    try:
        start_http_server(port, registry=registry)
        log.info("worker metrics on :%d/metrics", port)
    except OSError as exc:
        log.warning("worker metrics not served on port %d: %s", port, exc)


def mark_child_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(pid)


class JobStateCollector:
    """``qscore_jobs{state, type}`` from the store's counters, moved in the same transaction as
    every state change (``worker.store``): one small read per scrape, however many jobs there are.
    ``queued`` and ``running`` are the jobs in that state now; the final states count every job
    that ended so (since the store began)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def collect(self) -> Any:
        family = GaugeMetricFamily(
            "qscore_jobs",
            "Jobs by state: queued and running now; succeeded, failed and cancelled in all.",
            labels=["state", "type"],
        )
        try:
            counts = self.store.state_counts()
        except Exception:  # the store is down: no sample rather than a failed scrape
            return
        for state in STATES:
            for job_type in JOB_TYPES:
                family.add_metric([state, job_type], counts.get((state, job_type), 0))
        yield family


def export_on(registry: Any, store: Any, embedded: bool) -> None:
    """Add the job states (and, in embedded mode, the job outcomes) to the API's registry."""
    registry.register(JobStateCollector(store))
    if embedded:  # jobs run in the API process: their outcomes are the API's to export
        registry.register(JOBS_FINISHED)
        registry.register(JOB_SECONDS)
