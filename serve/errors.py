"""The one error type handlers raise; the app turns it into a JSON body with the request id."""

from typing import Any

from pydantic import BaseModel
from starlette.exceptions import HTTPException


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


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
    request_id: str


def error_body(code: str, message: str, request_id: str) -> dict[str, object]:
    return ErrorBody(error=ErrorDetail(code=code, message=message), request_id=request_id).model_dump()


def describe_validation(errors: Any) -> str:
    """One line from pydantic's (or FastAPI's) validation errors: `loc: message; ...`."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)
