"""Dependencies of the routes, as ``Annotated`` aliases.

They read what the app factory put on ``app.state`` (the settings included), so production needs
no ``dependency_overrides``: with any override set, FastAPI rebuilds the dependency signatures on
every request (about 14% of a busy server's CPU, FIELD-NOTES/STYLE). Tests may still override.
They are ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop
per dependency per request for a getter.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from models.monitoring.monitor import TrafficMonitor
from models.registry.versions import Registry
from qscore_config.settings import Settings
from service.batcher import Batcher
from service.explain_worker import ExplainWorker
from service.limits import ApiError
from service.metrics import Metrics
from service.state import ServingState, StateHolder


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was made with (``create_app(settings)``)."""
    return request.app.state.settings


async def get_holder(request: Request) -> StateHolder:
    return request.app.state.holder


async def get_state(holder: Annotated[StateHolder, Depends(get_holder)]) -> ServingState:
    """The pair served right now; requests keep the one they got even if a switch follows."""
    state = holder.current
    if state is None:
        raise ApiError(503, "not_ready", "no model is loaded yet; retry shortly", headers={"Retry-After": "1"})
    return state


async def get_batcher(request: Request) -> Batcher:
    return request.app.state.batcher


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def get_monitor(request: Request) -> TrafficMonitor | None:
    """The traffic monitor; None when QSCORE_MONITOR is off."""
    return request.app.state.monitor


async def get_registry(holder: Annotated[StateHolder, Depends(get_holder)]) -> Registry:
    return holder.registry


@dataclass(frozen=True, slots=True)
class Scoring:
    """What POST /score needs, in one dependency: FastAPI's cost is per dependency, per request."""

    settings: Settings
    state: ServingState
    batcher: Batcher
    metrics: Metrics
    decode_pool: ThreadPoolExecutor


async def get_scoring(request: Request) -> Scoring:
    app_state = request.app.state
    return Scoring(
        app_state.settings,
        await get_state(app_state.holder),
        app_state.batcher,
        app_state.metrics,
        app_state.decode_pool,
    )


@dataclass(frozen=True, slots=True)
class Explaining:
    """What POST /explain needs, in one dependency."""

    settings: Settings
    state: ServingState
    worker: ExplainWorker
    metrics: Metrics


async def get_explaining(request: Request) -> Explaining:
    app_state = request.app.state
    return Explaining(app_state.settings, await get_state(app_state.holder), app_state.explain, app_state.metrics)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
HolderDep = Annotated[StateHolder, Depends(get_holder)]
BatcherDep = Annotated[Batcher, Depends(get_batcher)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
MonitorDep = Annotated[TrafficMonitor | None, Depends(get_monitor)]
ScoringDep = Annotated[Scoring, Depends(get_scoring)]
ExplainingDep = Annotated[Explaining, Depends(get_explaining)]
