"""The serving image built and run for real on a Docker engine (tests/containers.py): a container serving a real
exported model, its healthcheck, user, dependencies and shutdown; containers that must refuse to start; the make
targets' errors; the compose file."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import onnx
import pytest
import yaml

from tests.conftest import ROOT
from tests.containers import (
    HEALTHY_WITHIN_S,
    docker,
    error_lines,
    free_port,
    make,
    run_container,
    wait_for_exit,
    wait_healthy,
)
from tests.serve.test_serve_api import png
from tests.serve.test_serve_lifecycle import raw_predict_request, read_response

STOP_GRACE_S = 10  # docker stop's default before it sends SIGKILL


@pytest.mark.slow
@pytest.mark.integration
def test_the_image_serves_a_real_model_as_non_root_without_torch_and_drains_on_sigterm(
    serve_image: str, tiny_run: Path, container_name: str, record_property, capsys
) -> None:
    size = int(docker("image", "inspect", "--format", "{{.Size}}", serve_image).stdout)
    record_property("image_size_bytes", size)
    with capsys.disabled():
        print(f"\n{serve_image}: {size / 1e6:.0f} MB")
    port = free_port()
    mount = f"{tiny_run / 'model.onnx'}:/models/model.onnx:ro"
    container = run_container(serve_image, container_name, port, "-v", mount)
    wait_healthy(container, HEALTHY_WITHIN_S)

    smoke = subprocess.run(  # a real client, a real test image of the committed sample
        [sys.executable, str(ROOT / "scripts" / "smoke_serve.py"), "--url", f"http://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert smoke.returncode == 0, smoke.stderr
    assert smoke.stdout.startswith("ok: ") and "->" in smoke.stdout

    assert docker("exec", container, "id", "-u").stdout.strip() == "10001"
    assert docker("inspect", "--format", "{{.Config.User}}", container).stdout.strip() == "10001"
    no_torch = docker("exec", container, "python", "-c", "import torch", check=False)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    # the shared prediction log's backends: a gs:// PREDICTION_LOG_URL needs gcsfs in the image
    backends = docker(
        "exec", container, "python", "-c", "import fsspec, gcsfs; print(fsspec.get_filesystem_class('gs'))"
    )
    assert backends.stdout.startswith("<class 'gcsfs."), backends.stdout + backends.stderr

    head, body = raw_predict_request(png())
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        connection.sendall(head + body[:100])  # a request in flight when SIGTERM arrives
        time.sleep(0.3)
        stopping = time.monotonic()
        docker("kill", "--signal", "TERM", container)
        time.sleep(0.5)
        connection.sendall(body[100:])
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert wait_for_exit(container, STOP_GRACE_S) == 0
    assert time.monotonic() - stopping < STOP_GRACE_S
    assert '"event": "shutdown"' in docker("logs", container).stderr


def _without_classes(source: Path, target: Path) -> Path:
    """The same network without its 'classes' metadata: a model that breaks the contract."""
    model = onnx.load(str(source))
    kept = [prop for prop in model.metadata_props if prop.key != "classes"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(target))
    return target


def _unreadable(source: Path, target: Path) -> Path:
    shutil.copy(source, target)
    target.chmod(0o600)  # the owner's alone; the container's user 10001 is not its owner
    return target


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no model", "model file not found: /models/model.onnx"),
        ("unreadable model", "Permission denied"),
        ("model breaking the contract", "has no valid 'classes' metadata"),
    ],
)
def test_a_container_without_a_usable_model_exits_non_zero_with_one_line_and_is_never_ready(
    serve_image: str, tiny_run: Path, tmp_path: Path, container_name: str, case: str, reason: str
) -> None:
    make_model = {"unreadable model": _unreadable, "model breaking the contract": _without_classes}.get(case)
    mounts = []
    if make_model is not None:
        mounts = ["-v", f"{make_model(tiny_run / 'model.onnx', tmp_path / 'model.onnx')}:/models/model.onnx:ro"]
    port = free_port()
    container = run_container(serve_image, container_name, port, *mounts)
    deadline = time.monotonic() + 60
    while docker("inspect", "--format", "{{.State.Status}}", container).stdout.strip() != "exited":
        assert time.monotonic() < deadline, "the container kept running"
        assert not ready(port), "/readyz answered 200"
        time.sleep(0.1)
    assert wait_for_exit(container, 5) != 0
    assert docker("inspect", "--format", "{{.State.Health.Status}}", container).stdout.strip() != "healthy"
    log = docker("logs", container)
    saying_why = [line for line in (log.stdout + log.stderr).splitlines() if reason in line]
    assert len(saying_why) == 1 and "Traceback" not in log.stderr, log.stderr


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return response.status == 200
    except OSError:  # refused, or an HTTP error status
        return False


def test_no_engine_is_one_line(tmp_path: Path) -> None:
    result = make(
        "docker-engine",
        env={"DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock", "DOCKERD": str(tmp_path / "dockerd")},
        timeout=60,
    )
    assert result.returncode != 0
    assert error_lines(result) == [
        "error: no Docker engine answers and dockerd is not installed (Debian: apt-get install docker.io)"
    ]


def test_an_engine_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    # a real dockerd, refused by its own argument parser
    env = {
        "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
        "DOCKERD": f"{shutil.which('dockerd') or 'dockerd'} --no-such-flag",
        "DOCKER_STATE": str(tmp_path / "state"),
    }
    result = make("docker-engine", env=env, timeout=120)
    assert result.returncode != 0
    (line,) = error_lines(result)
    if os.geteuid() == 0:
        assert line.startswith("error: dockerd did not start: ") and "no-such-flag" in line, line
    else:  # only root may start dockerd: the line says how to get an engine
        assert line == "error: no Docker engine answers; start one (sudo dockerd, or Docker Desktop) and retry"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("base", "says"),
    [
        ("debian:no-such-suite-slim", "no apt source of this machine serves no-such-suite"),
        ("registry.invalid/python:3.11-slim", "cannot be pulled"),
    ],
)
def test_a_base_image_that_cannot_be_made_is_one_line_and_nothing_is_tagged(
    docker_engine: dict[str, str], base: str, says: str
) -> None:
    result = make("docker-base", f"BASE_IMAGE={base}", env=docker_engine, timeout=120)
    assert result.returncode != 0
    (line,) = error_lines(result)
    assert line.startswith("error: ") and says in line, line
    assert docker("image", "inspect", base, check=False).returncode != 0


COMPOSE_FILE = ROOT / "monitoring" / "docker-compose.yml"


def compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker compose config` (Compose v2) where installed, else Debian's docker-compose (v1), which predates the
    top-level `name:`: it reads a copy without it, given as COMPOSE_PROJECT_NAME, from the file's own folder."""
    env = {**os.environ, **env}
    if docker("compose", "version", check=False).returncode == 0:
        command = ["docker", "compose", "--file", str(COMPOSE_FILE), "config"]
    else:
        v1 = shutil.which("docker-compose")
        assert v1, "no Docker Compose: make system-deps installs Debian's docker-compose"
        spec = yaml.safe_load(COMPOSE_FILE.read_text())
        env["COMPOSE_PROJECT_NAME"] = spec.pop("name")
        copy = tmp_path / "docker-compose.yml"
        copy.write_text(yaml.safe_dump(spec))
        command = [v1, "--project-directory", str(COMPOSE_FILE.parent), "--file", str(copy), "config"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_the_compose_file_matches_the_compose_spec_and_builds_the_serving_image(tmp_path: Path) -> None:
    schema = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            COMPOSE_FILE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    config = compose_config(tmp_path, {"MODEL_DIR": str(tmp_path)})
    assert config.returncode == 0, config.stderr
    serve = yaml.safe_load(config.stdout)["services"]["serve"]
    assert serve["image"] == "cifarlab-serve" and serve["build"]["dockerfile"] == "Dockerfile"
    assert Path(serve["build"]["context"]) == ROOT
    unset = compose_config(tmp_path, {"MODEL_DIR": ""})
    assert unset.returncode != 0 and "set MODEL_DIR to a run folder" in unset.stderr
