"""What a variant reports of its model: `cifarlab_model_ready` after loads and reloads that fail or succeed, and a
`models:/<name>@<alias>` URI resolved once, to the version that is then downloaded and reported."""

import asyncio
import hashlib
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from serve.model import load_model
from serve.service import ReloadFailed, Service
from serve.settings import Settings


def test_model_ready_follows_failed_and_successful_reloads(tiny_model: Path, tmp_path: Path) -> None:
    service = Service(Settings(model_uri=str(tiny_model)))

    def ready() -> float | None:
        return service.metrics.registry.get_sample_value("cifarlab_model_ready", {"variant": "default"})

    async def lifecycle() -> list[float | None]:
        seen = [ready()]  # before the load
        await service.start()
        seen.append(ready())
        with pytest.raises(ReloadFailed):
            await service.reload(str(tmp_path / "absent.onnx"))
        seen.append(ready())
        answer = await service.predict(np.zeros((1, 32, 32, 3), dtype=np.uint8), "default", "r")
        assert answer.probabilities.shape == (1, 10)  # the previous model still answers
        await service.reload()
        seen.append(ready())
        await service.stop()
        return [*seen, ready()]

    assert asyncio.run(lifecycle()) == [0.0, 1.0, 0.0, 1.0, 0.0]


def onnx_copy(source: Path, path: Path, tag: str) -> Path:
    """The same network with one more metadata entry: another file, another sha256."""
    model = onnx.load(str(source))
    entry = model.metadata_props.add()
    entry.key, entry.value = "test_tag", tag
    onnx.save(model, str(path))
    return path


def test_an_alias_that_moves_during_the_load_serves_the_version_it_resolved_to(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment("serve", artifact_location=str(tmp_path / "artifacts"))
    hashes = {}
    for tag in ("one", "two"):
        with mlflow.start_run(experiment_id=experiment):
            model = onnx.load(str(onnx_copy(tiny_model, tmp_path / f"{tag}.onnx", tag)))
            info = mlflow.onnx.log_model(model, name="model", registered_model_name="moving")
        hashes[str(info.registered_model_version)] = tag
    client = MlflowClient(tracking_uri)
    client.set_registered_model_alias("moving", "champion", "1")
    resolve_alias = MlflowClient.get_model_version_by_alias

    def resolve_then_move(self: MlflowClient, name: str, alias: str):
        version = resolve_alias(self, name, alias)
        client.set_registered_model_alias(name, alias, "2")  # a promotion lands between resolving and download
        return version

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", resolve_then_move)
    loaded = load_model("models:/moving@champion", Settings(model_uri="models:/moving@champion"))
    assert loaded.version == "1" and loaded.metadata["test_tag"] == "one"  # the weights of the version reported
    assert loaded.sha256 == hashlib.sha256(loaded.path.read_bytes()).hexdigest()
    assert loaded.uri == "models:/moving@champion"
