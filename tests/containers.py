"""A real Docker engine and the serving image, for the tests that run containers (a pytest plugin: tests/conftest.py
loads it). The engine comes from `make docker-engine`, which starts dockerd only when no engine answers; what it
started is stopped when the last xdist worker using it finishes: the workers count themselves in and out under a
file lock in the directory they share. The image is built once per test session by `make docker-build`, by the first
worker that needs it."""

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # tests.conftest's ROOT: that module imports this one
TEST_IMAGE = "cifarlab-serve:test"
BUILD_TIMEOUT_S = 1800  # a cold build here: the base made with debootstrap (~80 s) and the image (~80 s)
HEALTHY_WITHIN_S = 60


def make(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """A Makefile target, run as a user runs it: not as a sub-make of a `make pytest` that runs the tests, whose
    command-line variables (ARGS) would reach it through MAKEFLAGS."""
    merged = {**os.environ, **(env or {})}  # env may itself be a copy of os.environ (dvc_env)
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=cwd,
        env={k: v for k, v in merged.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def docker(*args: str, check: bool = True, timeout: int = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """What a make target said on stderr, make's own `make: *** ... Error 1` line aside."""
    return [line for line in result.stderr.splitlines() if line and not line.startswith("make: ***")]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def publish_flags(port: int) -> list[str]:
    """The container listening on 127.0.0.1:`port` of this machine: through a published port where the engine has a
    bridge network, else on the host's network (an engine started by make docker-engine has none)."""
    if docker("network", "inspect", "bridge", check=False).returncode == 0:
        return ["-p", f"127.0.0.1:{port}:{port}", "-e", f"UVICORN_PORT={port}"]
    return ["--network", "host", "-e", "UVICORN_HOST=127.0.0.1", "-e", f"UVICORN_PORT={port}"]


def wait_for_exit(container: str, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", container).stdout.split()
        if state[0] == "exited":
            return int(state[1])
        time.sleep(0.2)
    raise AssertionError(f"{container} still running after {timeout} s")


@contextmanager
def locked(directory: Path) -> Iterator[Path]:
    """`directory`, held under an exclusive lock that every xdist worker of this test session takes."""
    directory.mkdir(exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield directory


def shared_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One directory for all the workers of this test session (each worker's own base lies inside it)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "docker-engine"


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """An engine that answers; the environment its make targets run with (where a started engine keeps its state)."""
    shared = shared_directory(tmp_path_factory)
    env = {"DOCKER_STATE": str(shared / "state")}
    with locked(shared) as directory:
        users = directory / "users"
        count = int(users.read_text()) if users.exists() else 0
        if count == 0:
            started = make("docker-engine", env=env, timeout=120)
            assert started.returncode == 0, (
                f"{started.stderr.strip()} (a Docker engine: make system-deps installs Debian's docker.io)"
            )
        users.write_text(str(count + 1))
    yield env
    with locked(shared) as directory:
        count = int((directory / "users").read_text()) - 1
        (directory / "users").write_text(str(count))
        if count == 0:
            stopped = subprocess.run(
                [str(ROOT / "scripts" / "docker_engine.sh"), "stop"],
                env={**os.environ, **env},
                capture_output=True,
                text=True,
            )
            assert stopped.returncode == 0, stopped.stderr


@pytest.fixture(scope="session")
def serve_image(docker_engine: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The serving image, built by `make docker-build` (the base made here if it cannot be pulled)."""
    with locked(shared_directory(tmp_path_factory)) as directory:
        if not (directory / "image-built").exists():
            built = make("docker-build", f"SERVE_IMAGE={TEST_IMAGE}", env=docker_engine, timeout=BUILD_TIMEOUT_S)
            assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
            (directory / "image-built").touch()
    return TEST_IMAGE


def run_container(image: str, name: str, port: int, *args: str) -> str:
    """A detached container named `name`, polled for health every second (the image checks every 10 s)."""
    docker("rm", "--force", name, check=False)
    docker("run", "--detach", "--name", name, "--health-interval", "1s", *publish_flags(port), *args, image)
    return name


def wait_healthy(container: str, timeout: float) -> float:
    """Seconds until Docker reports the container healthy (its HEALTHCHECK, i.e. /readyz, passed)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status = docker("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", container).stdout.split()
        if status == ["running", "healthy"]:
            return time.monotonic() - started
        assert status[0] == "running", docker("logs", container).stderr[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"not healthy after {timeout} s:\n{docker('logs', container).stderr[-3000:]}")


@pytest.fixture
def container_name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A name for the test's container, removed afterwards whatever the test did."""
    name = f"cifarlab-test-{os.getpid()}-{request.node.name[:40]}".replace("[", "-").replace("]", "")
    yield name
    docker("rm", "--force", name, check=False)
