"""The feedback loop: recent predictions kept in memory, true labels stored durably as a training-ready dataset.

`RecentPredictions` holds the model inputs of the last requests (bounded in count and in bytes, oldest evicted
first), with the predictions shadow variants made of the same images, each under the prediction id the server
issued for it. When a client later names the true label of an image (`POST /v1/feedback`: that prediction id),
`FeedbackStore` writes the image as `<root>/<class>/<prediction id>.png` (the layout `cifarlab.data.prepare` reads
for `train/`) and then its record, `<root>/records/<id[:2]>/<id>.json`, created only if absent (the format:
cifarlab_contract.feedback). The root is a folder or any fsspec URL, shared by every replica: feedback for one
prediction is stored once whichever replica takes it, and a second label for it is refused. The ids are random
and issued by the server, never by the client, so no client can name, overwrite or claim another client's
prediction. In a folder both writes are fsynced before the call returns, so acknowledged feedback survives a
crash; on an object store an upload is durable once it returns.

The live metrics count the feedback this process acknowledged since it started (Prometheus counters: replicas
add up, a restart starts again from 0), never the whole store, which other replicas write too.

Errors map to HTTP statuses: UnknownPrediction 404, InvalidFeedback 422, ConflictingFeedback 409.
"""

from __future__ import annotations

import io
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cifarlab_contract.feedback import (
    INDEX_SEPARATOR,
    MANIFEST_FILE,
    REQUEST_ID_PATTERN,
    FeedbackRecord,
    image_path,
    open_feedback_store,
    parse_manifest,
    record_path,
)
from cifarlab_contract.files import atomic_destination, fsync_directory
from serve.json_logs import get_logger


class FeedbackError(Exception):
    """Feedback that cannot be accepted; the message says why."""


class UnknownPrediction(FeedbackError):
    """No recent prediction has this id (never issued, or already evicted from the cache)."""


class InvalidFeedback(FeedbackError):
    """A label outside the model's classes, or a request id that cannot name a file."""


class ConflictingFeedback(FeedbackError):
    """This prediction already has feedback with a different label."""


@dataclass(frozen=True)
class Prediction:
    """What the server answered for one image, kept until feedback arrives or the cache evicts it."""

    prediction_id: str  # issued by the server (cifarlab_contract.feedback.new_prediction_id)
    image: np.ndarray  # the model's input: uint8 [H, W, 3] RGB
    predicted: str
    confidence: float
    variant: str
    version: str
    request_id: str = ""  # the request's id (the client's X-Request-ID, if sent): for correlating logs only
    image_index: int = 0  # position in its request
    shadows: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # variant -> (predicted, version)

    @property
    def key(self) -> str:
        return self.prediction_id


class RecentPredictions:
    """A thread-safe LRU cache of predictions, bounded by `max_items` and by `max_bytes` of image data."""

    def __init__(self, max_items: int = 10_000, max_bytes: int = 64 * 2**20) -> None:
        if max_items < 1 or max_bytes < 1:
            raise ValueError("the prediction cache needs room for at least one item")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, Prediction] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(self, prediction: Prediction) -> None:
        with self._lock:
            previous = self._items.pop(prediction.key, None)
            if previous is not None:
                self._bytes -= previous.image.nbytes
            self._items[prediction.key] = prediction
            self._bytes += prediction.image.nbytes
            while len(self._items) > self.max_items or (self._bytes > self.max_bytes and len(self._items) > 1):
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.image.nbytes

    def add_shadow(self, key: str, variant: str, predicted: str, version: str) -> None:
        """Attach a shadow variant's prediction of a cached image (a no-op once the image is evicted)."""
        with self._lock:
            prediction = self._items.get(key)
            if prediction is not None:
                shadows = {**prediction.shadows, variant: (predicted, version)}
                self._items[key] = replace(prediction, shadows=shadows)

    def get(self, key: str) -> Prediction:
        with self._lock:
            prediction = self._items.get(key)
        if prediction is None:
            raise UnknownPrediction(f"no recent prediction with id {key!r} (never issued, or expired)")
        return prediction

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


@dataclass(frozen=True)
class LiveMetrics:
    """Accuracy, precision and recall of one variant and version, from the feedback received so far."""

    variant: str
    version: str
    count: int
    accuracy: float
    precision: dict[str, float]  # per label the model predicted at least once
    recall: dict[str, float]  # per label that was the true label at least once


class FeedbackStoreUnavailable(Exception):
    """The feedback store cannot be reached or written at start-up; the message says which and why."""


class FeedbackStoreFailed(FeedbackError):
    """The store refused a write or a read just now (unreachable, out of space): nothing was acknowledged."""


