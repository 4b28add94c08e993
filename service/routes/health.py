"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.batcher import Batcher
from service.deps import BatcherDep, HolderDep, MetricsDep
from service.schemas import Health, Readiness
from service.state import StateHolder

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and its event loop answers."""
    return Health()


@router.head("/healthz", include_in_schema=False)
async def healthz_head() -> Response:
    """GET /healthz without a body, for load balancers that probe with HEAD."""
    return Response(status_code=200)


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Not ready."}},
)
async def readyz(holder: HolderDep, batcher: BatcherDep) -> Readiness | JSONResponse:
    """Ready when a model is loaded and the queue is not saturated."""
    state = holder.current
    reason = _not_ready(holder, batcher)
    body = Readiness(
        status="not_ready" if reason else "ready",
        model_version=state.model_version if state else None,
        feature_set_version=state.feature_set_version if state else None,
        queue_depth=batcher.depth,
        queue_capacity=batcher.capacity,
        reason=reason,
    )
    if reason:
        return JSONResponse(body.model_dump(), status_code=503)
    return body


@router.head("/readyz", include_in_schema=False)
async def readyz_head(holder: HolderDep, batcher: BatcherDep) -> Response:
    """GET /readyz's status without a body, for load balancers that probe with HEAD."""
    return Response(status_code=503 if _not_ready(holder, batcher) else 200)


def _not_ready(holder: StateHolder, batcher: Batcher) -> str | None:
    """Why the service is not ready, or None when it is."""
    if holder.current is None:
        return "no model loaded"
    if batcher.saturated:
        return "the scoring queue is saturated"
    return None


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format.",
        }
    },
)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics, labelled by model version."""
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
