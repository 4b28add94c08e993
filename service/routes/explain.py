"""POST /explain: one image in; its verdict, its Q-Score decomposed and heatmaps of its top features out.

Never on /score's hot path: an explanation runs in its own thread (one at a time, one torch
thread, so the inference thread keeps its cores), never in the batcher, and at most
``QSCORE_MAX_EXPLAIN_QUEUE`` explanations wait or run (503 ``explain_busy`` beyond). The upload
goes through the same limits and error codes as /score (``service/limits.py``), with one file a
request; a file that is not a usable image is the request's error (422 with /score's per-file code).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query, Request, Response

from models.data.images import ImageDecodeError, decode_image
from models.explanation.explain import DEFAULT_TOP, MAX_TOP
from service.deps import ExplainingDep
from service.explain_worker import ExplainBusy
from service.limits import ApiError, ClientGone, read_uploads
from service.openapi import image_upload_body
from service.routes.score import CLIENT_CLOSED_REQUEST
from service.schemas import ErrorResponse, ExplainResponse
from service.state import ServingState

router = APIRouter(tags=["explanations"])


@router.post(
    "/explain",
    response_model=ExplainResponse,
    summary="Explain one image's score",
    responses={
        400: {"model": ErrorResponse, "description": "Malformed multipart body (malformed_body)."},
        413: {
            "model": ErrorResponse,
            "description": "request_too_large, too_many_files (one a request), file_too_large.",
        },
        415: {"model": ErrorResponse, "description": "Not multipart/form-data (unsupported_media_type)."},
        422: {
            "model": ErrorResponse,
            "description": "no_files, invalid_files, too_many_fields, invalid_request (top out of range), or the "
            "file is not a usable image: empty_file, not_an_image, corrupt_image, too_many_pixels.",
        },
        503: {"model": ErrorResponse, "description": "explain_busy (with Retry-After) or not_ready."},
    },
    openapi_extra={
        "requestBody": image_upload_body("One JPEG, PNG, WebP, BMP or GIF (first frame) image.", max_items=1)
    },
)
async def explain(
    request: Request,
    explaining: ExplainingDep,
    top: Annotated[int, Query(ge=1, le=MAX_TOP, description=f"Heatmaps of this many features (at most {MAX_TOP}).")] = (
        DEFAULT_TOP
    ),
    arrays: Annotated[bool, Query(description="Also return each heatmap before upsampling as numbers.")] = False,
) -> Response:
    """The image's verdict, its Q-Score decomposed (eq. 3) and heatmaps of its top features."""
    settings, state, worker, metrics = explaining.settings, explaining.state, explaining.worker, explaining.metrics
    version = state.model_version
    started = time.perf_counter()
    try:
        if worker.full:  # answered before the upload is read
            raise _busy(worker.limit)
        files = await read_uploads(
            request, max_files=1, max_file_bytes=settings.max_file_bytes, files_limit="POST /explain takes one image"
        )
        blob = await files[0].read()
        await files[0].close()
        try:
            row = await worker.run(_explain, state, blob, settings.max_image_pixels, top, arrays)
        except ExplainBusy:
            raise _busy(worker.limit) from None
        except ImageDecodeError as exc:
            raise ApiError(422, exc.code, exc.message, exc.limit) from None
        body = {**state.response_header, "filename": files[0].filename or "", **row}
        return Response(orjson.dumps(body), media_type="application/json")
    except ApiError as exc:
        metrics.error(version, exc.code)
        raise
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the connection is gone
    finally:
        metrics.explain_duration.labels(version).observe(time.perf_counter() - started)


def _explain(state: ServingState, blob: bytes, max_pixels: int, top: int, arrays: bool) -> dict[str, Any]:
    """Decode, preprocess and explain (in the explain thread)."""
    pixels = state.scorer.preprocess(decode_image(blob, max_pixels))
    return state.explainer.explain(pixels, top).row(arrays=arrays)


def _busy(limit: int) -> ApiError:
    return ApiError(
        503,
        "explain_busy",
        f"{limit} explanations are waiting or running (QSCORE_MAX_EXPLAIN_QUEUE); retry shortly",
        limit,
        headers={"Retry-After": "1"},
    )
