"""Load shedding in the micro-batcher (no HTTP): batch times fitted as a·n + b, a request refused at once when the
work ahead of it exceeds the latency objective or the queue is full, and the service counting and mapping it."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from serve.batching import BatchTimes, MicroBatcher, Overloaded
from serve.errors import as_api_error, retry_headers
from serve.service import Service
from serve.settings import Settings
from tests.serve.test_serve_batching import Recorder, images


def test_batch_times_fit_a_line_through_the_recent_batches():
    times = BatchTimes()
    assert times.estimate(8) is None  # nothing measured: nothing is shed
    times.add(4, 0.02)
    assert times.estimate(8) == pytest.approx(0.04)  # one size seen: proportional
    line = BatchTimes()
    for size in (1, 10, 64):
        line.add(size, 0.001 * size + 0.010)  # a = 1 ms an image, b = 10 ms a call
    assert line.estimate(32) == pytest.approx(0.042)


def test_the_window_forgets_old_batches():
    times = BatchTimes(window=3)
    times.add(8, 10.0)
    for size in (1, 2, 3):
        times.add(size, 0.002 * size)
    assert times.estimate(10) == pytest.approx(0.02)


async def queued(batcher: MicroBatcher, sizes: list[int]) -> list[asyncio.Future]:
    """Submit requests one by one while the worker is not started, so the queue ahead of each is known exactly."""
    futures = []
    for value, size in enumerate(sizes):
        futures.append(asyncio.ensure_future(batcher.submit(images(size, value))))
        await asyncio.sleep(0)  # it runs up to its await: queued, or refused
    return futures


def test_requests_that_cannot_be_answered_in_time_are_refused_at_once():
    async def scenario() -> list:
        batcher = MicroBatcher(Recorder(), max_batch_size=4, max_wait_ms=0, max_latency_ms=120)
        batcher.times.add(4, 0.050)  # a full batch takes 50 ms
        futures = await queued(batcher, [4, 4, 4, 2])  # 50, 100, 150 (refused), then 100 + 25 (refused)
        assert [f.done() for f in futures] == [False, False, True, True]
        batcher.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    first, second, third, fourth = asyncio.run(scenario())
    assert first[0][:, 0].tolist() == [0] * 4 and second[0][:, 0].tolist() == [1] * 4  # accepted: answered
    assert isinstance(third, Overloaded) and "within 120 ms" in str(third) and "150 ms" in str(third)
    assert third.retry_after_s == pytest.approx(0.030)
    assert isinstance(fourth, Overloaded) and fourth.retry_after_s == pytest.approx(0.005)


def test_nothing_is_shed_before_a_batch_has_been_timed_and_none_without_an_objective():
    async def scenario(latency: float | None, timed: bool) -> list:
        batcher = MicroBatcher(Recorder(), max_batch_size=4, max_wait_ms=0, max_latency_ms=latency)
        if timed:
            batcher.times.add(4, 10.0)
        futures = await queued(batcher, [4] * 5)
        batcher.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    assert not any(isinstance(r, Exception) for r in asyncio.run(scenario(1.0, timed=False)))
    assert not any(isinstance(r, Exception) for r in asyncio.run(scenario(None, timed=True)))


def test_the_queue_is_bounded():
    async def scenario() -> list:
        batcher = MicroBatcher(Recorder(), max_batch_size=4, max_wait_ms=0, max_queue=2)
        futures = await queued(batcher, [1, 1, 1])
        batcher.start()
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return results

    first, second, third = asyncio.run(scenario())
    assert isinstance(first, tuple) and isinstance(second, tuple)
    assert isinstance(third, Overloaded) and "2 requests are queued" in str(third)


def test_the_service_counts_a_shed_request_and_it_is_a_503_with_retry_after(tiny_model: Path):
    service = Service(Settings(model_uri=str(tiny_model), max_latency_ms=1000))

    async def scenario() -> Overloaded:
        await service.start()
        try:
            service.variants["default"].batcher.times.add(1, 2.5)  # as if one image took 2.5 s
            with pytest.raises(Overloaded) as refused:
                await service.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8), "default", "shed-1")
            assert service.ready  # shedding is not unreadiness
            return refused.value
        finally:
            await service.stop()

    error = asyncio.run(scenario())
    refusal = as_api_error(error)
    assert (refusal.status, refusal.code) == (503, "overloaded")
    assert retry_headers(error) == {"Retry-After": str(int(np.ceil(error.retry_after_s)))}
    assert float(retry_headers(error)["Retry-After"]) >= 1
    assert service.metrics.registry.get_sample_value("cifarlab_shed_total", {"variant": "default"}) == 1
