"""Drift detection in the service: a window of recent traffic, tested against the reference shipped inside the model.

The statistics, the reference format and the tests are cifarlab_contract.drift, shared with training, which
computes the reference at export. The server keeps the last `window` observations in a ring buffer and tests the
window when asked (GET /v1/drift, a Prometheus scrape).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from cifarlab_contract.drift import TESTS, Reference, check_images, compare, traffic_statistics


def empty_report(window: int, alpha: float, status: str) -> dict[str, Any]:
    """A drift report with no test run yet: `insufficient_data`, or `unavailable` for a model without reference."""
    return {
        "window": window,
        "observed": 0,
        "in_window": 0,
        "alpha": alpha,
        "threshold": alpha / len(TESTS),
        "correction": "bonferroni",
        "drift_detected": False,
        "status": status,
        "tests": {},
        "reference": {},
    }


class DriftMonitor:
    """A sliding window over the last `window` predictions, tested against the reference on demand.

    `observe` only copies a batch's model inputs and outputs into ring buffers (under a lock): the inference
    thread pays microseconds per batch. `report` computes the window's statistics and tests them, off the request
    path, and caches the result until the next observation, so scrapes and `GET /v1/drift` cost nothing between
    requests.
    """

    def __init__(self, reference: Reference, window: int = 200, alpha: float = 0.01) -> None:
        if window < 20:
            raise ValueError(f"a drift window needs at least 20 observations to test anything, not {window}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be between 0 and 1, not {alpha}")
        self.reference, self.window, self.alpha = reference, window, alpha
        self._images: np.ndarray | None = None  # [window, H, W, 3] uint8, shaped by the first batch
        self._probabilities = np.zeros((window, len(reference.classes)), dtype=np.float64)
        self._next = 0  # ring position of the next write
        self._observed = 0  # ever, so a report names how much traffic it has seen
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, Any]] | None = None

    def observe(self, images: np.ndarray, probabilities: np.ndarray) -> None:
        """Record a batch of model inputs (uint8 [N, H, W, 3]) and the model's softmax outputs [N, classes]."""
        if probabilities.shape[-1] != len(self.reference.classes):
            raise ValueError(
                f"probabilities have {probabilities.shape[-1]} classes, the reference {len(self.reference.classes)}"
            )
        check_images(images)
        if len(images) != len(probabilities):
            raise ValueError(f"{len(images)} images but {len(probabilities)} rows of probabilities")
        observed = len(images)
        images, probabilities = images[-self.window :], probabilities[-self.window :]
        with self._lock:
            if self._images is None:
                self._images = np.zeros((self.window, *images.shape[1:]), dtype=np.uint8)
            elif self._images.shape[1:] != images.shape[1:]:
                raise ValueError(f"images of {list(images.shape[1:])}, earlier ones {list(self._images.shape[1:])}")
            positions = (self._next + np.arange(len(images))) % self.window
            self._images[positions] = images
            self._probabilities[positions] = probabilities
            self._next = (self._next + len(images)) % self.window
            self._observed += observed

    def report(self) -> dict[str, Any]:
        """The drift report (JSON-ready) of the current window; `drift_detected` is False until the window is full."""
        with self._lock:
            observed = self._observed
            if self._cached is not None and self._cached[0] == observed:
                return self._cached[1]
            count = min(observed, self.window)
            images = None if self._images is None else self._images[:count].copy()
            probabilities = self._probabilities[:count].copy()
        report = empty_report(self.window, self.alpha, "insufficient_data") | {
            "observed": observed,
            "in_window": count,
            "reference": {"images": self.reference.images, **self.reference.provenance},
        }
        if count == self.window and images is not None:
            drifted, results = compare(self.reference, *traffic_statistics(images, probabilities), self.alpha)
            report.update(
                status="drift" if drifted else "ok",
                drift_detected=drifted,
                tests={name: asdict(result) for name, result in results.items()},
            )
        with self._lock:
            self._cached = (observed, report)
        return report


class DriftCollector:
    """Prometheus collector: `cifarlab_drift_score{variant,test}` and `cifarlab_drift_detected{variant}`.

    Register it once (`registry.register(DriftCollector(monitors))`, `monitors` returning the current monitor
    per variant); values are computed at scrape time.
    """

    def __init__(self, monitors: Callable[[], Mapping[str, DriftMonitor]]) -> None:
        self.monitors = monitors

    def collect(self) -> Iterator[Metric]:
        scores = GaugeMetricFamily(
            "cifarlab_drift_score",
            "Drift effect size of the window per test (0 = as reference)",
            labels=["variant", "test"],
        )
        detected = GaugeMetricFamily(
            "cifarlab_drift_detected", "1 when the current window differs from the reference", labels=["variant"]
        )
        for variant, monitor in self.monitors().items():
            report = monitor.report()
            detected.add_metric([variant], float(report["drift_detected"]))
            for test, result in report["tests"].items():
                scores.add_metric([variant, test], result["score"])
        yield scores
        yield detected
