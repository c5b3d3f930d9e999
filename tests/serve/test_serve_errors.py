"""serve.errors: the one place the service's domain errors become HTTP statuses."""

import pytest

from serve import batching, errors, feedback, preprocess, service
from serve.errors import DOMAIN_ERRORS, as_api_error

DOMAIN_MODULES = (batching, feedback, preprocess, service)


def defined_errors() -> list[type[Exception]]:
    return [
        value
        for module in DOMAIN_MODULES
        for value in vars(module).values()
        if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == module.__name__
    ]


def test_every_error_the_domain_modules_define_has_a_status() -> None:
    kinds = defined_errors()
    assert len(kinds) >= 12
    unmapped = [kind.__name__ for kind in kinds if not any(base in DOMAIN_ERRORS for base in kind.__mro__)]
    assert not unmapped, f"add these to serve.errors.DOMAIN_ERRORS: {unmapped}"
    assert set(DOMAIN_ERRORS) <= set(kinds)  # and the table maps nothing else


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (preprocess.EmptyImage("image 0 is empty"), 422, "empty_image"),
        (preprocess.ImageTooLarge("image 0 is too large"), 413, "image_too_large"),
        (preprocess.InvalidImage("image 0 cannot be decoded"), 422, "invalid_image"),
        (batching.BatchFailed("inference failed"), 500, "inference_failed"),
        (batching.ShuttingDown("shutting down"), 503, "shutting_down"),
        (service.NotReady("no model"), 503, "not_ready"),
        (service.UnknownVariant("no variant 'x'"), 404, "unknown_variant"),
        (service.VariantRequired("name one"), 422, "variant_required"),
        (service.ReloadFailed("bad file"), 422, "model_load_failed"),
        (service.FeedbackDisabled("off"), 404, "feedback_disabled"),
        (feedback.UnknownPrediction("expired"), 404, "unknown_prediction"),
        (feedback.ConflictingFeedback("other label"), 409, "conflicting_feedback"),
        (feedback.InvalidFeedback("no such label"), 422, "invalid_feedback"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else str(value),
)
def test_a_domain_error_becomes_its_status_code_and_message(error: Exception, status: int, code: str) -> None:
    refusal = as_api_error(error)
    assert (refusal.status, refusal.code, refusal.message) == (status, code, str(error))


def test_an_error_that_is_no_domain_error_is_not_mapped() -> None:
    with pytest.raises(KeyError, match="ValueError is not a domain error"):
        as_api_error(ValueError("a bug"))
    assert errors.ApiError(400, "x", "y").status_code == 400  # still an HTTPException: FastAPI passes it through
