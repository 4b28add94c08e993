"""Job endpoints (issue 4): placeholder router until the job API lands."""

from fastapi import APIRouter

router = APIRouter(prefix="/jobs", tags=["jobs"])
