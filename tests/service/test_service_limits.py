"""The body-size middleware on its own: declared and chunked bodies; a bug's 500 in the errors' JSON shape."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.app import _http_error, _unexpected_error, create_app
from service.limits import BodyLimitMiddleware


def small_app(limit: int) -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimitMiddleware, max_bytes=limit)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    return app


async def post(app: FastAPI, content: bytes | object) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        return await client.post("/echo", content=content)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_body_limit_under_limit_passes(anyio_backend: str) -> None:
    response = await post(small_app(1000), b"x" * 1000)
    assert response.status_code == 200 and response.json() == {"received": 1000}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_body_limit_declared_length_over_limit_is_413(anyio_backend: str) -> None:
    response = await post(small_app(1000), b"x" * 1001)
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "request_too_large"
    assert response.json()["detail"]["limit"] == 1000


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_body_limit_chunked_body_over_limit_is_413(anyio_backend: str) -> None:
    async def chunks():
        for _ in range(10):
            yield b"x" * 300

    response = await post(small_app(1000), chunks())
    assert response.status_code == 413
    assert response.json()["detail"] == {
        "code": "request_too_large",
        "limit": 1000,
        "message": response.json()["detail"]["message"],
    }


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_unexpected_exception_is_a_json_500_naming_no_internals(anyio_backend: str) -> None:
    app = FastAPI()
    app.add_exception_handler(Exception, _unexpected_error)

    @app.get("/bug")
    async def bug() -> None:
        raise RuntimeError("secret path /srv/registry/x")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/bug")
    assert response.status_code == 500 and response.headers["content-type"] == "application/json"
    assert response.json() == {
        "detail": {
            "code": "internal_error",
            "message": "the server failed on this request (RuntimeError); its log has the details",
        }
    }
    assert create_app().exception_handlers[Exception] is _unexpected_error  # the service's app has it
