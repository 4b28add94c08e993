"""The Celery worker's signal handlers: start-up checks, metrics, the pool children's set-up.

Imported by a worker only, with the tasks (``include`` in ``worker.celery_app``), after the
metrics folder is prepared: importing ``worker.metrics`` here starts prometheus_client in
multiprocess mode. Nothing here touches CUDA: the parent forks the pool after these run, and
encoders load in the children, on first use.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from celery import signals

from models.registry.versions import Registry
from qscore_config.settings import get_settings
from worker.jobs.context import forget_models
from worker.metrics import TASK_SECONDS, TASKS_RUNNING, mark_child_dead, serve_worker_metrics

log = logging.getLogger(__name__)


@signals.worker_init.connect
def _worker_init(**_: object) -> None:
    """In the worker's parent, before the pool forks: checks, registry leftovers, metrics. No CUDA here."""
    settings = get_settings()
    if settings.redis_url is None:
        raise RuntimeError("a worker needs QSCORE_REDIS_URL (without Redis, jobs run inside the service)")
    if settings.broker_is_amqp:
        log.info("broker RabbitMQ (heartbeat %s s), job store Redis", settings.broker_heartbeat_s)
    else:
        log.warning(
            "broker Redis: the job of a worker that is lost runs again only after the visibility timeout "
            "(%d s); set QSCORE_BROKER_URL to a RabbitMQ to have it re-delivered within seconds",
            settings.visibility_timeout_s,
        )
    removed = Registry(settings.registry_root).clean()
    if removed:
        log.warning("removed %d leftovers of interrupted writes from the registry", len(removed))
    if settings.worker_metrics_port:
        serve_worker_metrics(settings.worker_metrics_port)


@signals.worker_process_init.connect
def _child_init(**_: object) -> None:
    """In each pool child: no encoder loaded yet (they load lazily here, never in the parent)."""
    forget_models()
    threads = get_settings().worker_torch_threads
    if threads:
        torch.set_num_threads(threads)


@signals.worker_process_shutdown.connect
def _child_exit(pid: int | None = None, **_: object) -> None:
    mark_child_dead(pid or os.getpid())


_started: dict[str, float] = {}


@signals.task_prerun.connect
def _task_started(task_id: str | None = None, task: object = None, **_: object) -> None:
    _started[task_id or ""] = time.monotonic()
    TASKS_RUNNING.labels(getattr(task, "name", "?")).inc()


@signals.task_postrun.connect
def _task_ended(task_id: str | None = None, task: object = None, **_: object) -> None:
    name = getattr(task, "name", "?")
    TASKS_RUNNING.labels(name).dec()
    started = _started.pop(task_id or "", None)
    if started is not None:
        TASK_SECONDS.labels(name).observe(time.monotonic() - started)
