"""The thread explanations run in (POST /explain), apart from the /score batcher.

One thread, one torch thread in it (torch's thread count is per thread: the inference thread
keeps its cores), and a bound on the explanations waiting or running: beyond it the route
answers 503 before it reads the upload.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch


class ExplainBusy(Exception):
    """``limit`` explanations wait or run already."""


class ExplainWorker:
    """Runs explanations one at a time; ``in_flight`` counts those waiting or running (event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="qscore-explain", initializer=_one_torch_thread)

    @property
    def full(self) -> bool:
        return self.in_flight >= self.limit

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self.full:
            raise ExplainBusy()
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        finally:
            self.in_flight -= 1

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _one_torch_thread() -> None:
    torch.set_num_threads(1)
