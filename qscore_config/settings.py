"""All configuration, for the service and the workers alike: one pydantic-settings class.

Every value comes from an environment variable prefixed ``QSCORE_`` (or a ``.env`` file), e.g.
``QSCORE_REDIS_URL=redis://127.0.0.1:6379/0``. Bad values fail at start-up, not mid-request.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QSCORE_", env_file=".env", extra="ignore")

    # -- model and feature set ------------------------------------------------------------
    registry_root: Path = Field(Path(".qscore/registry"), description="Versions of models and feature sets.")
    model_version: str | None = Field(None, description="Model version to serve; default: the registry's active pair.")
    feature_set_version: str | None = Field(None, description="Feature set to serve with it.")
    auto_switch: bool = Field(
        False,
        description="Follow every change of the registry's active pair, and activate job outputs by default "
        "(a job's own activation is followed without it).",
    )
    registry_poll_seconds: float = Field(2.0, gt=0, description="How often the registry's active pair is checked.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    precision: Literal["float32", "float16", "bfloat16"] = "float32"
    runtime: Literal["torch", "onnxruntime", "auto"] = Field(
        "torch",
        description="What runs the encoder: torch; onnxruntime (an ONNX export, made once at load and cached in "
        "the registry); auto (onnxruntime where it is installed and the encoder exports, else torch). ONNX "
        "encoders always run on ONNX Runtime.",
    )
    intra_op_threads: int | None = Field(
        None,
        ge=1,
        description="Threads of one encoder operator, torch's and ONNX Runtime's alike; default: for torch the "
        "cores this process may use less one (at least 1), left to the event loop; for ONNX Runtime all of them "
        "(its idle threads sleep).",
    )

    # -- continuous batching --------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, le=4096)
    max_batch_wait_ms: float = Field(
        0.0,
        ge=0,
        description="Longest an idle encoder holds a batch that is not full, from its first image's arrival; "
        "0 = start at once.",
    )
    max_queue_images: int = Field(1024, ge=1, description="Images waiting for the encoder; beyond it, 503.")
    decode_threads: int = Field(2, ge=1, description="Threads decoding and preprocessing large uploads.")
    torch_threads: int | None = Field(
        None, ge=1, description="Deprecated: the old name of QSCORE_INTRA_OP_THREADS, read when that is unset."
    )
    decode_inline_bytes: int = Field(
        65536,
        ge=0,
        description="Uploads of at most this many bytes in all are decoded on the event loop (a thread hop "
        "costs more than decoding small images); larger ones in the decode threads.",
    )

    device_decode: bool = Field(
        False,
        description="Decode JPEG uploads on the encoder's device, in batches (nvJPEG on CUDA); pixels, and so "
        "scores, may differ from Pillow's by rounding.",
    )

    # -- explanations (POST /explain) -------------------------------------------------------
    max_explain_queue: int = Field(
        4,
        ge=1,
        le=1024,
        description="Explanations waiting or running (one at a time, in their own thread, never in the /score "
        "batches); beyond it POST /explain answers 503.",
    )

    # -- traffic monitor (GET /monitor, issue 15) ---------------------------------------------
    monitor: bool = Field(
        True,
        description="Keep a window of the recent images of the served model: their estimated error and the "
        "drift of their representations (GET /monitor, /metrics).",
    )
    monitor_window: int = Field(500, ge=10, le=100_000, description="Images in the window, per served model.")
    drift_every: int = Field(100, ge=1, description="New images between two drift tests of the window.")
    drift_min_interval_s: float = Field(
        10.0,
        ge=0,
        description="Least seconds between two drift tests (a test takes tens of ms of one core; at 1,000 "
        "images/s one every 100 images would cost a core, and Prometheus reads them once a scrape).",
    )
    drift_permutations: int = Field(
        500,
        ge=300,
        le=10_000,
        description="Permutations of the drift test's MMD; its p-value is at least 1 / (1 + this), and the "
        "combined drift p-value (up to three tests, Bonferroni) at least 3 / (1 + this): 300 or more can go below "
        "0.01.",
    )
    drift_reference_size: int = Field(
        1000, ge=10, le=20_000, description="Reference-bank vectors the window is tested against (a fixed sample)."
    )

    # -- serving --------------------------------------------------------------------------
    access_log: bool = Field(False, description="Log one INFO line per request (uvicorn's access log).")

    # -- request limits -------------------------------------------------------------------
    max_request_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_files: int = Field(64, ge=1)
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)

    # -- security -------------------------------------------------------------------------
    api_key: SecretStr | None = Field(None, description="When set, admin and job endpoints need header X-API-Key.")

    # -- jobs -----------------------------------------------------------------------------
    redis_url: str | None = Field(
        None, description="Job store and result backend (and broker unless QSCORE_BROKER_URL); unset = embedded."
    )
    broker_url: str | None = Field(
        None,
        description="Celery broker, e.g. amqp://guest:guest@rabbitmq:5672//; default: QSCORE_REDIS_URL. RabbitMQ "
        "re-delivers the job of a lost worker at once (connection closed) or after the heartbeat timeout.",
    )
    broker_heartbeat_s: float = Field(
        20.0,
        ge=0,
        description="AMQP heartbeat: RabbitMQ drops a silent (cut-off, frozen) worker's connection after about "
        "twice this, and re-delivers its job; 0 = none.",
    )
    max_queued_jobs: int = Field(100, ge=1, description="Jobs waiting to start; beyond it, POST /jobs/* answers 503.")
    datasets: dict[str, Path] = Field(default_factory=dict, description='JSON: {"name": "/folder"}.')
    job_time_limit_s: int = Field(6 * 3600, ge=10)
    job_checkpoint_dir: Path = Field(Path(".qscore/checkpoints"))
    cifar10_archive: Path = Field(
        Path("../shared/data/cifar10-jpeg.tar.gz"),
        description="The CIFAR-10 JPEG archive that tests, experiments and benchmarks extract.",
    )
    data_cache: Path = Field(Path(".cache/data"), description="Where data archives are extracted, once.")
    job_visibility_timeout_s: int | None = Field(
        None, ge=10, description="Redis re-delivers an unacknowledged job after this; default: time limit + 10 min."
    )
    discover_shard_size: int = Field(2000, ge=1, description="Reference images per discovery shard task.")
    worker_metrics_port: int | None = Field(
        None, ge=1, le=65535, description="Prometheus port of a worker (job durations, outcomes); unset = none."
    )
    worker_metrics_dir: Path = Field(
        Path(".qscore/worker-metrics"), description="prometheus_client multiprocess folder of a worker."
    )
    worker_torch_threads: int | None = Field(None, ge=1, description="torch threads per worker process.")

    @field_validator("datasets")
    @classmethod
    def _dataset_names(cls, value: dict[str, Path]) -> dict[str, Path]:
        for name in value:
            if not name or len(name) > 80 or not all(c.isalnum() or c in "._-" for c in name):
                raise ValueError(f"data set name {name!r}: use letters, digits, '.', '_' and '-'")
        return value

    @model_validator(mode="after")
    def _pairing(self) -> Settings:
        if self.feature_set_version and not self.model_version:
            raise ValueError("QSCORE_FEATURE_SET_VERSION needs QSCORE_MODEL_VERSION too")
        return self

    @model_validator(mode="after")
    def _drift_cadence(self) -> Settings:
        if self.drift_every > self.monitor_window:
            raise ValueError(
                f"QSCORE_DRIFT_EVERY ({self.drift_every}) must not exceed QSCORE_MONITOR_WINDOW "
                f"({self.monitor_window}), or images pass between tests without being in any tested window"
            )
        return self

    @model_validator(mode="after")
    def _visibility(self) -> Settings:
        if self.job_visibility_timeout_s is not None and self.job_visibility_timeout_s <= self.job_time_limit_s:
            raise ValueError(
                "QSCORE_JOB_VISIBILITY_TIMEOUT_S must exceed QSCORE_JOB_TIME_LIMIT_S, or Redis re-delivers "
                "jobs that are still running"
            )
        return self

    @model_validator(mode="after")
    def _broker(self) -> Settings:
        if self.broker_url and not self.redis_url:
            raise ValueError("QSCORE_BROKER_URL needs QSCORE_REDIS_URL too (job records and results live in Redis)")
        if self.broker_url and not self.broker_url.startswith(
            ("amqp://", "amqps://", "pyamqp://", "redis://", "rediss://")
        ):
            raise ValueError(
                f"QSCORE_BROKER_URL must be an amqp:// or redis:// URL, got {self.broker_url.split(':')[0]!r}"
            )
        return self

    @property
    def broker(self) -> str | None:
        """The Celery broker: QSCORE_BROKER_URL, else QSCORE_REDIS_URL."""
        return self.broker_url or self.redis_url

    @property
    def broker_is_amqp(self) -> bool:
        return bool(self.broker and self.broker.split("://")[0] in ("amqp", "amqps", "pyamqp"))

    @property
    def job_hard_time_limit_s(self) -> int:
        """Hard limit: the process running the job is killed (soft limit + 60 s to clean up)."""
        return self.job_time_limit_s + 60

    @model_validator(mode="after")
    def _runtime_precision(self) -> Settings:
        if self.runtime == "onnxruntime" and self.precision != "float32":
            raise ValueError(
                f"QSCORE_PRECISION={self.precision} is a torch setting; QSCORE_RUNTIME=onnxruntime serves float32 "
                "(use QSCORE_RUNTIME=torch for reduced precision)"
            )
        return self

    @property
    def inference_threads(self) -> int:
        """QSCORE_INTRA_OP_THREADS (or its old name QSCORE_TORCH_THREADS), else the cores this process may use
        less one, at least 1: the event loop keeps a core (benchmarks/results/ab-issue14.json: with both
        cores to the encoder, /score at one connection ran at 0.5x the earlier default's on this 2-core
        machine, 0.8x with one)."""
        return self.intra_op_threads or self.torch_threads or max(1, usable_cores() - 1)

    @property
    def onnxruntime_threads(self) -> int:
        """ONNX Runtime's intra-op threads: QSCORE_INTRA_OP_THREADS (or its old name), else every core this
        process may use. Its idle pool threads sleep instead of spinning (``allow_spinning`` 0), so, unlike
        torch's, they leave the event loop the cores between operators (benchmarks/results/ab-ort-threads.json:
        /score at 32 connections 1.29x with 2 threads against 1 on this 2-core machine, 0.90x at 1 connection)."""
        return self.intra_op_threads or self.torch_threads or usable_cores()

    @property
    def visibility_timeout_s(self) -> int:
        """Above the longest job (hard limit included), so that no running job is delivered twice."""
        return self.job_visibility_timeout_s or self.job_time_limit_s + 600


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


@lru_cache
def get_settings() -> Settings:
    return Settings()
