"""GET /atlas: the feature atlas of a feature set (``POST /jobs/atlas`` writes it into the registry).

By default the atlas of the feature set served now; ``?feature_set=`` names another version.
Atlases are read from the registry on each request (the index is a small JSON file; the
parsed copy is kept per folder, which never changes once written).
"""

from __future__ import annotations

import asyncio
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse

from models.explanation.atlas import SHEETS_DIR, read_atlas
from models.registry.versions import FEATURE_SET_FILE, Registry, RegistryError
from service.deps import HolderDep
from service.limits import ApiError
from service.schemas import VERSION_REGEX, AtlasFeature, AtlasIndex, ErrorResponse

router = APIRouter(prefix="/atlas", tags=["explanations"])

_NOT_FOUND = {
    404: {
        "model": ErrorResponse,
        "description": "version_not_found (no such feature set), atlas_not_found (none written for it: run POST "
        "/jobs/atlas) or feature_not_in_atlas.",
    },
    503: {"model": ErrorResponse, "description": "No model is loaded yet (not_ready)."},
}
FeatureSetQuery = Annotated[
    str | None,
    Query(pattern=VERSION_REGEX, max_length=80, description="Feature-set version; default: the one served now."),
]
FeatureIndex = Annotated[int, PathParam(ge=0, le=1_000_000, description="Feature index j of h.")]


@router.get("", response_model=AtlasIndex, responses=_NOT_FOUND)
async def atlas_index(holder: HolderDep, feature_set: FeatureSetQuery = None) -> dict[str, Any]:
    """The atlas's features (group, how many images each is dominant for, class purity)."""
    version, folder = await _atlas(holder, feature_set)
    data = await asyncio.to_thread(_read, folder)
    summary = ("index", "group", "n_dominant", "purity", "top_class", "classes_for_80")
    return {
        "feature_set": version,
        "atlas": folder.name,
        **{k: data.get(k) for k in ("created_at", "n_images", "method", "eps", "classes", "dataset", "top_k")},
        "features": [{k: f[k] for k in summary} for f in data["features"].values()],
    }


@router.get("/{feature}", response_model=AtlasFeature, responses=_NOT_FOUND)
async def atlas_feature(
    feature: FeatureIndex, holder: HolderDep, request: Request, feature_set: FeatureSetQuery = None
) -> dict[str, Any]:
    """One feature: the images it is dominant for (strongest first), its class distribution, its sheet."""
    version, folder = await _atlas(holder, feature_set)
    entry = _feature(await asyncio.to_thread(_read, folder), feature, version)
    sheet = request.url_for("atlas_sheet", feature=str(feature)).include_query_params(feature_set=version)
    return {**entry, "sheet_url": str(sheet), "feature_set": version, "atlas": folder.name}


@router.get(
    "/{feature}/sheet.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}, "description": "The contact sheet."}, **_NOT_FOUND},
)
async def atlas_sheet(feature: FeatureIndex, holder: HolderDep, feature_set: FeatureSetQuery = None) -> FileResponse:
    """The feature's contact sheet: its top images, each above its heatmap."""
    version, folder = await _atlas(holder, feature_set)
    _feature(await asyncio.to_thread(_read, folder), feature, version)
    return FileResponse(folder / SHEETS_DIR / f"{feature}.png", media_type="image/png")


async def _atlas(holder: Any, feature_set: str | None) -> tuple[str, Path]:
    registry: Registry = holder.registry
    if feature_set is None:
        state = holder.current
        if state is None:
            raise ApiError(503, "not_ready", "no model is loaded yet; retry shortly", headers={"Retry-After": "1"})
        feature_set = state.feature_set_version
    try:
        exists = await asyncio.to_thread(lambda: (registry.feature_set_dir(feature_set) / FEATURE_SET_FILE).is_file())
    except RegistryError as exc:
        raise ApiError(404, "version_not_found", str(exc)) from None
    if not exists:
        raise ApiError(404, "version_not_found", f"no feature set version {feature_set!r} in the registry")
    folder = await asyncio.to_thread(registry.current_atlas, feature_set)
    if folder is None:
        raise ApiError(
            404,
            "atlas_not_found",
            f"feature set {feature_set!r} has no atlas yet; build one with POST /jobs/atlas",
        )
    return feature_set, folder


@lru_cache(maxsize=16)
def _read(folder: Path) -> dict[str, Any]:
    """An atlas index, parsed once per folder (atlas folders are never changed once written)."""
    return read_atlas(folder)


def _feature(data: dict[str, Any], feature: int, version: str) -> dict[str, Any]:
    entry = data["features"].get(str(feature))
    if entry is None:
        groups = [e.get("group") for e in data["features"].values()]
        held = ", ".join(
            f"{groups.count(g)} {g.replace('_', '-')}"
            for g in ("discriminative", "upper_tail", "lower_tail")
            if g in groups
        )
        raise ApiError(
            404,
            "feature_not_in_atlas",
            f"feature {feature} is not in the atlas of feature set {version!r}: it holds {held} features "
            "(every discriminative one and a sample of each tail; GET /atlas lists them)",
        )
    return entry
