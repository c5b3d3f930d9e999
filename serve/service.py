"""The serving state: model variants (each with its model, micro-batcher and drift window), A/B routing, shadow
copies, the feedback store, reloads, and start/stop. What it refuses it raises as its own errors (below, and
serve.feedback's); serve.errors maps them to HTTP statuses."""

import asyncio
import contextlib
import signal
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from cifarlab_contract.drift import softmax
from cifarlab_contract.feedback import FeedbackRecord, new_prediction_id
from serve.batching import BatchFailed, MicroBatcher, Overloaded, ShuttingDown
from serve.drift import DriftCollector, DriftMonitor, empty_report
from serve.feedback import (
    FeedbackCollector,
    FeedbackStore,
    FeedbackStoreUnavailable,
    Prediction,
    RecentPredictions,
    UnknownPrediction,
)
from serve.json_logs import get_logger
from serve.model import LoadedModel, ModelLoadError, load_model
from serve.predlog import LoggedPrediction, PredictionLog, PredictionLogUnavailable, timestamp
from serve.prometheus_metrics import Metrics
from serve.settings import Settings
from serve.variants import VariantRouter, VariantSpec

SHADOW_BACKLOG = 256  # requests queued for a shadow variant beyond which its copies are dropped
SHADOW_FEEDBACK_WAIT_S = 10.0  # how long feedback waits for the shadows' predictions of its request


class NotReady(Exception):
    """A variant has no model loaded yet."""


class UnknownVariant(LookupError):
    """No variant of that name is configured."""


class VariantRequired(ValueError):
    """A reload with several variants configured that does not name one."""


class ReloadFailed(Exception):
    """The new model did not load; the previous one keeps serving."""


class FeedbackDisabled(Exception):
    """Feedback is off: the server was started without FEEDBACK_DIR."""


# The rows a variant's batcher answers: per image, [logits, probabilities] (Variant._infer)
OUTPUTS_LOGITS, OUTPUTS_PROBABILITIES = 0, 1


@dataclass(frozen=True)
class Answer:
    probabilities: np.ndarray  # [N, classes]
    model: LoadedModel
    variant: str
    logits: np.ndarray  # [N, classes], what the model computed (the v2 API answers them)
    prediction_ids: tuple[str, ...] = ()  # one per image, issued here: what feedback names


