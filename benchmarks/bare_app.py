"""The bare-framework ceiling of /score (benchmarks only): FastAPI under the same uvicorn, parsing
the same multipart body and decoding every image with Pillow, but no model, no batching, no
metrics. What the framework alone costs per request on this machine.

    python -m uvicorn --factory benchmarks.bare_app:create_app --no-access-log
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from starlette.datastructures import UploadFile

from models.data.images import decode_image


def create_app() -> FastAPI:
    app = FastAPI(title="bare multipart + Pillow decode")

    @app.post("/score")
    async def score(request: Request) -> Response:
        form = await request.form(max_files=64, max_fields=16)
        sizes = []
        for part in form.getlist("files"):
            if isinstance(part, UploadFile):
                sizes.append(decode_image(await part.read()).size[0])
        return Response(b'{"decoded": %d}' % len(sizes), media_type="application/json")

    return app
