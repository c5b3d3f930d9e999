"""The service's settings, read from environment variables (one per field, upper-case name)."""

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of the service. `MODEL_URI=runs/<run id>/model.onnx uvicorn serve.app:create_app --factory`."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, protected_namespaces=())

    model_uri: str = Field(
        description="a local .onnx file, or an MLflow URI (models:/<name>@<alias>, models:/<name>/<version>, "
        "runs:/<run id>/<path>) resolved through the MLflow client (needs `pip install mlflow-skinny`)"
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
    default_top_k: int = Field(3, gt=0, description="probabilities returned per image unless ?top_k= says otherwise")
    ort_intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads per call; 0: one per core")
    ort_spin_wait: bool = Field(
        False,
        description="let ONNX Runtime's threads spin between calls (off: they would steal the event loop's cores)",
    )
    variant: str = Field("default", description="the `variant` label on model metrics")
