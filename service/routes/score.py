"""POST /score: multipart images in, one Q-Score result per file out."""

from __future__ import annotations

import asyncio
import time

import torch
from fastapi import APIRouter, Request

from models.images import ImageDecodeError, decode_image
from models.scoring import ImageScore
from service.batcher import BatcherStopped, QueueFull
from service.deps import BatcherDep, DecodePoolDep, MetricsDep, SettingsDep, StateDep
from service.limits import ApiError, read_uploads
from service.metrics import Metrics
from service.schemas import ErrorBody, ErrorResponse, FeatureValueOut, ScoreResponse, ScoreResult
from service.state import ServingState

router = APIRouter(tags=["scoring"])

_MULTIPART_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "minItems": 1,
                        "description": "JPEG, PNG, WebP, BMP or GIF (first frame) images.",
                    }
                },
            },
            "encoding": {"files": {"contentType": "image/*, application/octet-stream"}},
        }
    },
}


@router.post(
    "/score",
    response_model=ScoreResponse,
    summary="Score images",
    responses={
        400: {"model": ErrorResponse, "description": "Malformed multipart body (malformed_body)."},
        413: {
            "model": ErrorResponse,
            "description": "request_too_large, too_many_files or file_too_large.",
        },
        415: {
            "model": ErrorResponse,
            "description": "Not multipart/form-data (unsupported_media_type).",
        },
        422: {"model": ErrorResponse, "description": "no_files, invalid_files or too_many_fields."},
        503: {"model": ErrorResponse, "description": "queue_full (with Retry-After) or not_ready."},
    },
    openapi_extra={"requestBody": _MULTIPART_BODY},
)
async def score(
    request: Request,
    settings: SettingsDep,
    state: StateDep,
    batcher: BatcherDep,
    metrics: MetricsDep,
    pool: DecodePoolDep,
) -> ScoreResponse:
    """Q-Score of each uploaded image; files that are not usable images get an ``error`` entry."""
    started = time.perf_counter()
    status = 500
    version = state.model_version
    try:
        files = await read_uploads(request, max_files=settings.max_files, max_file_bytes=settings.max_file_bytes)
        names = [f.filename or "" for f in files]
        blobs = []
        for f in files:
            blobs.append(await f.read())
            await f.close()
        prepared = await asyncio.get_running_loop().run_in_executor(
            pool, _prepare, state, blobs, settings.max_image_pixels
        )
        tensors = [p for p in prepared if isinstance(p, torch.Tensor)]
        try:
            scores = iter(await batcher.submit(state, tensors))
        except QueueFull as exc:
            raise ApiError(
                503,
                "queue_full",
                f"{exc}; retry after {exc.retry_after} s",
                exc.capacity,
                headers={"Retry-After": str(exc.retry_after)},
            ) from exc
        except BatcherStopped as exc:
            raise ApiError(503, "not_ready", str(exc), headers={"Retry-After": "1"}) from exc
        results = []
        for name, p in zip(names, prepared, strict=True):
            if isinstance(p, ImageDecodeError):
                metrics.error(version, p.code)
                results.append(ScoreResult(filename=name, error=ErrorBody(code=p.code, message=p.message)))
            else:
                results.append(_result(name, next(scores)))
        _observe(metrics, state, results)
        status = 200
        return ScoreResponse(model=state.model_info(), feature_set=state.feature_set_info(), results=results)
    except ApiError as exc:
        status = exc.status_code
        metrics.error(version, exc.code)
        raise
    finally:
        metrics.request_duration.labels(version, str(status)).observe(time.perf_counter() - started)


def _prepare(state: ServingState, blobs: list[bytes], max_pixels: int) -> list[torch.Tensor | ImageDecodeError]:
    """Decode and preprocess off the event loop (runs in the decode pool)."""
    out: list[torch.Tensor | ImageDecodeError] = []
    for blob in blobs:
        try:
            out.append(state.scorer.preprocess(decode_image(blob, max_pixels)))
        except ImageDecodeError as exc:
            out.append(exc)
    return out


def _result(name: str, s: ImageScore) -> ScoreResult:
    return ScoreResult(
        filename=name,
        q_score=s.q_score,
        low_quality=s.low_quality,
        typicality=s.typicality,
        atypical=s.atypical,
        risk=s.risk,
        reasons=list(s.reasons),
        l1_norm=s.l1_norm,
        dominant=[FeatureValueOut(index=v.index, value=v.value) for v in s.dominant],
        discriminative_active=[FeatureValueOut(index=v.index, value=v.value) for v in s.discriminative_active],
    )


def _observe(metrics: Metrics, state: ServingState, results: list[ScoreResult]) -> None:
    pair = (state.model_version, state.feature_set_version)
    scored = [r for r in results if r.q_score is not None]
    if not scored:
        return
    metrics.images_scored.labels(*pair).inc(len(scored))
    low = sum(1 for r in scored if r.low_quality)
    if low:
        metrics.low_quality.labels(*pair).inc(low)
    hist = metrics.q_score.labels(*pair)
    for r in scored:
        hist.observe(r.q_score)
    typical = [r.typicality for r in scored if r.typicality is not None]
    if typical:
        typicality_hist = metrics.typicality.labels(*pair)
        for t in typical:
            typicality_hist.observe(t)
        metrics.atypical.labels(*pair).inc(sum(1 for r in scored if r.atypical))
