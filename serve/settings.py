"""The service's settings, read from environment variables (one per field, upper-case name)."""

import os
import re
from typing import Any, Self

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from serve.variants import VariantRouter, VariantSpec

VARIANT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # a Prometheus label value and a JSON key, nothing odd


class Settings(BaseSettings):
    """Every knob of the service. `MODEL_URI=runs/<run id>/model.onnx uvicorn serve.app:create_app --factory`.

    One model (MODEL_URI) or several variants for A/B tests (VARIANTS, JSON), e.g.
    `VARIANTS='{"champion": {"model_uri": "models:/cifar10-classifier@champion", "weight": 90},
    "challenger": {"model_uri": "models:/cifar10-classifier@challenger", "weight": 10}}'`.
    """

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, protected_namespaces=())

    model_uri: str | None = Field(
        None,
        description="a local .onnx file, or an MLflow URI (models:/<name>@<alias>, models:/<name>/<version>, "
        "runs:/<run id>/<path>) resolved through the MLflow client (needs `pip install mlflow-skinny`)",
    )
    model_name: str = Field("cifarlab", description="the name reported for a local file (MLflow URIs carry theirs)")
    model_version: str | None = Field(
        None, description="the version reported for a local file; default: the first 12 hex digits of its sha256"
    )
    api_key: SecretStr | None = Field(
        None, description="when set, /v1/* calls need it in the X-API-Key header; /v1/admin/* needs it always"
    )
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body, chunked or not")
    max_images_per_request: int = Field(64, gt=0)
    max_image_pixels: int = Field(
        4096 * 4096, gt=0, description="width x height above which an upload is refused (decompression bombs)"
    )
    max_batch_size: int = Field(64, gt=0, description="most images in one ONNX Runtime call")
    max_wait_ms: float = Field(
        2.0, ge=0, description="how long a batch waits for requests already arriving before it runs"
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="load shedding: a request whose expected answer time (the batcher's fitted batch times and the "
        "queue ahead) exceeds this is refused at once with 503 and Retry-After; unset: never",
    )
    max_queue: int = Field(1024, gt=0, description="requests waiting for a batch, per variant, beyond which 503")
    default_top_k: int = Field(3, gt=0, description="probabilities returned per image unless ?top_k= says otherwise")
    ort_intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per call; 0: one per core")
    ort_spin_wait: bool = Field(
        False,
        description="let ONNX Runtime's threads spin between calls: a lone request is answered sooner, but idle "
        "threads burn CPU the event loop and the host could use, and it is no faster under load (make bench-serve)",
    )
    variant: str = Field("default", pattern=VARIANT_NAME, description="the variant name of MODEL_URI's model")
    variants: dict[str, VariantSpec] = Field(
        default_factory=dict,
        description="variant name -> {model_uri, weight, shadow} (JSON), for A/B tests; replaces MODEL_URI",
    )
    model_poll_s: float = Field(
        30.0,
        ge=0,
        description="how often a models:/<name>@<alias> URI's alias is checked; when it names another version, that "
        "version is loaded, warmed and swapped in (serve.follow). 0: never. Other URIs cannot move and are not polled",
    )
    client_id_header: str = Field(
        "X-Client-ID", description="the header whose value pins a client to one variant (hashed; optional)"
    )
    drift_window: int = Field(
        200,
        ge=20,
        le=20_000,
        description="recent images per variant tested against the reference (each kept, 3 KB, until it leaves)",
    )
    drift_alpha: float = Field(0.01, gt=0, lt=1, description="false-alarm rate of one drift check (all tests)")
    feedback_dir: str | None = Field(
        None,
        description="where POST /v1/feedback stores labelled images and their records, shared by all replicas: a "
        "folder or any fsspec URL (gs://bucket/path needs gcsfs); unset: no feedback",
    )
    feedback_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options of FEEDBACK_DIR (JSON), e.g. an endpoint_url"
    )
    feedback_cache_items: int = Field(10_000, gt=0, description="recent predictions kept for feedback")
    feedback_cache_bytes: int = Field(64 * 2**20, gt=0, description="image bytes kept for feedback, at most")
    prediction_log_url: str | None = Field(
        None,
        description="where every answered image is logged, shared by all replicas (serve.predlog): a folder or "
        "any fsspec URL (gs://bucket/path needs gcsfs); feedback looks ids up there. Unset: no log",
    )
    prediction_log_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (JSON), e.g. an endpoint_url or a token file"
    )
    prediction_log_required: bool = Field(
        True,
        description="true: a log store that cannot be written at start stops the start (the server never becomes "
        "ready); false: serve without the log (best effort), said by /readyz and cifarlab_prediction_log_available",
    )
    prediction_log_sample_rate: float = Field(1.0, gt=0, le=1, description="share of answered images logged")
    prediction_log_batch_items: int = Field(256, gt=0, description="images per log write, at most")
    prediction_log_flush_s: float = Field(1.0, gt=0, description="a queued image is written within this time")

    @field_validator("feedback_dir", mode="before")
    @classmethod
    def _a_folder_or_url(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value  # a Path given in Python

    @model_validator(mode="after")
    def _a_model_source(self) -> Self:
        if self.model_uri is None and not self.variants:
            raise ValueError("set MODEL_URI (one model) or VARIANTS (several)")
        bad = [name for name in self.variants if not re.fullmatch(VARIANT_NAME, name)]
        if bad:
            raise ValueError(f"variant names must be letters, digits and '_.-': {bad}")
        VariantRouter(self.variant_specs())  # its own checks: someone must answer
        return self

    def variant_specs(self) -> dict[str, VariantSpec]:
        """The configured variants: VARIANTS when set (MODEL_URI, e.g. the image's default, is then unused),
        else MODEL_URI as one variant named VARIANT."""
        if self.variants:
            return self.variants
        assert self.model_uri is not None  # the validator saw to it
        return {self.variant: VariantSpec(model_uri=self.model_uri)}


def load_settings() -> Settings:
    """The settings from the environment; a bad value ends the process with one line saying which and why."""
    try:
        return Settings()  # type: ignore[call-arg]  # every field has a default or comes from the environment
    except SettingsError as error:  # a complex value (VARIANTS) that is not JSON
        raise SystemExit(f"error: invalid server settings: {error}: {error.__cause__}") from None
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        raise SystemExit(f"error: invalid server settings: {problems}") from None
