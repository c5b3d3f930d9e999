"""The model registry on a real MLflow server: training registers a challenger, promotion moves the champion."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from torch import nn

from cifarlab.export.onnx import export_onnx, read_metadata
from cifarlab.tracking import log_run_end, mlflow_logger
from cifarlab_contract.alias_history import alias_history
from cifarlab_contract.model import contract_metadata
from cifarlab_lifecycle.promotion import promote
from cifarlab_lifecycle.registry import RegistryError
from tests.conftest import CHALLENGER_ALIAS, CHAMPION_ALIAS, CONFIGS, SAMPLE, run_cli
from tests.lifecycle.test_abreport import ab_report, split_traffic, write_manifest

pytestmark = pytest.mark.integration  # a real MLflow tracking server

OTHER_CLASSES = [f"c{i}" for i in range(10)]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def contract(classes: list[str]) -> dict[str, str]:
    return contract_metadata(classes, "no-run", "00" * 32)


class ConstantNet(nn.Module):
    """Answers one class for every image: exactly 10% accuracy on the balanced test sample, and a recall of 1
    for that class, 0 for the others."""

    def __init__(self, class_index: int) -> None:
        super().__init__()
        self.register_buffer("answer", nn.functional.one_hot(torch.tensor(class_index), len(CIFAR10)).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images[:, 0, 0, :1].float() * 0 + self.answer


@pytest.fixture(scope="module")
def always(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("constant")
    return {
        name: export_onnx(ConstantNet(CIFAR10.index(name)), folder / name / "model.onnx", contract(CIFAR10))
        for name in ("airplane", "truck")
    }


@pytest.fixture(scope="module")
def foreign_onnx(tmp_path_factory) -> Path:
    """A model trained on other classes: evaluating it on CIFAR-10 fails."""
    path = tmp_path_factory.mktemp("foreign") / "model.onnx"
    return export_onnx(ConstantNet(0), path, contract(OTHER_CLASSES))


def register(server: str, name: str, onnx_path: Path) -> str:
    """Register an ONNX file as training does (a run, the MLflow model, the challenger alias)."""
    logger = mlflow_logger(
        server, experiment_name="registry-tests", registered_model_name=name, challenger_alias=CHALLENGER_ALIAS
    )
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


def test_promotion_follows_the_scores_and_the_margin(mlflow_server, promote_cfg, always):
    name = "promotion-flow"
    first = register(mlflow_server, name, always["truck"])
    decision = promote(promote_cfg(name))
    assert decision.promoted and decision.champion_version is None
    assert decision.challenger_score == pytest.approx(0.1)  # one class of ten, on the balanced sample
    assert aliases(mlflow_server, name) == {CHAMPION_ALIAS: first, CHALLENGER_ALIAS: first}
    assert promotion_tags(mlflow_server, name, first)["promotion.champion_version"] == "none"

    # Scored by the airplane recall: the challenger's is 1, the champion's 0.
    better = register(mlflow_server, name, always["airplane"])
    decision = promote(promote_cfg(name, "metric=recall/airplane", "margin=1.5"))
    assert not decision.promoted and (decision.challenger_score, decision.champion_score) == (1.0, 0.0)
    assert aliases(mlflow_server, name)[CHAMPION_ALIAS] == first
    tags = promotion_tags(mlflow_server, name, better)
    assert tags["promotion.decision"] == "rejected" and tags["promotion.margin"] == "1.5"

    decision = promote(promote_cfg(name, "metric=recall/airplane", "margin=0.5"))
    assert decision.promoted and decision.champion_version == first
    assert aliases(mlflow_server, name) == {CHAMPION_ALIAS: better, CHALLENGER_ALIAS: better}
    tags = promotion_tags(mlflow_server, name, better)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.metric"] == "recall/airplane"
    assert (tags["promotion.challenger_score"], tags["promotion.champion_score"]) == ("1.000000", "0.000000")
    assert tags["promotion.champion_version"] == first and tags["promotion.by"] and tags["promotion.at"]
    # the alias history: both moves, oldest first, not the rejection
    history = alias_history(MlflowClient(mlflow_server).get_registered_model(name).tags, CHAMPION_ALIAS)
    assert [(m.from_version, m.to_version) for m in history] == [("none", first), (first, better)]
    assert all(m.via == "scripts/promote.py" and m.by == tags["promotion.by"] for m in history)
    assert history[1].why == decision.describe(name, "recall/airplane", 0.5)
    assert history[1].why.startswith(f"promoted {name} version {better} (recall/airplane 1.0000) to champion")

    worse = register(mlflow_server, name, always["truck"])
    decision = promote(promote_cfg(name, "metric=recall/airplane"))
    assert not decision.promoted and aliases(mlflow_server, name)[CHAMPION_ALIAS] == better
    assert promotion_tags(mlflow_server, name, worse)["promotion.decision"] == "rejected"


def test_missing_alias_changes_nothing(mlflow_server, promote_cfg, always):
    name = "promotion-missing-alias"
    version = register(mlflow_server, name, always["truck"])
    MlflowClient(mlflow_server).delete_registered_model_alias(name, CHALLENGER_ALIAS)
    with pytest.raises(RegistryError, match="has the alias 'challenger'"):
        promote(promote_cfg(name))
    assert aliases(mlflow_server, name) == {}
    assert promotion_tags(mlflow_server, name, version) == {}
    with pytest.raises(RegistryError, match="'no-such-model'"):
        promote(promote_cfg("no-such-model"))


def test_failed_evaluation_changes_nothing(mlflow_server, promote_cfg, always, foreign_onnx):
    name = "promotion-failed-evaluation"
    champion = register(mlflow_server, name, always["truck"])
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


def test_ab_report_promotes_only_the_tested_challenger(mlflow_server, always, tmp_path, capsys):
    """scripts/ab_report.py --promote: the champion alias moves to the challenger version the feedback names, only
    if that is the version the registry's challenger alias names, with the test's evidence as tags."""
    name = "ab-test-promotion"
    champion = register(mlflow_server, name, always["truck"])
    MlflowClient(mlflow_server).set_registered_model_alias(name, CHAMPION_ALIAS, champion)
    challenger = register(mlflow_server, name, always["airplane"])
    before = {CHAMPION_ALIAS: champion, CHALLENGER_ALIAS: challenger}
    promote_args = ["--promote", "--model-name", name, "--tracking-uri", mlflow_server]

    def run(versions: tuple[str, str], challenger_correct: int) -> dict:
        folder = write_manifest(tmp_path / f"v{versions[1]}-{challenger_correct}", [])
        write_manifest(folder, split_traffic((900, 720), (300, challenger_correct), versions=versions))
        out = folder / "report.json"
        assert ab_report(["--feedback", str(folder), "--json", str(out), *promote_args]) == 0
        return json.loads(out.read_text())

    worse = run((champion, challenger), 200)
    assert worse["recommendation"]["action"] == "keep" and not worse["promotion"]["promoted"]
    assert aliases(mlflow_server, name) == before

    stale = write_manifest(tmp_path / "stale", split_traffic((900, 720), (300, 270), versions=(champion, champion)))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        ab_report(["--feedback", str(stale), *promote_args])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: the tested challenger is {name} version {champion}, but the registry's")
    assert aliases(mlflow_server, name) == before and promotion_tags(mlflow_server, name, champion) == {}

    better = run((champion, challenger), 270)
    assert better["promotion"] == {
        "promoted": True,
        "model": name,
        "version": challenger,
        "alias": CHAMPION_ALIAS,
        "previous_champion": champion,
    }
    assert aliases(mlflow_server, name) == {CHAMPION_ALIAS: challenger, CHALLENGER_ALIAS: challenger}
    tags = promotion_tags(mlflow_server, name, challenger)
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == champion
    assert tags["promotion.method"] == "ab_test (independent, two-proportion z-test)"
    assert float(tags["promotion.p_value"]) == pytest.approx(better["comparison"]["p_value"], rel=1e-5)
    assert tags["promotion.samples"] == "1200" and tags["promotion.by"] and tags["promotion.at"]
    (move,) = alias_history(MlflowClient(mlflow_server).get_registered_model(name).tags, CHAMPION_ALIAS)
    assert (move.from_version, move.to_version, move.via) == (champion, challenger, "scripts/ab_report.py --promote")
    assert move.why == f"A/B test: {better['recommendation']['reason']}"

    with pytest.raises(SystemExit):  # the same evidence again: already the champion
        ab_report(["--feedback", str(tmp_path / f"v{challenger}-270"), *promote_args])
    assert f"{name} version {challenger} is already 'champion'" in capsys.readouterr().err
