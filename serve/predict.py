"""POST /v1/predict, the hot path: a plain ASGI handler behind a FastAPI route that documents it.

serve.app declares the route like the others, so the OpenAPI schema shows its parameters, API key, body and
every response. Its requests skip FastAPI's per-request machinery, though: dependency solving, the request and
response wrappers, and Starlette's form parser, which spools each upload into a temporary-file object. That
machinery took a fifth to a quarter of a request's CPU time besides the model (`make bench-overhead`, before and
after). The handler makes the same checks with the same parts: `check_api_key`, the route's own `top_k`
annotation, python-multipart for the body, and the app's error handlers for every refusal.
"""

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
from fastapi import Query
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.auth import API_KEY_HEADER, check_api_key
from serve.batching import BatchFailed
from serve.errors import ApiError, describe_validation
from serve.middleware import request_id_of
from serve.preprocess import decode_batch
from serve.schemas import ClassProbability, ModelRef, Prediction, PredictJSON, PredictResponse
from serve.service import Answer, Service

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks  # a typing-only name

TopK = Annotated[int | None, Query(ge=1, le=1000, description="probabilities per image")]
INLINE_DECODE_IMAGES = 4  # at most this many images ...
INLINE_DECODE_BYTES = 8 * 1024  # ... of at most this many bytes in all are decoded without a thread hop
FILES_FIELD = "files"

_TOP_K = TypeAdapter(TopK)


