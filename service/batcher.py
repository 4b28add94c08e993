"""Dynamic batching: images of concurrent requests are coalesced into encoder batches.

- A batch closes at ``max_batch_size`` images or ``max_wait`` after its *first* image arrived
  (not after the worker took it: FIELD-NOTES, TorchServe's flaw).
- One inference thread per device; the asyncio side only queues and wakes.
- The queue is bounded in images; beyond it :class:`QueueFull` (the route answers 503 with
  Retry-After) instead of growing.
- Images carry the :class:`ServingState` they were admitted with; a batch holds one state only,
  so a version switch never mixes versions inside a batch or a request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from models.scoring import ImageScore
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
class _Item:
    state: ServingState
    tensor: torch.Tensor
    future: asyncio.Future[ImageScore]
    arrived: float


class Batcher:
    def __init__(self, max_batch_size: int, max_wait_s: float, capacity: int, metrics: Metrics | None = None) -> None:
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.metrics = metrics
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qscore-inference")
        self._task: asyncio.Task[None] | None = None
        self._seconds_per_image = 0.01  # running estimate, for Retry-After

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def saturated(self) -> bool:
        return self.depth >= self.capacity

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qscore-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherStopped("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(self, state: ServingState, tensors: Sequence[torch.Tensor]) -> list[ImageScore]:
        """Queue the (3, H, W) tensors of one request together and wait for their scores."""
        if not tensors:
            return []
        if self._task is None:
            raise BatcherStopped("the batcher is not running")
        if self.depth + len(tensors) > self.capacity:
            retry = max(1, math.ceil(self.depth * self._seconds_per_image))
            raise QueueFull(self.capacity, retry)
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        items = [_Item(state, t, loop.create_future(), now) for t in tensors]
        self._queue.extend(items)
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        except asyncio.CancelledError:  # client gone: the worker skips what is still queued
            for i in items:
                i.future.cancel()
            raise

    async def _next_batch(self) -> list[_Item]:
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        first = self._queue[0]
        deadline = first.arrived + self.max_wait_s
        while len(self._queue) < self.max_batch_size and self._same_state_run() == len(self._queue):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        n = min(self.max_batch_size, self._same_state_run())
        return [self._queue.popleft() for _ in range(n)]

    def _same_state_run(self) -> int:
        """How many queued items, from the head, share the head's state."""
        state, n = self._queue[0].state, 0
        for item in self._queue:
            if item.state is not state:
                break
            n += 1
        return n

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [i for i in await self._next_batch() if not i.future.done()]
            if not batch:
                continue
            state = batch[0].state
            started = time.monotonic()
            try:
                scores = await loop.run_in_executor(self._executor, _score, state, [i.tensor for i in batch])
            except Exception as exc:
                log.exception("inference failed on a batch of %d images", len(batch))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            elapsed = time.monotonic() - started
            self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * elapsed / len(batch)
            if self.metrics is not None:
                version = state.model_version
                self.metrics.batch_size.labels(version).observe(len(batch))
                self.metrics.inference_duration.labels(version).observe(elapsed)
                wait = self.metrics.queue_wait.labels(version)
                for item in batch:
                    wait.observe(started - item.arrived)
            for item, score in zip(batch, scores, strict=True):
                if not item.future.done():
                    item.future.set_result(score)


def _score(state: ServingState, tensors: list[torch.Tensor]) -> list[ImageScore]:
    return state.scorer.score_batch(torch.stack(tensors))
