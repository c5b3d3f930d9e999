"""The lock files in requirements/: hash-pinned, complete for the extras they lock, and in step with
pyproject.toml (a dependency added there without `make lock` fails here, before an install from the lock does)."""

import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

REQUIREMENTS = ROOT / "requirements"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# lock file -> the extras of pyproject.toml it locks (make lock): the training environment has them all
LOCKS = {"serve.txt": ["serve"], "train.txt": sorted(PROJECT["optional-dependencies"])}
NOT_LOCKED = {"torch"}  # installed first from the CPU index, see docs/delivery.md, "Lock files"


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked(path: Path) -> dict[str, list[str]]:
    """Package name -> the hashes of its pinned version, from a `uv pip compile --generate-hashes` file."""
    text = path.read_text().replace("\\\n", " ")
    pins: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(\S+)(.*)$", line)
        assert match, f"{path.name}: not an exact pin: {line}"
        pins[normalize(match.group(1))] = re.findall(r"--hash=sha256:([0-9a-f]{64})", match.group(4))
    return pins


def direct_requirements(extras: list[str]) -> set[str]:
    requirements = list(PROJECT["dependencies"])
    for extra in extras:
        requirements += PROJECT["optional-dependencies"][extra]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)) for requirement in requirements}


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_every_locked_package_is_pinned_with_hashes(name: str) -> None:
    pins = locked(REQUIREMENTS / name)
    assert len(pins) > 10
    unhashed = sorted(package for package, hashes in pins.items() if not hashes)
    assert not unhashed, f"{name}: pinned without a hash: {unhashed}"


@pytest.mark.parametrize("name", sorted(LOCKS))
def test_the_lock_holds_every_direct_dependency(name: str) -> None:
    missing = direct_requirements(LOCKS[name]) - NOT_LOCKED - set(locked(REQUIREMENTS / name))
    assert not missing, f"requirements/{name} lacks {sorted(missing)} from pyproject.toml: run make lock"


def test_the_serving_lock_is_torch_free_and_the_training_lock_leaves_torch_to_its_own_index() -> None:
    serve, train = locked(REQUIREMENTS / "serve.txt"), locked(REQUIREMENTS / "train.txt")
    assert "torch" not in serve and "lightning" not in serve
    assert "torch" not in train and {"lightning", "onnxruntime", "mypy"} <= set(train)
    # PyPI's torch pulls the CUDA stack; the CPU build needs none of it, so none may sneak into the lock
    # (OpenAI's `triton` compiler comes with it; NVIDIA's `tritonclient`, the v2 protocol tests' client, is CPU-only)
    assert not [package for package in train if package.startswith("nvidia-") or package == "triton"]


def test_the_parser_rejects_a_loose_pin(tmp_path: Path) -> None:
    lock = tmp_path / "loose.txt"
    lock.write_text("numpy>=1.26\n")
    with pytest.raises(AssertionError, match="not an exact pin"):
        locked(lock)
