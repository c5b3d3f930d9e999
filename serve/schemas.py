"""Request and response bodies of the API, as they appear in its OpenAPI schema."""

from typing import Any

from pydantic import BaseModel, Field


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
    label: str
    class_index: int
    confidence: float = Field(description="the probability of `label`")
    top_k: list[ClassProbability]
    filename: str | None = None


class ModelRef(BaseModel):
    name: str
    version: str
    run_id: str


class PredictResponse(BaseModel):
    request_id: str
    model: ModelRef
    predictions: list[Prediction]


class ModelInfo(ModelRef):
    uri: str
    sha256: str
    classes: list[str]
    input_spec: dict[str, Any]
    output_spec: dict[str, Any]
    contract_version: str
    data_manifest_sha256: str
    loaded_at: float = Field(description="Unix time of the load")


class Status(BaseModel):
    status: str


class ReloadRequest(BaseModel):
    model_uri: str | None = Field(None, description="what to load; default: re-resolve the configured MODEL_URI")


class ReloadResponse(BaseModel):
    previous: ModelRef
    model: ModelInfo
