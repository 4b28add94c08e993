"""Continuous batching: images of concurrent requests are coalesced into encoder batches.

- One inference thread per device. When it is idle, a batch starts at once with what is queued:
  nothing waits for company that may never come. While it is busy, arrivals gather and go
  together into the next batch as soon as it is free (continuous batching).
- ``max_wait`` (``QSCORE_MAX_BATCH_WAIT_MS``, default 0) is only an upper bound for an idle
  encoder to hold a batch that is not full, counted from its *first* image's arrival
  (not from when the worker took it: FIELD-NOTES, TorchServe's flaw).
- The queue is bounded in images; beyond it :class:`QueueFull` (the route answers 503 with
  Retry-After) instead of growing.
- Images carry the :class:`ServingState` they were admitted with; a batch holds one state only,
  so a version switch never mixes versions inside a batch or a request.
- A request whose future is cancelled (its client hung up) has its images dropped before they
  reach the encoder.

Everything except the forward pass runs on the event loop, driven by callbacks: one wake-up
from the inference thread per batch, none per image.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.data.images import ImageDecodeError
from models.monitoring.monitor import TrafficMonitor
from models.scoring.result import ImageScore
from service.device_decode import batch_pixels
from service.metrics import Metrics
from service.state import ServingState

log = logging.getLogger(__name__)


class QueueFull(Exception):
    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the scoring queue is full ({capacity} images)")
        self.capacity = capacity
        self.retry_after = retry_after


class BatcherStopped(RuntimeError):
    pass


@dataclass(eq=False)
class _Request:
    """The images of one request: scored in order, answered together through ``future``."""

    state: ServingState
    future: asyncio.Future[list[ImageScore]]
    arrived: float
    features: bool
    results: list[Any] = field(default_factory=list)
    remaining: int = 0


@dataclass(eq=False, slots=True)
class _Item:
    request: _Request
    index: int
    image: np.ndarray | bytes  # bytes: a JPEG file decoded on the device, in the batch


class Batcher:
    def __init__(
        self,
        max_batch_size: int,
        max_wait_s: float,
        capacity: int,
        metrics: Metrics | None = None,
        intra_op_threads: int | None = None,
        monitor: TrafficMonitor | None = None,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.monitor = monitor
        self.intra_op_threads = intra_op_threads
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._seconds_per_image = 0.01  # running estimate, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        return self.depth >= self.capacity

    def queue_full(self) -> QueueFull:
        """The 503 of a full queue, with how long the queue takes to drain as Retry-After."""
        return QueueFull(self.capacity, max(1, math.ceil(self.depth * self._seconds_per_image)))

    def start(self) -> None:
        if self._executor is None:
            self._loop = asyncio.get_running_loop()
            self._executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="qscore-inference", initializer=self._set_threads
            )

    async def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        while self._queue:
            future = self._queue.popleft().request.future
            if not future.done():
                future.set_exception(BatcherStopped("the service is shutting down"))
        executor.shutdown(wait=True)

    def _set_threads(self) -> None:
        # torch's intra-op threads, set in the inference thread itself (OpenMP's count is per
        # thread). ONNX Runtime sessions got the same count when they were made (state.py).
        if self.intra_op_threads is not None:
            torch.set_num_threads(self.intra_op_threads)

    def enqueue(
        self, state: ServingState, images: Sequence[np.ndarray | bytes], features: bool = False
    ) -> asyncio.Future[list[ImageScore]]:
        """Queue the prepared images of one request (``Scorer.prepare``: (H, W, 3) uint8); the
        future gets their scores, in order.

        Cancel the future to drop the images that have not reached the encoder yet.
        ``features``: also list each image's dominant and active discriminative features.
        """
        if self._executor is None or self._loop is None:
            raise BatcherStopped("the batcher is not running")
        future: asyncio.Future[list[ImageScore]] = self._loop.create_future()
        if not images:
            future.set_result([])
            return future
        if self.depth + len(images) > self.capacity:
            raise self.queue_full()
        request = _Request(state, future, time.monotonic(), features, [None] * len(images), len(images))
        self._queue.extend(_Item(request, i, image) for i, image in enumerate(images))
        future.add_done_callback(self._drop_if_cancelled)
        self._maybe_start()
        return future

    async def submit(
        self, state: ServingState, images: Sequence[np.ndarray | bytes], features: bool = False
    ) -> list[ImageScore]:
        """:meth:`enqueue` and wait; cancelling the wait drops the images still queued."""
        future = self.enqueue(state, images, features)
        return await future

    # -- the scheduling, on the event loop ----------------------------------------------------

    def _maybe_start(self, flush: bool = False) -> None:
        """Start a batch if the inference thread is idle (``flush``: the wait bound has passed)."""
        if self._busy or self._executor is None:
            return
        self._drop_cancelled_head()
        if not self._queue:
            return
        if self.max_wait_s > 0 and not flush:
            run = self._same_state_run()
            deadline = self._queue[0].request.arrived + self.max_wait_s
            if run < self.max_batch_size and run == len(self._queue) and time.monotonic() < deadline:
                if self._timer is None:
                    self._timer = self._loop.call_at(  # type: ignore[union-attr]
                        self._loop.time() + (deadline - time.monotonic()),  # type: ignore[union-attr]
                        self._on_timer,
                    )
                return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._take()
        if not batch:
            return
        self._busy = True
        started = time.monotonic()
        state = batch[0].request.state
        features = [i.request.features for i in batch]
        job = self._loop.run_in_executor(  # type: ignore[union-attr]
            self._executor, _score, state, [i.image for i in batch], features, self.monitor
        )
        job.add_done_callback(lambda f: self._finish(batch, started, f))

    def _on_timer(self) -> None:
        self._timer = None
        self._maybe_start(flush=True)

    def _drop_if_cancelled(self, future: asyncio.Future[list[ImageScore]]) -> None:
        """A cancelled request (its client is gone) leaves the queue at once, all its images."""
        if future.cancelled() and self._queue:
            self._queue = deque(i for i in self._queue if i.request.future is not future)
            if self._timer is not None and not self._queue:
                self._timer.cancel()
                self._timer = None

    def _drop_cancelled_head(self) -> None:
        while self._queue and self._queue[0].request.future.done():
            self._queue.popleft()

    def _take(self) -> list[_Item]:
        """Up to max_batch_size live items of the head's state, from the head."""
        state = self._queue[0].request.state
        batch: list[_Item] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue[0]
            if item.request.future.done():  # its client is gone
                self._queue.popleft()
                continue
            if item.request.state is not state:
                break
            batch.append(self._queue.popleft())
        return batch

    def _same_state_run(self) -> int:
        """How many queued items, from the head, share the head's state."""
        state, n = self._queue[0].request.state, 0
        for item in self._queue:
            if item.request.state is not state:
                break
            n += 1
        return n

    def _finish(self, batch: list[_Item], started: float, job: asyncio.Future[list[ImageScore]]) -> None:
        self._busy = False
        try:
            self._deliver(batch, started, job)
        finally:
            self._maybe_start()

    def _deliver(self, batch: list[_Item], started: float, job: asyncio.Future[list[ImageScore]]) -> None:
        exc = job.exception() if not job.cancelled() else BatcherStopped("the service is shutting down")
        if exc is not None:
            if not isinstance(exc, BatcherStopped):
                log.error("inference failed on a batch of %d images", len(batch), exc_info=exc)
            for item in batch:
                if not item.request.future.done():
                    item.request.future.set_exception(exc)
            return
        scores = job.result()
        elapsed = time.monotonic() - started
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(batch)
        if self.metrics is not None:
            self.metrics.observe_batch(
                batch[0].request.state.model_version, elapsed, [started - i.request.arrived for i in batch]
            )
        for item, score in zip(batch, scores, strict=True):
            request = item.request
            if request.future.done():
                continue
            request.results[item.index] = score
            request.remaining -= 1
            if request.remaining == 0:
                request.future.set_result(request.results)


