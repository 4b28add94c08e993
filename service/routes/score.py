"""POST /score: multipart images in, one Q-Score result per file out.

The hot path: no pydantic model is built per request (the answer is plain dicts serialised by
orjson, its ``model``/``feature_set`` part made once per served pair), small uploads are decoded
on the event loop, and one future per request carries the scores back from the batcher.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
import orjson
from fastapi import APIRouter, Query, Request, Response
from starlette.types import Receive

from models.data.images import ImageDecodeError, decode_image
from models.scoring.result import ImageScore, error_row
from service.batcher import BatcherStopped, QueueFull
from service.deps import ScoringDep
from service.device_decode import decodable_on_device
from service.limits import ApiError, ClientGone, read_uploads
from service.openapi import image_upload_body
from service.schemas import ErrorResponse, ScoreResponse
from service.state import ServingState

router = APIRouter(tags=["scoring"])

#: Not an HTTP status anyone receives: nginx's "client closed request", for the metrics.
CLIENT_CLOSED_REQUEST = 499


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
    openapi_extra={"requestBody": image_upload_body("JPEG, PNG, WebP, BMP or GIF (first frame) images.")},
)
async def score(
    request: Request,
    scoring: ScoringDep,
    features: Annotated[
        bool, Query(description="Also list each image's dominant and active discriminative features.")
    ] = False,
    predict: Annotated[
        bool,
        Query(description="Also give each image's predicted_class and confidence from the served head (if any)."),
    ] = False,
) -> Response:
    """Q-Score of each uploaded image; files that are not usable images get an ``error`` entry."""
    settings, state, batcher, metrics = scoring.settings, scoring.state, scoring.batcher, scoring.metrics
    started = time.perf_counter()
    status = 500
    version = state.model_version
    try:
        if batcher.saturated:  # answer before parsing and decoding: an overloaded loop starves the encoder
            raise _queue_full(batcher.queue_full())
        files = await read_uploads(request, max_files=settings.max_files, max_file_bytes=settings.max_file_bytes)
        names = [f.filename or "" for f in files]
        blobs = []
        for f in files:
            blobs.append(await f.read())
            await f.close()
        if sum(len(b) for b in blobs) <= settings.decode_inline_bytes:
            prepared = _prepare(state, blobs, settings.max_image_pixels, settings.device_decode)
        else:
            prepared = await asyncio.get_running_loop().run_in_executor(
                scoring.decode_pool, _prepare, state, blobs, settings.max_image_pixels, settings.device_decode
            )
        images = [p for p in prepared if not isinstance(p, ImageDecodeError)]
        try:
            pending = batcher.enqueue(state, images, features)
        except QueueFull as exc:
            raise _queue_full(exc) from exc
        except BatcherStopped as exc:
            raise ApiError(503, "not_ready", str(exc), headers={"Retry-After": "1"}) from exc
        try:
            scores = iter(await _unless_client_leaves(pending, request.receive))
        except BatcherStopped as exc:
            raise ApiError(503, "not_ready", str(exc), headers={"Retry-After": "1"}) from exc
        results, verdicts = [], []
        for name, p in zip(names, prepared, strict=True):
            outcome = p if isinstance(p, ImageDecodeError) else next(scores)
            if isinstance(outcome, ImageDecodeError):  # from Pillow here, or from the device decoder
                metrics.error(version, outcome.code)
                results.append(_error_result(name, outcome))
            else:
                verdicts.append(outcome)
                row = outcome.row()
                if not predict:
                    row["predicted_class"] = row["confidence"] = None
                results.append({"filename": name, **row, "error": None})
        metrics.observe_scores(state.model_version, state.feature_set_version, verdicts)
        status = 200
        return Response(orjson.dumps({**state.response_header, "results": results}), media_type="application/json")
    except ApiError as exc:
        status = exc.status_code
        metrics.error(version, exc.code)
        raise
    except ClientGone:
        status = CLIENT_CLOSED_REQUEST  # the client's doing, not an error of the service
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it: the connection is gone
    finally:
        metrics.request_duration.labels(version, str(status)).observe(time.perf_counter() - started)


def _queue_full(exc: QueueFull) -> ApiError:
    return ApiError(
        503,
        "queue_full",
        f"{exc}; retry after {exc.retry_after} s",
        exc.capacity,
        headers={"Retry-After": str(exc.retry_after)},
    )


async def _unless_client_leaves(pending: asyncio.Future[list[ImageScore]], receive: Receive) -> list[ImageScore]:
    """Wait for the scores; if the client hangs up first, cancel them (the batcher drops the
    images not yet encoded) and raise :class:`ClientGone`.

    The body is read by now, so the next ASGI message can only be ``http.disconnect``.
    """
    watcher = asyncio.ensure_future(_disconnected(receive))
    watcher.add_done_callback(lambda _: pending.cancel())
    try:
        return await pending
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientGone() from None
        raise
    finally:
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _prepare(
    state: ServingState, blobs: list[bytes], max_pixels: int, device_decode: bool
) -> list[np.ndarray | bytes | ImageDecodeError]:
    """Decode, resize and crop (on the event loop for small uploads, else in the decode pool);
    the batch's conversion to tensors happens in the inference thread. With ``device_decode``,
    JPEG files go as they are, to be decoded there on the device."""
    out: list[np.ndarray | bytes | ImageDecodeError] = []
    for blob in blobs:
        if device_decode and decodable_on_device(blob, max_pixels):
            out.append(blob)
            continue
        try:
            out.append(state.scorer.preprocess(decode_image(blob, max_pixels)))
        except ImageDecodeError as exc:
            out.append(exc)
    return out


def _error_result(name: str, exc: ImageDecodeError) -> dict[str, Any]:
    row = error_row(exc.code, exc.message)
    row["error"] |= {"limit": exc.limit, "errors": None}
    return {"filename": name, **row}
