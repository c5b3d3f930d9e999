"""The feedback loop: recent predictions kept in memory, true labels stored durably as a training-ready dataset.

`RecentPredictions` holds the model inputs of the last requests (bounded in count and in bytes, oldest evicted
first), with the predictions shadow variants made of the same images, each under the prediction id the server
issued for it. When a client later names the true label of an image (`POST /v1/feedback`: that prediction id),
`FeedbackStore` writes it as `<root>/<class>/<prediction id>.png` (the layout `cifarlab.data.prepare` reads for
`train/`) and appends a line to `<root>/manifest.jsonl`. The ids are random and issued by the server, never by
the client, so no client can name, overwrite or claim another client's prediction. Both writes are fsynced
before the call returns, so acknowledged feedback survives a crash; the image is renamed into place before its
manifest line exists, so no manifest line names a partial image. The store is for one server process (a lock
guards it; several processes need one store each).

Errors map to HTTP statuses: UnknownPrediction 404, InvalidFeedback 422, ConflictingFeedback 409.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cifarlab_contract.feedback import (
    MANIFEST_FILE,
    REQUEST_ID_PATTERN,
    FeedbackRecord,
    image_path,
    read_manifest,
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


class FeedbackStore:
    """Feedback images in image-folder layout plus an append-only JSON-lines manifest, reloaded at start."""

    def __init__(self, root: str | os.PathLike[str], classes: Sequence[str]) -> None:
        self.root = Path(root)
        self.classes = tuple(classes)
        self._index = {name: i for i, name in enumerate(self.classes)}
        self._records: dict[str, FeedbackRecord] = {}
        self._confusion: dict[tuple[str, str], np.ndarray] = {}
        self._lock = threading.Lock()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = self.root / MANIFEST_FILE
        self._load()

    def submit(self, prediction_id: str, label: str, recent: RecentPredictions) -> tuple[FeedbackRecord, bool]:
        """Store the true `label` of the recent prediction `prediction_id`; returns the record and whether it is new.

        Repeating the same feedback returns the stored record (created False), even after the cache evicted it.
        """
        if not isinstance(label, str) or label not in self._index:
            raise InvalidFeedback(f"label {label!r} is not one of the model's classes: {', '.join(self.classes)}")
        if not isinstance(prediction_id, str) or not REQUEST_ID_PATTERN.fullmatch(prediction_id):
            raise InvalidFeedback(f"prediction id {prediction_id!r} is not a valid id (letters, digits, '_.-')")
        with self._lock:
            existing = self._records.get(prediction_id)
            if existing is not None:
                if existing.label != label:
                    raise ConflictingFeedback(
                        f"prediction {prediction_id!r} already has feedback {existing.label!r}; "
                        f"it cannot become {label!r}"
                    )
                return existing, False
            prediction = recent.get(prediction_id)
            relative = image_path(label, prediction_id)
            self._write_image(self.root / relative, prediction.image)
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
            self._append(record)
            self._add(record)
        return record, True

    def get(self, key: str) -> FeedbackRecord:
        """The feedback stored under `key`: a prediction id (or, in an older store, `<request id>~<index>`)."""
        with self._lock:
            record = self._records.get(key)
        if record is None:
            raise UnknownPrediction(f"no feedback for prediction {key!r}")
        return record

    def __len__(self) -> int:
        return len(self._records)

    def live_metrics(self) -> list[LiveMetrics]:
        """Per (variant, version): accuracy, and per-label precision and recall over all feedback received."""
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
        """Feedback received per (variant, correct), shadow variants included."""
        counts: dict[tuple[str, bool], int] = {}
        with self._lock:
            for record in self._records.values():
                for variant, _, predicted in record.outcomes():
                    key = (variant, predicted == record.label)
                    counts[key] = counts.get(key, 0) + 1
        return counts

    def _write_image(self, path: Path, image: np.ndarray) -> None:
        with atomic_destination(path, durable=True) as temp:
            Image.fromarray(image).save(temp, format="PNG")

    def _append(self, record: FeedbackRecord) -> None:
        line = record.to_line()
        created = not self.manifest.exists()
        with open(self.manifest, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        if created:
            fsync_directory(self.root)

    def _load(self) -> None:
        """Read the manifest. Only a torn last line (a crash mid-append, never acknowledged) is cut off; a line
        this version cannot read stays in the file, named in one warning."""
        if not self.manifest.exists():
            return
        skipped: list[int] = []
        records, good_end = read_manifest(self.manifest, skipped)
        for record in records:
            self._add(record)
        if skipped:
            get_logger().warning(
                "feedback manifest lines skipped: not records this version can read; kept in the file",
                extra={"event": "startup", "manifest": str(self.manifest), "lines": skipped},
            )
        if good_end < self.manifest.stat().st_size:
            with open(self.manifest, "r+b") as handle:
                handle.truncate(good_end)
                os.fsync(handle.fileno())

    def _add(self, record: FeedbackRecord) -> None:
        self._records[record.key] = record
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
