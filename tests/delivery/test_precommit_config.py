"""The pre-commit configuration: local hooks only (nothing fetched from GitHub), each one a tool that the dev
extra installs, covering the gates the project promises. `make precommit` runs them on every file."""

import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT

CONFIG = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
HOOKS = [hook for repo in CONFIG["repos"] for hook in repo["hooks"]]
BIN = Path(sys.executable).parent


def test_hooks_are_local_and_installed_by_the_dev_extra() -> None:
    assert [repo["repo"] for repo in CONFIG["repos"]] == ["local"]
    for hook in HOOKS:
        command = hook["entry"].split()[0]
        assert hook["language"] == "system", hook["id"]
        assert (BIN / command).is_file(), f"hook {hook['id']}: {command} is not in {BIN}; add it to the dev extra"


def test_the_promised_gates_are_hooks() -> None:
    ids = {hook["id"] for hook in HOOKS}
    promised = {"ruff-check", "ruff-format", "nbstripout", "hadolint", "actionlint", "check-yaml", "check-toml"}
    assert promised | {"check-added-large-files"} <= ids


def test_pre_commit_accepts_the_config() -> None:
    result = subprocess.run(
        [str(BIN / "pre-commit"), "validate-config", ".pre-commit-config.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_large_file_guard_stops_a_large_file(tmp_path: Path) -> None:
    guard = next(hook for hook in HOOKS if hook["id"] == "check-added-large-files")
    big, small = tmp_path / "weights.bin", tmp_path / "notes.txt"
    big.write_bytes(b"\0" * 3 * 1024 * 1024)
    small.write_text("fine\n")
    command, *args = guard["entry"].split()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # the guard asks git which files are in LFS
    result = subprocess.run(
        [str(BIN / command), *args, str(big), str(small)], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "weights.bin" in result.stdout and "notes.txt" not in result.stdout
