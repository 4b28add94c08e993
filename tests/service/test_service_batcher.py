"""The batcher on its own, with fake scorers that record the batches they get (the real one: test_service_score)."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from service.batcher import Batcher, QueueFull


class RecordingScorer:
    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name, self.delay = name, delay
        self.batches: list[int] = []
        self.started: list[int] = []
        self.values: list[list[float]] = []
        self.gate = threading.Event()
        self.gate.set()

    def score(self, images: list[np.ndarray], features: object = True) -> list[tuple[str, float]]:
        self.started.append(len(images))
        self.gate.wait(5)
        time.sleep(self.delay)
        self.batches.append(len(images))
        self.values.append([float(x[0, 0, 0]) for x in images])
        return [(self.name, float(x[0, 0, 0])) for x in images]


def fake_state(scorer: RecordingScorer) -> SimpleNamespace:
    return SimpleNamespace(scorer=scorer, model_version=scorer.name)


def images(*values: float) -> list[np.ndarray]:
    return [np.full((2, 2, 3), v, dtype=np.uint8) for v in values]


def run(coro):
    return asyncio.run(coro)


def test_batcher_coalesces_concurrent_requests_up_to_max_batch() -> None:
    async def main() -> list[int]:
        scorer = RecordingScorer("a")
        batcher = Batcher(max_batch_size=4, max_wait_s=0.2, capacity=100)
        batcher.start()
        state = fake_state(scorer)
        results = await asyncio.gather(*(batcher.submit(state, images(i)) for i in range(10)))
        await batcher.stop()
        assert [r[0] for r in results] == [("a", float(i)) for i in range(10)]  # in order, per request
        return scorer.batches

    assert run(main()) == [4, 4, 2]


def test_batcher_idle_encoder_starts_at_once_and_busy_one_gathers_the_next_batch() -> None:
    async def main() -> RecordingScorer:
        scorer = RecordingScorer("a")
        scorer.gate.clear()  # the first batch blocks in the encoder until we let it go
        batcher = Batcher(max_batch_size=4, max_wait_s=0.0, capacity=100)
        batcher.start()
        state = fake_state(scorer)
        first = asyncio.ensure_future(batcher.submit(state, images(0)))
        await asyncio.sleep(0.05)
        assert scorer.started == [1]  # alone: nothing waited for company
        later = [asyncio.ensure_future(batcher.submit(state, images(i))) for i in range(1, 10)]
        await asyncio.sleep(0.05)
        assert scorer.started == [1] and batcher.depth == 9  # gathered while the encoder is busy
        scorer.gate.set()
        assert (await first) == [("a", 0.0)]
        assert [r[0] for r in await asyncio.gather(*later)] == [("a", float(i)) for i in range(1, 10)]
        await batcher.stop()
        return scorer

    scorer = run(main())
    assert scorer.batches == [1, 4, 4, 1]
    assert scorer.values[1] == [1.0, 2.0, 3.0, 4.0]


def test_batcher_drops_images_of_a_cancelled_request_before_the_encoder() -> None:
    async def main() -> RecordingScorer:
        scorer = RecordingScorer("a")
        scorer.gate.clear()
        batcher = Batcher(max_batch_size=8, max_wait_s=0.0, capacity=100)
        batcher.start()
        state = fake_state(scorer)
        running = asyncio.ensure_future(batcher.submit(state, images(0)))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(state, images(1, 2, 3)))
        kept = asyncio.ensure_future(batcher.submit(state, images(4)))
        await asyncio.sleep(0.01)
        gone.cancel()  # what the route does when the client hangs up
        scorer.gate.set()
        assert (await running) == [("a", 0.0)] and (await kept) == [("a", 4.0)]
        assert gone.cancelled()
        await batcher.stop()
        return scorer

    scorer = run(main())
    assert scorer.values == [[0.0], [4.0]]


def test_batcher_splits_a_large_request_across_batches_and_answers_in_order() -> None:
    async def main() -> list[tuple[str, float]]:
        scorer = RecordingScorer("a")
        batcher = Batcher(max_batch_size=3, max_wait_s=0.0, capacity=100)
        batcher.start()
        result = await batcher.submit(fake_state(scorer), images(*range(7)))
        await batcher.stop()
        assert scorer.batches == [3, 3, 1]
        return result

    assert run(main()) == [("a", float(i)) for i in range(7)]


def test_batcher_wait_counts_from_first_arrival() -> None:
    async def main() -> float:
        batcher = Batcher(max_batch_size=64, max_wait_s=0.1, capacity=100)
        batcher.start()
        state = fake_state(RecordingScorer("a"))
        t0 = time.monotonic()
        first = asyncio.ensure_future(batcher.submit(state, images(1)))
        await asyncio.sleep(0.06)
        second = await batcher.submit(state, images(2))  # arrives late: shares the first's deadline
        elapsed = time.monotonic() - t0
        assert (await first)[0] == ("a", 1.0) and second[0] == ("a", 2.0)
        assert state.scorer.batches == [2]
        await batcher.stop()
        return elapsed

    assert run(main()) < 0.2


def test_batcher_full_queue_raises_queue_full_with_retry_after() -> None:
    async def main() -> None:
        scorer = RecordingScorer("a")
        scorer.gate.clear()  # the worker blocks on its first batch
        batcher = Batcher(max_batch_size=2, max_wait_s=0.0, capacity=4)
        batcher.start()
        state = fake_state(scorer)
        running = asyncio.ensure_future(batcher.submit(state, images(0, 1)))
        await asyncio.sleep(0.05)  # taken by the worker, which now blocks
        queued = asyncio.ensure_future(batcher.submit(state, images(2, 3, 4)))
        await asyncio.sleep(0.01)
        assert batcher.depth == 3
        with pytest.raises(QueueFull) as info:
            await batcher.submit(state, images(5, 6))
        assert info.value.capacity == 4 and info.value.retry_after >= 1
        scorer.gate.set()
        assert len(await running) == 2 and len(await queued) == 3
        await batcher.stop()

    run(main())


def test_batcher_never_mixes_states_in_one_batch() -> None:
    async def main() -> None:
        a, b = RecordingScorer("a"), RecordingScorer("b")
        batcher = Batcher(max_batch_size=16, max_wait_s=0.05, capacity=100)
        batcher.start()
        sa, sb = fake_state(a), fake_state(b)
        results = await asyncio.gather(
            batcher.submit(sa, images(1, 2)),
            batcher.submit(sb, images(3)),
            batcher.submit(sa, images(4)),
        )
        assert [[name for name, _ in r] for r in results] == [["a", "a"], ["b"], ["a"]]
        assert a.batches == [2, 1] and b.batches == [1]
        await batcher.stop()

    run(main())


def test_batcher_inference_error_fails_only_its_batch() -> None:
    class Broken(RecordingScorer):
        def score(self, images: list[np.ndarray], features: object = True) -> list[tuple[str, float]]:
            raise RuntimeError("device lost")

    async def main() -> None:
        batcher = Batcher(max_batch_size=8, max_wait_s=0.0, capacity=100)
        batcher.start()
        with pytest.raises(RuntimeError, match="device lost"):
            await batcher.submit(fake_state(Broken("x")), images(1))
        assert (await batcher.submit(fake_state(RecordingScorer("a")), images(2))) == [("a", 2.0)]
        await batcher.stop()

    run(main())
