"""The app factory: wiring only. The routes live in service/routes/, their dependencies in deps.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import iter_route_contexts
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.monitoring.monitor import TrafficMonitor
from models.registry.versions import Registry
from qscore_config.settings import Settings, get_settings
from service import openapi
from service.batcher import Batcher
from service.explain_worker import ExplainWorker
from service.limits import BodyLimitMiddleware
from service.metrics import Metrics, QueueLevel
from service.routes import admin, atlas, docs, explain, health, jobs, model_import, monitor, score
from service.state import StateHolder

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Pillow's decompression-bomb guard stays on, at the service's own pixel cap.
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
        if settings.torch_threads is not None and settings.intra_op_threads is None:
            log.warning("QSCORE_TORCH_THREADS is deprecated: set QSCORE_INTRA_OP_THREADS (it applies to both runtimes)")
        traffic = _traffic_monitor(settings)
        holder = StateHolder(Registry(settings.registry_root), settings, traffic)
        await holder.load_initial()
        batcher = Batcher(
            settings.max_batch_size,
            settings.max_batch_wait_ms / 1000.0,
            settings.max_queue_images,
            app.state.metrics,
            intra_op_threads=settings.inference_threads,
            monitor=traffic,
        )
        batcher.start()
        app.state.holder, app.state.batcher, app.state.monitor = holder, batcher, traffic
        app.state.metrics.attach(lambda: holder.current, lambda: QueueLevel(batcher.depth, batcher.capacity))
        if traffic is not None:
            app.state.metrics.attach_monitor(traffic.snapshot)
        app.state.decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="qscore-decode")
        app.state.explain = ExplainWorker(settings.max_explain_queue)
        jobs.start_embedded_jobs(app, settings)
        # Start-up made a few million long-lived objects (torch, the app): move them out of the
        # cyclic collector's sight, or every full collection walks them all and stalls the loop.
        gc.collect()
        gc.freeze()
        # Always: a job asked to activate its output ("activate": true) is followed even without
        # QSCORE_AUTO_SWITCH, which makes the service follow every change of the active pair.
        watcher = asyncio.get_running_loop().create_task(
            holder.watch(settings.registry_poll_seconds, follow_all=settings.auto_switch)
        )
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await batcher.stop()
            if traffic is not None:
                traffic.close()
            jobs.stop_jobs(app)
            app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
            app.state.explain.shutdown()

    app = FastAPI(
        title="qscore",
        summary="Label-free quality scoring of self-supervised image representations (Q-Score).",
        version="0.1.0",
        lifespan=lifespan,
        # /docs and /redoc come from service/routes/docs.py: local assets, not a CDN
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = Metrics(settings.max_batch_size)
    app.state.monitor = None
    # The routes read the settings off app.state (service.deps): no dependency_overrides outside tests.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.include_router(score.router)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(model_import.router)
    app.include_router(jobs.router)
    app.include_router(explain.router)
    app.include_router(atlas.router)
    app.include_router(monitor.router)
    docs.install(app)
    openapi.install(app, settings)
    return app


def _traffic_monitor(settings: Settings) -> TrafficMonitor | None:
    """The traffic monitor of GET /monitor (QSCORE_MONITOR), or None when it is off."""
    if not settings.monitor:
        return None
    return TrafficMonitor(
        settings.monitor_window,
        settings.drift_every,
        settings.drift_min_interval_s,
        settings.drift_permutations,
        settings.drift_reference_size,
    )


#: Codes of the framework's own errors (a string detail).
_FRAMEWORK_CODES = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    """Every HTTP error as ``{"detail": {"code": ..., "message": ...}}``."""
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if not (isinstance(detail, dict) and "code" in detail and "message" in detail):
        code = _FRAMEWORK_CODES.get(exc.status_code, f"http_{exc.status_code}")
        detail = {"code": code, "message": str(detail)}
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names the methods of one route; the path may have several
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    path = request.scope["path"]
    methods: set[str] = set()
    for route in iter_route_contexts(request.app.routes):  # those of included routers too
        regex = getattr(route, "path_regex", None)
        if regex is not None and regex.match(path):
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug's 500 in the same JSON shape as every other error, naming no internals; Starlette
    re-raises the exception after this answer, so the server's log keeps the traceback."""
    message = f"the server failed on this request ({type(exc).__name__}); its log has the details"
    return JSONResponse({"detail": {"code": "internal_error", "message": message}}, status_code=500)


#: Routes whose refused requests qscore_errors_total counts (the scoring routes; admin and job errors are not).
_COUNTED_PATHS = frozenset({"/score", "/explain"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    unparsed = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
    if unparsed is not None:  # FastAPI reports a body it cannot parse as a validation error: it is a 400
        where = unparsed.get("loc", ())[-1:]
        at = f" (at character {where[0]})" if where and isinstance(where[0], int) else ""
        error = (unparsed.get("ctx") or {}).get("error", "")
        message = f"the body is not JSON{at}: {error or unparsed.get('msg', '')}"
        return JSONResponse({"detail": {"code": "malformed_body", "message": message}}, status_code=400)
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    message = f"invalid request: {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
    if request.url.path in _COUNTED_PATHS:  # refused before the handler, which counts its own errors
        holder = getattr(request.app.state, "holder", None)
        served = holder.current if holder is not None else None
        request.app.state.metrics.error(served.model_version if served else None, "invalid_request")
    return JSONResponse(
        {"detail": jsonable_encoder({"code": "invalid_request", "message": message, "errors": errors})},
        status_code=422,
    )
