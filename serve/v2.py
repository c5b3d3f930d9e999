"""The Open Inference Protocol (KServe v2), REST: what Triton, KServe and MLServer speak and what NVIDIA's
`tritonclient` and KServe's clients call. Health, server and model metadata, model readiness, and inference on the
uint8 tensor `images` [-1, 32, 32, 3], as JSON (`data` flat or nested) or through the binary tensor data extension.

The routes are a thin protocol layer over the same Service as /v1: the same variants and A/B router, micro-batcher,
drift window, feedback memory, metrics and API key. Errors are the protocol's body `{"error": "<message>"}`.
"""

import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cifarlab_contract.model import IMAGE_SHAPE, INPUT_NAME, OUTPUT_NAME
from serve.auth import API_KEY_HEADER, check_api_key
from serve.errors import ApiError, as_api_error, describe_validation, retry_headers, v2_error_body
from serve.middleware import request_id_of
from serve.service import Answer, Service, Variant

PROBABILITIES = "probabilities"  # the second output: softmax of the logits, what /v1/predict ranks
OUTPUTS = (OUTPUT_NAME, PROBABILITIES)
UINT8, FP32 = "UINT8", "FP32"
HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY = "application/octet-stream"
PLATFORM = "onnxruntime_onnx"  # Triton's name for the ONNX Runtime backend
EXTENSIONS = ["binary_tensor_data"]
UNSUPPORTED_PARAMETERS = ("shared_memory_region", "classification")  # Triton extensions this server lacks


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[StrictInt]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None  # flat or nested integers; absent with `binary_data_size`


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequestBody(BaseModel):
    """The inference request's JSON (its header, with the binary tensor data extension)."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # uint8 [N, 32, 32, 3]
    outputs: tuple[tuple[str, bool], ...]  # (output name, answered as binary?) in the order asked


class V2Route(APIRoute):
    """A route whose every refusal, raised anywhere in it (the API key, the body limit while the body is read, the
    service's own errors), is answered with the protocol's error body instead of /v1's."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as error:  # each kind is answered below; the rest is a logged 500
                return _refusal(request, error)

        return handle


def _refusal(request: Request, error: Exception) -> Response:
    if isinstance(error, RequestValidationError):
        return error_response(400, describe_validation(error.errors()))
    if isinstance(error, ApiError):
        return error_response(error.status, error.message)
    if isinstance(error, HTTPException):
        return error_response(error.status_code, str(error.detail), error.headers)
    try:
        refusal = as_api_error(error)
    except KeyError:
        request.app.state.service.log.exception("unhandled error", extra={"request_id": request_id_of(request.scope)})
        return error_response(500, "internal error; see the server log for this request id")
    return error_response(refusal.status, refusal.message, retry_headers(error, request.state))


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(v2_error_body(message), status, headers, media_type="application/json")


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    meaning = {
        400: "malformed request: JSON, datatype, shape, data or binary sizes",
        401: "missing or wrong X-API-Key",
        404: "unknown model or version",
        405: "method not allowed",
        413: "body over the size limit",
        415: "unsupported Content-Encoding",
        500: "the model call failed for the batch this request was in",
        503: "shutting down, or overloaded (Retry-After)",
    }
    schema = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    return {s: {"description": meaning[s], "content": {"application/json": {"schema": schema}}} for s in statuses}


def v2_router(service: Service) -> APIRouter:
    """The v2 routes over `service`; the app factory includes them."""
    settings = service.settings
    router = APIRouter(route_class=V2Route, tags=["Open Inference Protocol (v2)"])

    async def require_api_key(key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> None:
        if settings.api_key is not None:
            check_api_key(key, settings.api_key.get_secret_value())

    auth = [Depends(require_api_key)]

    @router.get("/v2/health/live", responses=_errors(), summary="v2: the server is alive")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", responses=_errors(503), summary="v2: every model is loaded and warm")
    async def ready() -> dict[str, bool]:
        if not service.ready:
            raise ApiError(503, "not_ready", "not ready: a model is not loaded, or the server is shutting down")
        return {"ready": True}

    @router.get("/v2", responses=_errors(), summary="v2: server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "cifarlab", "version": _version(), "extensions": EXTENSIONS}

    @router.get("/v2/models/{model_name}", dependencies=auth, responses=_errors(401, 404), summary="v2: model metadata")
    async def model_metadata(model_name: str) -> dict[str, Any]:
        return _metadata(model_name, serving(service, model_name))

    @router.get(
        "/v2/models/{model_name}/versions/{model_version}",
        dependencies=auth,
        responses=_errors(401, 404),
        summary="v2: model metadata of one version",
    )
    async def version_metadata(model_name: str, model_version: str) -> dict[str, Any]:
        return _metadata(model_name, serving(service, model_name, model_version))

    @router.get(
        "/v2/models/{model_name}/ready", dependencies=auth, responses=_errors(401, 404, 503), summary="v2: model ready"
    )
    async def model_ready(model_name: str) -> dict[str, Any]:
        return _ready(service, model_name, serving(service, model_name))

    @router.get(
        "/v2/models/{model_name}/versions/{model_version}/ready",
        dependencies=auth,
        responses=_errors(401, 404, 503),
        summary="v2: model version ready",
    )
    async def version_ready(model_name: str, model_version: str) -> dict[str, Any]:
        return _ready(service, model_name, serving(service, model_name, model_version))

    infer_errors = _errors(400, 401, 404, 413, 415, 500, 503)
    infer_body = {"requestBody": _infer_body()}

    @router.post(
        "/v2/models/{model_name}/infer",
        dependencies=auth,
        responses=infer_errors,
        openapi_extra=infer_body,
        summary="v2: classify a uint8 tensor of images",
    )
    async def infer(request: Request, model_name: str) -> Response:
        """JSON, or a JSON header of `Inference-Header-Content-Length` bytes followed by the binary tensors."""
        return await _infer(service, request, model_name, None)

    @router.post(
        "/v2/models/{model_name}/versions/{model_version}/infer",
        dependencies=auth,
        responses=infer_errors,
        openapi_extra=infer_body,
        summary="v2: classify with one version of a model",
    )
    async def infer_version(request: Request, model_name: str, model_version: str) -> Response:
        return await _infer(service, request, model_name, model_version)

    @router.api_route(
        "/v2/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"], include_in_schema=False
    )
    async def unknown(request: Request, path: str) -> Response:
        """Under /v2, a path no route has is a 404, and a route asked with the wrong method a 405, in the
        protocol's body (the app's own would answer /v1's)."""
        allowed = sorted(
            {
                method
                for route in router.routes
                if isinstance(route, APIRoute)
                and route.endpoint is not unknown
                and route.matches(request.scope)[0] == Match.PARTIAL
                for method in route.methods or ()
            }
        )
        if allowed:
            return error_response(405, f"method {request.method} not allowed", {"Allow": ", ".join(allowed)})
        return error_response(404, f"no such v2 endpoint: {request.url.path}")

    return router


def serving(service: Service, name: str, version: str | None = None) -> list[Variant]:
    """The answering variants that serve model `name` (at `version` when given); 404 for none. Shadow variants
    answer nobody, so their models are not addressable."""
    named = [v for v in service.variants.values() if not v.spec.shadow and v.model is not None and v.model.name == name]
    if not named:
        served = sorted({v.model.name for v in service.variants.values() if v.model is not None and not v.spec.shadow})
        raise ApiError(404, "unknown_model", f"unknown model {name!r}; served: {', '.join(served)}")
    if version is None:
        return named
    versioned = [v for v in named if v.current().version == version]
    if not versioned:
        versions = ", ".join(sorted({v.current().version for v in named}))
        raise ApiError(
            404, "unknown_version", f"model {name!r} has no version {version!r} being served; served: {versions}"
        )
    return versioned


def _metadata(name: str, variants: Sequence[Variant]) -> dict[str, Any]:
    models = [v.current() for v in variants]
    classes = len(models[0].classes)
    return {
        "name": name,
        "versions": sorted({m.version for m in models}),
        "platform": PLATFORM,
        "inputs": [{"name": INPUT_NAME, "datatype": UINT8, "shape": [-1, *IMAGE_SHAPE]}],
        "outputs": [{"name": output, "datatype": FP32, "shape": [-1, classes]} for output in OUTPUTS],
        "parameters": {"classes": list(models[0].classes), "variants": [v.name for v in variants]},
    }


def _ready(service: Service, name: str, variants: Sequence[Variant]) -> dict[str, Any]:
    if not all(v.model is not None and not v.batcher.closed for v in variants):
        raise ApiError(503, "not_ready", f"model {name!r} is not ready")
    return {"name": name, "ready": True}


def _version() -> str:
    try:
        return metadata.version("cifarlab")
    except metadata.PackageNotFoundError:  # the image ships serve/ without installing the package
        return "0"


async def _infer(service: Service, request: Request, name: str, version: str | None) -> Response:
    settings = service.settings
    candidates = serving(service, name, version)
    variant = pick(service, candidates, request.headers.get(settings.client_id_header))
    request.state.variant = variant.name
    with variant.batcher.arriving():  # a batch waits for this request while its body is read and parsed
        _check_encoding(request.headers.get("content-encoding"))
        parsed = parse_infer(await request.body(), request.headers.get(HEADER_LENGTH), settings.max_images_per_request)
    answer = await service.predict(parsed.images, variant.name, request_id_of(request.scope))
    predicted = answer.probabilities.argmax(axis=1)
    request.state.log = {
        "variant": variant.name,
        "model_version": answer.model.version,
        "labels": [answer.model.classes[i] for i in predicted],
        "confidences": [round(float(p), 4) for p in answer.probabilities.max(axis=1)],
    }
    body, headers = infer_response(answer, parsed, name, request_id_of(request.scope))
    return Response(body, 200, headers, media_type=headers.pop("content-type"))


def pick(service: Service, candidates: Sequence[Variant], client_id: str | None) -> Variant:
    """The variant the A/B router assigns this client when it is among `candidates` (a request for one version
    narrows them), else the first of them."""
    assigned = service.assign(client_id)
    return next((v for v in candidates if v.name == assigned), candidates[0])


def _check_encoding(encoding: str | None) -> None:
    if encoding and encoding.strip().lower() != "identity":
        raise ApiError(415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported; send identity")


def parse_infer(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """The request from its body: all JSON, or a JSON header of `header_length` bytes and the binary tensors."""
    header, binary = _split(body, header_length)
    try:
        request = InferRequestBody.model_validate_json(header)
    except ValidationError as error:
        if any(e["type"] == "json_invalid" for e in error.errors()):
            raise ApiError(400, "invalid_json", "the inference request is not valid JSON") from None
        raise ApiError(400, "invalid_request", describe_validation(error.errors())) from None
    (tensor,) = request.inputs
    shape = _check_input(tensor, max_images)
    if "binary_data_size" in tensor.parameters:
        images = _binary_tensor(tensor, shape, binary)
    elif binary:
        raise ApiError(400, "invalid_request", "binary data follows the header but no input has binary_data_size")
    else:
        images = _json_tensor(tensor, shape)
    return InferRequest(request.id, images, _outputs(request))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    length = int(header_length) if header_length.strip().isdigit() else -1
    if not 0 < length <= len(body):
        raise ApiError(
            400, "invalid_header_length", f"{HEADER_LENGTH} must be a byte count from 1 to the body's {len(body)}"
        )
    return body[:length], body[length:]


def _check_input(tensor: RequestInput, max_images: int) -> tuple[int, ...]:
    if tensor.name != INPUT_NAME:
        raise ApiError(400, "unknown_input", f"unknown input {tensor.name!r}; the model takes {INPUT_NAME!r}")
    if tensor.datatype != UINT8:
        raise ApiError(400, "invalid_datatype", f"input {INPUT_NAME!r} is {UINT8}, not {tensor.datatype!r}")
    if len(tensor.shape) != 1 + len(IMAGE_SHAPE) or tuple(tensor.shape[1:]) != IMAGE_SHAPE:
        raise ApiError(400, "invalid_shape", f"input shape {tensor.shape}; the model takes [N, 32, 32, 3]")
    if not 1 <= tensor.shape[0] <= max_images:
        raise ApiError(400, "invalid_shape", f"{tensor.shape[0]} images; from 1 to {max_images} per request")
    for key in UNSUPPORTED_PARAMETERS:
        if key in tensor.parameters:
            raise ApiError(400, "unsupported_parameter", f"parameter {key!r} is not supported by this server")
    return tuple(tensor.shape)


def _binary_tensor(tensor: RequestInput, shape: tuple[int, ...], binary: bytes) -> np.ndarray:
    size = tensor.parameters["binary_data_size"]
    expected = int(np.prod(shape))  # one byte per UINT8 element
    if tensor.data is not None:
        raise ApiError(400, "invalid_request", "an input has both `data` and binary_data_size")
    if type(size) is not int or size != expected:
        raise ApiError(400, "invalid_binary_size", f"binary_data_size {size!r}; shape {list(shape)} needs {expected}")
    if len(binary) != size:
        raise ApiError(
            400, "invalid_binary_size", f"{len(binary)} bytes follow the header; binary_data_size says {size}"
        )
    return np.frombuffer(binary, dtype=np.uint8).reshape(shape).copy()  # writable, like decoded images


def _json_tensor(tensor: RequestInput, shape: tuple[int, ...]) -> np.ndarray:
    if tensor.data is None:
        raise ApiError(400, "invalid_request", "the input has neither `data` nor binary_data_size")
    try:
        values = np.asarray(tensor.data)
    except ValueError as error:  # ragged nesting
        raise ApiError(400, "invalid_data", f"`data` is not a regular array: {error}") from None
    if values.dtype.kind not in "iu":  # floats, booleans, strings, nulls, integers beyond 64 bits
        raise ApiError(400, "invalid_data", f"{UINT8} data must be integers from 0 to 255")
    if values.shape not in ((int(np.prod(shape)),), shape):
        raise ApiError(
            400, "invalid_data", f"`data` of shape {list(values.shape)} fits neither {list(shape)} nor its flat form"
        )
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ApiError(400, "invalid_data", f"{UINT8} data must be integers from 0 to 255")
    return values.astype(np.uint8).reshape(shape)


def _outputs(request: InferRequestBody) -> tuple[tuple[str, bool], ...]:
    """The requested outputs and whether each is answered as binary: an output's own `binary_data`, else the
    request's `binary_data_output`; every output when none is named (tritonclient then asks for binary)."""
    default = _flag(request.parameters, "binary_data_output")
    if request.outputs is None:
        return tuple((name, default) for name in OUTPUTS)
    chosen: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise ApiError(400, "unknown_output", f"unknown output {output.name!r}; the model has {list(OUTPUTS)}")
        if output.name in chosen:
            raise ApiError(400, "invalid_request", f"output {output.name!r} is asked for twice")
        for key in UNSUPPORTED_PARAMETERS:
            if key in output.parameters:
                raise ApiError(400, "unsupported_parameter", f"parameter {key!r} is not supported by this server")
        chosen[output.name] = _flag(output.parameters, "binary_data", default)
    return tuple(chosen.items())


def _flag(parameters: dict[str, Any], key: str, default: bool = False) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise ApiError(400, "invalid_parameter", f"parameter {key!r} must be true or false")
    return value


def infer_response(answer: Answer, request: InferRequest, name: str, request_id: str) -> tuple[bytes, dict[str, str]]:
    """The body and headers: JSON, or a JSON header followed by the binary outputs when any is asked as binary."""
    arrays = {OUTPUT_NAME: answer.logits, PROBABILITIES: answer.probabilities}
    outputs, blobs = [], []
    for output, binary in request.outputs:
        values = np.asarray(arrays[output], dtype="<f4")
        tensor: dict[str, Any] = {"name": output, "datatype": FP32, "shape": list(values.shape)}
        if binary:
            blobs.append(values.tobytes())
            tensor["parameters"] = {"binary_data_size": len(blobs[-1])}
        else:
            tensor["data"] = values.ravel().tolist()  # row-major, float32 values exactly
        outputs.append(tensor)
    response: dict[str, Any] = {"model_name": name, "model_version": answer.model.version}
    if request.id is not None:
        response["id"] = request.id
    # one server-issued id per image names its prediction for POST /v1/feedback, as in /v1/predict's body; the
    # request id only correlates logs
    response["parameters"] = {
        "request_id": request_id,
        "variant": answer.variant,
        "prediction_ids": list(answer.prediction_ids),
    }
    response["outputs"] = outputs
    header = json.dumps(response, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {"content-type": BINARY, HEADER_LENGTH: str(len(header))}


def _infer_body() -> dict[str, Any]:
    schema = _inline_defs(InferRequestBody.model_json_schema())
    return {
        "required": True,
        "content": {"application/json": {"schema": schema}, BINARY: {"schema": {"type": "string", "format": "binary"}}},
    }


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its `$defs` put in place. Inside the OpenAPI document, `#/$defs/RequestInput` would
    point at the document's root, which has no `$defs`: the reference would not resolve (schemathesis said so)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            rest = {key: inline(value) for key, value in node.items() if key != "$ref"}
            return {**inline(defs[node["$ref"].removeprefix("#/$defs/")]), **rest} if "$ref" in node else rest
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined
