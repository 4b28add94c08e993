"""The admin API key: required on admin and job endpoints when one is configured."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Security, status
from fastapi.security import APIKeyHeader

from qscore_config.settings import Settings
from service.deps import get_app_settings

API_KEY_HEADER = "X-API-Key"
_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="Needed when QSCORE_API_KEY is set.")


async def require_api_key(
    settings: Annotated[Settings, Depends(get_app_settings)],
    key: Annotated[str | None, Security(_header)] = None,
) -> None:
    if settings.api_key is None:
        return
    if key is None or not secrets.compare_digest(key.encode(), settings.api_key.get_secret_value().encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail={"code": "unauthorized", "message": f"this endpoint needs a valid {API_KEY_HEADER} header"},
        )


AdminKey = Annotated[None, Depends(require_api_key)]
