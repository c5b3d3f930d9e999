"""Each DVC stage's deps cover every repository file its command runs, so that `dvc repro` reruns a stage whenever
code it executes changes: the entry scripts, the repository modules they import (transitively, read from the
AST: nothing is executed), the modules the Hydra configs name (`_target_`), and the config folders Hydra reads.
Everything is read from dvc.yaml and pyproject.toml, so the check follows files and packages that move."""

import ast
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.imports import PACKAGE_ROOTS, imported_names, module_files

STAGES: dict[str, dict] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@dataclass
class Reads:
    """What a command runs and reads from the repository: Python files, and folders read as a whole (configs)."""

    files: set[Path] = field(default_factory=set)
    folders: set[Path] = field(default_factory=set)


def entry_scripts(cmd: str, repo: Path) -> list[Path]:
    """The Python files `cmd` starts: `python path/to/x.py ...` or `python -m package.module ...`."""
    words = shlex.split(cmd)
    scripts = [repo / word for word in words if word.endswith(".py") and (repo / word).is_file()]
    modules = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-m"]
    return scripts + [file for name in modules for file in module_files(name, [repo, *PACKAGE_ROOTS])[-1:]]


def config_folders(file: Path) -> Iterator[Path]:
    """Folders a Hydra entry point composes its config from: `config_path=` is relative to the calling file."""
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "config_path" and isinstance(keyword.value, ast.Constant):
                    yield (file.parent / keyword.value.value).resolve()


def config_targets(folder: Path) -> Iterator[str]:
    """The dotted names the configs in `folder` instantiate (`_target_: package.module.Class`)."""

    def targets(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    yield value
                else:
                    yield from targets(value)
        elif isinstance(node, list):
            for item in node:
                yield from targets(item)

    for config in sorted(folder.rglob("*.yaml")):
        yield from targets(yaml.safe_load(config.read_text()))


def command_reads(cmd: str, repo: Path, package_roots: list[Path]) -> Reads:
    """Everything in `repo` that running `cmd` executes or composes, following imports and config targets."""
    reads = Reads()
    pending = entry_scripts(cmd, repo)
    assert pending, f"no Python entry script in {cmd!r}"
    # `python dir/x.py` puts dir/ first on sys.path, before the installed packages
    roots = [*{script.parent: None for script in pending}, *package_roots]
    while pending:
        file = pending.pop()
        if file in reads.files:
            continue
        reads.files.add(file)
        for name in imported_names(file, roots):
            pending += module_files(name, roots)
        for folder in set(config_folders(file)) - reads.folders:
            reads.folders.add(folder)
            for target in config_targets(folder):
                pending += module_files(target, roots)
    return reads


def covered(path: Path, deps: list[Path]) -> bool:
    return any(path == dep or dep in path.parents for dep in deps)


def named_in_command(dep: str, cmd: str) -> bool:
    """A data dep is passed to the command: as an argument, or as the value of a Hydra override (`key=path`)."""
    return any(word == dep or word.endswith(f"={dep}") for word in shlex.split(cmd))


def uncovered(stage: dict, repo: Path, package_roots: list[Path]) -> list[str]:
    reads = command_reads(stage["cmd"], repo, package_roots)
    deps = [(repo / dep).resolve() for dep in stage.get("deps", [])]
    return sorted(str(p.relative_to(repo)) for p in reads.files | reads.folders if not covered(p, deps))


def unused_deps(stage: dict, repo: Path, package_roots: list[Path]) -> list[str]:
    """Deps that cover nothing the command runs or reads and are not data handed to it."""
    reads = command_reads(stage["cmd"], repo, package_roots)
    read = reads.files | reads.folders
    return [
        dep
        for dep in stage.get("deps", [])
        if not named_in_command(dep, stage["cmd"]) and not any(covered(p, [(repo / dep).resolve()]) for p in read)
    ]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_every_file_its_command_runs(name: str):
    missing = uncovered(STAGES[name], ROOT, PACKAGE_ROOTS)
    assert not missing, f"dvc.yaml stage {name!r} runs or reads these, but no dep covers them: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_dep_is_run_read_or_handed_to_the_command(name: str):
    unused = unused_deps(STAGES[name], ROOT, PACKAGE_ROOTS)
    assert not unused, f"dvc.yaml stage {name!r} depends on what its command never uses: {unused}"


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_walk_follows_imports_relative_imports_config_targets_and_skips_type_checking(tmp_path: Path):
    src = tmp_path / "src"
    write(tmp_path / "run.py", "import hydra\nfrom lib import a\n@hydra.main(config_path='conf')\ndef f(): ...\n")
    write(tmp_path / "conf" / "x.yaml", "net:\n  _target_: lib.sub.net.Net\n")
    write(src / "lib" / "__init__.py", "")
    write(
        src / "lib" / "a.py",
        "from .b import thing\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n import lib.c\n",
    )
    write(src / "lib" / "b.py", "def helper():\n    from lib import d\n")  # an import inside a function runs too
    write(src / "lib" / "c.py", "")
    write(src / "lib" / "d.py", "")
    write(src / "lib" / "unused.py", "")
    write(src / "lib" / "sub" / "__init__.py", "")
    write(src / "lib" / "sub" / "net.py", "from ..b import helper\nimport numpy\n")
    stage = {"cmd": "python run.py data=in/put", "deps": ["in/put", "run.py", "src/lib/a.py", "src/lib/unused.py"]}

    reads = command_reads(stage["cmd"], tmp_path, [src])
    assert {str(p.relative_to(tmp_path)) for p in reads.files} == {
        "run.py",
        "src/lib/__init__.py",
        "src/lib/a.py",
        "src/lib/b.py",
        "src/lib/d.py",
        "src/lib/sub/__init__.py",
        "src/lib/sub/net.py",
    }
    assert reads.folders == {tmp_path / "conf"}
    assert uncovered(stage, tmp_path, [src]) == [
        "conf",
        "src/lib/__init__.py",
        "src/lib/b.py",
        "src/lib/d.py",
        "src/lib/sub/__init__.py",
        "src/lib/sub/net.py",
    ]
    assert unused_deps(stage, tmp_path, [src]) == ["src/lib/unused.py"]  # in/put is handed to the command
    stage["deps"] = ["in/put", "run.py", "conf", "src/lib"]
    assert uncovered(stage, tmp_path, [src]) == [] and unused_deps(stage, tmp_path, [src]) == []
