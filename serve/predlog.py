"""The prediction log: every answered image (sampled as configured), shared by all replicas, on any fsspec URL.

    <url>/images/<id[:2]>/<prediction id>.png        the image as the model saw it (lossless), with its record as
                                                     the PNG text chunk `cifarlab` (JSON): one GET finds both
    <url>/batches/<date>/<time>-<writer>-<n>.jsonl   the records of one batch, one JSON object a line, each naming
                                                     its image: the dataset (pandas.read_json(lines=True), DuckDB)

JSON Lines plus PNG files, not Parquet: a replica looks a prediction up by id with one object read (feedback sent
to another replica), the images stay plain labelled-folder material for training, and batch files are appended by
many writers without coordination (each writes its own objects; nothing is ever rewritten). Parquet would need a
compaction job to stay readable and would turn the by-id lookup into a scan.

`add` only appends references to an in-memory queue (bounded: past `max_pending` entries are dropped and counted);
a writer thread flushes every `batch_items` entries or `flush_s` seconds. A failed write never reaches a
request: its entries are counted in `cifarlab_prediction_log_failed_total` and logged. How long the store keeps
objects is the bucket's lifecycle rule (docs/serving.md), not the server's.
"""

from __future__ import annotations

import io
import json
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin
from prometheus_client import CollectorRegistry, Counter

from cifarlab_contract.files import write_atomic
from serve.json_logs import get_logger

RECORD_CHUNK = "cifarlab"


class PredictionLogUnavailable(Exception):
    """The log's store cannot be reached or written at start-up; the message says which and why."""


@dataclass(frozen=True)
class LoggedPrediction:
    """One answered image, as the log stores it (the image beside it)."""

    prediction_id: str
    request_id: str
    image_index: int
    time: str
    variant: str
    model_name: str
    model_version: str
    run_id: str
    predicted: str
    confidence: float
    top_k: dict[str, float]
    image: str  # the image's path relative to the log's root

    @staticmethod
    def image_path(prediction_id: str) -> str:
        return f"images/{prediction_id[:2]}/{prediction_id}.png"


class PredictionLog:
    """Batched, best-effort appends of answered predictions to `url`, and lookups by prediction id."""

    def __init__(
        self,
        url: str,
        registry: CollectorRegistry,
        *,
        storage_options: dict[str, Any] | None = None,
        sample_rate: float = 1.0,
        batch_items: int = 256,
        flush_s: float = 1.0,
        max_pending: int = 10_000,
    ) -> None:
        self.url, self.sample_rate, self.batch_items, self.flush_s = url, sample_rate, batch_items, flush_s
        self.max_pending = max_pending
        self.storage_options = storage_options or {}
        self.writer = uuid.uuid4().hex[:8]  # this process: batch files of replicas never collide
        self._pending: deque[tuple[LoggedPrediction, np.ndarray]] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batches = 0
        self._thread: threading.Thread | None = None
        self._local = False
        self.log = get_logger()
        self.written = Counter("cifarlab_prediction_log_written", "Predictions written to the log", registry=registry)
        self.failed = Counter(
            "cifarlab_prediction_log_failed", "Predictions whose log write failed (never the answer)", registry=registry
        )
        self.dropped = Counter(
            "cifarlab_prediction_log_dropped", "Predictions dropped: the log's queue was full", registry=registry
        )

    def open(self) -> None:
        """Connect and prove the store writable (a probe object, removed), then start the writer thread."""
        import fsspec  # type: ignore[import-untyped]  # here: a server without a log never imports it

        try:
            self._local = local = fsspec.utils.get_protocol(self.url) in ("file", "local")
            options = {"auto_mkdir": True, **self.storage_options} if local else self.storage_options  # folders
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
            probe = f"{self.root}/.probe-{self.writer}"
            self.fs.pipe_file(probe, b"ok")
            self.fs.rm_file(probe)
        except Exception as error:
            raise PredictionLogUnavailable(f"prediction log {self.url} is not writable: {error}") from error
        self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self._thread.start()

    def add(self, entry: LoggedPrediction, image: np.ndarray) -> None:
        """Queue one answered image (sampled); never blocks on the store, never raises."""
        if self.sample_rate < 1.0 and random.random() >= self.sample_rate:
            return
        with self._wake:
            if len(self._pending) >= self.max_pending:
                self.dropped.inc()
                return
            self._pending.append((entry, image))
            if len(self._pending) >= self.batch_items:
                self._wake.notify()

    def lookup(self, prediction_id: str) -> tuple[dict[str, Any], np.ndarray] | None:
        """The record and image of a logged prediction (any replica's), or None. Blocking: call it off the loop."""
        path = f"{self.root}/{LoggedPrediction.image_path(prediction_id)}"
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:
                record = json.loads(image.text[RECORD_CHUNK])  # type: ignore[attr-defined]  # PNG text chunks
                return record, np.asarray(image.convert("RGB"))
        except (OSError, KeyError, ValueError) as error:  # written by a replica killed mid-write: not logged
            self.log.warning(
                "prediction log image unreadable; taken as not logged",
                extra={"event": "prediction_log", "path": path, "reason": str(error)},
            )
            return None

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _put(self, files: dict[str, bytes]) -> None:
        """Write whole objects. An object store shows an upload only once it is complete; in a folder each file is
        written under a hidden name and renamed into place, so a process killed mid-write leaves no torn file."""
        if not self._local:
            self.fs.pipe(files)
            return
        for path, data in files.items():
            write_atomic(Path(path), data)

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._closing and len(self._pending) < self.batch_items:
                    self._wake.wait(self.flush_s)
                batch = [self._pending.popleft() for _ in range(min(self.batch_items, len(self._pending)))]
                done = self._closing and not self._pending
            if batch:
                self._write(batch)
            if done:
                return

    def _write(self, batch: list[tuple[LoggedPrediction, np.ndarray]]) -> None:
        try:
            files = {f"{self.root}/{entry.image}": _png(entry, image) for entry, image in batch}
            self._put(files)  # images first: a batch line never names an image that is not there
            self._batches += 1
            now = datetime.now(UTC)
            name = f"batches/{now:%Y-%m-%d}/{now:%H%M%S%f}-{self.writer}-{self._batches}.jsonl"
            lines = "".join(json.dumps(asdict(entry), sort_keys=True) + "\n" for entry, _ in batch)
            self._put({f"{self.root}/{name}": lines.encode()})
        except Exception as error:  # the store is down or refuses: count, log, and keep serving
            self.failed.inc(len(batch))
            self.log.warning(
                "prediction log write failed; the predictions were answered",
                extra={"event": "prediction_log", "url": self.url, "count": len(batch), "reason": str(error)},
            )
            return
        self.written.inc(len(batch))


def _png(entry: LoggedPrediction, image: np.ndarray) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(RECORD_CHUNK, json.dumps(asdict(entry), sort_keys=True))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def timestamp() -> str:
    return datetime.fromtimestamp(time.time(), UTC).isoformat(timespec="milliseconds")
