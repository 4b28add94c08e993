"""GET /monitor: the window of recent traffic of the served model (issue 15)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter

from service.deps import MonitorDep
from service.schemas import ModelMonitor, MonitorResponse

router = APIRouter(tags=["monitoring"])


@router.get("/monitor", response_model=MonitorResponse)
async def monitor(traffic: MonitorDep) -> MonitorResponse:
    """Per served model: the window's estimated error, representation drift and flagged shares."""
    if traffic is None:
        return MonitorResponse(enabled=False, models=[])
    return MonitorResponse(enabled=True, models=[ModelMonitor(**dataclasses.asdict(s)) for s in traffic.snapshot()])
