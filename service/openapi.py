"""The served OpenAPI document says what this server, as configured, does (checked by schemathesis
with all its checks in tests/service/test_service_openapi.py).

FastAPI's generated document is adjusted where only the configuration knows the answer:
- the API key: declared (with its 401) only when ``QSCORE_API_KEY`` is set, else nothing asks
  for it;
- the names a job may use: data sets are an ``enum`` of ``QSCORE_DATASETS``; model and feature
  set versions an ``enum`` of the registry's versions when the document is asked for (the
  registry grows, so the document is built per request: it is small);
- ``/score`` takes at most ``QSCORE_MAX_FILES`` files (``maxItems``);
- every 422 is the service's ``ErrorResponse`` (``{"detail": {"code", "message", "errors"}}``),
  never FastAPI's ``HTTPValidationError``, which the service does not answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from models.registry.versions import Registry
from qscore_config.settings import Settings

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
DATASET_FIELDS = ("dataset", "train_dataset", "test_dataset")
JOB_PARAMS = ("DiscoverParams", "RegularizeParams", "EvaluateParams", "AtlasParams")


def image_upload_body(description: str, max_items: int | None = None) -> dict[str, Any]:
    """The OpenAPI request body of an image upload: multipart ``files``, at least one (at most ``max_items``)."""
    files: dict[str, Any] = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
    if max_items is not None:
        files["maxItems"] = max_items
    files["description"] = description
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["files"], "properties": {"files": files}},
                "encoding": {"files": {"contentType": "image/*, application/octet-stream"}},
            }
        },
    }


def install(app: FastAPI, settings: Settings) -> None:
    """Serve the adjusted document at /openapi.json (and to /docs)."""

    def openapi() -> dict[str, Any]:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            summary=app.summary,
            description=app.description,
            routes=app.routes,
        )
        return adjust(schema, settings, Registry(settings.registry_root))

    app.openapi = openapi  # type: ignore[method-assign]


def adjust(schema: dict[str, Any], settings: Settings, registry: Registry) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for operation in _operations(schema):
        responses = operation.get("responses", {})
        if "422" in responses:
            responses["422"]["content"] = {"application/json": {"schema": ERROR_REF}}
        if settings.api_key is None:
            operation.pop("security", None)
            responses.pop("401", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    if settings.api_key is None:
        components.pop("securitySchemes", None)
    _enum_names(schemas, settings, registry)
    _file_limit(schema, settings.max_files)
    return schema


def _file_limit(schema: dict[str, Any], max_files: int) -> None:
    score = schema.get("paths", {}).get("/score", {}).get("post", {})
    body = score.get("requestBody", {}).get("content", {}).get("multipart/form-data", {})
    files = body.get("schema", {}).get("properties", {}).get("files")
    if files is not None:
        files["maxItems"] = max_files


def _operations(schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [op for path in schema.get("paths", {}).values() for op in path.values() if isinstance(op, dict)]


def _enum_names(schemas: dict[str, Any], settings: Settings, registry: Registry) -> None:
    datasets = sorted(settings.datasets)
    try:
        models = sorted(m.version for m in registry.list_models())
        feature_sets = sorted(v for v, _ in registry.list_feature_sets())
    except Exception:  # an unreadable registry: the names stay patterns, the server still answers 422
        models, feature_sets = [], []
    names = {"model": models, "feature_set": feature_sets, **{f: datasets for f in DATASET_FIELDS}}
    for component, body in schemas.items():
        if not component.startswith(JOB_PARAMS):
            continue
        for field, properties in body.get("properties", {}).items():
            if names.get(field):
                _restrict(properties, names[field])


def _restrict(prop: dict[str, Any], values: list[str]) -> None:
    """Add ``enum`` to the string branch of a property (``{"type": "string"}`` or ``anyOf`` with null)."""
    if prop.get("type") == "string":
        prop["enum"] = values
    for branch in prop.get("anyOf", []):
        if branch.get("type") == "string":
            branch["enum"] = values
