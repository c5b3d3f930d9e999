"""What every run records: flattened params, code and system identity, and the MLflow store's layout."""

import json
import os
import platform
import re
from types import SimpleNamespace

import lightning
import pytest
import torch
from mlflow import MlflowClient

from cifarlab.tracking import MAX_PARAM_LENGTH, as_params, flatten, git_state, log_run_start, mlflow_logger, system_info
from cifarlab_lifecycle.registry import ensure_experiment
from tests.conftest import ROOT


@pytest.mark.parametrize(
    ("config", "flat"),
    [
        ({"a": {"b": 1, "c": {"d": "x"}}, "e": 2}, {"a.b": 1, "a.c.d": "x", "e": 2}),
        ({"widths": [16, 32], "groups": [{"k": 1}]}, {"widths": [16, 32], "groups": [{"k": 1}]}),
        ({"callbacks": {}, "model": {"extra": {}}}, {"callbacks": {}, "model.extra": {}}),
        ({"ckpt_path": None, "test": True}, {"ckpt_path": None, "test": True}),
        ({}, {}),
    ],
    ids=["nested", "lists-stay-values", "empty-dicts-stay-values", "scalars", "empty"],
)
def test_flatten(config, flat):
    assert flatten(config) == flat


def test_flatten_with_a_prefix():
    assert flatten({"lr": 0.1, "betas": {"one": 0.9}}, "optimizer.") == {
        "optimizer.lr": 0.1,
        "optimizer.betas.one": 0.9,
    }


def test_as_params_are_strings_cut_at_the_mlflow_limit():
    params = as_params(
        {"model": {"net": {"widths": [16, 32, 32]}}, "ckpt_path": None, "callbacks": {}, "long": "x" * 7000}
    )
    assert params == {
        "model.net.widths": "[16, 32, 32]",
        "ckpt_path": "None",
        "callbacks": "{}",
        "long": "x" * MAX_PARAM_LENGTH,
    }
    assert MAX_PARAM_LENGTH == 6000


def test_git_state_of_the_repository():
    state = git_state(ROOT)
    assert set(state) == {"git.commit", "git.dirty"}
    assert re.fullmatch(r"[0-9a-f]{40}", state["git.commit"])
    assert state["git.dirty"] in ("True", "False")


@pytest.mark.parametrize("cause", ["not-a-checkout", "no-git-program"])
def test_git_state_is_unknown_without_git(tmp_path, monkeypatch, cause):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above tmp_path either
    if cause == "no-git-program":
        monkeypatch.setenv("PATH", str(tmp_path))
    assert git_state(tmp_path) == {"git.commit": "unknown", "git.dirty": "unknown"}


