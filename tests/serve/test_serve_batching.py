"""The micro-batcher: concurrent requests share one model call; a failure answers each; stop drains the queue."""

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import numpy as np
import pytest

from serve.batching import BatchFailed, MicroBatcher, ShuttingDown

T = TypeVar("T")


class Recorder:
    """A model stand-in that returns each image's first pixel as its output and records its batch sizes."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.delay = delay
        self.fail = fail
        self.thread_names: set[str] = set()

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, str]:
        self.thread_names.add(threading.current_thread().name)
        self.batches.append(len(images))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return images[:, 0, 0, :1].astype(np.float32), f"call-{len(self.batches)}"


def images(count: int, value: int) -> np.ndarray:
    return np.full((count, 32, 32, 3), value, dtype=np.uint8)


async def queue_then_start(batcher: MicroBatcher, requests: list[Coroutine[Any, Any, T]]) -> list[asyncio.Future[T]]:
    """Schedule the requests, let each run up to its await (all are then queued), and only then start the batcher:
    its thread takes work as soon as it wakes, so requests that should share a call must be waiting before it does."""
    futures = [asyncio.ensure_future(request) for request in requests]
    await asyncio.sleep(0)
    batcher.start()
    return futures


async def submit_many(batcher: MicroBatcher, sizes: list[int]) -> list:
    """Requests of these sizes, queued together before the batcher starts; their results or exceptions."""
    requests = await queue_then_start(batcher, [batcher.submit(images(n, i)) for i, n in enumerate(sizes)])
    return await asyncio.gather(*requests, return_exceptions=True)


def test_concurrent_requests_share_a_call_and_get_their_own_rows():
    async def scenario() -> tuple[Recorder, list]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch_size=64, max_wait_ms=0)
        results = await submit_many(batcher, [1, 3, 2, 1])
        await batcher.stop()
        return recorder, results

    recorder, results = asyncio.run(scenario())
    assert recorder.batches == [7]
    for index, (rows, tag) in enumerate(results):
        assert rows.shape == ([1, 3, 2, 1][index], 1) and (rows == index).all() and tag == "call-1"
    assert recorder.thread_names == {"inference"}  # off the event loop, on the batcher's own thread


def test_batches_never_exceed_the_maximum():
    async def scenario() -> Recorder:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch_size=4, max_wait_ms=0)
        results = await submit_many(batcher, [3, 3, 1, 1, 2, 6])
        await batcher.stop()
        assert not [r for r in results if isinstance(r, BaseException)]
        return recorder

    # 3 | 3+1 | 1+2 | 6 (alone: one request larger than a batch still runs, as one call)
    assert asyncio.run(scenario()).batches == [3, 4, 3, 6]


def test_a_batch_waits_for_requests_still_arriving_but_a_lone_request_does_not():
    async def scenario() -> tuple[list[int], float]:
        recorder = Recorder()
        batcher = MicroBatcher(recorder, max_batch_size=64, max_wait_ms=2000)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(images(1, 0))  # nobody else arriving: runs at once
        lone = time.perf_counter() - started

        async def late_arrival() -> None:
            with batcher.arriving():
                await asyncio.sleep(0.05)  # reading and decoding its body
                await batcher.submit(images(1, 1))

        await asyncio.gather(late_arrival(), _after(0.01, batcher.submit(images(1, 2))))
        await batcher.stop()
        return recorder.batches, lone

    batches, lone = asyncio.run(scenario())
    assert batches == [1, 2]  # the second batch waited for the request that was arriving
    assert lone < 1.0  # far below max_wait_ms


async def _after(delay: float, awaitable):
    await asyncio.sleep(delay)
    return await awaitable


def test_a_failed_batch_answers_every_request_in_it_and_the_next_batch_runs():
    async def scenario() -> tuple[list, tuple]:
        recorder = Recorder(fail=True)
        batcher = MicroBatcher(recorder, max_batch_size=64, max_wait_ms=0)
        failed = await asyncio.wait_for(submit_many(batcher, [1, 2, 1]), timeout=10)
        recorder.fail = False
        after = await asyncio.wait_for(batcher.submit(images(1, 9)), timeout=10)
        await batcher.stop()
        return failed, after

    failed, after = asyncio.run(scenario())
    assert len(failed) == 3 and all(isinstance(r, BatchFailed) and "model exploded" in str(r) for r in failed)
    assert (after[0] == 9).all()


def test_stop_finishes_queued_requests_then_refuses_new_ones():
    async def scenario() -> tuple[list, Recorder]:
        recorder = Recorder(delay=0.05)
        batcher = MicroBatcher(recorder, max_batch_size=2, max_wait_ms=0)
        requests = await queue_then_start(batcher, [batcher.submit(images(1, i)) for i in range(6)])
        await batcher.stop()
        results = await asyncio.gather(*requests)
        with pytest.raises(ShuttingDown, match="shutting down"):
            await batcher.submit(images(1, 0))
        return results, recorder

    results, recorder = asyncio.run(scenario())
    assert [int(rows[0, 0]) for rows, _ in results] == list(range(6))
    assert recorder.batches == [2, 2, 2]


def test_record_sees_each_batch_after_its_requests_have_their_answers():
    events: list[str] = []
    recorded: list[tuple[list[int], list[float], str, float]] = []

    def record(batch: np.ndarray, outputs: np.ndarray, tag: str, seconds: float) -> None:
        events.append(f"record {tag}")
        recorded.append((batch[:, 0, 0, 0].tolist(), outputs[:, 0].tolist(), tag, seconds))
        if tag == "call-1":
            raise RuntimeError("bookkeeping exploded")  # logged; the batcher goes on

    async def ask(batcher: MicroBatcher, value: int) -> None:
        _, tag = await batcher.submit(images(1, value))
        events.append(f"answer {value} from {tag}")  # a handler resumes, and would send, here

    async def scenario() -> None:
        batcher = MicroBatcher(Recorder(delay=0.01), max_batch_size=64, max_wait_ms=0, record=record)
        asking = await queue_then_start(batcher, [ask(batcher, 1), ask(batcher, 2)])  # one batch
        await asyncio.gather(*asking)
        await ask(batcher, 3)
        await batcher.stop()

    asyncio.run(scenario())
    assert events == [
        "answer 1 from call-1",
        "answer 2 from call-1",
        "record call-1",
        "answer 3 from call-2",
        "record call-2",
    ]
    assert [r[:3] for r in recorded] == [([1, 2], [1.0, 2.0], "call-1"), ([3], [3.0], "call-2")]
    assert all(0.01 <= seconds < 1 for *_, seconds in recorded)  # the model call's own time, sleep included
