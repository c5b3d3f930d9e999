"""The DVC pipeline, run for real on the committed sample and pushed to / pulled from a GCS API on loopback."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifarlab.export.onnx import read_metadata
from tests.conftest import ROOT
from tests.servers import BUCKET, REMOTE, Emulator, dvc, dvc_env, free_port

TRACKED = (
    "data/raw/cifar10.tar.gz",
    "data/prepared/cifar10",
    "models/best.ckpt",
    "models/model.onnx",
    "models/model_card.md",
)


def tracked_files(repo: Path) -> dict[str, str]:
    """sha256 of every file DVC tracks in the workspace (directories expanded)."""
    files = {}
    for name in TRACKED:
        path = repo / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                files[str(file.relative_to(repo))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return files


def remove_outputs_and_cache(repo: Path) -> None:
    for name in TRACKED:
        path = repo / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")


def status(repo: Path, *args: str) -> dict:
    return json.loads(dvc(repo, "status", "--json", *args).stdout or "{}")


def test_committed_config_names_a_gcs_remote_and_no_credentials():
    config = (ROOT / ".dvc" / "config").read_text()
    assert f"remote = {REMOTE}" in config and f"url = gs://{BUCKET}/dvc" in config
    for secret in ("credentialpath", "allow_anonymous_login", "endpointurl", "projectname"):
        assert secret not in config, f"{secret} belongs in .dvc/config.local or the environment"
    assert "/config.local" in (ROOT / ".dvc" / ".gitignore").read_text().split()


def test_stages_take_their_params_from_the_hydra_configs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["prepare", "train", "evaluate"]
    train = stages["train"]
    assert train["cmd"].startswith("python train.py experiment=pipeline ")
    assert train["params"] == [{"configs/experiment/pipeline.yaml": None}]
    assert "configs" in train["deps"] and "data/prepared/cifar10" in train["deps"]
    assert not (ROOT / "params.yaml").exists()  # no second copy of the hyper-parameters


@pytest.mark.integration
def test_pipeline_push_delete_pull_is_byte_identical(pipeline_repo: Path, gcs: Emulator):
    repo = pipeline_repo
    metrics = json.loads((repo / "reports" / "test_metrics.json").read_text())
    assert metrics["images"] == 1000 and 0.0 <= metrics["acc"] <= 1.0
    for name in ("per_class.csv", "predictions.csv", "confusion_matrix.png"):
        assert (repo / "reports" / name).stat().st_size > 0, name
    card = (repo / "models" / "model_card.md").read_text()
    run_id = read_metadata(repo / "models" / "model.onnx")["run_id"]
    assert f"Run: `{run_id}`" in card and "| airplane |" in card
    assert (repo / "runs" / run_id / "checkpoints" / "best.ckpt").read_bytes() == (
        repo / "models" / "best.ckpt"
    ).read_bytes()
    shown = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    assert f'"acc": {metrics["acc"]}' in json.dumps(shown)
    plots = dvc(repo, "plots", "show", "--json").stdout
    assert all(f"reports/{name}" in plots for name in ("per_class.csv", "predictions.csv", "confusion_matrix.png"))
    before = tracked_files(repo)
    assert len(before) == 9  # raw archive, 4 arrays + manifest, checkpoint, ONNX, card

    gcs.wipe()
    pushed = dvc(repo, "push")
    assert "pushed" in pushed.stdout
    assert all(name.startswith("dvc/files/md5/") for name in gcs.objects())
    assert status(repo, "-c") == {}  # cache and remote in sync

    remove_outputs_and_cache(repo)
    dvc(repo, "pull")
    assert tracked_files(repo) == before
    assert status(repo, "-c") == {}
    assert status(repo) == {}  # the pulled workspace matches dvc.lock: nothing to rerun
    assert "up to date" in dvc(repo, "repro").stdout


def changed_by(repo: Path, name: str, addition: str) -> dict:
    """`dvc status` per stage while `addition` is appended to the file `name`; the file comes back after."""
    path = repo / name
    original = path.read_text()
    try:
        path.write_text(original + addition)
        changed = status(repo)
    finally:
        path.write_text(original)
    return {stage.rsplit(":", 1)[-1]: change for stage, change in changed.items()}


@pytest.mark.integration
def test_repro_reruns_only_what_a_change_touches(pipeline_repo: Path):
    repo = pipeline_repo
    changed = changed_by(repo, "configs/experiment/pipeline.yaml", "optimizer:\n  lr: 0.07\n")
    assert set(changed) == {"train", "evaluate"}  # both compose configs/; prepare reads none of it
    assert "configs/experiment/pipeline.yaml" in json.dumps(changed["train"])
    # the export embeds the drift reference the contract computes: a change there retrains; the service feeds nothing
    assert set(changed_by(repo, "src/cifarlab_contract/drift.py", "# changed\n")) == {"train", "evaluate"}
    assert changed_by(repo, "serve/drift.py", "# changed\n") == {}
    assert set(changed_by(repo, "scripts/prepare_data.py", "# changed\n")) == {"prepare"}
    assert status(repo) == {}


def _bad_remote(repo: Path, **options: str) -> subprocess.CompletedProcess:
    """`dvc push` with the local remote options replaced by `options`; the old config.local comes back after."""
    local = repo / ".dvc" / "config.local"
    saved = local.read_text()
    try:
        local.write_text(f"['remote \"{REMOTE}\"']\n" + "".join(f"    {k} = {v}\n" for k, v in options.items()))
        return dvc(repo, "push", check=False, timeout=180)
    finally:
        local.write_text(saved)


@pytest.mark.integration
def test_unreachable_remote_is_a_clear_error_and_loses_nothing(pipeline_repo: Path, gcs: Emulator):
    before = tracked_files(pipeline_repo)
    gcs.wipe()
    port = free_port()
    result = _bad_remote(pipeline_repo, endpointurl=f"http://127.0.0.1:{port}", allow_anonymous_login="true")
    assert result.returncode != 0
    # gcsfs logs the traceback of its last retry (about 30 s of backoff) before DVC's own error line, which names
    # the cause
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR:")]
    assert errors and f"127.0.0.1:{port}" in errors[-1], result.stderr
    assert tracked_files(pipeline_repo) == before


@pytest.mark.integration
def test_bad_credentials_are_a_clear_error_and_lose_nothing(pipeline_repo: Path, gcs: Emulator, tmp_path: Path):
    key = tmp_path / "key.json"
    key.write_text('{"type": "service_account", "client_email": "nobody@example.com"}')
    before = tracked_files(pipeline_repo)
    result = _bad_remote(pipeline_repo, endpointurl=gcs.url, credentialpath=str(key))
    assert result.returncode != 0
    assert "ERROR" in result.stderr and "Traceback" not in result.stderr
    assert tracked_files(pipeline_repo) == before


def _dvc_process(repo: Path, *args: str) -> subprocess.Popen:
    dvc_bin = Path(sys.executable).parent / "dvc"
    return subprocess.Popen(
        [str(dvc_bin), *args, "--jobs", "1"],
        cwd=repo,
        env=dvc_env(repo),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _kill_while_held(process: subprocess.Popen, gcs: Emulator) -> None:
    """Kill `process` (as a user's Ctrl-C cannot be relied on: SIGKILL) while the emulator holds its request."""
    try:
        assert gcs.held.wait(120), "the transfer never reached the held request"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        gcs.hold = None
        gcs.release.set()
    gcs.held.clear()
    gcs.release.clear()


@pytest.mark.integration
def test_interrupted_push_is_retried_to_completion(pipeline_repo: Path, gcs: Emulator):
    repo = pipeline_repo
    gcs.wipe()

    def hold_an_upload_once_an_object_is_stored(method: str, path: str) -> bool:
        # decided on what the bucket holds, not on the upload requests answered so far: an answered upload request
        # need not have stored anything (a resumable upload's first request, one a retry replaced)
        return method in ("POST", "PUT") and "/upload/" in path and gcs.stored() >= 1

    gcs.hold = hold_an_upload_once_an_object_is_stored
    _kill_while_held(_dvc_process(repo, "push"), gcs)
    partial = gcs.objects()
    assert 1 <= len(partial) < 9 and status(repo, "-c") != {}

    dvc(repo, "push")
    assert status(repo, "-c") == {}
    before = tracked_files(repo)
    remove_outputs_and_cache(repo)
    dvc(repo, "pull")
    assert tracked_files(repo) == before


@pytest.mark.integration
def test_interrupted_pull_never_leaves_a_partial_file(pipeline_repo: Path, gcs: Emulator):
    repo = pipeline_repo
    gcs.wipe()
    dvc(repo, "push")
    before = tracked_files(repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "data" / "raw" / "cifar10.tar.gz").unlink()  # one file to fetch; the others are good local copies

    gcs.hold = lambda method, path: method == "GET" and "alt=media" in path
    _kill_while_held(_dvc_process(repo, "pull"), gcs)
    after = tracked_files(repo)
    assert all(after[name] == before[name] for name in after)  # good files untouched, no partial one
    assert "data/raw/cifar10.tar.gz" not in after

    dvc(repo, "pull")
    assert tracked_files(repo) == before
    assert status(repo) == {}
