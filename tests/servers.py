"""Real services on loopback for the integration tier (a pytest plugin: tests/conftest.py loads it): a GCS API
(gcp-storage-emulator) and an MLflow tracking server, each started once per session, and a throwaway copy of the
repository for DVC to work in."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONFIGS, ROOT, SAMPLE, TINY, isolated, run_cli

BUCKET = "cifarlab-artifacts"  # the bucket .dvc/config names: the tests push to the configured remote, emulated
REMOTE = "gcs"
TRAINED_MODEL = "test-trained"  # registered name of the session's tiny model trained against the server
# gcsfs would otherwise probe bucket types over gRPC (~60 s per filesystem) and the GCE metadata server.
GCS_ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true", "DVC_NO_ANALYTICS": "1"}
SERVER_START_S = 300  # ~20 s on an idle machine (the first start migrates the database)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _missing(tool: str, extra: str = "pipeline") -> str:
    return f"{tool} is not installed: run `make venv` (it installs the {extra!r} extra of pyproject.toml)"


class Emulator:
    """gcp-storage-emulator in this process, with a gate a test can close to hold one request mid-transfer."""

    def __init__(self) -> None:
        try:
            from gcp_storage_emulator.server import create_server
        except ImportError as error:
            raise RuntimeError(_missing("gcp-storage-emulator")) from error
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=BUCKET)
        self.hold: Callable[[str, str], bool] | None = None  # (HTTP method, path) -> hold this request?
        self.held = threading.Event()  # set when a request is being held
        self.release = threading.Event()
        self._install_gate()

    def _install_gate(self) -> None:
        from gcp_storage_emulator import server

        emulator = self

        def gated(original: Callable) -> Callable:
            def handle(handler: server.RequestHandler) -> None:
                hold = emulator.hold
                if hold is not None and hold(handler.command, handler.path):
                    emulator.hold = None
                    emulator.held.set()
                    emulator.release.wait(60)
                original(handler)

            return handle

        # The emulator serves one request at a time, so a held request stalls the client until it is released.
        for name in ("do_GET", "do_POST", "do_PUT"):
            setattr(server.RequestHandler, name, gated(getattr(server.RequestHandler, name)))

    def objects(self) -> list[str]:
        listing = f"{self.url}/storage/v1/b/{BUCKET}/o"
        with urllib.request.urlopen(listing, timeout=10) as response:
            return [item["name"] for item in json.load(response).get("items", [])]

    def read(self, name: str) -> bytes:
        """One object's bytes, read over plain HTTP (no gcsfs in the test's own process)."""
        url = f"{self.url}/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read()

    def stored(self) -> int:
        """How many objects the bucket holds, read in this process: a gate may ask while it decides on a request,
        when a request to the emulator would wait behind the one being decided on."""
        return len(self.server._storage.objects.get(BUCKET, {}))

    def wipe(self) -> None:
        self.server.wipe(keep_buckets=True)


@pytest.fixture(scope="session")
def gcs() -> Iterator[Emulator]:
    emulator = Emulator()
    emulator.server.start()
    yield emulator
    emulator.release.set()
    emulator.server.stop()


def dvc_env(repo: Path) -> dict[str, str]:
    """What a DVC command in `repo` runs with: the venv's python first on PATH (stages call `python`), the copy's
    own sources and root, and no tracking server or data source inherited from the developer's shell."""
    inherited = {
        k: v for k, v in os.environ.items() if k not in ("CIFAR10_SOURCE", "MLFLOW_TRACKING_URI", "PROJECT_ROOT")
    }
    return {
        **inherited,
        **GCS_ENV,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{repo / 'src'}{os.pathsep}{repo}",
        "PROJECT_ROOT": str(repo),
        "DVC_SITE_CACHE_DIR": str(repo.parent / "dvc-site-cache"),
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def dvc(repo: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run DVC in `repo`; on a timeout its whole process group goes (a stage's training included)."""
    dvc_bin = Path(sys.executable).parent / "dvc"
    if not dvc_bin.exists():
        raise RuntimeError(_missing("dvc"))
    process = subprocess.Popen(
        [str(dvc_bin), *args],
        cwd=repo,
        env=dvc_env(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({result.returncode}):\n{stdout}\n{stderr}")
    return result


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, env=dvc_env(repo), capture_output=True, text=True, check=True
    ).stdout


def tiny_recipe() -> str:
    """The recipe the tests' pipeline trains: debug=limit's miniature and TINY's widths on the CPU, untracked."""
    limit = OmegaConf.load(CONFIGS / "debug" / "limit.yaml")
    recipe = OmegaConf.merge(
        {"defaults": [{"override /logger": "none"}], "run_name": "pipeline"},
        limit,
        {
            "trainer": {"accelerator": "cpu"},
            "model": {"net": {"widths": [16, 32, 32]}},
            "callbacks": {"onnx_export": {"every_best": False}},
        },
    )
    return "# @package _global_\n" + OmegaConf.to_yaml(recipe)


assert "model.net.widths=[16,32,32]" in TINY and "debug=limit" in TINY  # keep in step with the suite's TINY


def copy_repository(dest: Path) -> Path:
    """The repository's files (committed and new, not ignored) in a fresh git repository at `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q", "-b", "main")
    return dest


@pytest.fixture(scope="session")
def pipeline_repo(tmp_path_factory: pytest.TempPathFactory, gcs: Emulator) -> Path:
    """A copy of the repository whose pipeline ran once on the committed sample with the tiny recipe, its remote
    pointed at the emulator through .dvc/config.local (as a user would, never the committed config)."""
    repo = copy_repository(tmp_path_factory.mktemp("pipeline") / "repo")
    (repo / "configs" / "experiment" / "pipeline.yaml").write_text(tiny_recipe())
    shutil.copy2(SAMPLE, repo / "data" / "raw" / "cifar10.tar.gz")
    (repo / "data" / "feedback").mkdir()  # no feedback yet: what a fresh project's `dvc pull` gives
    dvc(repo, "add", "data/raw/cifar10.tar.gz", "data/feedback")
    dvc(repo, "remote", "modify", "--local", REMOTE, "endpointurl", gcs.url)
    dvc(repo, "remote", "modify", "--local", REMOTE, "allow_anonymous_login", "true")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny pipeline")
    dvc(repo, "repro", timeout=900)
    return repo


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend, local artifact store) on a free loopback port."""
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    if not mlflow_bin.exists():
        raise RuntimeError(_missing("mlflow", "train"))
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (store / "server.log").open("w")
    process = subprocess.Popen(
        [
            str(mlflow_bin),
            "server",
            "--backend-store-uri",
            f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_healthy(url, process, store / "server.log")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)  # a throwaway store: no need to wait for a graceful stop
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def trained_version(mlflow_server: str, prepared_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One tiny model trained by train.py against the server, registered under TRAINED_MODEL."""
    work = tmp_path_factory.mktemp("trained")
    result = run_cli(
        "train.py",
        *TINY,
        *isolated(work, mlflow_server, prepared_root),
        f"logger.registered_model_name={TRAINED_MODEL}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (work / "runs").iterdir()
    return {"run_id": run_dir.name, "run_dir": run_dir, "name": TRAINED_MODEL}