def test_system_info():
    info = system_info("cpu")
    expected = {
        "system.python",
        "system.platform",
        "system.cpu_count",
        "system.torch",
        "system.lightning",
        "system.accelerator",
    }
    assert set(info) == expected | ({"system.gpu"} if torch.cuda.is_available() else set())
    assert all(isinstance(value, str) for value in info.values())
    assert info["system.python"] == platform.python_version()
    assert info["system.cpu_count"] == str(os.cpu_count())
    assert info["system.torch"] == torch.__version__ and info["system.lightning"] == lightning.__version__
    assert info["system.accelerator"] == "cpu"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store that does not exist yet, opened through mlflow_logger from an unrelated working folder."""
    folder = tmp_path_factory.mktemp("tracking")
    database = folder / "deep" / "mlruns" / "mlflow.db"
    cwd = folder / "cwd"
    cwd.mkdir()
    uri = f"sqlite:///{database}"
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.chdir(cwd)
        existed_before = database.parent.exists()
        logger = mlflow_logger(uri, experiment_name="layout", run_name="first")
        run_id = logger.run_id  # creates the database, the experiment and the run
    return SimpleNamespace(
        uri=uri, database=database, cwd=cwd, logger=logger, run_id=run_id, existed_before=existed_before
    )


def test_mlflow_logger_puts_artifacts_beside_the_sqlite_database(store, tmp_path, monkeypatch):
    assert not store.existed_before and store.database.is_file()
    artifacts = (store.database.parent / "artifacts").resolve()
    client = MlflowClient(store.uri)
    experiment = client.get_experiment_by_name("layout")
    assert experiment.artifact_location == artifacts.as_uri()
    run = client.get_run(store.run_id)
    assert run.info.run_name == "first"

    monkeypatch.chdir(store.cwd)
    (tmp_path / "note.txt").write_text("hello")
    client.log_artifact(store.run_id, str(tmp_path / "note.txt"))
    logged = [p for p in artifacts.rglob("note.txt")]
    assert len(logged) == 1 and logged[0].read_text() == "hello" and store.run_id in logged[0].parts
    assert list(store.cwd.iterdir()) == []  # nothing in the working folder


def test_mlflow_logger_keeps_an_explicit_artifact_location(store, tmp_path):
    location = (tmp_path / "elsewhere").as_uri()
    logger = mlflow_logger(store.uri, experiment_name="explicit", artifact_location=location, tags={"k": "v"})
    run = MlflowClient(store.uri).get_run(logger.run_id)
    assert MlflowClient(store.uri).get_experiment_by_name("explicit").artifact_location == location
    assert run.data.tags["k"] == "v"


class LateLookup(MlflowClient):
    """A client whose first lookup of an experiment misses it, while another job creates it just after: what two
    jobs of a sweep starting at once see."""

    def __init__(self, uri: str) -> None:
        super().__init__(uri)
        self.rival_created: str | None = None

    def get_experiment_by_name(self, name):
        if self.rival_created is None:
            self.rival_created = MlflowClient(self._tracking_client.tracking_uri).create_experiment(name)
            return None
        return super().get_experiment_by_name(name)


def test_an_experiment_that_another_job_creates_meanwhile_is_joined(store):
    late = LateLookup(store.uri)  # a sweep's second job, looking just before the first one creates the experiment
    assert ensure_experiment(late, "raced", None) == late.rival_created


CONFIG = {
    "model": {"net": {"_target_": "cifarlab.models.airbench.AirbenchNet", "widths": [8, 16, 16]}},
    "optimizer": {"lr": 0.05},
    "ckpt_path": None,
    "callbacks": {},
}
TAGS = {"git.commit": "a" * 40, "data.manifest_sha256": "b" * 64}


def new_run(store, name: str):
    return mlflow_logger(store.uri, experiment_name="cifar10", run_name=name)


def test_log_run_start_logs_params_and_tags(store):
    logger = new_run(store, "start")
    log_run_start(logger, CONFIG, TAGS)
    run = MlflowClient(store.uri).get_run(logger.run_id)
    assert run.data.params == {
        "model.net._target_": "cifarlab.models.airbench.AirbenchNet",
        "model.net.widths": "[8, 16, 16]",
        "optimizer.lr": "0.05",
        "ckpt_path": "None",
        "callbacks": "{}",
    }
    assert TAGS.items() <= run.data.tags.items()
    assert "resume.changed_params" not in run.data.tags


def test_log_run_start_again_keeps_params_and_records_changes(store):
    first = new_run(store, "resumed")
    log_run_start(first, CONFIG, TAGS)

    changed = {
        **CONFIG,
        "optimizer": {"lr": 0.1},
        "ckpt_path": "runs/x/checkpoints/last.ckpt",
        "trainer": {"epochs": 3},
    }
    resumed = mlflow_logger(store.uri, experiment_name="cifar10", run_id=first.run_id)
    log_run_start(resumed, changed, {**TAGS, "git.commit": "c" * 40})

    run = MlflowClient(store.uri).get_run(first.run_id)
    params = run.data.params
    assert params["optimizer.lr"] == "0.05" and params["ckpt_path"] == "None"  # MLflow params never change
    assert params["trainer.epochs"] == "3"  # new keys are added
    assert params["model.net.widths"] == "[8, 16, 16]"
    assert json.loads(run.data.tags["resume.changed_params"]) == {
        "optimizer.lr": "0.1",
        "ckpt_path": "runs/x/checkpoints/last.ckpt",
    }
    assert run.data.tags["git.commit"] == "c" * 40  # tags describe the latest start


def test_long_param_values_are_logged_up_to_the_mlflow_limit(store):
    logger = new_run(store, "long")
    log_run_start(logger, {"note": "n" * 7000}, {})
    logged = MlflowClient(store.uri).get_run(logger.run_id).data.params["note"]
    assert set(logged) == {"n"}
    assert len(logged) == MAX_PARAM_LENGTH  # as_params' cut, not a shorter one


def test_resuming_with_an_unchanged_long_value_records_no_change(store):
    first = new_run(store, "long-resume")
    config = {"note": "n" * 300, "optimizer": {"lr": 0.05}}
    log_run_start(first, config, {})
    log_run_start(mlflow_logger(store.uri, experiment_name="cifar10", run_id=first.run_id), config, {})
    tags = MlflowClient(store.uri).get_run(first.run_id).data.tags
    changed = json.loads(tags.get("resume.changed_params", "{}"))
    assert changed == {}, f"spurious changes recorded for {sorted(changed)}"
