"""The repository's own imports, read from the AST (nothing is executed): which files `import x` runs, and what
each file imports. DVC's stage deps (tests/pipeline/test_dvc_stage_deps.py) and the import arrows between the
packages (tests/delivery/test_import_arrows.py) are both checked from this walk."""

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# where `import x` finds the repository's own packages: the roots pyproject.toml installs them from
PACKAGE_ROOTS = [
    (ROOT / where).resolve()
    for where in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["where"]
]


def module_files(name: str, roots: list[Path]) -> list[Path]:
    """The repository files `import name` executes: each package's __init__.py along the dotted path, then the
    module. Stops at the first part that is not a repository module (a class, a third-party package)."""
    for root in roots:
        files = []
        base = root
        for part in name.split("."):
            base = base / part
            found = next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)
            if found is None:
                break
            files.append(found)
        if files:
            return files
    return []


def executed_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below `node`, leaving out `if TYPE_CHECKING:` bodies, which never run."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and ast.unparse(child.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for other in child.orelse:
                yield other
                yield from executed_nodes(other)
            continue
        yield child
        yield from executed_nodes(child)


def imported_names(file: Path, roots: list[Path]) -> Iterator[str]:
    """Dotted names `file` imports; `from a import b` yields `a` and `a.b` (b may be a submodule)."""
    package = dotted_name(file.parent, roots)
    for node in executed_nodes(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".") if package else []
            base_parts = (parts[: len(parts) - node.level + 1] if node.level else []) + (
                node.module.split(".") if node.module else []
            )
            base = ".".join(base_parts)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def dotted_name(folder: Path, roots: list[Path]) -> str:
    """The package name of `folder` under the innermost root that holds it ("" for a root itself)."""
    holding = [root for root in roots if folder == root or root in folder.parents]
    return ".".join(folder.relative_to(max(holding, key=lambda root: len(root.parts))).parts) if holding else ""
