"""`make retrain` end to end on the session's pipeline copy and MLflow server: feedback written by the service's
real FeedbackStore is merged into data/feedback (DVC-tracked), the pipeline reruns on it, and the new model is
registered as `challenger` only if it scores no worse than the champion."""

import contextlib
import json
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from omegaconf import DictConfig
from PIL import Image

from cifarlab.export.onnx import export_onnx, read_metadata
from cifarlab_contract.errors import UserError
from cifarlab_contract.feedback import FeedbackRecord, open_feedback_store
from cifarlab_contract.files import file_sha256
from cifarlab_lifecycle.registry import ONNX_SHA256_TAG, RegistryError
from cifarlab_lifecycle.retrain import merge_feedback, register_if_not_worse, retrain, run_dvc
from serve.feedback import FeedbackStore, Prediction, RecentPredictions
from tests.conftest import CONFIGS, ROOT
from tests.lifecycle.test_promotion import CIFAR10, ConstantNet, contract, register
from tests.servers import BUCKET, GCS_ENV, dvc, dvc_env, free_port

LABELS = ("cat", "cat", "dog", "airplane")
FIRST = "retrain-first"  # the registered model of the first retraining, which finds no champion


@pytest.fixture(scope="module")
def feedback(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feedback store as the service leaves it: four labelled images with their records, and a half-written
    temp file."""
    root = tmp_path_factory.mktemp("feedback")
    store, recent = FeedbackStore(root, CIFAR10), RecentPredictions()
    images = np.random.default_rng(0).integers(0, 256, size=(len(LABELS), 32, 32, 3), dtype=np.uint8)
    for index, (label, image) in enumerate(zip(LABELS, images, strict=True)):
        recent.add(Prediction(f"p{index}", image, "truck", 0.5, "primary", "1", request_id=f"req-{index}"))
        store.submit(f"p{index}", label, recent.get)
    (root / "cat" / ".req-9.png.tmp").write_bytes(b"partial")
    return root


def stored_images(store: Path) -> list[str]:
    """The `<class>/<name>.png` paths the store's records name, in the order they were received."""
    return [record.path for record in open_feedback_store(store).contents().records]


@contextlib.contextmanager
def retrain_config(repo: Path, server: str, store: str | Path | None, *overrides: str) -> Iterator[DictConfig]:
    """configs/retrain.yaml as `make retrain` composes it in `repo`, with the environment a DVC command in `repo`
    gets (so the pipeline's stages run on the copy) while the block runs."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**dvc_env(repo), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}.items():
            patch.setenv(key, value)
        for key in ("CIFAR10_SOURCE", "MLFLOW_TRACKING_URI", "FEEDBACK_DIR"):
            patch.delenv(key, raising=False)
        if store is not None:
            patch.setenv("FEEDBACK_DIR", str(store))
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("retrain", overrides=[f"tracking_uri={server}", *overrides])
        GlobalHydra.instance().clear()
        yield cfg


def run_retrain(repo: Path, server: str, store: str | Path | None, *overrides: str) -> str:
    """`make retrain` in this process (the CLI's start-up alone costs ~10 s here): its one-line outcome."""
    with retrain_config(repo, server, store, *overrides) as cfg:
        return retrain(cfg)


def upload(store: Path, gcs, name: str) -> tuple[str, dict[str, str]]:
    """A copy of `store` on the GCS emulator, as a deployment keeps it: its gs:// URL and fsspec options."""
    options = {"endpoint_url": gcs.url, "token": "anon"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in GCS_ENV.items():
            patch.setenv(key, value)
        fs = fsspec.filesystem("gs", **options)
        fs.put(f"{store}/", f"{BUCKET}/{name}/", recursive=True)
    return f"gs://{BUCKET}/{name}", options


def prepared_manifest(repo: Path) -> dict:
    return json.loads((repo / "data" / "prepared" / "cifar10" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def first(pipeline_repo: Path, mlflow_server: str, feedback: Path) -> tuple[str, dict, dict]:
    """The first retraining of the session's pipeline copy: its printed line, the prepared manifest before, and the
    summary it wrote (read at once: a later test's retraining rewrites reports/retrain.json)."""
    before = prepared_manifest(pipeline_repo)
    line = run_retrain(pipeline_repo, mlflow_server, feedback, f"model_name={FIRST}")
    return line, before, summary(pipeline_repo)


def summary(repo: Path) -> dict:
    return json.loads((repo / "reports" / "retrain.json").read_text())


def aliases(server: str, name: str) -> dict[str, str]:
    return dict(MlflowClient(server).get_registered_model(name).aliases)


@pytest.mark.integration
def test_retrain_merges_feedback_reruns_the_pipeline_and_registers_a_challenger(
    pipeline_repo, mlflow_server, feedback, first
):
    repo, name = pipeline_repo, FIRST
    line, before, recorded = first
    assert line.startswith("4 new feedback image(s), 4 in training; registered the candidate")
    assert "there is no champion" in line

    merged = sorted(
        path.relative_to(repo / "data" / "feedback").as_posix() for path in (repo / "data/feedback").rglob("*")
    )
    assert merged == sorted(["airplane", "cat", "dog", "manifest.jsonl", *stored_images(feedback)])
    assert [name.split("/")[0] for name in stored_images(feedback)] == list(LABELS)
    lines = (repo / "data" / "feedback" / "manifest.jsonl").read_text().splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["req-0", "req-1", "req-2", "req-3"]
    assert yaml.safe_load((repo / "data" / "feedback.dvc").read_text())["outs"][0]["nfiles"] == 5
    assert json.loads(dvc(repo, "status", "--json").stdout or "{}") == {}  # versioned, and the pipeline is current

    manifest = prepared_manifest(repo)
    assert manifest["extra_train"]["count"] == 4 and manifest["extra_train"]["per_class"]["cat"] == 2
    assert manifest["splits"]["train"]["count"] == before["splits"]["train"]["count"] + 4
    assert manifest["splits"]["test"] == before["splits"]["test"]  # the held-out set is untouched

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(name, "challenger")
    assert aliases(mlflow_server, name) == {"challenger": version.version}  # champion is never set by retraining
    assert version.tags["retrain.decision"] == "registered" and version.tags["retrain.champion_version"] == "none"
    assert (
        version.tags["retrain.feedback_new"] == "4" and version.tags["retrain.data"] == recorded["data_manifest_sha256"]
    )
    location = client.get_model_version_download_uri(name, version.version)
    model = Path(download_artifacts(location, tracking_uri=mlflow_server)) / "model.onnx"
    assert read_metadata(model)["run_id"] == read_metadata(repo / "models" / "model.onnx")["run_id"]
    assert recorded["registered"] and recorded["version"] == version.version
    assert recorded["feedback"]["new"] == 4 and recorded["test_images"] == 1000
    test_metrics = json.loads((repo / "reports" / "test_metrics.json").read_text())
    assert recorded["candidate_score"] == pytest.approx(test_metrics["acc"])  # the evaluate stage's score


@pytest.mark.integration
def test_retraining_with_nothing_new_registers_nothing_again(pipeline_repo, mlflow_server, feedback, first, gcs):
    """The second retraining reads the same store from object storage (FEEDBACK_DIR=gs://...)."""
    repo, name = pipeline_repo, FIRST
    client = MlflowClient(mlflow_server)
    (version,) = client.search_model_versions(f"name='{name}'")
    assert version.tags[ONNX_SHA256_TAG] == file_sha256(repo / "models" / "model.onnx")

    url, options = upload(feedback, gcs, "feedback-nothing-new")
    storage = f"feedback_storage_options={{endpoint_url:'{options['endpoint_url']}',token:anon}}"
    with retrain_config(repo, mlflow_server, url, f"model_name={name}", storage) as cfg:
        line, experiment = retrain(cfg), client.get_experiment_by_name(cfg.experiment_name)
    assert line == (
        "0 new feedback image(s), 4 in training; did not register the candidate: "
        f"{name} version {version.version} is the same ONNX file"
    )
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert aliases(mlflow_server, name) == {"challenger": version.version}
    recorded = summary(repo)
    assert not recorded["registered"] and recorded["version"] is None
    assert recorded["existing_version"] == version.version and recorded["candidate_score"] is None
    (run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`retrain.decision` = 'unchanged'")
    assert run.data.tags["retrain.existing_version"] == version.version


@pytest.mark.integration
def test_a_worse_candidate_is_not_registered_unless_within_tolerance(
    pipeline_repo, mlflow_server, feedback, first, tmp_path
):
    repo, name = pipeline_repo, "retrain-rejected"
    recalls = json.loads((repo / "reports" / "test_metrics.json").read_text())
    weakest = min(CIFAR10, key=lambda label: recalls[f"recall/{label}"])
    assert recalls[f"recall/{weakest}"] < 1.0
    # A champion that answers `weakest` for every image: its recall of that class is 1, better than the candidate's.
    onnx = export_onnx(ConstantNet(CIFAR10.index(weakest)), tmp_path / "model.onnx", contract(CIFAR10))
    champion = register(mlflow_server, name, onnx)
    MlflowClient(mlflow_server).set_registered_model_alias(name, "champion", champion)

    line = run_retrain(repo, mlflow_server, feedback, f"model_name={name}", f"metric=recall/{weakest}")
    assert line.startswith("0 new feedback image(s), 4 in training; did not register the candidate")
    assert f"worse than the champion version {champion} (recall/{weakest} 1.0000)" in line
    assert aliases(mlflow_server, name) == {"champion": champion, "challenger": champion}
    assert len(MlflowClient(mlflow_server).search_model_versions(f"name='{name}'")) == 1
    assert not summary(repo)["registered"] and summary(repo)["champion_score"] == 1.0

    # The same comparison with a tolerance of 1: not worse by more than that, so registered (champion untouched).
    with retrain_config(
        repo, mlflow_server, feedback, f"model_name={name}", f"metric=recall/{weakest}", "tolerance=1"
    ) as cfg:
        decision = register_if_not_worse(cfg, repo / "models" / "model.onnx")
    assert decision.registered and decision.version != champion
    assert aliases(mlflow_server, name) == {"champion": champion, "challenger": decision.version}


@pytest.mark.integration
def test_a_missing_feedback_store_or_registry_stops_retraining_before_it_starts(pipeline_repo, mlflow_server, feedback):
    feedback_dvc = (pipeline_repo / "data" / "feedback.dvc").read_text()
    with pytest.raises(UserError, match="no feedback store given: set FEEDBACK_DIR"):
        run_retrain(pipeline_repo, mlflow_server, None)
    with pytest.raises(UserError, match="no such feedback folder"):
        run_retrain(pipeline_repo, mlflow_server, pipeline_repo / "absent")
    unreachable = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RegistryError, match=f"cannot read the registry at {unreachable}"):
        run_retrain(pipeline_repo, unreachable, feedback)
    data = pipeline_repo / "data" / "feedback"
    data.rename(data.with_name("pulled"))  # a clone that has not run `dvc pull`: merging would drop what DVC holds
    try:
        with pytest.raises(UserError, match="tracked by DVC but not in the workspace: fetch it first"):
            run_retrain(pipeline_repo, mlflow_server, feedback)
    finally:
        data.with_name("pulled").rename(data)
    assert (pipeline_repo / "data" / "feedback.dvc").read_text() == feedback_dvc


def test_retrain_cli_reports_an_error_in_one_line(tmp_path, monkeypatch, capsys):
    """scripts/retrain.py's own main, as `make retrain` runs it, in this process (a fresh one costs ~10 s)."""
    script = str(ROOT / "scripts" / "retrain.py")
    monkeypatch.setattr(sys, "argv", [script, f"feedback_dir={tmp_path / 'absent'}", f"hydra.run.dir={tmp_path}"])
    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(script, run_name="__main__")
    GlobalHydra.instance().clear()
    assert exited.value.code == 1
    error = capsys.readouterr().err
    assert error.strip().count("\n") == 0 and error.startswith(f"error: {tmp_path / 'absent'}: no such feedback folder")


def test_a_failing_dvc_command_is_one_error_line(tmp_path, capfd):
    with pytest.raises(UserError) as caught:
        run_dvc(tmp_path, "status")  # not a DVC project
    assert str(caught.value) == "dvc status failed with exit status 253 (its output above says why)"
    assert "not inside of a DVC repository" in capfd.readouterr().err  # DVC's own reason, shown as it came


@pytest.mark.integration
def test_a_store_on_object_storage_merges_as_the_same_folder_does(feedback, gcs, tmp_path):
    url, options = upload(feedback, gcs, "feedback-merge")
    local, remote = tmp_path / "from-folder", tmp_path / "from-gcs"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in GCS_ENV.items():
            patch.setenv(key, value)
        assert merge_feedback(open_feedback_store(url, options), remote, CIFAR10) == len(LABELS)
        assert merge_feedback(open_feedback_store(url, options), remote, CIFAR10) == 0  # nothing new the second time
        with pytest.raises(UserError, match=f"gs://{BUCKET}/absent: no such feedback folder"):
            open_feedback_store(f"gs://{BUCKET}/absent", options)
        with pytest.raises(UserError, match=r"nosuch://feedback: cannot read the feedback store: .*nosuch"):
            open_feedback_store("nosuch://feedback")
    assert merge_feedback(open_feedback_store(feedback), local, CIFAR10) == len(LABELS)
    files = sorted(path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file())
    assert files == sorted(["manifest.jsonl", *stored_images(feedback)])  # no temp file, records as manifest lines
    assert files == sorted(path.relative_to(remote).as_posix() for path in remote.rglob("*") if path.is_file())
    for member in stored_images(feedback):
        assert (remote / member).read_bytes() == (local / member).read_bytes() == (feedback / member).read_bytes()
    assert (remote / "manifest.jsonl").read_bytes() == (local / "manifest.jsonl").read_bytes()


def test_unknown_feedback_class_is_refused_before_any_copy(feedback, tmp_path):
    store = tmp_path / "store"
    (store / "cat").mkdir(parents=True)
    image = (feedback / stored_images(feedback)[0]).read_bytes()
    (store / "cat" / "a.png").write_bytes(image)
    (store / "unicorn").mkdir()
    (store / "unicorn" / "b.png").write_bytes(image)
    (store / "manifest.jsonl").write_text(record_line("cat/a.png", "cat") + record_line("unicorn/b.png", "unicorn"))
    with pytest.raises(UserError, match="unknown class"):
        merge_feedback(open_feedback_store(store), tmp_path / "data", CIFAR10)
    assert not (tmp_path / "data").exists()


def test_only_acknowledged_feedback_is_merged(feedback, tmp_path, caplog):
    """An image whose record was never written (the server was killed between the two writes) was never
    acknowledged: the client was told nothing, and may send another label. It stays out of the training data."""
    root = tmp_path / "store"
    image = np.asarray(Image.open(feedback / stored_images(feedback)[0]))
    FeedbackStore(root, CIFAR10).submit("acked", "cat", lambda _: Prediction("acked", image, "dog", 0.5, "a", "1"))
    (root / "dog").mkdir()
    (root / "dog" / "orphan.png").write_bytes((feedback / stored_images(feedback)[0]).read_bytes())
    with caplog.at_level("WARNING"):
        assert merge_feedback(open_feedback_store(root), tmp_path / "data", CIFAR10) == 1
    assert sorted(p.relative_to(tmp_path / "data").as_posix() for p in (tmp_path / "data").rglob("*.png")) == [
        "cat/acked.png"
    ]
    assert "1 image(s) in" in caplog.text and "have no record (never acknowledged)" in caplog.text


def record_line(path: str, label: str) -> str:
    name = Path(path).stem
    return FeedbackRecord(name, label, "truck", False, 0.5, "primary", "1", path, "t", prediction_id=name).to_line()
