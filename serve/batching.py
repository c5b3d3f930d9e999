"""Micro-batching: concurrent requests gathered into one model call, run on a worker thread.

One batch runs at a time. While it runs, new requests queue; the next batch takes all of them (up to
`max_batch_size` images), so batches grow with the load by themselves. A batch waits up to `max_wait_ms`
for more only while other requests are still arriving (being read or decoded): a lone request never waits.
Bookkeeping about a batch (metrics, drift statistics) goes to `record`, which runs on the event loop once the
batch's requests have been answered, so it never delays an answer.

The worker thread takes requests straight from a thread-safe queue and hands each batch's answers back with
one `call_soon_threadsafe`: a round trip of about 25 µs here, against 60-70 µs through an asyncio queue, a
batching task and `run_in_executor`, which a lone request pays in full.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Generic, NoReturn, TypeVar

import numpy as np

T = TypeVar("T")
# images [N, ...] -> (outputs [N, ...], a tag for the caller, e.g. the model that computed them)
Infer = Callable[[np.ndarray], tuple[np.ndarray, T]]
# (images, outputs, tag, seconds the model call took) of a batch whose requests have been answered
Record = Callable[[np.ndarray, np.ndarray, T, float], None]
# Under load the event loop's queue, not the batcher's, can hold a request longest: it crosses the loop four times
# (its bytes read, its handler started, its answer handed back, its handler resumed), each about a timer's lateness.
LOOP_TRIPS = 4
LOOP_PROBE_S = 0.005  # how often the loop's lateness is sampled
LAG_SMOOTHING = 0.2  # weight of the newest sample in the smoothed lateness
_STOP = None  # queued by stop(): the worker finishes what was queued before it, then exits


class BatchFailed(Exception):
    """The model call for a batch raised; every request in that batch gets this error."""


class ShuttingDown(Exception):
    """The batcher has stopped taking work, or stopped before a queued request ran."""


class Overloaded(Exception):
    """Refused at once, before queueing: the queue is full, or the request would not be answered within the
    latency objective. `retry_after_s`: when the queue ahead of it should have drained."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BatchTimes:
    """Batch seconds ≈ a·n + b, fitted by least squares to the last `window` batches (BentoML's dispatcher
    models its batches the same way). The worker thread adds a batch and refits; the event loop reads the line,
    one tuple swapped whole, so each admission decision costs two multiplications, not a fit."""

    def __init__(self, window: int = 64) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._line: tuple[float, float] | None = None  # (a, b); None before any batch ran

    def add(self, size: int, seconds: float) -> None:
        self._samples.append((size, seconds))
        sizes, times = np.array(self._samples, dtype=np.float64).T
        if np.ptp(sizes) == 0:  # one batch size seen: proportional, the best a single size allows
            self._line = (float(times.mean() / sizes.mean()), 0.0)
        else:
            a, b = np.polyfit(sizes, times, 1)
            self._line = (max(float(a), 0.0), max(float(b), 0.0))

    def estimate(self, size: int) -> float | None:
        """Seconds for a batch of `size` images; None before any batch ran."""
        line = self._line
        return None if line is None else line[0] * size + line[1]


@dataclass
class _Item(Generic[T]):
    images: np.ndarray
    future: "asyncio.Future[tuple[np.ndarray, T]]"


