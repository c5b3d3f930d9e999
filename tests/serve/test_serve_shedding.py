"""Load shedding: in the micro-batcher (batch times fitted as a·n + b, a request refused at once when the work
ahead of it, the event loop's lateness included, exceeds the latency objective or the queue is full, and refused
before its body is read), the service counting and mapping it, and a real server answering it on both APIs."""

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from serve.batching import LOOP_TRIPS, BatchTimes, MicroBatcher, Overloaded
from serve.errors import as_api_error, retry_headers
from serve.service import Service
from serve.settings import Settings
from tests.serve.conftest import API_KEY, Server
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


def test_a_request_is_refused_as_it_arrives_before_its_body_is_read_and_those_being_read_count_ahead():
    shed: list[int] = []
    batcher = MicroBatcher(
        Recorder(), max_batch_size=4, max_wait_ms=0, max_latency_ms=120, on_shed=lambda: shed.append(1)
    )
    batcher.times.add(1, 0.050)  # 50 ms an image
    # two being read: 100 ms ahead of a third ...
    with batcher.arriving(), batcher.arriving(), pytest.raises(Overloaded) as refused, batcher.arriving():
        pytest.fail("a request that would be late must not get to read its body")
    assert "150 ms of work is ahead" in str(refused.value) and shed == [1]
    with batcher.arriving():  # ... and once they are gone, a request is let in again
        pass
    assert shed == [1]


def test_the_event_loops_lateness_is_measured_and_counted_as_work_ahead():
    async def scenario() -> tuple[float, float, float | None]:
        batcher = MicroBatcher(Recorder(), max_batch_size=4, max_wait_ms=0, max_latency_ms=1000)
        batcher.start()
        batcher.times.add(4, 0.010)
        quiet = batcher.loop_lag_s
        for _ in range(5):
            await asyncio.sleep(0.01)
            time.sleep(0.05)  # a handler hogging the loop: every timer due meanwhile fires late
        lag = batcher.loop_lag_s
        expected = batcher.expected_latency(4)
        await batcher.stop()
        return quiet, lag, expected

    quiet, lag, expected = asyncio.run(scenario())
    assert quiet == 0.0 and 0.01 < lag < 0.06
    assert expected == pytest.approx(0.010 + LOOP_TRIPS * lag)


@pytest.fixture(scope="module")
def shedding_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An objective no request can meet once a batch has been timed: the first request is answered (nothing is
    known yet), every later one is shed."""
    env = {"MODEL_URI": str(tiny_model), "API_KEY": API_KEY, "MAX_LATENCY_MS": "0.001"}
    running = Server(env, tmp_path_factory.mktemp("shedding") / "server.log").start()
    yield running
    running.stop()


@pytest.mark.integration  # a real uvicorn server on loopback
def test_a_real_server_sheds_on_both_apis_with_retry_after_stays_ready_and_logs_a_summary(
    shedding_server: Server, test_images: list[tuple[str, str, bytes]]
):
    _, name, jpeg = test_images[0]
    tensor = {"name": "images", "datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [0] * 3072}
    with httpx.Client(base_url=shedding_server.url, headers={"X-API-Key": API_KEY}, timeout=30) as http:
        assert http.post("/v1/predict", files=[("files", (name, jpeg, "image/jpeg"))]).status_code == 200
        refused = [http.post("/v1/predict", files=[("files", (name, jpeg, "image/jpeg"))]) for _ in range(5)]
        v2 = http.post("/v2/models/cifarlab/infer", json={"inputs": [tensor]})
        ready = http.get("/readyz")
        metrics = http.get("/metrics").text
    for response in refused:
        assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["code"] == "overloaded"
        assert "cannot answer within 0 ms" in response.json()["error"]["message"]
    assert v2.status_code == 503 and "cannot answer within" in v2.json()["error"]  # the protocol's error body
    assert ready.status_code == 200  # shedding is not unreadiness
    assert 'cifarlab_shed_total{variant="default"} 6.0' in metrics
    logs = shedding_server.json_logs()
    assert not [line for line in logs if line.get("status") == 503]  # no line per refusal ...
    summaries = [line for line in logs if line["message"].startswith("shed requests")]
    assert summaries and summaries[0]["shed"] == 1  # ... the first at once, the rest in a line a second
    assert sum(line["shed"] for line in summaries) <= 6
