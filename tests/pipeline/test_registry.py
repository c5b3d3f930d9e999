"""The model registry on a real MLflow server: training registers a challenger, promotion moves the champion."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from cifarlab.export.onnx import contract_metadata, export_onnx, read_metadata
from cifarlab.models.airbench import AirbenchNet
from cifarlab.models.module import ClassifierNet
from cifarlab.registry import RegistryError, promote
from cifarlab.tracking import CHALLENGER_ALIAS, CHAMPION_ALIAS, log_run_end, mlflow_logger
from tests.conftest import CONFIGS, SAMPLE, run_cli

OTHER_CLASSES = [f"c{i}" for i in range(10)]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def constant_onnx(tmp_path_factory) -> Path:
    """A model that always answers 'airplane': exactly 10% on the balanced test sample."""
    net = ClassifierNet(AirbenchNet(widths=(8, 16, 16)))
    for parameter in net.parameters():
        torch.nn.init.zeros_(parameter)
    path = tmp_path_factory.mktemp("constant") / "model.onnx"
    return export_onnx(net, path, contract_metadata(CIFAR10, "constant", "00" * 32))


@pytest.fixture(scope="module")
def foreign_onnx(tmp_path_factory) -> Path:
    """A model trained on other classes: evaluating it on CIFAR-10 fails."""
    path = tmp_path_factory.mktemp("foreign") / "model.onnx"
    return export_onnx(ClassifierNet(AirbenchNet(widths=(8, 16, 16))), path, contract_metadata(OTHER_CLASSES, "x", "0"))


def register(server: str, name: str, onnx_path: Path) -> str:
    """Register an ONNX file as training does (a run, the MLflow model, the challenger alias)."""
    logger = mlflow_logger(server, experiment_name="registry-tests", registered_model_name=name)
    version = log_run_end(logger, onnx_path.parent, onnx_path, None)
    logger.finalize("success")
    return version


@pytest.fixture
def promote_cfg(mlflow_server, prepared_root):
    def _compose(name: str, *overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(
                "promote",
                overrides=[
                    f"tracking_uri={mlflow_server}",
                    f"model_name={name}",
                    f"data.source={SAMPLE}",
                    f"data.prepared_root={prepared_root}",
                    *overrides,
                ],
            )

    yield _compose
    GlobalHydra.instance().clear()


def aliases(server: str, name: str) -> dict[str, str]:
    return dict(MlflowClient(server).get_registered_model(name).aliases)


def promotion_tags(server: str, name: str, version: str) -> dict[str, str]:
    tags = MlflowClient(server).get_model_version(name, version).tags
    return {k: v for k, v in tags.items() if k.startswith("promotion.")}


def test_training_registers_its_onnx_export_as_the_challenger(mlflow_server, trained_version, tmp_path):
    name = trained_version["name"]
    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(name, CHALLENGER_ALIAS)
    assert version.run_id == trained_version["run_id"]
    location = client.get_model_version_download_uri(name, version.version)
    local = download_artifacts(location, dst_path=str(tmp_path), tracking_uri=mlflow_server)
    assert read_metadata(Path(local) / "model.onnx")["run_id"] == trained_version["run_id"]
    run = client.get_run(trained_version["run_id"])
    assert run.data.params["logger.registered_model_name"] == name


def test_promotion_follows_the_scores_and_the_margin(mlflow_server, promote_cfg, trained_version, constant_onnx):
    name = "promotion-flow"
    trained = trained_version["run_dir"] / "model.onnx"
    first = register(mlflow_server, name, constant_onnx)
    decision = promote(promote_cfg(name))
    assert decision.promoted and decision.champion_version is None
    assert decision.challenger_score == pytest.approx(0.1)  # the constant model on the balanced sample
    assert aliases(mlflow_server, name) == {CHAMPION_ALIAS: first, CHALLENGER_ALIAS: first}
    assert promotion_tags(mlflow_server, name, first)["promotion.champion_version"] == "none"

    better = register(mlflow_server, name, trained)
    decision = promote(promote_cfg(name, "margin=0.95"))
    assert not decision.promoted and decision.challenger_score > 0.1 + 0.01
    assert aliases(mlflow_server, name)[CHAMPION_ALIAS] == first
    tags = promotion_tags(mlflow_server, name, better)
    assert tags["promotion.decision"] == "rejected" and tags["promotion.margin"] == "0.95"

    decision = promote(promote_cfg(name, "margin=0.01"))
    assert decision.promoted and decision.champion_version == first
    assert aliases(mlflow_server, name)[CHAMPION_ALIAS] == better
    tags = promotion_tags(mlflow_server, name, better)
    assert tags["promotion.decision"] == "promoted"
    assert float(tags["promotion.challenger_score"]) == pytest.approx(decision.challenger_score, abs=1e-6)
    assert float(tags["promotion.champion_score"]) == pytest.approx(0.1, abs=1e-6)
    assert tags["promotion.champion_version"] == first and tags["promotion.by"] and tags["promotion.at"]

    worse = register(mlflow_server, name, constant_onnx)
    decision = promote(promote_cfg(name))
    assert not decision.promoted and aliases(mlflow_server, name)[CHAMPION_ALIAS] == better
    assert promotion_tags(mlflow_server, name, worse)["promotion.decision"] == "rejected"


def test_missing_alias_changes_nothing(mlflow_server, promote_cfg, constant_onnx):
    name = "promotion-missing-alias"
    version = register(mlflow_server, name, constant_onnx)
    MlflowClient(mlflow_server).delete_registered_model_alias(name, CHALLENGER_ALIAS)
    with pytest.raises(RegistryError, match="has the alias 'challenger'"):
        promote(promote_cfg(name))
    assert aliases(mlflow_server, name) == {}
    assert promotion_tags(mlflow_server, name, version) == {}
    with pytest.raises(RegistryError, match="'no-such-model'"):
        promote(promote_cfg("no-such-model"))


def test_failed_evaluation_changes_nothing(mlflow_server, promote_cfg, constant_onnx, foreign_onnx):
    name = "promotion-failed-evaluation"
    champion = register(mlflow_server, name, constant_onnx)
    promote(promote_cfg(name))
    challenger = register(mlflow_server, name, foreign_onnx)
    before = promotion_tags(mlflow_server, name, champion)
    with pytest.raises(RegistryError, match=f"could not evaluate {name} version {challenger}, nothing was changed"):
        promote(promote_cfg(name))
    assert aliases(mlflow_server, name) == {CHAMPION_ALIAS: champion, CHALLENGER_ALIAS: challenger}
    assert promotion_tags(mlflow_server, name, challenger) == {}
    assert promotion_tags(mlflow_server, name, champion) == before


def test_promote_cli_reports_a_missing_model_in_one_line(mlflow_server, tmp_path):
    result = run_cli(
        "scripts/promote.py",
        f"tracking_uri={mlflow_server}",
        "model_name=nobody-registered-this",
        f"hydra.run.dir={tmp_path / 'hydra'}",
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: no version of registered model")