class MicroBatcher(Generic[T]):
    def __init__(
        self,
        infer: Infer[T],
        max_batch_size: int,
        max_wait_ms: float,
        record: Record[T] | None = None,
        max_latency_ms: float | None = None,
        max_queue: int | None = None,
        on_shed: Callable[[], None] | None = None,
    ) -> None:
        self._infer = infer
        self._record = record
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        # Load shedding: a request that the fitted batch times say cannot be answered within `max_latency`, or
        # that finds `max_queue` requests waiting, is refused at once (Overloaded) instead of queueing; `on_shed`
        # is told of each refusal (the service counts them).
        self.max_latency = None if max_latency_ms is None else max_latency_ms / 1000
        self.max_queue = max_queue
        self._on_shed = on_shed
        self.times = BatchTimes()
        self.loop_lag_s = 0.0  # smoothed lateness of a timer on the event loop: how long the loop's own queue is
        self._waiting_images = 0  # images queued and not yet taken into a batch
        self._running: tuple[int, float] | None = None  # (images, perf_counter at start) of the batch running
        self._count_lock = threading.Lock()
        self._queue: queue.SimpleQueue[_Item[T] | None] = queue.SimpleQueue()
        # taken from the queue but left for the next batch: the worker's, except when stop() times out while
        # the worker is stuck in a model call and fails it with the rest of the queue
        self._carry: _Item[T] | None = None
        self._taken = 0.0  # perf_counter when the worker took the first request of the batch it is on
        self._arriving = 0
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._finished: asyncio.Future[None] | None = None

    @property
    def backlog(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._finished = self._loop.create_future()
        # a daemon: a model call that never returns must not keep the process from exiting
        threading.Thread(target=self._work, name="inference", daemon=True).start()
        if self.max_latency is not None:
            self._loop.call_later(LOOP_PROBE_S, self._probe_loop, time.perf_counter() + LOOP_PROBE_S)

    def _probe_loop(self, due: float) -> None:
        """A timer that measures how late it fires, and sets itself again until the batcher stops."""
        now = time.perf_counter()
        self.loop_lag_s += LAG_SMOOTHING * (max(now - due, 0.0) - self.loop_lag_s)
        if not self._closed and self._loop is not None:
            self._loop.call_later(LOOP_PROBE_S, self._probe_loop, now + LOOP_PROBE_S)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request that will submit soon (while its body is read and decoded), so a batch waits for it.
        Under overload it is refused here (Overloaded), before its body costs anything: counting it and each
        request still being read ahead of it as one image, the least a request holds, it would be late."""
        self._admit(1, ahead=self._arriving)
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, T]:
        """Outputs for `images` and the tag of the call that computed them; BatchFailed if that call raised,
        ShuttingDown once the batcher is stopping."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry on another instance")
        self._admit(len(images))
        future: asyncio.Future[tuple[np.ndarray, T]] = asyncio.get_running_loop().create_future()
        with self._count_lock:
            self._waiting_images += len(images)
        self._queue.put(_Item(images, future))
        return await future

    def expected_latency(self, images: int) -> float | None:
        """Seconds until a request of `images` images queued now would be answered: what is left of the running
        batch, then the queued images and these in full batches; None before any batch has been timed."""
        full = self.times.estimate(self.max_batch_size)
        if full is None:
            return None
        batches, rest = divmod(self._waiting_images + images, self.max_batch_size)
        seconds = LOOP_TRIPS * self.loop_lag_s + batches * full + ((self.times.estimate(rest) or 0.0) if rest else 0.0)
        running = self._running
        if running is not None:
            seconds += max((self.times.estimate(running[0]) or 0.0) - (time.perf_counter() - running[1]), 0.0)
        return seconds

    def _admit(self, images: int, ahead: int = 0) -> None:
        """Overloaded if a request of `images` images, queued behind `ahead` more requests (one image each) than
        are queued now, would find the queue full or be answered later than the latency objective."""
        queued = self.backlog + ahead
        if self.max_queue is not None and queued >= self.max_queue:
            self._shed(f"{queued} requests are queued, the most allowed; retry later", self.expected_latency(0) or 1.0)
        if self.max_latency is None:
            return
        expected = self.expected_latency(images + ahead)
        if expected is not None and expected > self.max_latency:
            self._shed(
                f"the server cannot answer within {self.max_latency * 1000:.0f} ms now (about "
                f"{expected * 1000:.0f} ms of work is ahead); retry later",
                expected - self.max_latency,
            )

    def _shed(self, message: str, retry_after_s: float) -> NoReturn:
        if self._on_shed is not None:
            self._on_shed()
        raise Overloaded(message, retry_after_s)

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish everything queued, then stop the worker thread."""
        self._closed = True
        self._queue.put(_STOP)
        if self._finished is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._finished), timeout)
        except TimeoutError:
            self._fail_queued(ShuttingDown("the server stopped before this request ran"))

    def _work(self) -> None:
        """The worker thread: collect a batch, run it, hand the answers to the event loop; until the stop mark."""
        running = True
        while running:
            batch, running = self._collect()
            if batch:
                self._run(batch, self._taken)
        self._call_on_loop(_resolve, self._finished)

    def _collect(self) -> tuple[list[_Item[T]], bool]:
        """The next batch, and False once the stop mark has been seen (everything before it is in the batch)."""
        first = self._carry or self._queue.get()
        self._taken = time.perf_counter()
        self._carry = None
        if first is _STOP:
            return [], False
        batch, size, deadline = [first], len(first.images), time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if not (self._arriving and remaining > 0):
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is _STOP:
                return batch, False
            if size + len(item.images) > self.max_batch_size:
                self._carry = item  # it starts the next batch rather than overfilling this one
                break
            batch.append(item)
            size += len(item.images)
        return batch, True

    def _run(self, batch: list[_Item[T]], taken: float) -> None:
        """Run a batch whose first request the worker took at `taken`. BatchTimes learns the whole turn, taken to
        answers handed back (gathering, concatenating, waiting for the GIL included): under load the next batch
        starts only then, so that, not the model call alone, is what a queued request waits for."""
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        with self._count_lock:
            self._waiting_images -= len(images)
        try:
            started = time.perf_counter()
            self._running = (len(images), started)
            outputs, tag = self._infer(images)
            seconds = time.perf_counter() - started
            self._running = None
            if len(outputs) != len(images):
                raise ValueError(f"the model returned {len(outputs)} rows for {len(images)} images")
        except Exception as error:
            self._running = None
            failure = BatchFailed(f"inference failed for a batch of {len(images)} images: {error}")
            self._call_on_loop(self._fail, batch, failure)
            return
        self._call_on_loop(self._answer, batch, images, outputs, tag, seconds)
        self.times.add(len(images), time.perf_counter() - taken)

    def _call_on_loop(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(callback, *args)

    def _answer(self, batch: list[_Item[T]], images: np.ndarray, outputs: np.ndarray, tag: T, seconds: float) -> None:
        """On the event loop: each request its rows; then the bookkeeping, queued behind the requests' handlers,
        which run (and send their answers) first."""
        start = 0
        for item in batch:
            stop = start + len(item.images)
            _settle(item, result=(outputs[start:stop], tag))
            start = stop
        if self._record is not None:
            assert self._loop is not None
            self._loop.call_soon(self._record_quietly, images, outputs, tag, seconds)

    def _fail(self, batch: list[_Item[T]], error: Exception) -> None:
        for item in batch:
            _settle(item, error=error)

    def _record_quietly(self, images: np.ndarray, outputs: np.ndarray, tag: T, seconds: float) -> None:
        assert self._record is not None
        try:
            self._record(images, outputs, tag, seconds)
        except Exception:  # bookkeeping must never stop the batcher; the answers are already out
            logging.getLogger(__name__).exception("recording a batch failed")

    def _fail_queued(self, error: Exception) -> None:
        pending: list[_Item[T] | None] = [self._carry]
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._queue.get_nowait())
        self._fail([item for item in pending if item is not None], error)


def _settle(item: _Item[T], result: tuple[np.ndarray, T] | None = None, error: Exception | None = None) -> None:
    if item.future.done():  # the client went away and its handler was cancelled
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)  # type: ignore[arg-type]


def _resolve(future: "asyncio.Future[None] | None") -> None:
    if future is not None and not future.done():
        future.set_result(None)
