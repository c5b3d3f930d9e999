"""A `models:/<name>@<alias>` MODEL_URI resolved through a real MLflow registry (local SQLite store)."""

import hashlib

import mlflow
import onnx
import pytest
from mlflow import MlflowClient

from serve.model import load_model
from serve.settings import Settings

pytestmark = pytest.mark.slow  # the session's trained model, registered in an MLflow store


def test_models_alias_uri_loads_the_registered_version(onnx_model, tmp_path, monkeypatch):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("serve", artifact_location=str(tmp_path / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(onnx.load(str(onnx_model)), name="model", registered_model_name="cifarlab")
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("cifarlab", "champion", info.registered_model_version)

    model = load_model("models:/cifarlab@champion", Settings(model_uri="models:/cifarlab@champion"))

    assert (model.name, model.version) == ("cifarlab", str(info.registered_model_version))
    assert model.metadata == {p.key: p.value for p in onnx.load(str(onnx_model)).metadata_props}
    assert model.sha256 == hashlib.sha256(model.path.read_bytes()).hexdigest()
    assert model.uri == "models:/cifarlab@champion" and len(model.classes) == 10
