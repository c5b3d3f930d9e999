"""Following the registry: a variant served from `models:/<name>@<alias>` checks the alias every MODEL_POLL_S
seconds, and when it names another version, loads, warms and swaps it in through the admin reload's path
(Service.reload), so no request fails: a batch reads the model reference once and finishes on the model it began.

A version that fails to load leaves the old one serving; it is retried after a backoff that doubles from the poll
interval up to MAX_BACKOFF_S, and reported in /readyz's detail, the `cifarlab_model_follow_failing` gauge and the
log. A registry that cannot be reached changes nothing that serves: the check is counted, logged and tried again
at the next poll. A variant reloaded by hand from another URI is not followed until it serves its own URI again.
"""

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from serve.service import ReloadFailed, Service

MAX_BACKOFF_S = 600.0


def alias_of(uri: str) -> tuple[str, str] | None:
    """(registered model, alias) of a `models:/<name>@<alias>` URI; None for a URI that cannot move."""
    if not uri.startswith("models:/"):
        return None
    name, at, alias = uri.removeprefix("models:/").partition("@")
    return (name, alias) if at and name and alias else None


def alias_version(name: str, alias: str) -> str:
    """The version the alias names now, from the registry MLFLOW_TRACKING_URI points at. Blocking."""
    from mlflow import MlflowClient  # the server needs MLflow only for MLflow URIs (serve.model says so)

    return str(MlflowClient().get_model_version_by_alias(name, alias).version)


def backoff(poll_s: float, attempts: int) -> float:
    """Seconds before the next try of a version that failed `attempts` times: the poll interval, doubled per
    failure, at most MAX_BACKOFF_S."""
    return float(min(poll_s * 2 ** (attempts - 1), MAX_BACKOFF_S))


@dataclass
class Failure:
    version: str
    reason: str
    attempts: int
    retry_at: float  # time.monotonic()


@dataclass
class FollowState:
    name: str
    alias: str
    alias_version: str | None = None
    checked_at: float | None = None  # Unix time of the last check that reached the registry
    poll_error: str | None = None  # why the last check did not reach the registry
    failure: Failure | None = None
    paused: str | None = None
    last_swap: dict[str, Any] = field(default_factory=dict)


class AliasFollower:
    def __init__(self, service: Service) -> None:
        self.service = service
        self.poll_s = service.settings.model_poll_s
        self.states: dict[str, FollowState] = {}
        for variant in service.variants.values():
            if (target := alias_of(variant.spec.model_uri)) is not None:
                self.states[variant.name] = FollowState(*target)
        registry = service.metrics.registry
        self.failing = Gauge(
            "cifarlab_model_follow_failing",
            "1 while the version the variant's alias names fails to load (the previous version keeps serving)",
            ["variant"],
            registry=registry,
        )
        self.poll_errors = Counter(
            "cifarlab_model_follow_poll_errors_total",
            "alias checks that could not read the registry (nothing changed)",
            ["variant"],
            registry=registry,
        )
        for name in self.states:
            self.failing.labels(variant=name).set(0)
            self.poll_errors.labels(variant=name)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def enabled(self) -> bool:
        return self.poll_s > 0 and bool(self.states)

    def start(self) -> None:
        if self.enabled:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._follow(name)) for name in self.states]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def report(self) -> dict[str, dict[str, Any]] | None:
        """What /readyz shows of each followed variant; None when nothing is followed."""
        if not self.enabled:
            return None
        now = time.monotonic()
        return {name: self._describe(name, state, now) for name, state in self.states.items()}

    def _describe(self, name: str, state: FollowState, now: float) -> dict[str, Any]:
        failure = state.failure
        return {
            "alias": f"models:/{state.name}@{state.alias}",
            "poll_s": self.poll_s,
            "served_version": self.service.variants[name].current().version,
            "alias_version": state.alias_version,
            "checked_at": state.checked_at,
            "poll_error": state.poll_error,
            "paused": state.paused,
            "failing": None
            if failure is None
            else {
                "version": failure.version,
                "reason": failure.reason,
                "attempts": failure.attempts,
                "retry_in_s": round(max(failure.retry_at - now, 0.0), 1),
            },
            "last_swap": state.last_swap or None,
        }

    async def _follow(self, name: str) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check(name)
            except Exception:  # a bug here must not end following; it is logged with its traceback
                self.service.log.exception("alias check failed", extra={"event": "follow", "variant": name})

    async def check(self, name: str) -> None:
        """One check of a variant's alias, and a swap when it names a version that is not served."""
        state, variant, log = self.states[name], self.service.variants[name], self.service.log
        current = variant.current()
        if current.uri != variant.spec.model_uri:
            state.paused = f"serving {current.uri}, loaded by hand; following resumes once {variant.spec.model_uri} is"
            return
        state.paused = None
        try:
            version = await asyncio.to_thread(alias_version, state.name, state.alias)
        except Exception as error:
            state.poll_error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            self.poll_errors.labels(variant=name).inc()
            log.warning("cannot read the alias; nothing changed", extra=self._fields(name, reason=state.poll_error))
            return
        state.alias_version, state.checked_at, state.poll_error = version, time.time(), None
        if version == current.version:
            self._clear(name, state)
            return
        failure = state.failure
        if failure is not None and failure.version == version and time.monotonic() < failure.retry_at:
            return
        log.info("the alias moved; loading", extra=self._fields(name, served=current.version, version=version))
        await self._swap(name, state, version)

    async def _swap(self, name: str, state: FollowState, version: str) -> None:
        try:
            old, new = await self.service.reload(variant_name=name)  # re-resolves the alias, warms, swaps
        except ReloadFailed as error:
            previous = state.failure
            attempts = previous.attempts + 1 if previous is not None and previous.version == version else 1
            delay = backoff(self.poll_s, attempts)
            state.failure = Failure(version, str(error), attempts, time.monotonic() + delay)
            self.failing.labels(variant=name).set(1)
            log_fields = self._fields(name, version=version, attempts=attempts, retry_in_s=delay, reason=str(error))
            self.service.log.error(
                "the alias's version failed to load; the previous one keeps serving", extra=log_fields
            )
            return
        state.last_swap = {"from_version": old.version, "to_version": new.version, "at": time.time()}
        self._clear(name, state)
        self.service.log.info(
            "followed the alias", extra=self._fields(name, previous=old.version, model_version=new.version)
        )

    def _clear(self, name: str, state: FollowState) -> None:
        state.failure = None
        self.failing.labels(variant=name).set(0)

    def _fields(self, name: str, **values: Any) -> dict[str, Any]:
        state = self.states[name]
        return {"event": "follow", "variant": name, "alias": f"models:/{state.name}@{state.alias}", **values}
