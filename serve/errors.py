"""Errors at the edge of the API: ApiError, the refusal handlers raise, and the one table that maps the service's
domain errors to HTTP statuses. The app answers both as a JSON body with the request id."""

import json
import math
from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException

from serve.batching import BatchFailed, Overloaded, ShuttingDown
from serve.feedback import (
    ConflictingFeedback,
    FeedbackError,
    FeedbackStoreFailed,
    FeedbackStoreUnavailable,
    UnknownPrediction,
)
from serve.preprocess import EmptyImage, ImageTooLarge, InvalidImage
from serve.service import FeedbackDisabled, NotReady, ReloadFailed, UnknownVariant, VariantRequired


class ApiError(HTTPException):
    """A request the server refuses: HTTP status, a stable machine-readable code, a sentence for humans.

    An HTTPException, so that FastAPI passes it through unchanged even when it is raised while FastAPI reads
    the body (the body limit is enforced inside `receive`).
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.code = code
        self.message = message


# domain error -> (HTTP status, error code). A subclass is looked up before its base (FeedbackError is the rest).
DOMAIN_ERRORS: dict[type[Exception], tuple[int, str]] = {
    EmptyImage: (422, "empty_image"),
    ImageTooLarge: (413, "image_too_large"),
    InvalidImage: (422, "invalid_image"),
    BatchFailed: (500, "inference_failed"),
    ShuttingDown: (503, "shutting_down"),
    Overloaded: (503, "overloaded"),
    NotReady: (503, "not_ready"),
    UnknownVariant: (404, "unknown_variant"),
    VariantRequired: (422, "variant_required"),
    ReloadFailed: (422, "model_load_failed"),
    FeedbackDisabled: (404, "feedback_disabled"),
    UnknownPrediction: (404, "unknown_prediction"),
    ConflictingFeedback: (409, "conflicting_feedback"),
    FeedbackStoreFailed: (503, "feedback_store_unavailable"),
    FeedbackStoreUnavailable: (503, "feedback_store_unavailable"),  # at start-up: the server does not start
    FeedbackError: (422, "invalid_feedback"),
}


def retry_headers(error: Exception, state: Any = None) -> dict[str, str] | None:
    """Retry-After for a shed request (whole seconds, at least 1); the request's `state` is marked shed, for the
    log's summary of refusals (serve.middleware)."""
    if isinstance(error, Overloaded):
        if state is not None:
            state.shed = True
        return {"Retry-After": str(max(1, math.ceil(error.retry_after_s)))}
    return None


def as_api_error(error: Exception) -> ApiError:
    """The refusal a domain error maps to (DOMAIN_ERRORS, by its nearest class); KeyError for any other error."""
    for kind in type(error).__mro__:
        if kind in DOMAIN_ERRORS:
            status, code = DOMAIN_ERRORS[kind]
            return ApiError(status, code, str(error))
    raise KeyError(f"{type(error).__name__} is not a domain error of the service")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str


def error_body(code: str, message: str, request_id: str) -> dict[str, object]:
    return ErrorBody(error=ErrorDetail(code=code, message=message), request_id=request_id).model_dump()


V2_PREFIX = "/v2"  # the Open Inference Protocol's routes (serve.v2), whose errors have the protocol's body


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def v2_error_body(message: str) -> bytes:
    """The Open Inference Protocol's error body, `{"error": "<message>"}`."""
    return json.dumps({"error": message}).encode()


def describe_validation(errors: Any) -> str:
    """One line from pydantic's (or FastAPI's) validation errors: `loc: message; ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