class DirectRoute(APIRoute):
    """An APIRoute that FastAPI documents from `endpoint` (its parameters, dependencies and docstring) and
    routes as usual (404, 405), but that `handler`, a plain ASGI app, serves: the endpoint never runs."""

    def __init__(self, path: str, endpoint: Callable[..., Any], *, handler: ASGIApp, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.app = handler


class PredictHandler:
    """Serves POST /v1/predict. Errors are raised as ApiError, which the app's handlers answer as JSON."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service, settings = self.service, self.settings
        request = Request(scope, receive)
        if settings.api_key is not None:
            check_api_key(request.headers.get(API_KEY_HEADER.model.name), settings.api_key.get_secret_value())
        top_k = _top_k(request.query_params.get("top_k")) or settings.default_top_k
        variant = service.assign(request.headers.get(settings.client_id_header))
        request.state.variant = variant
        request_id = request_id_of(scope)
        with service.variants[variant].batcher.arriving():
            names, blobs = await _read_images(request, settings.max_images_per_request)
            images = await _decode(blobs, settings.max_image_pixels)
        try:
            answer = await service.predict(images, variant, request_id)
        except BatchFailed as error:
            raise ApiError(500, "inference_failed", str(error)) from error
        predictions = _predictions(answer, names, top_k)
        request.state.log = {
            "variant": variant,
            "model_version": answer.model.version,
            "labels": [p.label for p in predictions],
            "confidences": [round(p.confidence, 4) for p in predictions],
        }
        body = PredictResponse(
            request_id=request_id, variant=variant, model=ModelRef.of(answer.model), predictions=predictions
        )
        response = Response(body.model_dump_json(), media_type="application/json", headers={"X-Model-Variant": variant})
        await response(scope, receive, send)


def _top_k(given: str | None) -> int | None:
    try:
        return _TOP_K.validate_python(given)
    except ValidationError as error:
        errors = [{**e, "loc": ("query", "top_k", *e["loc"])} for e in error.errors()]
        raise ApiError(422, "invalid_request", describe_validation(errors)) from error


async def _read_images(request: Request, max_images: int) -> tuple[list[str | None], list[bytes]]:
    """(file names, encoded images) from a multipart or JSON body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        files = _FileParts(max_images)
        await files.parse(request)
        _check_count(len(files.blobs), max_images)
        return files.names, files.blobs
    if media_type == "application/json":
        blobs = _decode_base64(_parse_json(await request.body()).images)
        _check_count(len(blobs), max_images)
        return [None] * len(blobs), blobs
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (field `files`) or application/json")


class _FileParts:
    """The uploads of the `files` field, parsed (python-multipart) as the body streams in, kept in memory (the
    body limit bounds them). Uploads in other fields are counted against the limit and dropped."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.names: list[str | None] = []
        self.blobs: list[bytes] = []
        self._uploads = 0
        self._fields = 0
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._data: bytearray | None = None  # the current part's bytes, when it is an upload we keep

    async def parse(self, request: Request) -> None:
        _, options = parse_options_header(request.headers.get("content-type"))
        if b"boundary" not in options:
            raise ApiError(400, "invalid_multipart", "the multipart Content-Type has no boundary")
        parser = MultipartParser(options[b"boundary"], self._callbacks())
        try:
            async for chunk in request.stream():
                parser.write(chunk)
            parser.finalize()
        except FormParserError as error:
            raise ApiError(400, "invalid_multipart", f"the multipart body is malformed: {error}") from error

    def _callbacks(self) -> "MultipartCallbacks":
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": self._on_header_field,
            "on_header_value": self._on_header_value,
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }

    def _on_part_begin(self) -> None:
        self._disposition, self._data = b"", None

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise ApiError(400, "invalid_multipart", 'a part\'s Content-Disposition has no "name"')
        field = _text(options[b"name"])
        if b"filename" not in options:
            self._fields += 1
            if field == FILES_FIELD:
                raise ApiError(422, "invalid_request", f"the `{FILES_FIELD}` field must hold file uploads")
            if self._fields > self.max_files:
                raise ApiError(400, "invalid_multipart", f"too many form fields; at most {self.max_files}")
            return
        self._uploads += 1
        if self._uploads > self.max_files:
            raise ApiError(422, "too_many_images", f"at most {self.max_files} images per request")
        if field == FILES_FIELD:
            self.names.append(_text(options[b"filename"]))
            self._data = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._data is not None:
            self._data += data[start:end]

    def _on_part_end(self) -> None:
        if self._data is not None:
            self.blobs.append(bytes(self._data))
            self._data = None


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def _parse_json(body: bytes) -> PredictJSON:
    try:
        return PredictJSON.model_validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from error
        raise ApiError(422, "invalid_request", describe_validation(error.errors())) from error


def _decode_base64(encoded: list[str]) -> list[bytes]:
    blobs = []
    for index, text in enumerate(encoded):
        payload = text.split(",", 1)[1] if text.startswith("data:") else text
        try:
            blobs.append(base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError) as error:
            raise ApiError(422, "invalid_base64", f"image {index} is not valid base64: {error}") from error
    return blobs


async def _decode(blobs: list[bytes], max_pixels: int) -> np.ndarray:
    """Decode on the event loop when the images are small (32x32 uploads: ~0.2 ms each, less than the hop to a
    thread and back), on a worker thread otherwise, so large uploads never stall other requests."""
    if len(blobs) <= INLINE_DECODE_IMAGES and sum(map(len, blobs)) <= INLINE_DECODE_BYTES:
        return decode_batch(blobs, max_pixels)
    return await asyncio.to_thread(decode_batch, blobs, max_pixels)


def _check_count(count: int, max_images: int) -> None:
    if count == 0:
        raise ApiError(422, "no_images", "send at least one image")
    if count > max_images:
        raise ApiError(422, "too_many_images", f"{count} images; at most {max_images} per request")


def _predictions(answer: Answer, names: list[str | None], top_k: int) -> list[Prediction]:
    model = answer.model
    top_k = min(top_k, len(model.classes))
    order = np.argsort(-answer.probabilities, axis=1, kind="stable")[:, :top_k]
    predictions = []
    for row, name, ranked in zip(answer.probabilities, names, order, strict=True):
        top = [ClassProbability(label=model.classes[i], class_index=int(i), probability=float(row[i])) for i in ranked]
        predictions.append(
            Prediction(
                label=top[0].label,
                class_index=top[0].class_index,
                confidence=top[0].probability,
                top_k=top,
                filename=name,
            )
        )
    return predictions
