"""The FastAPI app: `uvicorn serve.app:create_app --factory`, configured by environment variables (serve.settings)."""

import asyncio
import base64
import binascii
import hmac
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from serve.batching import BatchFailed
from serve.errors import ApiError, ErrorBody, error_body
from serve.middleware import BodyLimitMiddleware, RequestContextMiddleware, request_id_of
from serve.model import LoadedModel
from serve.preprocess import decode_batch, limit_pillow
from serve.schemas import (
    ClassProbability,
    DriftResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelInfo,
    ModelRef,
    Prediction,
    PredictJSON,
    PredictResponse,
    ReloadRequest,
    ReloadResponse,
    Status,
)
from serve.service import Answer, Service
from serve.settings import Settings, load_settings

INLINE_DECODE_IMAGES = 4  # at most this many images ...
INLINE_DECODE_BYTES = 8 * 1024  # ... of at most this many bytes in all are decoded without a thread hop
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when API_KEY is set")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries: every listed status answers with the JSON error body."""
    meaning = {
        400: "malformed request (JSON that does not parse, broken multipart)",
        401: "missing or wrong X-API-Key",
        403: "admin calls are disabled (no API_KEY configured)",
        404: "unknown or expired request id, unknown variant, or feedback not enabled (FEEDBACK_DIR)",
        409: "this image already has feedback with another label",
        413: "body over the size limit, or an image with too many pixels (decompression bomb)",
        415: "unsupported Content-Type",
        422: "invalid input: not an image, truncated or empty file, bad base64, too many images, bad parameters, "
        "a label outside the model's classes",
        500: "the model call failed for the batch this request was in",
        503: "not ready: model not loaded, or shutting down",
    }
    return {status: {"model": ErrorBody, "description": meaning[status]} for status in statuses}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    limit_pillow(settings.max_image_pixels)
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()  # uvicorn has stopped accepting and finished in-flight requests by now

    app = FastAPI(
        title="cifarlab inference",
        version="1",
        description="CIFAR-10 classification with ONNX Runtime, micro-batched. Errors are JSON: "
        '`{"error": {"code": ..., "message": ...}, "request_id": ...}`.',
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, service=service)  # outermost: it also sees the 413s
    _add_error_handlers(app)
    _add_routes(app, service)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    async def require_api_key(key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
        if settings.api_key is not None:
            _check_key(key, settings.api_key.get_secret_value())

    async def require_admin_key(key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
        if settings.api_key is None:
            raise ApiError(403, "admin_disabled", "admin calls need API_KEY to be set on the server")
        _check_key(key, settings.api_key.get_secret_value())

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        dependencies=[Depends(require_api_key)],
        responses=_errors(400, 401, 413, 415, 422, 500, 503),
        openapi_extra={"requestBody": _predict_body(settings.max_images_per_request)},
        summary="Classify one or several images",
    )
    async def predict(
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, le=1000, description="probabilities per image")] = None,
    ) -> Response:
        """Images as multipart files (field `files`, repeated) or as JSON `{"images": [<base64>, ...]}`.
        Images that are not 32x32 are resized with Pillow's bilinear filter. With several variants, the client
        id header (default X-Client-ID) keeps a client on one variant."""
        variant = service.assign(request.headers.get(settings.client_id_header))
        request.state.variant = variant
        request_id = request_id_of(request.scope)
        with service.variants[variant].batcher.arriving():
            names, blobs = await _read_images(request, settings.max_images_per_request)
            images = await _decode(blobs, settings.max_image_pixels)
        try:
            answer = await service.predict(images, variant, request_id)
        except BatchFailed as error:
            raise ApiError(500, "inference_failed", str(error)) from error
        predictions = _predictions(answer, names, top_k or settings.default_top_k)
        request.state.log = {
            "variant": variant,
            "model_version": answer.model.version,
            "labels": [p.label for p in predictions],
            "confidences": [round(p.confidence, 4) for p in predictions],
        }
        body = PredictResponse(
            request_id=request_id, variant=variant, model=_ref(answer.model), predictions=predictions
        )
        # Serialised here, once: returning the model would make FastAPI validate and encode it a second time.
        return Response(body.model_dump_json(), media_type="application/json", headers={"X-Model-Variant": variant})

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        status_code=201,
        dependencies=[Depends(require_api_key)],
        responses={
            **_errors(400, 401, 404, 409, 413, 422),
            200: {"model": FeedbackResponse, "description": "the same feedback again: nothing new stored"},
        },
        summary="Report the true label of a predicted image",
    )
    async def feedback(body: FeedbackRequest, response: Response) -> FeedbackResponse:
        """Stores the image (as the model saw it) under its true label, in the image-folder layout training reads
        (FEEDBACK_DIR/<label>/<request id>~<index>.png, plus manifest.jsonl), durably, before answering."""
        record, created = await service.submit_feedback(body.request_id, body.label, body.image_index)
        if not created:
            response.status_code = 200
        return FeedbackResponse.model_validate({**asdict(record), "created": created})

    @app.get(
        "/v1/drift",
        response_model=DriftResponse,
        dependencies=[Depends(require_api_key)],
        responses=_errors(401),
        summary="Recent traffic of each variant tested against its model's reference statistics",
    )
    async def drift() -> DriftResponse:
        reports = await asyncio.to_thread(lambda: {name: v.drift_report() for name, v in service.variants.items()})
        return DriftResponse.model_validate({"variants": reports})

    @app.get(
        "/v1/model",
        response_model=ModelInfo,
        dependencies=[Depends(require_api_key)],
        responses=_errors(401, 404, 503),
        summary="The model a variant serves",
    )
    async def model_info(
        variant: Annotated[str | None, Query(description="default: the first answering variant")] = None,
    ) -> ModelInfo:
        return _model_info(service, variant)

    @app.post(
        "/v1/admin/reload",
        response_model=ReloadResponse,
        dependencies=[Depends(require_admin_key)],
        responses=_errors(400, 401, 403, 404, 413, 422, 503),
        summary="Load, warm up and swap in a model without downtime (also: SIGHUP)",
    )
    async def reload(body: ReloadRequest | None = None) -> ReloadResponse:
        body = body or ReloadRequest()
        old, _ = await service.reload(body.model_uri, body.variant)
        return ReloadResponse(previous=_ref(old), model=_model_info(service, body.variant))

    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses=_errors(503), summary="A model is loaded and warm")
    async def readyz() -> Status:
        if not service.ready:
            raise ApiError(503, "not_ready", "no model loaded, or shutting down")
        return Status(status="ready")

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        text = await asyncio.to_thread(generate_latest, service.metrics.registry)  # drift tests run at scrape time
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


