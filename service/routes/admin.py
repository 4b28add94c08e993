"""Admin endpoints: the registry's versions and switching the served pair (API key when configured)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends

from models.encoders.errors import RuntimeUnavailable
from models.registry.versions import RegistryError
from service.deps import HolderDep, RegistryDep, SettingsDep
from service.limits import ApiError
from service.schemas import (
    ActiveInfo,
    ErrorResponse,
    FeatureSetInfo,
    ModelInfo,
    ServingInfo,
    SwitchRequest,
)
from service.security import require_api_key
from service.state import PairMismatch, VersionNotFound

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_api_key)],
    responses={
        401: {
            "model": ErrorResponse,
            "description": "Missing or wrong X-API-Key (when configured).",
        }
    },
)


@router.get("/models", response_model=list[ModelInfo])
async def list_models(registry: RegistryDep) -> list[ModelInfo]:
    """Model versions in the registry."""
    return [ModelInfo.of(m) for m in await asyncio.to_thread(registry.list_models)]


@router.get("/feature-sets", response_model=list[FeatureSetInfo])
async def list_feature_sets(registry: RegistryDep) -> list[FeatureSetInfo]:
    """Feature-set versions in the registry."""
    return [FeatureSetInfo.of(v, fs) for v, fs in await asyncio.to_thread(registry.list_feature_sets)]


@router.get("/active", response_model=ActiveInfo, responses={503: {"model": ErrorResponse}})
async def active(holder: HolderDep, settings: SettingsDep) -> ActiveInfo:
    """The pair served now and the registry's active pair on disk."""
    state = holder.current
    if state is None:
        raise ApiError(503, "not_ready", "no model is loaded yet")
    pair = await asyncio.to_thread(holder.registry.active)
    return ActiveInfo(
        serving=state.info(),
        registry_active=pair.model_dump(exclude_none=True) if pair else None,
        auto_switch=settings.auto_switch,
    )


@router.post(
    "/switch",
    response_model=ServingInfo,
    responses={
        400: {"model": ErrorResponse, "description": "A body that is not JSON (malformed_body)."},
        404: {
            "model": ErrorResponse,
            "description": "Unknown model or feature-set version (version_not_found).",
        },
        409: {
            "model": ErrorResponse,
            "description": "The feature set was found on another encoder (feature_set_mismatch).",
        },
        422: {
            "model": ErrorResponse,
            "description": "Invalid body (invalid_request) or unloadable version (invalid_version).",
        },
    },
)
async def switch(body: SwitchRequest, holder: HolderDep) -> ServingInfo:
    """Serve another pair: loaded and checked fully first, then swapped atomically."""
    try:
        state = await holder.switch(body.model, body.feature_set, persist=body.persist)
    except VersionNotFound as exc:
        raise ApiError(404, "version_not_found", str(exc)) from exc
    except PairMismatch as exc:
        raise ApiError(409, "feature_set_mismatch", str(exc)) from exc
    except (RegistryError, RuntimeUnavailable) as exc:  # RuntimeUnavailable: QSCORE_RUNTIME cannot run it
        raise ApiError(422, "invalid_version", str(exc)) from exc
    return state.info()
