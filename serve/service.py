"""The serving state: the current model, its micro-batcher, reloads, and start/stop."""

import asyncio
import contextlib
import signal
import time

import numpy as np

from serve.batching import MicroBatcher
from serve.errors import ApiError
from serve.logging import get_logger
from serve.metrics import Metrics
from serve.model import LoadedModel, ModelLoadError, load_model
from serve.settings import Settings


class Service:
    """Owns the model. A reload builds and warms a new LoadedModel, then swaps one reference: each batch reads
    the reference once, so requests already in a batch finish on the model they started with."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.log = get_logger()
        self.model: LoadedModel | None = None
        self.batcher: MicroBatcher[LoadedModel] = MicroBatcher(
            self._infer, settings.max_batch_size, settings.max_wait_ms
        )
        self._reload_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.batcher.closed

    async def start(self) -> None:
        try:
            model = await asyncio.to_thread(load_model, self.settings)
        except ModelLoadError as error:
            self.log.error("model failed to load; not starting", extra={"event": "startup", "reason": str(error)})
            raise
        self._install(model)
        self.batcher.start()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no SIGHUP on Windows / outside main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._reload_on_signal)
        self.log.info("ready", extra={"event": "startup", **self._model_fields(model)})

    async def stop(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        self.metrics.model_ready.labels(variant=self.settings.variant).set(0)
        await self.batcher.stop()
        self.log.info("stopped: queue drained", extra={"event": "shutdown"})

    async def predict(self, images: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """Class probabilities [N, classes] for uint8 images [N, 32, 32, 3], and the model that computed them."""
        logits, model = await self.batcher.submit(images)
        return softmax(logits), model

    async def reload(self, uri: str | None = None) -> tuple[LoadedModel, LoadedModel]:
        """Load, warm and swap in a model (default: re-resolve MODEL_URI); (old, new). The old one keeps serving
        if the new one fails (ApiError 422 with the reason)."""
        async with self._reload_lock:
            old = self.current()
            variant = self.settings.variant
            try:
                new = await asyncio.to_thread(load_model, self.settings, uri)
            except ModelLoadError as error:
                self.metrics.reloads.labels(variant=variant, result="failure").inc()
                self.log.error("reload failed; the previous model keeps serving", extra={"reason": str(error)})
                raise ApiError(422, "model_load_failed", f"{error}; the previous model keeps serving") from error
            self._install(new)
            self.metrics.reloads.labels(variant=variant, result="success").inc()
            self.log.info("reloaded", extra={"event": "reload", "previous": old.version, **self._model_fields(new)})
            return old, new

    def current(self) -> LoadedModel:
        if self.model is None:
            raise ApiError(503, "not_ready", "no model is loaded yet")
        return self.model

    def _install(self, model: LoadedModel) -> None:
        self.model = model
        self.metrics.set_model(self.settings.variant, model.version, model.run_id, model.sha256)

    def _infer(self, images: np.ndarray) -> tuple[np.ndarray, LoadedModel]:
        """Runs on the batcher's worker thread."""
        model = self.current()  # read once: the whole batch runs on one model
        started = time.perf_counter()
        logits = model.logits(images)
        variant = self.settings.variant
        self.metrics.inference_duration.labels(variant=variant).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(variant=variant).observe(len(images))
        return logits, model

    def _reload_on_signal(self) -> None:
        task = asyncio.get_running_loop().create_task(self._reload_quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reload_quietly(self) -> None:
        with contextlib.suppress(ApiError):  # already logged and counted; the old model keeps serving
            await self.reload()

    @staticmethod
    def _model_fields(model: LoadedModel) -> dict[str, str]:
        return {"model_uri": model.uri, "model_version": model.version, "run_id": model.run_id, "sha256": model.sha256}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True))
