"""Request and response bodies of the API, as they appear in its OpenAPI schema."""

from typing import TYPE_CHECKING, Annotated, Any, Literal, Self

from pydantic import BaseModel, Field, model_validator

from cifarlab_contract.feedback import PREDICTION_ID_PATTERN

if TYPE_CHECKING:
    from serve.model import LoadedModel


class PredictJSON(BaseModel):
    images: list[str] = Field(
        min_length=1,
        description="base64-encoded image files (JPEG, PNG, GIF, BMP, WEBP, TIFF); a data: URL prefix is allowed",
    )


class ClassProbability(BaseModel):
    label: str
    class_index: int
    probability: float


class Prediction(BaseModel):
    prediction_id: str = Field(
        description="issued by the server for this image (random, unique): send it with POST /v1/feedback"
    )
    label: str
    class_index: int
    confidence: float = Field(description="the probability of `label`")
    top_k: list[ClassProbability]
    filename: str | None = None


class ModelRef(BaseModel):
    name: str
    version: str
    run_id: str

    @classmethod
    def of(cls, model: "LoadedModel") -> Self:
        return cls(name=model.name, version=model.version, run_id=model.run_id)


class PredictResponse(BaseModel):
    request_id: str = Field(
        description="the client's X-Request-ID, or a new one: correlates logs. Feedback names a prediction_id"
    )
    variant: str = Field(description="the model variant that answered (A/B tests; also the X-Model-Variant header)")
    model: ModelRef
    predictions: list[Prediction]


class AliasMove(BaseModel):
    alias: str
    from_version: str = Field(description="`none` when the alias named no version before")
    to_version: str
    by: str
    at: str = Field(description="ISO 8601, UTC")
    why: str
    via: str = Field(description="the command that moved it")


class ModelInfo(ModelRef):
    variant: str
    shadow: bool = Field(description="the variant scores copies of requests and answers none")
    traffic_share: float = Field(description="expected share of answered requests")
    uri: str
    sha256: str
    classes: list[str]
    input_spec: dict[str, Any]
    output_spec: dict[str, Any]
    contract_version: str
    data_manifest_sha256: str
    drift_reference: bool = Field(description="the model carries reference statistics: drift is monitored")
    loaded_at: float = Field(description="Unix time of the load")
    alias_history: list[AliasMove] = Field(
        default_factory=list,
        description="for a models:/<name>@<alias> URI: the alias's latest moves in the registry, oldest first",
    )


class Status(BaseModel):
    status: str


class Readiness(Status):
    following: dict[str, dict[str, Any]] | None = Field(
        None, description="per variant following a registry alias: the versions, the last check, a failing load"
    )
    prediction_log: Literal["logging", "unavailable"] | None = Field(
        None,
        description="with PREDICTION_LOG_URL set: whether answered images are logged; unavailable: its store could "
        "not be opened at start and the server serves without it (PREDICTION_LOG_REQUIRED=false)",
    )


class ReloadRequest(BaseModel):
    model_uri: Annotated[str | None, Field(description="what to load; default: the variant's configured URI")] = None
    variant: Annotated[str | None, Field(description="the variant to reload; needed when there are several")] = None


class ReloadResponse(BaseModel):
    previous: ModelRef
    model: ModelInfo


class FeedbackRequest(BaseModel):
    prediction_id: str = Field(
        pattern=f"^{PREDICTION_ID_PATTERN.pattern}$", description="the prediction_id the server answered for the image"
    )
    label: str = Field(description="the true class of the image")

    @model_validator(mode="before")
    @classmethod
    def _not_the_removed_fields(cls, data: Any) -> Any:
        """API 1.1 removed `request_id` + `image_index` (the client chose that id): say so, not just 'missing'."""
        if isinstance(data, dict) and "prediction_id" not in data and "request_id" in data:
            raise ValueError(
                "request_id and image_index were removed from feedback in API 1.1: send the prediction_id that "
                "the prediction answered for the image"
            )
        return data


class ShadowOutcome(BaseModel):
    predicted: str
    version: str
    correct: bool


class FeedbackResponse(BaseModel):
    prediction_id: str
    request_id: str = Field(description="the id of the request that was answered (log correlation)")
    image_index: int = Field(description="the image's position in that request")
    label: str
    predicted: str = Field(description="what the answering variant said")
    correct: bool
    confidence: float
    variant: str
    version: str
    received_at: str = Field(description="when the feedback was first stored (ISO 8601, UTC)")
    shadows: dict[str, ShadowOutcome] = Field(description="what shadow variants said of the same image")
    created: bool = Field(description="false when the same feedback had been stored before (idempotent)")


class DriftTestResult(BaseModel):
    test: Literal["ks", "chi2"]
    statistic: float
    p_value: float
    score: float = Field(description="effect size in [0, 1]: KS distance, or total-variation distance of class mixes")
    drifted: bool


class VariantDrift(BaseModel):
    status: Literal["ok", "drift", "insufficient_data", "unavailable"] = Field(
        description="`unavailable`: the model carries no reference statistics"
    )
    drift_detected: bool
    window: int
    observed: int = Field(description="images seen since the model was loaded")
    in_window: int
    alpha: float
    threshold: float = Field(description="the per-test p-value threshold (alpha over the number of tests)")
    correction: str
    tests: dict[str, DriftTestResult]
    reference: dict[str, Any]


class DriftResponse(BaseModel):
    variants: dict[str, VariantDrift]
