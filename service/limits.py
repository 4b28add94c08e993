"""Request limits: body bytes counted as they arrive, and the multipart upload checks.

FastAPI has no body cap and a Content-Length check alone is bypassed by chunked bodies
(FIELD-NOTES, uploads), so :class:`BodyLimitMiddleware` counts the bytes of every request body
as they are received and answers 413 once the cap is passed.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ApiError(HTTPException):
    """An HTTP error with the service's error body ``{"detail": {"code", "message", "limit"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        limit: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        detail: dict[str, Any] = {"code": code, "message": message}
        if limit is not None:
            detail["limit"] = limit
        super().__init__(status, detail=detail, headers=headers)
        self.code = code


def body_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "request_too_large",
        f"the request body is larger than {limit} bytes "
        "(QSCORE_MAX_REQUEST_BYTES); send fewer or smaller files per request",
        limit,
    )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes:
                    await _send_error(send, body_too_large(self.max_bytes))
                    return
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise body_too_large(self.max_bytes)
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if exceeded and message["status"] != 413:
                    # Whatever the app made of the cut body, the answer is the limit.
                    raise _Replace()
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _Replace:
            await _send_error(send, body_too_large(self.max_bytes))
        except ApiError:
            if not exceeded or started:
                raise
            await _send_error(send, body_too_large(self.max_bytes))


class ClientGone(Exception):
    """The client hung up (mid-upload or while its images waited): not an error of the service."""


class _Replace(Exception):
    """Raised from send to swap a response made from a cut body for the 413."""


async def _send_error(send: Send, error: ApiError) -> None:
    body = json.dumps({"detail": error.detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": error.status_code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def read_uploads(
    request: Request, *, max_files: int, max_file_bytes: int, files_limit: str = "QSCORE_MAX_FILES"
) -> list[UploadFile]:
    """The ``files`` parts of a multipart request, checked against the limits.

    415 when the body is not multipart/form-data, 413 for more than ``max_files`` files or a
    file over ``max_file_bytes``, 422 when no file was sent, 400 for a malformed body;
    :class:`ClientGone` when the client hangs up before the body is complete. ``files_limit``
    names where ``max_files`` comes from, for the 413's message.
    """
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the images as multipart/form-data in field 'files', not {content_type or 'no content type'!r}",
        )
    try:
        form = await request.form(max_files=max_files, max_fields=16, max_part_size=64 * 1024)
    except ClientDisconnect:
        raise ClientGone() from None
    except StarletteHTTPException as exc:
        if isinstance(exc, ApiError):
            raise
        text = str(exc.detail)
        if "Too many files" in text:
            raise ApiError(
                413,
                "too_many_files",
                f"more than {max_files} files in one request ({files_limit}); split the upload",
                max_files,
            ) from exc
        if "Too many fields" in text:
            raise ApiError(422, "too_many_fields", "too many form fields; send only 'files'", 16) from exc
        raise ApiError(400, "malformed_body", f"the multipart body could not be parsed: {text}") from exc
    values = form.getlist("files")
    files = [v for v in values if isinstance(v, UploadFile)]
    if len(files) != len(values):
        raise ApiError(422, "invalid_files", "field 'files' must hold file parts (with a filename), not text")
    if not files:
        # python-multipart drops a part the body ends inside of: a body cut before its closing
        # boundary reads as one with no files
        raise ApiError(
            422,
            "no_files",
            "no complete file in field 'files'; send one or more images (a body cut before its closing boundary "
            "loses its last part)",
        )
    if len(files) > max_files:
        raise ApiError(
            413,
            "too_many_files",
            f"{len(files)} files in one request; the limit is {max_files} ({files_limit})",
            max_files,
        )
    for f in files:
        if f.size is not None and f.size > max_file_bytes:
            raise ApiError(
                413,
                "file_too_large",
                f"file {f.filename!r} has {f.size} bytes; the limit is "
                f"{max_file_bytes} bytes per file (QSCORE_MAX_FILE_BYTES)",
                max_file_bytes,
            )
    return files
