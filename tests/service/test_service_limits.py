"""The body-size middleware on its own: declared and chunked bodies."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.app import _http_error
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
