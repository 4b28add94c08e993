"""What a job body is given: its :class:`JobContext` (id, store, settings, the attempt it runs as),
the fencing that stops an attempt once another holds the job, and the exceptions that end a job.

Fencing: every start of a job is a new attempt (``worker.store``); an attempt goes on, and
writes, only while the record says it is the one running. A worker that was cut off and came
back finds a later attempt there and stops without writing (:class:`JobSuperseded`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from models.encoders.device import resolve_device
from models.encoders.loading import ImportedEncoder
from models.registry.versions import Registry
from qscore_config.settings import Settings
from worker.store import JobStore


class JobCancelled(Exception):
    """The job's cancel flag was seen; the job stops and says so."""


class JobAlreadyOver(Exception):
    """A shard of a job that already ended (failed, cancelled): nothing left to do."""


class JobSuperseded(Exception):
    """A later attempt holds the job (this one's worker was cut off, then came back): stop, write nothing."""


@dataclass
class JobContext:
    job_id: str
    store: JobStore
    settings: Settings
    attempt: int = 0  # set by ``lifecycle.start``; carried by the shard tasks of a discovery
    _last_write: float = field(default=0.0, repr=False)

    @property
    def registry(self) -> Registry:
        return Registry(self.settings.registry_root)

    @property
    def scratch(self) -> Path:
        """The job's own folder of intermediate results (discovery shards); removed when it ends."""
        return Path(self.settings.job_checkpoint_dir) / self.job_id

    @property
    def checkpoint(self) -> Path:
        """The resumable training state of a regularize job; removed when it ends."""
        return Path(self.settings.job_checkpoint_dir) / f"{self.job_id}.ckpt"

    @property
    def device(self) -> torch.device:
        return resolve_device(self.settings.device)

    def cached_model(self, version: str) -> ImportedEncoder:
        """Model ``version``, read once per worker process (for inference only: not to be trained)."""
        return _cached_model(str(self.settings.registry_root), version)

    def cancelled(self) -> bool:
        """Cancellation requested? Raises :class:`JobSuperseded` when a later attempt holds the job.

        Asked between training steps, before checkpoints and before every write of an output.
        """
        holds, cancel = self.store.holds(self.job_id, self.attempt)
        if not holds:
            raise JobSuperseded(self._superseded_reason())
        return cancel

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise JobCancelled("stopped between its steps")

    def fence(self) -> None:
        """Go on only while this attempt holds the job (before checkpoints and output writes)."""
        self.cancelled()

    def _superseded_reason(self) -> str:
        record = self.store.get(self.job_id)
        if record is None:
            return "the job record is gone"
        if record.attempts != self.attempt:
            later = record.history[-1] if record.history else None
            where = f" on {later.worker}" if later is not None and later.worker else ""
            return (
                f"attempt {record.attempts}{where} took the job over while this attempt was cut off; "
                "stopped without writing"
            )
        return f"the job ended ({record.state}) while this attempt was cut off; stopped without writing"

    def progress(self, fraction: float, metrics: dict[str, Any] | None = None, *, force: bool = False) -> None:
        """Record progress (0..1) and metrics so far; at most a few writes a second."""
        now = time.monotonic()
        if not force and now - self._last_write < 0.5:
            return
        self._last_write = now
        if not self.store.update(self.job_id, self.attempt, progress=round(min(max(fraction, 0.0), 1.0), 4)):
            raise JobSuperseded(self._superseded_reason())
        if metrics:
            self.merge_metrics(metrics)

    def merge_metrics(self, metrics: dict[str, Any]) -> None:
        if not self.store.merge_metrics(self.job_id, self.attempt, clean(metrics)):
            raise JobSuperseded(self._superseded_reason())


def clean(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    return value


@lru_cache(maxsize=4)
def _cached_model(root: str, version: str) -> ImportedEncoder:
    """Encoders read once per worker process (on first use: never before the pool forks)."""
    return Registry(root).load_model(version)


def forget_models() -> None:
    """Drop the cached encoders (a pool child starts with none: it must not share the parent's)."""
    _cached_model.cache_clear()
