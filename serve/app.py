"""The FastAPI app: `uvicorn serve.app:create_app --factory`, configured by environment variables (serve.settings)."""

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from serve.auth import API_KEY_HEADER, check_api_key
from serve.errors import (
    DOMAIN_ERRORS,
    ApiError,
    ErrorBody,
    as_api_error,
    describe_validation,
    error_body,
    retry_headers,
)
from serve.follow import AliasFollower
from serve.middleware import BodyLimitMiddleware, OneLineStartupFailure, RequestContextMiddleware, request_id_of
from serve.predict import DirectRoute, PredictHandler, TopK
from serve.preprocess import limit_pillow
from serve.schemas import (
    DriftResponse,
    FeedbackRequest,
    FeedbackResponse,
    ModelInfo,
    ModelRef,
    PredictJSON,
    PredictResponse,
    Readiness,
    ReloadRequest,
    ReloadResponse,
    Status,
)
from serve.service import Service
from serve.settings import Settings, load_settings
from serve.v2 import v2_router

# OpenAPI links: from an answer to feedback on its first image, which a client (and schemathesis's stateful phase) can
# follow. The label given is the predicted one: feedback that confirms the prediction (201, then 200 the same again).
PREDICT_LINKS = {
    "ConfirmFirstPrediction": {
        "operationRef": "#/paths/~1v1~1feedback/post",
        "description": "feedback that the first image is what the model said",
        "requestBody": {
            "prediction_id": "$response.body#/predictions/0/prediction_id",
            "label": "$response.body#/predictions/0/label",
        },
    },
}


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries: every listed status answers with the JSON error body."""
    meaning = {
        400: "malformed request (JSON that does not parse, broken multipart)",
        401: "missing or wrong X-API-Key",
        403: "admin calls are disabled (no API_KEY configured)",
        404: "unknown or expired prediction id, unknown variant, or feedback not enabled (FEEDBACK_DIR)",
        409: "this prediction already has feedback with another label",
        413: "body over the size limit, or an image with too many pixels (decompression bomb)",
        415: "unsupported Content-Type",
        422: "invalid input: not an image, truncated or empty file, bad base64, too many images, bad parameters, "
        "a label outside the model's classes",
        500: "the model call failed for the batch this request was in",
        503: "not ready: model not loaded, or shutting down; or overloaded (MAX_LATENCY_MS, MAX_QUEUE: Retry-After); "
        "or the feedback store failed",
    }
    return {status: {"model": ErrorBody, "description": meaning[status]} for status in statuses}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    limit_pillow(settings.max_image_pixels)
    service = Service(settings)
    follower = AliasFollower(service)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        follower.start()
        yield
        await follower.stop()  # no swap may begin while the batchers drain
        await service.stop()  # uvicorn has stopped accepting and finished in-flight requests by now

    app = FastAPIOffline(  # FastAPI, with /docs and /redoc served from local assets
        title="cifarlab inference",
        version="1.1",  # 1.1: feedback names server-issued prediction ids (docs/serving.md, "API changes")
        description="CIFAR-10 classification with ONNX Runtime, micro-batched. Errors are JSON: "
        '`{"error": {"code": ..., "message": ...}, "request_id": ...}`.',
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(OneLineStartupFailure)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware, service=service)  # outermost: it also sees the 413s
    _add_error_handlers(app)
    _add_routes(app, service, follower)
    app.include_router(v2_router(service))  # the Open Inference Protocol over the same service
    return app


def _add_routes(app: FastAPI, service: Service, follower: AliasFollower) -> None:
    settings = service.settings

    async def require_api_key(key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
        if settings.api_key is not None:
            check_api_key(key, settings.api_key.get_secret_value())

    async def require_admin_key(key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
        if settings.api_key is None:
            raise ApiError(403, "admin_disabled", "admin calls need API_KEY to be set on the server")
        check_api_key(key, settings.api_key.get_secret_value())

    # FastAPI documents /v1/predict from this signature and the route's arguments; PredictHandler serves it
    # (serve/predict.py says why) and enforces each of them: tests/serve/test_predict_route.py fails on one it does not.
    async def predict(top_k: TopK = None) -> PredictResponse:
        """Images as multipart files (field `files`, repeated) or as JSON `{"images": [<base64>, ...]}`.
        Images that are not 32x32 are resized with Pillow's bilinear filter. With several variants, the client
        id header (default X-Client-ID) keeps a client on one variant."""
        raise AssertionError("documentation only: PredictHandler serves this route")

    app.router.routes.insert(  # first: the route most requests take is matched first
        0,
        DirectRoute(
            "/v1/predict",
            predict,
            handler=PredictHandler(service),
            methods=["POST"],
            response_model=PredictResponse,
            dependencies=[Depends(require_api_key)],
            responses={200: {"description": "Successful Response", "links": PREDICT_LINKS}}
            | _errors(400, 401, 413, 415, 422, 500, 503),
            openapi_extra={"requestBody": _predict_body(settings.max_images_per_request)},
            summary="Classify one or several images",
        ),
    )

    @app.post(
        "/v1/feedback",
        response_model=FeedbackResponse,
        status_code=201,
        dependencies=[Depends(require_api_key)],
        responses={
            **_errors(400, 401, 404, 409, 413, 422, 503),
            200: {"model": FeedbackResponse, "description": "the same feedback again: nothing new stored"},
        },
        summary="Report the true label of a predicted image",
    )
    async def feedback(body: FeedbackRequest, response: Response) -> FeedbackResponse:
        """Stores the image (as the model saw it) under its true label, in the image-folder layout training reads
        (FEEDBACK_DIR/<label>/<prediction id>.png, then its record under records/, created only if absent: one
        label per prediction across all replicas), durably, before answering. API 1.1: the
        body names the server-issued `prediction_id`; the client-chosen `request_id` + `image_index` are gone."""
        record, created = await service.submit_feedback(body.prediction_id, body.label)
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
        return ReloadResponse(previous=ModelRef.of(old), model=_model_info(service, body.variant))

    @app.get("/healthz", response_model=Status, summary="The process is alive")
    async def healthz() -> Status:
        return Status(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        response_model_exclude_none=True,
        responses=_errors(503),
        summary="A model is loaded and warm (and, when following registry aliases, how that goes)",
    )
    async def readyz() -> Readiness:
        if not service.ready:
            raise ApiError(503, "not_ready", "no model loaded, or shutting down")
        # a followed alias whose new version fails to load is shown, not unready: the previous version serves
        return Readiness(status="ready", following=follower.report(), prediction_log=service.prediction_log_state)

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def metrics() -> PlainTextResponse:
        text = await asyncio.to_thread(generate_latest, service.metrics.registry)  # drift tests run at scrape time
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)


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


def _model_info(service: Service, variant_name: str | None) -> ModelInfo:
    variant = service.variant(variant_name)
    share = service.router.shares()[variant.name]
    return ModelInfo(
        **variant.current().describe(), variant=variant.name, shadow=variant.spec.shadow, traffic_share=share
    )


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

    async def domain_error(request: Request, error: Exception) -> JSONResponse:
        refusal = as_api_error(error)
        return respond(request, refusal.status, refusal.code, refusal.message, retry_headers(error, request.state))

    for kind in DOMAIN_ERRORS:
        app.add_exception_handler(kind, domain_error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        code = codes.get(error.status_code, "http_error")
        return respond(request, error.status_code, code, str(error.detail), error.headers)  # e.g. 405's Allow

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        if any(e.get("type") == "json_invalid" for e in error.errors()):
            return respond(request, 400, "invalid_json", "the body is not valid JSON")
        return respond(request, 422, "invalid_request", describe_validation(error.errors()))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        app.state.service.log.exception("unhandled error", extra={"request_id": request_id_of(request.scope)})
        return respond(request, 500, "internal_error", "internal error; see the server log for this request id")
