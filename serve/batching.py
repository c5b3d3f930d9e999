"""Micro-batching: concurrent requests gathered into one model call, run on a worker thread.

One batch runs at a time. While it runs, new requests queue; the next batch takes all of them (up to
`max_batch_size` images), so batches grow with the load by themselves. A batch waits up to `max_wait_ms`
for more only while other requests are still arriving (being read or decoded): a lone request never waits.
"""

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from serve.errors import ApiError

T = TypeVar("T")
# images [N, ...] -> (outputs [N, ...], a tag for the caller, e.g. the model that computed them)
Infer = Callable[[np.ndarray], tuple[np.ndarray, T]]


class BatchFailed(Exception):
    """The model call for a batch raised; every request in that batch gets this error."""


@dataclass
class _Item(Generic[T]):
    images: np.ndarray
    future: "asyncio.Future[tuple[np.ndarray, T]]"


class MicroBatcher(Generic[T]):
    def __init__(self, infer: Infer[T], max_batch_size: int, max_wait_ms: float) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._queue: asyncio.Queue[_Item[T] | None] = asyncio.Queue()
        self._carry: _Item[T] | None = None
        self._arriving = 0
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        """Requests waiting for a batch."""
        return self._queue.qsize()

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request that will submit soon (while its body is read and decoded), so a batch waits for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def submit(self, images: np.ndarray) -> tuple[np.ndarray, T]:
        """Outputs for `images` and the tag of the call that computed them; BatchFailed if that call raised."""
        if self._closed:
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another instance")
        future: asyncio.Future[tuple[np.ndarray, T]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Item(images, future))
        return await future

    async def stop(self, timeout: float = 30.0) -> None:
        """Refuse new work, finish everything queued, then stop the worker thread."""
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                self._fail_queued(ApiError(503, "shutting_down", "the server stopped before this request ran"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _loop(self) -> None:
        running = True
        while running:
            batch, running = await self._collect()
            if batch:
                await self._run(batch)

    async def _collect(self) -> tuple[list[_Item[T]], bool]:
        """The next batch, and False once the stop sentinel has been seen (everything before it is in the batch)."""
        first = self._carry or await self._queue.get()
        self._carry = None
        if first is None:
            return [], False
        loop = asyncio.get_running_loop()
        batch, size, deadline = [first], len(first.images), loop.time() + self.max_wait
        while size < self.max_batch_size:
            if not self._queue.empty():
                item = self._queue.get_nowait()
            elif self._arriving and (remaining := deadline - loop.time()) > 0:
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                break
            if item is None:
                return batch, False
            if size + len(item.images) > self.max_batch_size:
                self._carry = item  # it starts the next batch rather than overfilling this one
                break
            batch.append(item)
            size += len(item.images)
        return batch, True

    async def _run(self, batch: list[_Item[T]]) -> None:
        images = batch[0].images if len(batch) == 1 else np.concatenate([item.images for item in batch])
        try:
            outputs, tag = await asyncio.get_running_loop().run_in_executor(self._executor, self._infer, images)
            if len(outputs) != len(images):
                raise ValueError(f"the model returned {len(outputs)} rows for {len(images)} images")
        except Exception as error:
            failure = BatchFailed(f"inference failed for a batch of {len(images)} images: {error}")
            for item in batch:
                _settle(item, error=failure)
            return
        start = 0
        for item in batch:
            stop = start + len(item.images)
            _settle(item, result=(outputs[start:stop], tag))
            start = stop

    def _fail_queued(self, error: Exception) -> None:
        pending: list[_Item[T] | None] = [self._carry]
        while not self._queue.empty():
            pending.append(self._queue.get_nowait())
        for item in pending:
            if item is not None:
                _settle(item, error=error)


def _settle(item: _Item[T], result: tuple[np.ndarray, T] | None = None, error: Exception | None = None) -> None:
    if item.future.done():  # the client went away and its handler was cancelled
        return
    if error is not None:
        item.future.set_exception(error)
    else:
        item.future.set_result(result)  # type: ignore[arg-type]