class FeedbackStore:
    """Feedback images in image-folder layout, each with its record object, on a folder or an fsspec URL."""

    def __init__(
        self, url: str | os.PathLike[str], classes: Sequence[str], storage_options: dict[str, Any] | None = None
    ) -> None:
        self.classes = tuple(classes)
        self._index = {name: i for i, name in enumerate(self.classes)}
        self._records: dict[str, FeedbackRecord] = {}  # acknowledged by this process, since it started
        self._confusion: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        try:
            self.source = open_feedback_store(url, storage_options, create=True)
            self._probe()
            self._legacy = self._read_legacy()
        except Exception as error:
            raise FeedbackStoreUnavailable(f"feedback store {url} is not writable: {error}") from error

    def submit(self, prediction_id: str, label: str, find: Callable[[str], Prediction]) -> tuple[FeedbackRecord, bool]:
        """Store the true `label` of the prediction `prediction_id`, which `find` returns (UnknownPrediction if it
        cannot); returns the record and whether it is new. Blocking: call it off the event loop.

        Repeating the same feedback returns the stored record (created False), whichever replica stored it.
        """
        if not isinstance(label, str) or label not in self._index:
            raise InvalidFeedback(f"label {label!r} is not one of the model's classes: {', '.join(self.classes)}")
        if not isinstance(prediction_id, str) or not REQUEST_ID_PATTERN.fullmatch(prediction_id):
            raise InvalidFeedback(f"prediction id {prediction_id!r} is not a valid id (letters, digits, '_.-')")
        try:
            return self._submit(prediction_id, label, find)
        except FeedbackError:
            raise
        except Exception as error:  # the store, not the request: the client may retry, and nothing was stored
            get_logger().error(
                "feedback store failed; feedback not stored",
                extra={"event": "feedback", "url": self.source.url, "reason": str(error)},
            )
            raise FeedbackStoreFailed(f"the feedback store cannot take it now ({error}); retry later") from error

    def _submit(self, prediction_id: str, label: str, find: Callable[[str], Prediction]) -> tuple[FeedbackRecord, bool]:
        existing = self._stored(prediction_id)
        if existing is not None:
            return self._same(existing, label), False
        prediction = find(prediction_id)
        relative = image_path(label, prediction_id)
        self._write_image(relative, prediction.image)
        record = FeedbackRecord(
            prediction_id=prediction_id,
            request_id=prediction.request_id,
            label=label,
            predicted=prediction.predicted,
            correct=prediction.predicted == label,
            confidence=float(prediction.confidence),
            variant=prediction.variant,
            version=prediction.version,
            path=relative,
            received_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
            image_index=prediction.image_index,
            shadows={
                variant: {"predicted": predicted, "version": version, "correct": predicted == label}
                for variant, (predicted, version) in prediction.shadows.items()
            },
        )
        try:
            self._create(record_path(prediction_id), record.to_line().encode())
        except FileExistsError:  # another replica (or request) stored feedback for it in between: theirs stands
            winner = self._stored(prediction_id)
            assert winner is not None
            if winner.path != relative:
                self.source.fs.rm_file(self.source.path(relative))  # not acknowledged: not training data
            return self._same(winner, label), False
        with self._lock:
            self._records[record.key] = record
            self._add(record)
        return record, True

    def get(self, key: str) -> FeedbackRecord:
        """The feedback stored under `key`: a prediction id (or, in an older store, `<request id>~<index>`)."""
        record = self._stored(key)
        if record is None:
            raise UnknownPrediction(f"no feedback for prediction {key!r}")
        return record

    def __len__(self) -> int:
        """Feedback acknowledged by this process since it started."""
        return len(self._records)

    def live_metrics(self) -> list[LiveMetrics]:
        """Per (variant, version): accuracy, and per-label precision and recall over the feedback this process
        acknowledged."""
        with self._lock:
            confusions = {key: matrix.copy() for key, matrix in sorted(self._confusion.items())}
        metrics = []
        for (variant, version), matrix in confusions.items():
            hits = np.diag(matrix)
            predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
            metrics.append(
                LiveMetrics(
                    variant=variant,
                    version=version,
                    count=int(matrix.sum()),
                    accuracy=float(hits.sum() / matrix.sum()),
                    precision={self.classes[i]: float(hits[i] / predicted[i]) for i in np.flatnonzero(predicted)},
                    recall={self.classes[i]: float(hits[i] / actual[i]) for i in np.flatnonzero(actual)},
                )
            )
        return metrics

    def feedback_counts(self) -> dict[tuple[str, bool], int]:
        """Feedback acknowledged by this process per (variant, correct), shadow variants included."""
        counts: dict[tuple[str, bool], int] = {}
        with self._lock:
            for record in self._records.values():
                for variant, _, predicted in record.outcomes():
                    key = (variant, predicted == record.label)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def _same(self, existing: FeedbackRecord, label: str) -> FeedbackRecord:
        if existing.label != label:
            raise ConflictingFeedback(
                f"prediction {existing.key!r} already has feedback {existing.label!r}; it cannot become {label!r}"
            )
        return existing

    def _stored(self, key: str) -> FeedbackRecord | None:
        """This process's record, an older store's manifest line, or the record object any replica wrote."""
        with self._lock:
            record = self._records.get(key) or self._legacy.get(key)
        if record is not None or INDEX_SEPARATOR in key:  # older keys live in the manifest only
            return record
        try:
            return self.source.read_record(key)
        except ValueError:  # a record object this version cannot read: kept, and the prediction is taken
            get_logger().warning(
                "feedback record unreadable; kept in the store, taken as stored",
                extra={"event": "feedback", "path": record_path(key)},
            )
            raise ConflictingFeedback(f"prediction {key!r} already has feedback this server cannot read") from None

    def _write_image(self, relative: str, image: np.ndarray) -> None:
        if self.source.local:
            with atomic_destination(Path(self.source.path(relative)), durable=True) as temp:
                Image.fromarray(image).save(temp, format="PNG")
            return
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        self.source.fs.pipe_file(self.source.path(relative), buffer.getvalue())

    def _create(self, relative: str, data: bytes) -> None:
        """Write `data` at `relative` only if nothing is there (FileExistsError otherwise), durably and whole."""
        if not self.source.local:
            self.source.fs.pipe_file(self.source.path(relative), data, mode="create")  # a generation precondition
            return
        path = Path(self.source.path(relative))
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{uuid.uuid4().hex}")  # hidden, and this writer's own
        try:
            with open(staged, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(staged, path)  # atomic, and fails if the record exists: exactly one writer wins
        finally:
            staged.unlink(missing_ok=True)
        fsync_directory(path.parent)

    def _probe(self) -> None:
        probe = self.source.path(f".probe-{uuid.uuid4().hex[:8]}")
        self.source.fs.pipe_file(probe, b"ok")
        self.source.fs.rm_file(probe)

    def _read_legacy(self) -> dict[str, FeedbackRecord]:
        """An older store's manifest: read once (one file), never written; what does not parse is reported."""
        try:
            data = self.source.read(MANIFEST_FILE)
        except FileNotFoundError:
            return {}
        skipped: list[int] = []
        records, _ = parse_manifest(data, skipped)
        if skipped:
            get_logger().warning(
                "feedback manifest lines skipped: not records this version can read; kept in the file",
                extra={"event": "startup", "manifest": self.source.path(MANIFEST_FILE), "lines": skipped},
            )
        return {record.key: record for record in records}

    def _add(self, record: FeedbackRecord) -> None:
        size = len(self.classes)
        for variant, version, predicted in record.outcomes():
            matrix = self._confusion.setdefault((variant, version), np.zeros((size, size), dtype=np.int64))
            if predicted in self._index and record.label in self._index:
                matrix[self._index[record.label], self._index[predicted]] += 1


class FeedbackCollector:
    """Prometheus collector for `cifarlab_feedback_total` and `cifarlab_live_{accuracy,precision,recall}`."""

    def __init__(self, store: FeedbackStore) -> None:
        self.store = store

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        total = CounterMetricFamily(
            "cifarlab_feedback", "Feedback received, by whether the answer was correct", labels=["variant", "correct"]
        )
        for (variant, correct), count in sorted(self.store.feedback_counts().items()):
            total.add_metric([variant, str(correct).lower()], count)
        accuracy = GaugeMetricFamily(
            "cifarlab_live_accuracy", "Accuracy on requests with feedback", labels=["variant", "version"]
        )
        precision = GaugeMetricFamily(
            "cifarlab_live_precision", "Precision per label on feedback", labels=["variant", "version", "label"]
        )
        recall = GaugeMetricFamily(
            "cifarlab_live_recall", "Recall per label on feedback", labels=["variant", "version", "label"]
        )
        for live in self.store.live_metrics():
            accuracy.add_metric([live.variant, live.version], live.accuracy)
            for label, value in live.precision.items():
                precision.add_metric([live.variant, live.version, label], value)
            for label, value in live.recall.items():
                recall.add_metric([live.variant, live.version, label], value)
        yield from (total, accuracy, precision, recall)
