"""``qscore worker``: a Celery worker with the project's settings (the service's settings class).

One process per GPU: ``--concurrency`` children of the prefork pool (time limits work there),
or ``--pool solo`` for one process that runs tasks itself. Encoders load in the children only,
so CUDA is never initialised before the fork.
"""

from __future__ import annotations

from qscore_config.settings import get_settings


def run_worker(concurrency: int = 1, pool: str = "prefork", loglevel: str = "INFO") -> None:
    settings = get_settings()
    if settings.redis_url is None:
        raise SystemExit("error: `qscore worker` needs QSCORE_REDIS_URL; without Redis, the service runs jobs")
    if pool not in ("prefork", "solo", "threads"):
        raise SystemExit(f"error: pool must be prefork, solo or threads, got {pool!r}")
    if concurrency < 1:
        raise SystemExit(f"error: concurrency must be at least 1, got {concurrency}")
    from worker.celery_app import QUEUE, app

    app.worker_main(
        [
            "worker",
            f"--concurrency={concurrency}",
            f"--pool={pool}",
            f"--loglevel={loglevel}",
            f"--queues={QUEUE}",
            "--without-gossip",
            "--without-mingle",
        ]
    )
