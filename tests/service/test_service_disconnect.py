"""Clients that hang up (mid-upload, or while their images wait): status 499, no traceback, and
their images never reach the encoder. A real server and raw sockets that really close."""

from __future__ import annotations

import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from service_helpers import LiveServer

BOUNDARY = "qscore-test-boundary"


def multipart(blob: bytes, name: str = "a.jpg") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + blob
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def request_head(port: int, length: int) -> bytes:
    return (
        f"POST /score HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


class ErrorRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture()
def server_errors() -> Iterator[ErrorRecords]:
    """ERROR records of uvicorn ("Exception in ASGI application") and of the service."""
    handler = ErrorRecords()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "uvicorn", "service")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def jpeg(cifar_slice: Path) -> bytes:
    return sorted((cifar_slice / "test").rglob("*.jpg"))[0].read_bytes()


def test_client_hanging_up_mid_upload_is_499_not_500(
    make_server: Callable[..., LiveServer], cifar_slice: Path, server_errors: ErrorRecords
) -> None:
    live = make_server()
    body = multipart(jpeg(cifar_slice))
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request_head(live.port, len(body)) + body[: len(body) // 2])
        time.sleep(0.2)  # the server is now parsing a body that will never be complete
    wait_for(lambda: live.metric("qscore_request_duration_seconds_count", status="499") == 1)
    assert live.metric("qscore_request_duration_seconds_count", status="500") == 0
    assert live.metric("qscore_batch_size_count") == 0
    assert server_errors.records == [], [r.getMessage() for r in server_errors.records]
    with live.client() as client:  # and it still serves
        ok = client.post("/score", files=[("files", ("b.jpg", jpeg(cifar_slice), "image/jpeg"))])
    assert ok.status_code == 200 and ok.json()["results"][0]["q_score"] is not None


def test_client_hanging_up_while_waiting_drops_its_images_before_the_encoder(
    make_server: Callable[..., LiveServer], cifar_slice: Path, server_errors: ErrorRecords
) -> None:
    # An idle encoder holds a batch that is not full for up to 3 s: the request waits there.
    live = make_server(max_batch_wait_ms=3000.0, max_batch_size=16)
    body = multipart(jpeg(cifar_slice), f"{uuid.uuid4().hex}.jpg")
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        sock.sendall(request_head(live.port, len(body)) + body)
        wait_for(lambda: live.metric("qscore_queue_depth") == 1, 2.0)
    wait_for(lambda: live.metric("qscore_request_duration_seconds_count", status="499") == 1)
    assert live.metric("qscore_queue_depth") == 0  # dropped at once, not when the batch would run
    time.sleep(3.2)  # past the batch's wait bound: had the image stayed queued, it would run now
    assert live.metric("qscore_batch_size_count") == 0
    assert live.metric("qscore_images_scored_total") == 0
    assert live.metric("qscore_request_duration_seconds_count", status="500") == 0
    assert server_errors.records == [], [r.getMessage() for r in server_errors.records]
