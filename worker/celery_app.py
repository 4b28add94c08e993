"""The Celery application, configured from the project's settings only (``qscore_config.settings``).

Long GPU jobs need more than Celery's defaults (FIELD-NOTES, "Celery with PyTorch on GPUs"):
one task at a time per process (prefetch 1), late acknowledgement with re-delivery when the
process running a task dies, time limits, and no CUDA in the parent before the pool forks
(encoders are loaded lazily in the child). The broker is RabbitMQ (``QSCORE_BROKER_URL``), which
re-delivers the job of a lost worker within the heartbeat timeout, or Redis, which re-delivers
it only after the visibility timeout (above the longest job: hours). Results and job records
are in Redis either way.

Start a worker with ``qscore worker`` (or ``celery -A worker.celery_app worker``). The worker's
signal handlers are in ``worker/hooks.py``, which only a worker imports (with the tasks); the
API imports this module to send tasks.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys

from celery import Celery, signals
from kombu import Exchange, Queue

from qscore_config.settings import Settings, get_settings

log = logging.getLogger(__name__)

QUEUE = "qscore"
TASK_NAMES = {
    "discover": "qscore.discover",
    "regularize": "qscore.regularize",
    "evaluate": "qscore.evaluate",
    "atlas": "qscore.atlas",
}


def create_celery(settings: Settings) -> Celery:
    broker = settings.broker or "memory://"  # no Redis: embedded mode never sends to this app
    app = Celery("qscore", broker=broker, backend=settings.redis_url, include=["worker.tasks", "worker.hooks"])
    visibility = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_is_amqp:
        # RabbitMQ re-delivers the unacknowledged job of a worker whose connection closes: at once
        # when its processes die, after the heartbeat timeout when it is frozen or cut off. Its
        # consumer_timeout (30 min by default) would also close the channel of a worker holding
        # one job longer than that, and start a second copy: the queue's x-consumer-timeout
        # (RabbitMQ 3.12+; older servers need consumer_timeout in rabbitmq.conf) sits above the
        # hard time limit, like Redis's visibility timeout.
        consumer_timeout_ms = 1000 * settings.visibility_timeout_s
        app.conf.update(
            task_queues=[
                Queue(
                    QUEUE,
                    Exchange(QUEUE),
                    routing_key=QUEUE,
                    queue_arguments={"x-consumer-timeout": consumer_timeout_ms},
                )
            ],
            broker_heartbeat=settings.broker_heartbeat_s,
            broker_transport_options={"confirm_publish": True},
            # A worker that lost its connection keeps its running task: the fencing in the job
            # record (worker.store) stops it if the broker gave the job to another worker.
            worker_cancel_long_running_tasks_on_connection_loss=False,
        )
    else:
        app.conf.update(broker_transport_options=visibility)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_default_queue=QUEUE,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_soft_time_limit=settings.job_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        result_backend_transport_options=visibility,
        result_expires=7 * 24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=2,
        redis_socket_connect_timeout=2,
        task_publish_retry_policy={
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.5,
            "interval_max": 1,
        },
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


app = create_celery(get_settings())


@signals.import_modules.connect
def _prepare_worker_metrics(**_: object) -> None:
    """In the worker's parent, before the task modules are imported: the metrics folder.

    prometheus_client picks its multiprocess mode when it is first imported, from
    ``PROMETHEUS_MULTIPROC_DIR``, so the folder is wiped and named here, before the tasks (and
    through them ``worker.metrics``) are imported; the pool children inherit the variable and
    write their samples there, which the parent's endpoint sums (``worker.hooks``).
    """
    settings = get_settings()
    folder = str(settings.worker_metrics_dir.resolve())
    if not settings.worker_metrics_port or os.environ.get("PROMETHEUS_MULTIPROC_DIR") == folder:
        return  # no metrics, or prepared already (a pool child started afresh imports the tasks again)
    if "prometheus_client" in sys.modules:
        raise RuntimeError(
            "QSCORE_WORKER_METRICS_PORT is set but prometheus_client was imported before the worker "
            "could set PROMETHEUS_MULTIPROC_DIR; start the worker with `qscore worker` or "
            "`celery -A worker.celery_app worker`"
        )
    shutil.rmtree(settings.worker_metrics_dir, ignore_errors=True)
    settings.worker_metrics_dir.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
