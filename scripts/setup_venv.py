"""Build the virtual environment from the lock, exactly: `make venv` (any make target that needs .venv runs it).

    python3 scripts/setup_venv.py                  # .venv from requirements/train.txt, torch, then the project
    python3 scripts/setup_venv.py --record-digest requirements/serve.txt requirements/train.txt   # make lock

Standard library only, run by the system Python. Steps, each safe to repeat, so an interrupted set-up is finished by
the next run: refuse a lock older than pyproject.toml's dependencies; create .venv (again, if its Python does not
run); install uv at the lock's version with pip --require-hashes; `uv pip sync --require-hashes` the lock (exactly
its packages, each file checked against its hashes); torch's CPU build (left out of the lock: README "Lock files");
the project itself, editable and without dependencies; `uv pip check`; the stamp file last. Under
PYTHONDONTWRITEBYTECODE each install step byte-compiles what it installs. Every failure is one line naming what to
fix.
"""

from __future__ import annotations

import sys

if sys.version_info < (3, 11):  # noqa: UP036 (the system Python runs this, and may be older than the project needs)
    sys.exit(f"error: Python 3.11+ is needed to set up, {sys.executable} is {sys.version.split()[0]}")

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DIGEST_LINE = "# pyproject.toml dependencies sha256: "  # written by `make lock` under uv's header
TORCH = "torch==2.13.0"
LOCK_PLATFORM = ("Linux", "x86_64")  # what `make lock` resolves for (x86_64-manylinux_2_28)
# Where PYTHONDONTWRITEBYTECODE is set (CI machines, containers), Python never caches what it compiles, so every
# process would compile each module it imports again: 11 s of the training stack's 19 s import on the build machine.
# There the whole environment is byte-compiled once at install instead (40 s more set-up); elsewhere the first
# import of each module caches it, and compiling all 22,000 files up front would only cost (docs/setup.md).
COMPILE = ["--compile-bytecode"] if os.environ.get("PYTHONDONTWRITEBYTECODE") else []


class SetupError(Exception):
    """Set-up cannot go on; the message is the one line the user reads."""


