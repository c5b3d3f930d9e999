"""Prometheus metrics, in one registry per app, under the names that monitoring/ (dashboards, alert rules) queries."""

from collections.abc import Sequence

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, PlatformCollector, ProcessCollector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = tuple(i / 10 for i in range(1, 11))


class Metrics:
    """All of the service's metrics. A registry of its own: several apps in one process do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.requests = Counter(
            "cifarlab_http_requests_total", "HTTP requests", ["route", "method", "status", "variant"], registry=r
        )
        self.request_duration = Histogram(
            "cifarlab_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method", "variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("cifarlab_http_requests_in_flight", "HTTP requests being served", registry=r)
        self.batch_size = Histogram(
            "cifarlab_batch_size", "images per model call", ["variant"], buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_duration = Histogram(
            "cifarlab_inference_duration_seconds",
            "time of one model call",
            ["variant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter("cifarlab_predictions_total", "predicted labels", ["variant", "label"], registry=r)
        self.confidence = Histogram(
            "cifarlab_prediction_confidence",
            "probability of the predicted label",
            ["variant"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "cifarlab_model_info", "the model being served (=1)", ["variant", "version", "run_id", "sha256"], registry=r
        )
        self.model_ready = Gauge(
            "cifarlab_model_ready",
            "1 when the variant serves the model it was last asked to load, loaded and warm; 0 before that, after "
            "a failed load or reload (a previous model, if any, keeps serving), and while shutting down",
            ["variant"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            "cifarlab_shadow_dropped_total",
            "shadow copies dropped because the shadow fell behind",
            ["variant"],
            registry=r,
        )
        self.shed = Counter(
            "cifarlab_shed_total", "requests refused at once: over MAX_LATENCY_MS or MAX_QUEUE", ["variant"], registry=r
        )
        self.prediction_log_available = Gauge(
            "cifarlab_prediction_log_available",
            "1 while answered images are logged (PREDICTION_LOG_URL); 0 when the log's store could not be opened at "
            "start and the server serves without it (PREDICTION_LOG_REQUIRED=false)",
            registry=r,
        )
        self.reloads = Counter(
            "cifarlab_model_reloads_total", "model reloads by result", ["variant", "result"], registry=r
        )

        self._model_labels: dict[str, tuple[str, str, str, str]] = {}

    def set_model(self, variant: str, version: str, run_id: str, sha256: str) -> None:
        """Point the model-info gauge at the model now serving (one series per variant)."""
        previous = self._model_labels.get(variant)
        if previous is not None:
            self.model_info.remove(*previous)
        self._model_labels[variant] = (variant, version, run_id, sha256)
        self.model_info.labels(variant=variant, version=version, run_id=run_id, sha256=sha256).set(1)
        self.model_ready.labels(variant=variant).set(1)

    def record_predictions(self, variant: str, classes: Sequence[str], probabilities: np.ndarray) -> None:
        """Count the predicted labels and observe the confidences of one batch."""
        predicted = probabilities.argmax(axis=1)
        for index, count in enumerate(np.bincount(predicted, minlength=len(classes))):
            if count:
                self.predictions.labels(variant=variant, label=classes[index]).inc(int(count))
        confidence = self.confidence.labels(variant=variant)
        for value in probabilities[np.arange(len(predicted)), predicted]:
            confidence.observe(float(value))
