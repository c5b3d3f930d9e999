"""Pure ASGI middleware: request ids, metrics and one JSON log line per request; the body size limit; a model that
does not load reported in one line."""

import json
import math
import sys
import time
import uuid
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cifarlab_contract.feedback import REQUEST_ID_PATTERN
from serve.errors import ApiError, error_body, is_v2, v2_error_body
from serve.model import ModelLoadError
from serve.service import Service

REQUEST_ID_HEADER = "X-Request-ID"


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


async def send_json(send: Send, status: int, body: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer with an encoded JSON body, its length, and any further headers."""
    start = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})


class RequestContextMiddleware:
    """Gives each request an id (the client's X-Request-ID if sane, else a new one) and returns it; counts,
    times and logs every request. Handlers add log fields through `request.state.log`."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.shed_summary = ShedSummary(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # what the client sees if the app raises before answering
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        metrics = self.service.metrics
        metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")  # the template: bounded label values
            method = scope["method"]
            variant = state.get("variant", "")  # set by the handlers that ask a model
            metrics.requests.labels(route=route, method=method, status=str(status), variant=variant).inc()
            metrics.request_duration.labels(route=route, method=method, variant=variant).observe(elapsed)
            if state.get("shed"):
                self.shed_summary.count(variant)
            else:
                self._log(scope, status, elapsed)

    def _log(self, scope: Scope, status: int, elapsed: float) -> None:
        state = scope["state"]
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "route": getattr(scope.get("route"), "path", "unmatched"),
            "path": scope["path"],
            "status": status,
            "latency_ms": round(elapsed * 1000, 3),
            **state.get("log", {}),
        }
        self.service.log.info("request", extra=fields)


class ShedSummary:
    """Requests refused under overload, logged as at most one line a second per variant, not one each: at twice
    the capacity a line per refusal would cost the server more CPU than deciding to refuse. The first refusal is
    logged at once; the metric cifarlab_shed_total counts every one, a count still open when shedding stops too."""

    def __init__(self, service: Service, every_s: float = 1.0) -> None:
        self.service = service
        self.every_s = every_s
        self._counts: dict[str, int] = {}
        self._logged = -math.inf  # monotonic time of the last summary

    def count(self, variant: str) -> None:
        self._counts[variant] = self._counts.get(variant, 0) + 1
        now = time.monotonic()
        if now - self._logged < self.every_s:
            return
        for name, shed in self._counts.items():
            fields = {"variant": name, "shed": shed}
            message = "shed requests since the last summary: over MAX_LATENCY_MS or MAX_QUEUE"
            self.service.log.warning(message, extra=fields)
        self._counts, self._logged = {}, now


class BodyLimitMiddleware:
    """Refuses bodies over `max_bytes` with 413: by Content-Length up front, and by counting the bytes actually
    received, which also covers chunked bodies that declare no length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, send, self._too_large())
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # an HTTPException: the app's error handler answers it
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except ApiError as error:
            if started:
                raise
            await self._refuse(scope, send, error)

    def _too_large(self) -> ApiError:
        return ApiError(413, "body_too_large", f"request body over the limit of {self.max_bytes} bytes")

    @staticmethod
    async def _refuse(scope: Scope, send: Send, error: ApiError) -> None:
        if is_v2(scope["path"]):
            body = v2_error_body(error.message)
        else:
            body = json.dumps(error_body(error.code, error.message, request_id_of(scope))).encode()
        await send_json(send, error.status, body)


class OneLineStartupFailure:
    """A model that does not load stops the service at startup, and Service.start has logged why as one JSON line.
    uvicorn would follow it with the whole traceback (the message of Starlette's lifespan.startup.failed), which in
    a container log hides that line: for this error, and no other, the message is dropped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_without_traceback(message: Message) -> None:
            # Starlette sends startup.failed from inside its `except` block, so the error is the one being handled
            if message["type"] == "lifespan.startup.failed" and isinstance(sys.exc_info()[1], ModelLoadError):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_without_traceback)
