"""Job endpoints: queue discovery, regularised fine-tuning, evaluation and atlases; follow and cancel them.

Jobs run on Celery workers when ``QSCORE_REDIS_URL`` is set (records in Redis survive a restart
of the API) and in-process otherwise (embedded mode). Every parameter and every name (data
sets, model and feature-set versions) is checked before anything is queued: 422. Redis down: 503.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, status
from kombu.exceptions import OperationalError
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.convertors import Convertor, register_url_convertor

from qscore_config.settings import Settings
from service.deps import SettingsDep
from service.schemas import ErrorResponse
from service.security import AdminKey
from worker.backend import JobBackend, make_backend
from worker.embedded import job_db
from worker.metrics import export_on
from worker.params import (
    AtlasParams,
    DiscoverParams,
    EvaluateParams,
    ParamConflict,
    ParamError,
    RegularizeParams,
    resolve,
)
from worker.store import JobEnded, JobRecord, TooManyQueuedJobs

router = APIRouter(
    prefix="/jobs",
    tags=["jobs"],
    responses={
        400: {"model": ErrorResponse, "description": "A body that is not JSON (malformed_body)."},
        401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key (when configured)."},
        422: {"model": ErrorResponse, "description": "Invalid parameters or names (invalid_request)."},
        503: {
            "model": ErrorResponse,
            "description": "The job store or broker is unreachable (job_store_unavailable), or "
            "QSCORE_MAX_QUEUED_JOBS jobs wait to start (too_many_queued_jobs); see Retry-After.",
        },
    },
)
_NOT_FOUND = {404: {"model": ErrorResponse, "description": "No job with this id (job_not_found)."}}
_CONFLICT = {
    409: {
        "model": ErrorResponse,
        "description": "Existing names that do not fit together: a feature set of another model, a model "
        "without feature set, no active model (feature_set_mismatch).",
    }
}

JOB_ID_REGEX = "[0-9a-f]{32}"


class _JobIdConvertor(Convertor[str]):
    """Paths like /jobs/discover are no job id: they do not match /jobs/{job_id} (405, not 422)."""

    regex = JOB_ID_REGEX

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_id", _JobIdConvertor())
JobId = Annotated[str, Path(pattern=f"^{JOB_ID_REGEX}$", description="The id answered when the job was queued.")]
_lock = threading.Lock()


def job_backend_of(app: Any, settings: Settings) -> JobBackend:
    """The app's job backend, made on first use: start-up never waits on Redis, nor does scoring."""
    backend = getattr(app.state, "job_backend", None)
    if backend is None:
        with _lock:
            backend = getattr(app.state, "job_backend", None)
            if backend is None:
                backend = make_backend(settings)
                registry = getattr(getattr(app.state, "metrics", None), "registry", None)
                if registry is not None:
                    export_on(registry, backend.store, embedded=settings.redis_url is None)
                app.state.job_backend = backend
    return backend


def get_job_backend(request: Request, settings: SettingsDep) -> JobBackend:
    return job_backend_of(request.app, settings)


def start_embedded_jobs(app: Any, settings: Settings) -> None:
    """Embedded mode, at start-up: resume the jobs a previous run left queued or running."""
    if settings.redis_url is None and job_db(settings).is_file():
        job_backend_of(app, settings)


def stop_jobs(app: Any) -> None:
    backend = getattr(app.state, "job_backend", None)
    if backend is not None:
        backend.shutdown()


Backend = Annotated[JobBackend, Depends(get_job_backend)]


class JobAccepted(BaseModel):
    job_id: str
    state: str
    type: str
    url: str


class JobList(BaseModel):
    jobs: list[JobRecord]


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    """Redis or the broker unreachable: 503 with a body that says so (scoring is not affected)."""
    try:
        yield
    except (RedisError, OperationalError, ConnectionError, TimeoutError) as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={
                "code": "job_store_unavailable",
                "message": f"the job store (Redis) or the broker is unreachable; retry later ({type(exc).__name__})",
            },
            headers={"Retry-After": "5"},
        ) from None