class Variant:
    """One configured variant. A reload builds and warms a new LoadedModel, then swaps one reference: each batch
    reads the reference once, so requests already in a batch finish on the model they started with."""

    def __init__(self, name: str, spec: VariantSpec, settings: Settings, metrics: Metrics) -> None:
        self.name, self.spec, self.settings, self.metrics = name, spec, settings, metrics
        self.model: LoadedModel | None = None
        self.drift: DriftMonitor | None = None
        self.batcher: MicroBatcher[LoadedModel] = MicroBatcher(
            self._infer,
            settings.max_batch_size,
            settings.max_wait_ms,
            record=self._record,
            max_latency_ms=settings.max_latency_ms,
            max_queue=settings.max_queue,
            on_shed=metrics.shed.labels(variant=name).inc,
        )

    def current(self) -> LoadedModel:
        if self.model is None:
            raise NotReady(f"variant {self.name!r} has no model loaded yet")
        return self.model

    def install(self, model: LoadedModel) -> None:
        reference, settings = model.reference, self.settings
        self.drift = None if reference is None else DriftMonitor(reference, settings.drift_window, settings.drift_alpha)
        self.model = model
        self.metrics.set_model(self.name, model.version, model.run_id, model.sha256)

    def drift_report(self) -> dict[str, Any]:
        if self.drift is None:
            return empty_report(self.settings.drift_window, self.settings.drift_alpha, "unavailable")
        return self.drift.report()

    def _infer(self, images: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """Runs on the batcher's worker thread: the model call and softmax, once per batch. Each row is the image's
        [logits, probabilities] (OUTPUTS_LOGITS, OUTPUTS_PROBABILITIES): the batcher hands each request its rows,
        and the v2 API answers both."""
        model = self.current()  # read once: the whole batch runs on one model
        logits = model.logits(images)
        return np.stack([logits, softmax(logits)], axis=1), model

    def _record(self, images: np.ndarray, outputs: np.ndarray, model: LoadedModel, seconds: float) -> None:
        """After the batch's answers: metrics and the drift window."""
        probabilities = outputs[:, OUTPUTS_PROBABILITIES]
        self.metrics.inference_duration.labels(variant=self.name).observe(seconds)
        self.metrics.batch_size.labels(variant=self.name).observe(len(images))
        self.metrics.record_predictions(self.name, model.classes, probabilities)
        if self.drift is not None and self.model is model:  # a reload in between: the batch is not its model's
            self.drift.observe(images, probabilities)


class Service:
    """Owns the variants and everything shared between requests."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.log = get_logger()
        specs = settings.variant_specs()
        self.variants = {name: Variant(name, spec, settings, self.metrics) for name, spec in specs.items()}
        self.router = VariantRouter(specs)
        self.default_variant = next(name for name, spec in specs.items() if not spec.shadow)
        for name in self.router.shadows:
            self.metrics.shadow_dropped.labels(variant=name)  # a series from the start: 0 until a drop
        for name in self.variants:
            self.metrics.model_ready.labels(variant=name).set(0)  # until its model is loaded and warm
        self.classes: tuple[str, ...] = ()
        self.recent: RecentPredictions | None = None
        self.feedback: FeedbackStore | None = None
        self.prediction_log: PredictionLog | None = None
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self._shadowing: dict[str, set[asyncio.Task[None]]] = {}  # prediction id -> its shadow copies still running
        self.metrics.registry.register(DriftCollector(self.drift_monitors))

    @property
    def ready(self) -> bool:
        return all(v.model is not None and not v.batcher.closed for v in self.variants.values())

    async def start(self) -> None:
        try:
            for variant in self.variants.values():
                model = await asyncio.to_thread(load_model, variant.spec.model_uri, self.settings)
                self._check_classes(model)
                variant.install(model)
        except ModelLoadError as error:
            self.log.error("model failed to load; not starting", extra={"event": "startup", "reason": str(error)})
            raise
        if self.settings.prediction_log_url is not None:
            await self._open_prediction_log(self.settings.prediction_log_url)
        if self.settings.feedback_dir is not None:
            self.feedback = await self._open_feedback_store(self.settings.feedback_dir)
            self.recent = RecentPredictions(self.settings.feedback_cache_items, self.settings.feedback_cache_bytes)
            self.metrics.registry.register(FeedbackCollector(self.feedback))
        for variant in self.variants.values():
            variant.batcher.start()
            self.log.info("ready", extra={"event": "startup", "variant": variant.name, **_fields(variant.current())})
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no SIGHUP on Windows / outside main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_on_signal)

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for variant in self.variants.values():
            self.metrics.model_ready.labels(variant=variant.name).set(0)
        # answering variants first: their last requests may still send shadow copies
        for variant in sorted(self.variants.values(), key=lambda v: v.spec.shadow):
            await variant.batcher.stop()
        if self.prediction_log is not None:
            await asyncio.to_thread(self.prediction_log.close)  # what was answered is written before exit
        self.log.info("stopped: queues drained", extra={"event": "shutdown"})

    def drift_monitors(self) -> dict[str, DriftMonitor]:
        """The current drift monitor of each variant whose model has a reference (a reload replaces it)."""
        return {name: v.drift for name, v in self.variants.items() if v.drift is not None}

    def assign(self, client_id: str | None) -> str:
        """The variant that answers this client (sticky by client id)."""
        return self.router.assign(client_id).answer

    async def predict(self, images: np.ndarray, variant_name: str, request_id: str) -> Answer:
        """Class probabilities for uint8 images [N, 32, 32, 3] from the named variant; shadow variants get a copy
        off the response path. Each image gets a new prediction id; with feedback on, the images are kept under it
        for a later true label. `request_id` only goes into the records, for correlating logs."""
        variant = self.variants[variant_name]
        outputs, model = await variant.batcher.submit(images)
        logits, probabilities = outputs[:, OUTPUTS_LOGITS], outputs[:, OUTPUTS_PROBABILITIES]
        ids = tuple(new_prediction_id() for _ in range(len(images)))
        if self.recent is not None:
            self._remember(ids, request_id, images, probabilities, model, variant_name)
        if self.prediction_log is not None:
            self._log_predictions(ids, request_id, images, probabilities, model, variant_name)
        for shadow in self.router.shadows:
            # A shadow never slows the answers down: past a few batches of backlog, its copies are dropped.
            if self.variants[shadow].batcher.backlog > SHADOW_BACKLOG:
                self.metrics.shadow_dropped.labels(variant=shadow).inc()
            else:
                task = self._in_background(self._shadow(shadow, images, ids, request_id))
                if self.recent is not None:
                    self._track_shadow(ids, task)
        return Answer(probabilities, model, variant_name, logits, ids)

    async def submit_feedback(self, prediction_id: str, label: str) -> tuple[FeedbackRecord, bool]:
        if self.feedback is None or self.recent is None:
            raise FeedbackDisabled("feedback is off on this server: start it with FEEDBACK_DIR set")
        if shadows := self._shadowing.get(prediction_id):
            # feedback sent right after the answer: the record also scores what the shadows predict
            await asyncio.wait(set(shadows), timeout=SHADOW_FEEDBACK_WAIT_S)
        return await asyncio.to_thread(self.feedback.submit, prediction_id, label, self._find_prediction)

    def variant(self, name: str | None) -> Variant:
        """A variant by name (default: the first answering one); UnknownVariant for a name not configured."""
        name = name or self.default_variant
        if name not in self.variants:
            raise UnknownVariant(f"no variant {name!r}; configured: {', '.join(self.variants)}")
        return self.variants[name]

    async def reload(self, uri: str | None = None, variant_name: str | None = None) -> tuple[LoadedModel, LoadedModel]:
        """Load, warm and swap in a model for a variant (default: re-resolve its configured URI); (old, new). The
        old one keeps serving if the new one fails (ReloadFailed, with the reason)."""
        if variant_name is None and len(self.variants) > 1:
            raise VariantRequired(f"name the variant to reload: one of {', '.join(self.variants)}")
        variant = self.variant(variant_name)
        async with self._reload_lock:
            old = variant.current()
            try:
                new = await asyncio.to_thread(load_model, uri or variant.spec.model_uri, self.settings)
                self._check_classes(new)
            except ModelLoadError as error:
                self.metrics.reloads.labels(variant=variant.name, result="failure").inc()
                # not the model asked for: the old one answers, and the CifarlabModelNotReady alert says so
                self.metrics.model_ready.labels(variant=variant.name).set(0)
                self.log.error(
                    "reload failed; the previous model keeps serving",
                    extra={"variant": variant.name, "reason": str(error)},
                )
                raise ReloadFailed(f"{error}; the previous model keeps serving") from error
            variant.install(new)
            self.metrics.reloads.labels(variant=variant.name, result="success").inc()
            self.log.info(
                "reloaded",
                extra={"event": "reload", "variant": variant.name, "previous": old.version, **_fields(new)},
            )
            return old, new

    def _check_classes(self, model: LoadedModel) -> None:
        """Every variant must predict the same classes: feedback, metrics and A/B reports compare them."""
        if not self.classes:
            self.classes = model.classes
        elif model.classes != self.classes:
            raise ModelLoadError(f"{model.uri} predicts {list(model.classes)}, the other variants {list(self.classes)}")

    def _remember(
        self,
        ids: tuple[str, ...],
        request_id: str,
        images: np.ndarray,
        probabilities: np.ndarray,
        model: LoadedModel,
        variant: str,
    ) -> None:
        assert self.recent is not None
        for index, (prediction_id, image, row) in enumerate(zip(ids, images, probabilities, strict=True)):
            best = int(row.argmax())
            predicted, confidence = model.classes[best], float(row[best])
            self.recent.add(
                Prediction(prediction_id, image, predicted, confidence, variant, model.version, request_id, index)
            )

    async def _open_prediction_log(self, url: str) -> None:
        settings = self.settings
        log = PredictionLog(
            url,
            self.metrics.registry,
            storage_options=settings.prediction_log_options,
            sample_rate=settings.prediction_log_sample_rate,
            batch_items=settings.prediction_log_batch_items,
            flush_s=settings.prediction_log_flush_s,
        )
        try:
            await asyncio.to_thread(log.open)
        except PredictionLogUnavailable as error:
            if settings.prediction_log_required:  # one line, as for a model that does not load; not ready
                self.log.error(
                    "prediction log unavailable; not starting", extra={"event": "startup", "reason": str(error)}
                )
                raise ModelLoadError(str(error)) from error
            self.metrics.prediction_log_available.set(0)
            self.log.warning(
                "prediction log unavailable; serving without it (PREDICTION_LOG_REQUIRED=false)",
                extra={"event": "startup", "reason": str(error)},
            )
            return
        self.metrics.prediction_log_available.set(1)
        self.prediction_log = log

    async def _open_feedback_store(self, url: str) -> FeedbackStore:
        try:
            return await asyncio.to_thread(FeedbackStore, url, self.classes, self.settings.feedback_options)
        except FeedbackStoreUnavailable as error:  # one line, as for a model that does not load; not ready
            self.log.error("feedback store unavailable; not starting", extra={"event": "startup", "reason": str(error)})
            raise ModelLoadError(str(error)) from error

    @property
    def prediction_log_state(self) -> Literal["logging", "unavailable"] | None:
        """For /readyz: "logging", "unavailable" (serving without it, best effort), or None with no log set."""
        if self.settings.prediction_log_url is None:
            return None
        return "logging" if self.prediction_log is not None else "unavailable"

    def _log_predictions(
        self,
        ids: tuple[str, ...],
        request_id: str,
        images: np.ndarray,
        probabilities: np.ndarray,
        model: LoadedModel,
        variant: str,
    ) -> None:
        assert self.prediction_log is not None
        now, top = timestamp(), min(self.settings.default_top_k, len(model.classes))
        for index, (prediction_id, image, row) in enumerate(zip(ids, images, probabilities, strict=True)):
            order = np.argsort(-row, kind="stable")[:top]
            entry = LoggedPrediction(
                prediction_id=prediction_id,
                request_id=request_id,
                image_index=index,
                time=now,
                variant=variant,
                model_name=model.name,
                model_version=model.version,
                run_id=model.run_id,
                predicted=model.classes[int(order[0])],
                confidence=float(row[order[0]]),
                top_k={model.classes[int(i)]: float(row[i]) for i in order},
                image=LoggedPrediction.image_path(prediction_id),
            )
            self.prediction_log.add(entry, image)

    def _find_prediction(self, prediction_id: str) -> Prediction:
        """The prediction feedback names: from this process's cache, else (another replica answered it, or this one
        before a restart) from the shared log. Blocking: the store calls it off the event loop."""
        assert self.recent is not None
        try:
            return self.recent.get(prediction_id)
        except UnknownPrediction:
            found = None if self.prediction_log is None else self.prediction_log.lookup(prediction_id)
            if found is None:
                raise
        record, image = found
        return Prediction(
            prediction_id,
            image,
            record["predicted"],
            record["confidence"],
            record["variant"],
            record["model_version"],
            record["request_id"],
            record["image_index"],
        )

    async def _shadow(self, name: str, images: np.ndarray, ids: tuple[str, ...], request_id: str) -> None:
        try:
            outputs, model = await self.variants[name].batcher.submit(images)
        except (
            BatchFailed,
            ShuttingDown,
            Overloaded,
        ) as error:  # a shadow's failure never reaches the client; it is logged
            self.log.warning(
                "shadow prediction failed", extra={"variant": name, "request_id": request_id, "reason": str(error)}
            )
            return
        if self.recent is not None:
            for prediction_id, best in zip(ids, outputs[:, OUTPUTS_PROBABILITIES].argmax(axis=1), strict=True):
                self.recent.add_shadow(prediction_id, name, model.classes[best], model.version)

    def _in_background(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _track_shadow(self, ids: tuple[str, ...], task: asyncio.Task[None]) -> None:
        for prediction_id in ids:
            self._shadowing.setdefault(prediction_id, set()).add(task)

        def forget(done: asyncio.Task[None]) -> None:
            for prediction_id in ids:
                running = self._shadowing.get(prediction_id, set())
                running.discard(done)
                if not running:  # the last shadow copy of this image
                    self._shadowing.pop(prediction_id, None)

        task.add_done_callback(forget)

    def _reload_on_signal(self) -> None:
        for name in self.variants:
            self._in_background(self._reload_quietly(name))

    async def _reload_quietly(self, name: str) -> None:
        with contextlib.suppress(ReloadFailed, NotReady):  # logged and counted; the old model keeps serving
            await self.reload(variant_name=name)


def _fields(model: LoadedModel) -> dict[str, str]:
    return {"model_uri": model.uri, "model_version": model.version, "run_id": model.run_id, "sha256": model.sha256}
