"""The arrows between the packages, read from the AST (tests/imports.py): training and the service share only the
torch-free contract package, and neither imports the other; the lifecycle (registry, promotion, retraining, A/B)
imports neither. The way test_lock_files.py guards the torch-free image.

A package "reaches" a module when one of its files imports it, directly or through the repository's own modules
that file imports (an import inside a function counts: it runs when called; `if TYPE_CHECKING:` does not).
"""

import sys
from pathlib import Path

import pytest

from tests.imports import PACKAGE_ROOTS, ROOT, imported_names, module_files

TORCH = ("torch", "lightning", "torchmetrics")
# package -> top-level modules it must never reach, and why
FORBIDDEN: dict[str, tuple[set[str], str]] = {
    "serve": (
        {*TORCH, "hydra", "scipy", "cifarlab", "cifarlab_lifecycle"},
        "the serving image holds no training code, no torch and no scipy",
    ),
    "cifarlab": ({"serve"}, "training never imports the service: what both need is cifarlab_contract"),
    "cifarlab_lifecycle": (
        {*TORCH, "cifarlab", "serve"},
        "the lifecycle has no Lightning and no training code: it scores models by configs/registry.yaml's scorer",
    ),
}
# The contract is imported by both sides, so it may reach only the standard library and its declared dependencies
# (pyproject.toml's core `dependencies`).
# fsspec opens the feedback store on any URL for both sides: pure Python, a dependency of Lightning and of the serve
# extra, and imported only where a store is opened
CONTRACT, CONTRACT_DEPENDENCIES = "cifarlab_contract", {"numpy", "PIL", "fsspec"}


def reached(files: list[Path], roots: list[Path]) -> dict[str, Path]:
    """Top-level module -> a file that imports it, over `files` and every repository module they import."""
    found: dict[str, Path] = {}
    pending, seen = list(files), set()
    while pending:
        file = pending.pop()
        if file in seen:
            continue
        seen.add(file)
        for name in imported_names(file, roots):
            found.setdefault(name.split(".")[0], file)
            pending += module_files(name, roots)
    return found


def package_files(package: str, roots: list[Path]) -> list[Path]:
    (folder,) = [root / package for root in roots if (root / package / "__init__.py").is_file()]
    return sorted(folder.rglob("*.py"))


def arrows_out(package: str, roots: list[Path]) -> dict[str, Path]:
    """What `package` reaches outside itself."""
    return {name: file for name, file in reached(package_files(package, roots), roots).items() if name != package}


def describe(arrows: dict[str, Path]) -> list[str]:
    return sorted(
        f"{file.relative_to(ROOT) if ROOT in file.parents else file} -> {name}" for name, file in arrows.items()
    )


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_reaches_what_it_must_not(package: str) -> None:
    forbidden, why = FORBIDDEN[package]
    arrows = {name: file for name, file in arrows_out(package, PACKAGE_ROOTS).items() if name in forbidden}
    assert not arrows, f"{why}: {describe(arrows)}"


def test_the_contract_reaches_only_the_standard_library_numpy_pillow_and_fsspec() -> None:
    allowed = CONTRACT_DEPENDENCIES | set(sys.stdlib_module_names)
    arrows = {name: file for name, file in arrows_out(CONTRACT, PACKAGE_ROOTS).items() if name not in allowed}
    assert not arrows, f"training and serving both import {CONTRACT}, which must stay torch-free: {describe(arrows)}"


def test_both_sides_use_the_contract() -> None:
    assert CONTRACT in arrows_out("serve", PACKAGE_ROOTS) and CONTRACT in arrows_out("cifarlab", PACKAGE_ROOTS)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_an_arrow_through_another_module_or_inside_a_function_is_found(tmp_path: Path) -> None:
    write(tmp_path / "app" / "__init__.py", "")
    write(tmp_path / "app" / "api.py", "from . import helpers\n")
    write(tmp_path / "app" / "helpers.py", "def load():\n    from shared.stats import thing\n")
    write(tmp_path / "shared" / "__init__.py", "")
    write(
        tmp_path / "shared" / "stats.py",
        "import numpy\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n import torch\n",
    )
    write(tmp_path / "shared" / "heavy.py", "import torch\n")  # in the package, but imported by nobody from app
    assert set(arrows_out("app", [tmp_path])) == {"shared", "numpy", "typing"}
    assert set(arrows_out("shared", [tmp_path])) == {"numpy", "typing", "torch"}
