"""``qscore worker``: a Celery worker with the project's settings (the service's settings class).

One process per GPU: ``--concurrency`` children of the prefork pool (time limits work there),
or ``--pool solo`` for one process that runs tasks itself. Encoders load in the children only,
so CUDA is never initialised before the fork.
"""

from __future__ import annotations

import os
import sys

from qscore_config.settings import get_settings
from worker.celery_app import QUEUE


def worker_argv(concurrency: int = 1, pool: str = "prefork", loglevel: str = "INFO") -> list[str]:
    """The checked command line of the worker: ``python -m celery -A worker.celery_app worker ...``."""
    settings = get_settings()
    if settings.redis_url is None:
        raise SystemExit("error: `qscore worker` needs QSCORE_REDIS_URL; without Redis, the service runs jobs")
    if pool not in ("prefork", "solo", "threads"):
        raise SystemExit(f"error: pool must be prefork, solo or threads, got {pool!r}")
    if concurrency < 1:
        raise SystemExit(f"error: concurrency must be at least 1, got {concurrency}")
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--loglevel={loglevel}",
        f"--queues={QUEUE}",
        "--without-gossip",
        "--without-mingle",
    ]


def run_worker(concurrency: int = 1, pool: str = "prefork", loglevel: str = "INFO") -> None:
    """Replace this process by the worker (same pid, so signals and containers see no difference).

    A fresh interpreter, because the ``qscore`` command has imported the service and with it
    prometheus_client, whose multiprocess mode the worker's metrics need must be chosen before
    its first import (``worker.celery_app``).
    """
    argv = worker_argv(concurrency, pool, loglevel)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)