def _submit(
    job_type: Literal["discover", "regularize", "evaluate", "atlas"],
    params: Any,
    backend: JobBackend,
    settings: Settings,
    request: Request,
) -> JobAccepted:
    try:
        resolved = resolve(params, settings)
    except ParamConflict as exc:
        raise HTTPException(409, detail={"code": "feature_set_mismatch", "message": str(exc)}) from None
    except ParamError as exc:
        raise HTTPException(
            422,  # Starlette renamed the constant; the number is stable
            detail={
                "code": "invalid_request",
                "message": f"invalid request: body.{exc.field}: {exc}",
                "errors": [{"loc": ["body", *exc.field.split(".")], "msg": str(exc), "type": "value_error"}],
            },
        ) from None
    with _store_errors():
        try:
            record = backend.store.create(
                job_type, resolved.model_dump(mode="json", by_alias=True), max_queued=settings.max_queued_jobs
            )
        except TooManyQueuedJobs as exc:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                detail={
                    "code": "too_many_queued_jobs",
                    "message": f"{exc}; retry when some have started",
                    "limit": exc.limit,
                },
                headers={"Retry-After": "30"},
            ) from None
        try:
            backend.enqueue(record)
        except Exception:
            # the client gets a 503 and no job id: leave no record (nor a failed count) behind
            backend.store.discard(record.id)
            raise
    return JobAccepted(
        job_id=record.id,
        state=record.state,
        type=job_type,
        url=str(request.url_for("get_job", job_id=record.id)),
    )


@router.post("/discover", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_CONFLICT)
def submit_discover(
    body: DiscoverParams, backend: Backend, settings: SettingsDep, request: Request, _: AdminKey
) -> JobAccepted:
    """Discover a model's features on a configured data set (sharded); writes a feature set."""
    return _submit("discover", body, backend, settings, request)


@router.post("/regularize", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_CONFLICT)
def submit_regularize(
    body: RegularizeParams, backend: Backend, settings: SettingsDep, request: Request, _: AdminKey
) -> JobAccepted:
    """Q-Score-regularised fine-tuning; writes a model version and its feature set."""
    return _submit("regularize", body, backend, settings, request)


@router.post("/evaluate", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_CONFLICT)
def submit_evaluate(
    body: EvaluateParams, backend: Backend, settings: SettingsDep, request: Request, _: AdminKey
) -> JobAccepted:
    """Linear evaluation; writes the calibrated feature set as a new version."""
    return _submit("evaluate", body, backend, settings, request)


@router.post("/atlas", status_code=status.HTTP_202_ACCEPTED, response_model=JobAccepted, responses=_CONFLICT)
def submit_atlas(
    body: AtlasParams, backend: Backend, settings: SettingsDep, request: Request, _: AdminKey
) -> JobAccepted:
    """The feature atlas of a feature set on a data set; served by GET /atlas."""
    return _submit("atlas", body, backend, settings, request)


@router.get("", response_model=JobList)
def list_jobs(
    backend: Backend,
    _: AdminKey,
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JobList:
    """Jobs, newest first."""
    with _store_errors():
        return JobList(jobs=backend.store.list(limit=limit, state=state))


@router.get("/{job_id:job_id}", response_model=JobRecord, responses=_NOT_FOUND)
def get_job(job_id: JobId, backend: Backend, _: AdminKey) -> JobRecord:
    """State, progress (0 to 1), metrics so far, result and artifacts of one job."""
    with _store_errors():
        record = backend.store.get(job_id)
    return _found(record, job_id)


@router.delete(
    "/{job_id:job_id}",
    response_model=JobRecord,
    responses={
        **_NOT_FOUND,
        409: {"model": ErrorResponse, "description": "The job had already ended: nothing to cancel (job_finished)."},
    },
)
def cancel_job(job_id: JobId, backend: Backend, _: AdminKey) -> JobRecord:
    """Cancel: a queued job never starts; a running one stops at its next step ('cancelled')."""
    with _store_errors():
        try:
            record = backend.store.request_cancel(job_id)
        except JobEnded as exc:  # say so: a 200 with the record unchanged reads as done
            raise HTTPException(409, detail={"code": "job_finished", "message": str(exc)}) from exc
    return _found(record, job_id)


def _found(record: JobRecord | None, job_id: str) -> JobRecord:
    if record is None:
        raise HTTPException(404, detail={"code": "job_not_found", "message": f"no job {job_id}"})
    return record
