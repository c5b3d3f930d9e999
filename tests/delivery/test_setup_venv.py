"""scripts/setup_venv.py (make venv): the locks record pyproject.toml's dependencies, a stale or broken lock stops
set-up with one line naming what to fix, and a set-up cut short is finished by the next run.

The runs below are real: a venv made by the system Python, uv installed by pip from the lock's hashes, `uv pip sync`
of a small lock cut from requirements/train.txt (the same pins and hashes)."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # each test runs the set-up script end to end: a venv, uv, a sync
SCRIPT = ROOT / "scripts" / "setup_venv.py"
LOCKS = [ROOT / "requirements" / "serve.txt", ROOT / "requirements" / "train.txt"]


def load_script():
    spec = importlib.util.spec_from_file_location("setup_venv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


setup_venv = load_script()


def small_lock(path: Path, *packages: str, broken_hashes: str = "") -> Path:
    """A lock holding uv and `packages` as requirements/train.txt pins them, stamped with today's digest; the
    hashes of `broken_hashes` are altered."""
    train = ROOT / "requirements" / "train.txt"
    blocks = []
    for package in ("uv", *packages):
        block = setup_venv.locked_block(train, package)
        if package == broken_hashes:
            block = re.sub(r"sha256:[0-9a-f]{8}", "sha256:00000000", block)
        blocks.append(block)
    digest = setup_venv.dependency_digest(ROOT / "pyproject.toml")
    path.write_text(f"{setup_venv.DIGEST_LINE}{digest}\n{''.join(blocks)}")
    return path


def set_up(venv: Path, lock: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--venv", str(venv), "--lock", str(lock), "--no-torch", "--no-project"]
    return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600, env=env)


def error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One venv with uv in it, shared by the tests that only need set-up to reach the lock."""
    folder = tmp_path_factory.mktemp("venv")
    result = set_up(folder / "venv", small_lock(folder / "uv.txt"), "--uv-only")
    assert result.returncode == 0, result.stderr
    return folder / "venv"


@pytest.mark.parametrize("lock", LOCKS, ids=lambda path: path.name)
def test_each_lock_records_the_digest_of_todays_pyproject_dependencies(lock: Path):
    assert setup_venv.recorded_digest(lock) == setup_venv.dependency_digest(ROOT / "pyproject.toml"), (
        f"{lock.name} was made from other dependencies than pyproject.toml's: run make lock"
    )


def test_the_digest_follows_dependencies_not_tool_settings(tmp_path: Path):
    text = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "ruff.toml").write_text(text.replace("line-length = 120", "line-length = 100"))
    (tmp_path / "dep.toml").write_text(text.replace('"httpx>=0.27",', '"httpx>=0.27",\n    "rich>=13",'))
    digest = setup_venv.dependency_digest(ROOT / "pyproject.toml")
    assert setup_venv.dependency_digest(tmp_path / "ruff.toml") == digest
    assert setup_venv.dependency_digest(tmp_path / "dep.toml") != digest


def test_a_dependency_added_without_relocking_stops_set_up_with_one_line(tmp_path: Path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text((ROOT / "pyproject.toml").read_text().replace('"httpx>=0.27",', '"httpx>=0.27", "rich",'))
    result = set_up(tmp_path / "venv", LOCKS[1], "--pyproject", str(pyproject))
    line = error_line(result)
    assert str(pyproject) in line and "run make lock" in line
    assert not (tmp_path / "venv").exists()  # refused before anything was made


def test_a_hash_mismatch_stops_set_up_with_one_line_naming_the_package(venv: Path, tmp_path: Path):
    lock = small_lock(tmp_path / "lock.txt", "zipp", broken_hashes="zipp")
    line = error_line(set_up(venv, lock))
    assert "zipp==" in line and "hashes" in line
    assert not (venv / ".installed").exists()


def test_a_package_missing_from_the_lock_stops_set_up_with_one_line_naming_it(venv: Path, tmp_path: Path):
    lock = small_lock(tmp_path / "lock.txt", "importlib-metadata")  # without zipp, which it requires
    line = error_line(set_up(venv, lock))
    assert "importlib-metadata requires zipp" in line and "run make lock" in line
    assert not (venv / ".installed").exists()


def test_a_set_up_cut_short_is_finished_by_the_next_run(tmp_path: Path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text("")  # cut off while the venv was being made: a Python that cannot run
    environment = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # as on CI machines: imports cache nothing
    result = set_up(venv, small_lock(tmp_path / "lock.txt", "zipp"), env=environment)
    assert result.returncode == 0, result.stderr
    assert (venv / ".installed").is_file()
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('zipp'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert f"zipp=={version}" in setup_venv.locked_block(ROOT / "requirements" / "train.txt", "zipp")
    # byte-compiled at install, so that processes under PYTHONDONTWRITEBYTECODE do not compile it at each import
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert list((site / "zipp").glob("__pycache__/__init__.cpython-*.pyc"))