def _check_key(given: str | None, expected: str) -> None:
    if not given:
        raise ApiError(401, "missing_api_key", "this server needs an X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):  # constant time
        raise ApiError(401, "invalid_api_key", "the X-API-Key is not valid")


def _predict_body(max_images: int) -> dict[str, Any]:
    files = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1, "maxItems": max_images}
    json_schema = PredictJSON.model_json_schema()
    json_schema["properties"]["images"]["maxItems"] = max_images
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"files": files}, "required": ["files"]}
            },
            "application/json": {"schema": json_schema},
        },
    }


async def _read_images(request: Request, max_images: int) -> tuple[list[str | None], list[bytes]]:
    """(file names, encoded images) from a multipart or JSON body."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, max_images)
    if media_type == "application/json":
        blobs = _decode_base64(_parse_json(await request.body()).images)
        _check_count(len(blobs), max_images)
        return [None] * len(blobs), blobs
    raise ApiError(415, "unsupported_media_type", "send multipart/form-data (field `files`) or application/json")


async def _read_multipart(request: Request, max_images: int) -> tuple[list[str | None], list[bytes]]:
    try:
        async with request.form(max_files=max_images, max_fields=max_images) as form:
            uploads = form.getlist("files")
            if not all(isinstance(upload, UploadFile) for upload in uploads):
                raise ApiError(422, "invalid_request", "the `files` field must hold file uploads")
            _check_count(len(uploads), max_images)
            return [u.filename for u in uploads], [await u.read() for u in uploads]  # type: ignore[union-attr]
    except ApiError:
        raise
    except HTTPException as error:  # Starlette's multipart parser; it counts files as it parses
        if "too many files" in str(error.detail).lower():
            raise ApiError(422, "too_many_images", f"at most {max_images} images per request") from error
        raise ApiError(400, "invalid_multipart", str(error.detail)) from error


def _parse_json(body: bytes) -> PredictJSON:
    try:
        return PredictJSON.model_validate_json(body)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from error
        raise ApiError(422, "invalid_request", _describe(error.errors())) from error


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


def _model_info(service: Service, variant_name: str | None) -> ModelInfo:
    variant = service.variant(variant_name)
    share = service.router.shares()[variant.name]
    return ModelInfo(
        **variant.current().describe(), variant=variant.name, shadow=variant.spec.shadow, traffic_share=share
    )


def _ref(model: LoadedModel) -> ModelRef:
    return ModelRef(name=model.name, version=model.version, run_id=model.run_id)


def _add_error_handlers(app: FastAPI) -> None:
    codes = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}

    def respond(
        request: Request, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        body = error_body(code, message, request_id_of(request.scope))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return respond(request, error.status, error.code, error.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = codes.get(error.status_code, "http_error")
        return respond(request, error.status_code, code, str(error.detail), error.headers)  # e.g. 405's Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        if any(e.get("type") == "json_invalid" for e in error.errors()):
            return respond(request, 400, "invalid_json", "the body is not valid JSON")
        return respond(request, 422, "invalid_request", _describe(error.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        app.state.service.log.exception("unhandled error", extra={"request_id": request_id_of(request.scope)})
        return respond(request, 500, "internal_error", "internal error; see the server log for this request id")


def _describe(errors: Any) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
