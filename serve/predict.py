"""POST /v1/predict, the hot path: a plain ASGI handler behind a FastAPI route that documents it.

serve.app declares the route like the others, so the OpenAPI schema shows its parameters, API key, body and
every response. Its requests skip FastAPI's per-request machinery, though: dependency solving, the request and
response wrappers, and Starlette's form parser, which spools each upload into a temporary-file object. That
machinery took a fifth to a quarter of a request's CPU time besides the model (`make bench-overhead`, before and
after). The handler makes the same checks with the same parts: `check_api_key`, the route's own `top_k`
annotation, serve.multipart for the body, and the app's error handlers for every refusal.
"""

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
from fastapi import Query
from fastapi.routing import APIRoute
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.auth import API_KEY_HEADER, check_api_key
from serve.errors import ApiError, describe_validation
from serve.middleware import request_id_of, send_json
from serve.multipart import MultipartError, boundary_of, parts
from serve.preprocess import decode_batch
from serve.schemas import ModelRef, PredictJSON, PredictResponse
from serve.service import Answer, Service

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
    """Serves POST /v1/predict. It refuses a request with ApiError; the service's own errors pass through. The app's
    handlers answer both as JSON (serve.errors maps the latter to statuses)."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.settings = service.settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        service, settings = self.service, self.settings
        request = Request(scope, receive)
        if settings.api_key is not None:
            check_api_key(request.headers.get(API_KEY_HEADER.model.name), settings.api_key.get_secret_value())
        given_top_k = request.query_params.get("top_k") if scope["query_string"] else None  # parse only if sent
        top_k = _top_k(given_top_k) or settings.default_top_k
        variant = service.assign(request.headers.get(settings.client_id_header))
        request.state.variant = variant
        request_id = request_id_of(scope)
        with service.variants[variant].batcher.arriving():
            names, blobs = await _read_images(request, settings.max_images_per_request)
            images = await _decode(blobs, settings.max_image_pixels)
        answer = await service.predict(images, variant, request_id)
        predictions = _predictions(answer, names, top_k)
        model = answer.model
        request.state.log = {
            "variant": variant,
            "model_version": model.version,
            "prediction_ids": list(answer.prediction_ids),
            "labels": [p["label"] for p in predictions],
            "confidences": [round(p["confidence"], 4) for p in predictions],
        }
        # one validation of the whole tree: half the time of building each nested model on its own
        body = PredictResponse.model_validate(
            {
                "request_id": request_id,
                "variant": variant,
                "model": ModelRef.of(model),
                "predictions": predictions,
            }
        )
        await send_json(send, 200, body.model_dump_json().encode(), ((b"x-model-variant", variant.encode()),))


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
        names, blobs = _files(await request.body(), request.headers["content-type"], max_images)
        _check_count(len(blobs), max_images)
        return names, blobs
    if media_type == "application/json":
        blobs = _decode_base64(_parse_json(await request.body()).images)
        _check_count(len(blobs), max_images)
        return [None] * len(blobs), blobs
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (field `files`) or application/json")


def _files(body: bytes, content_type: str, max_files: int) -> tuple[list[str | None], list[bytes]]:
    """The uploads of the `files` field, in order. Uploads in other fields are counted against the limit and
    dropped; plain fields are dropped too, but a plain `files` field is refused."""
    names: list[str | None] = []
    blobs: list[bytes] = []
    uploads = fields = 0
    try:
        for part in parts(body, boundary_of(content_type)):
            if part.filename is None:
                fields += 1
                if part.name == FILES_FIELD:
                    raise ApiError(422, "invalid_request", f"the `{FILES_FIELD}` field must hold file uploads")
                if fields > max_files:
                    raise ApiError(400, "invalid_multipart", f"too many form fields; at most {max_files}")
                continue
            uploads += 1
            if uploads > max_files:
                raise ApiError(422, "too_many_images", f"at most {max_files} images per request")
            if part.name == FILES_FIELD:
                names.append(part.filename)
                blobs.append(part.data)
    except MultipartError as error:
        raise ApiError(400, "invalid_multipart", f"the multipart body is malformed: {error}") from error
    return names, blobs


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


def _predictions(answer: Answer, names: list[str | None], top_k: int) -> list[dict[str, Any]]:
    """Per image, the fields of a `Prediction`."""
    classes = answer.model.classes
    top_k = min(top_k, len(classes))
    order = np.argsort(-answer.probabilities, axis=1, kind="stable")[:, :top_k]
    predictions = []
    rows = zip(answer.prediction_ids, answer.probabilities.tolist(), names, order.tolist(), strict=True)
    for prediction_id, row, name, ranked in rows:
        top = [{"label": classes[i], "class_index": i, "probability": row[i]} for i in ranked]
        best = top[0]
        predictions.append(
            {
                "prediction_id": prediction_id,
                "label": best["label"],
                "class_index": best["class_index"],
                "confidence": best["probability"],
                "top_k": top,
                "filename": name,
            }
        )
    return predictions
