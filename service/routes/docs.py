"""The human-facing pages, served offline: Swagger UI (/docs), ReDoc (/redoc) and the explorer (/ui).

Swagger UI's and ReDoc's files come from the ``fastapi-offline`` package (its ``static`` folder,
mounted at ``/static-offline-docs``), not a CDN, so the pages work on machines without internet
access. Each page is sent with a Content-Security-Policy that lets it load and connect to this
server only: ReDoc 2 asks for its logo at cdn.redoc.ly, and the browser refuses that request
before it leaves (the page renders without the logo).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/static-offline-docs"
UI_DIR = Path(__file__).resolve().parents[1] / "static" / "ui"

#: This server only; inline scripts and styles for the two generated doc pages; data: for the
#: explorer's base64 heatmaps; blob: workers for ReDoc's search.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "frame-ancestors 'self'; form-action 'self'; base-uri 'self'"
)

router = APIRouter(include_in_schema=False)


class _StaticWithPolicy(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["Content-Security-Policy"] = CSP
        return response


def install(app: FastAPI) -> None:
    """Mount the assets and the explorer, and add the pages (the app is made with docs_url=None)."""
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="static-offline-docs")
    app.mount("/ui", _StaticWithPolicy(directory=UI_DIR, html=True), name="ui")
    app.include_router(router)


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    app = request.app
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - Swagger UI",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    app = request.app
    page = get_redoc_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} - ReDoc",
        redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/")
async def to_ui() -> RedirectResponse:
    return RedirectResponse("/ui/")