def dependency_digest(pyproject: Path) -> str:
    """sha256 of what a lock is resolved from: Python version, dependencies, extras and uv's index settings. Other
    tables (ruff, mypy, pytest settings) change without a relock."""
    document = tomllib.loads(pyproject.read_text())
    project = document.get("project", {})
    resolved_from = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "uv": document.get("tool", {}).get("uv", {}),
    }
    return hashlib.sha256(json.dumps(resolved_from, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    for line in lock.read_text().splitlines():
        if line.startswith(DIGEST_LINE):
            return line.removeprefix(DIGEST_LINE).strip()
    return None


def record_digest(locks: list[Path], pyproject: Path) -> None:
    """Write pyproject.toml's dependency digest into each lock, replacing an older one (make lock)."""
    line = DIGEST_LINE + dependency_digest(pyproject)
    for lock in locks:
        lines = [old for old in lock.read_text().splitlines() if not old.startswith(DIGEST_LINE)]
        header = next((i for i, old in enumerate(lines) if not old.startswith("#")), len(lines))
        text = "\n".join([*lines[:header], line, *lines[header:]]) + "\n"
        temp = lock.with_name(f".{lock.name}.tmp")
        temp.write_text(text)
        temp.replace(lock)


def check_lock_is_current(lock: Path, pyproject: Path) -> None:
    recorded = recorded_digest(lock)
    if recorded is None:
        raise SetupError(f"{lock} records no pyproject.toml digest: it was not made by `make lock`; run make lock")
    if recorded != dependency_digest(pyproject):
        raise SetupError(
            f"{pyproject} changed its dependencies after {lock} was made: run make lock (and commit the locks)"
        )


def locked_block(lock: Path, package: str) -> str:
    """The lines that pin `package` in a `uv pip compile --generate-hashes` file: the pin and its hashes."""
    match = re.search(rf"^{re.escape(package)}==\S+(?: \\\n\s+--hash=\S+)+", lock.read_text(), re.MULTILINE)
    if match is None:
        raise SetupError(f"{lock} does not pin {package}: run make lock")
    return match.group(0) + "\n"


def run(command: list[str], what: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SetupError(f"{what} failed: {one_line(result.stderr + result.stdout)}")
    return result


def one_line(output: str) -> str:
    """uv's and pip's error with its causes, on one line; a package named by a hash mismatch comes first."""
    mismatch = re.search(r"Hash mismatch for `([^`]+)`", output)
    if mismatch:
        return f"the hashes of {mismatch.group(1)} in the lock do not match the downloaded file (run make lock)"
    lines = [line.strip() for line in output.splitlines() if re.match(r"\s*(error|cause|ERROR)\b", line)]
    return "; ".join(lines) or (output.strip().splitlines() or ["no output"])[-1]


def ensure_python(venv: Path) -> Path:
    """The venv's Python; a venv whose Python does not run (interrupted creation, moved folder) is made anew."""
    python = venv / "bin" / "python"
    try:
        if subprocess.run([str(python), "-c", ""], capture_output=True).returncode == 0:
            return python
    except OSError:  # missing, or not an executable
        pass
    shutil.rmtree(venv, ignore_errors=True)
    run([sys.executable, "-m", "venv", str(venv)], f"creating {venv}")
    return python


def ensure_uv(python: Path, lock: Path) -> Path:
    """uv at the version the lock pins, installed by pip from the lock's hashes."""
    block = locked_block(lock, "uv")
    version = block.split("==", 1)[1].split()[0]
    uv = python.parent / "uv"
    if uv.exists():
        current = subprocess.run([str(uv), "--version"], capture_output=True, text=True).stdout.split()
        if current[1:2] == [version]:
            return uv
    with tempfile.TemporaryDirectory() as folder:
        requirement = Path(folder) / "uv.txt"
        requirement.write_text(block)
        pip = [str(python), "-m", "pip", "install", "-qq", "--no-deps", "--require-hashes", "-r", str(requirement)]
        run(pip, "installing uv")
    return uv


def install_torch(uv: Path, python: Path, find_links: str | None, index_url: str) -> None:
    """The CPU build: from a folder of wheels when given (offline), else from PyTorch's CPU index."""
    source = ["--no-index", "--find-links", find_links] if find_links else ["--index-url", index_url]
    command = [str(uv), "pip", "install", "-q", "--python", str(python), *COMPILE, "--no-deps", *source, TORCH]
    run(command, f"installing {TORCH}")


def install_project(uv: Path, python: Path, lock: Path, pyproject: Path) -> None:
    """This repository, editable. On the lock's platform, nothing else: the lock holds every dependency. Elsewhere
    (a Mac) the extras are resolved once more, constrained to the lock's versions, which adds only what that
    platform needs besides (appnope for ipykernel on macOS) and a Linux lock cannot pin."""
    command = [str(uv), "pip", "install", "-q", "--python", str(python), *COMPILE]
    if (platform.system(), platform.machine()) == LOCK_PLATFORM:
        run([*command, "--no-deps", "-e", str(ROOT)], "installing .")
        return
    extras = ",".join(tomllib.loads(pyproject.read_text())["project"].get("optional-dependencies", {}))
    run([*command, "--no-sources", "--constraint", str(lock), "-e", f"{ROOT}[{extras}]"], "installing .")


def incomplete_lock(uv: Path, python: Path, lock: Path) -> None:
    result = subprocess.run([str(uv), "pip", "check", "--python", str(python)], capture_output=True, text=True)
    if result.returncode != 0:
        missing = re.search(r"The package `([^`]+)` requires `([^`]+)`", result.stdout + result.stderr)
        detail = f"{missing.group(1)} requires {missing.group(2)}" if missing else one_line(result.stdout)
        raise SetupError(f"{lock} is incomplete: {detail}, which it does not pin; run make lock")


def set_up(args: argparse.Namespace) -> None:
    lock, venv, pyproject = Path(args.lock), Path(args.venv), Path(args.pyproject)
    if args.uv_only:  # what make lock needs, whatever the state of the lock
        ensure_uv(ensure_python(venv), lock)
        return
    check_lock_is_current(lock, pyproject)
    print(f"setting up {venv} from {lock} (uv pip sync), {TORCH} and this repository", flush=True)
    start = time.monotonic()
    stamp = venv / ".installed"
    stamp.unlink(missing_ok=True)  # until every step below has succeeded again
    python = ensure_python(venv)
    uv = ensure_uv(python, lock)
    sync = [str(uv), "pip", "sync", "-q", "--python", str(python), *COMPILE, "--require-hashes", str(lock)]
    run(sync, f"installing {lock}")
    if not args.no_torch:
        install_torch(uv, python, args.torch_find_links, args.torch_index)
    if not args.no_project:
        install_project(uv, python, lock, pyproject)
    incomplete_lock(uv, python, lock)
    stamp.touch()
    print(f"set up {venv} in {time.monotonic() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(ROOT / ".venv"))
    parser.add_argument("--lock", default=str(ROOT / "requirements" / "train.txt"))
    parser.add_argument("--pyproject", default=str(ROOT / "pyproject.toml"))
    parser.add_argument("--torch-find-links", default=None, help="a folder holding torch's CPU wheel (offline)")
    parser.add_argument("--torch-index", default="https://download.pytorch.org/whl/cpu")
    parser.add_argument("--no-torch", action="store_true", help="skip torch (a lock of the serving side)")
    parser.add_argument("--no-project", action="store_true", help="skip the editable install of this repository")
    parser.add_argument("--uv-only", action="store_true", help="stop once uv is installed (make lock needs no more)")
    parser.add_argument("--record-digest", nargs="+", metavar="LOCK", help="record pyproject.toml's digest in LOCKs")
    args = parser.parse_args(argv)
    try:
        if args.record_digest:
            record_digest([Path(lock) for lock in args.record_digest], Path(args.pyproject))
        else:
            set_up(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
