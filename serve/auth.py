"""The API key: one header, compared in constant time."""

import hmac

from fastapi.security import APIKeyHeader

from serve.errors import ApiError

API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when API_KEY is set")


def check_api_key(given: str | None, expected: str) -> None:
    """ApiError 401 unless `given` is the expected key."""
    if not given:
        raise ApiError(401, "missing_api_key", "this server needs an X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(401, "invalid_api_key", "the X-API-Key is not valid")