def _score(
    state: ServingState,
    images: list[np.ndarray | bytes],
    features: list[bool],
    monitor: TrafficMonitor | None = None,
) -> list[ImageScore | ImageDecodeError]:
    """In the inference thread: the scorer's infer and postprocess steps on one batch, then the
    monitor's record of it (its representations and verdicts).

    ``bytes`` are JPEG files to decode on the device (QSCORE_DEVICE_DECODE); one that fails to
    decode gets its :class:`ImageDecodeError` in place of a score.
    """
    if all(isinstance(x, np.ndarray) for x in images):
        return _scored(state, images, features, monitor)
    pixels, errors = batch_pixels(state.scorer, images)
    kept = [f for f, e in zip(features, errors, strict=True) if e is None]
    scores = iter(_scored(state, pixels, kept, monitor) if pixels is not None else [])
    return [e if e is not None else next(scores) for e in errors]


def _scored(state: ServingState, pixels: Any, features: list[bool], monitor: TrafficMonitor | None) -> list[ImageScore]:
    if monitor is None:
        return state.scorer.score(pixels, features=features)
    inference = state.scorer.infer(pixels)  # the steps of Scorer.score, keeping the representations
    scores = state.scorer.postprocess(inference, features)
    version, probabilities = state.feature_set_version, inference.probabilities
    monitor.observe(state.model_version, inference.h, scores, version, probabilities, pixels)
    return scores
