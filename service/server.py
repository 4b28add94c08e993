"""``qscore serve``: uvicorn with the app, one process (the metrics live in it)."""

from __future__ import annotations

import logging

import uvicorn

from models.registry.versions import Registry
from qscore_config.settings import Settings, get_settings
from service.app import create_app
from service.state import resolve_pair


def startup_pair(settings: Settings) -> tuple[str, str]:
    """The pair the service loads first, checked (a ``RegistryError`` saying what is missing)."""
    registry = Registry(settings.registry_root)
    model, feature_set = resolve_pair(registry, settings)
    registry.check_pair(model, feature_set)
    return model, feature_set


def run(host: str = "127.0.0.1", port: int = 8000) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(get_settings())
    # One worker process: the encoder, the batcher and the metrics are per process. Scale out
    # with more instances behind a balancer, one per GPU.
    settings = app.state.settings
    # uvicorn[standard] brings httptools and uvloop, which "auto" picks over h11 and asyncio.
    uvicorn.run(
        app,
        host=host,
        port=port,
        workers=1,
        log_level="info",
        access_log=settings.access_log,
        timeout_graceful_shutdown=10,
    )
