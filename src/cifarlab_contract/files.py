"""Atomic writes and file digests: a reader sees the old file (or folder) or the new one, never a half-written one."""

import contextlib
import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_destination(path: Path, *, durable: bool = False) -> Iterator[Path]:
    """A hidden temporary path beside `path`, moved over it once the block succeeds (removed if it fails).

    The file gets mode 0644, not mkstemp's 0600, so that other users (a container's non-root server, say) can read
    it. `durable`: the file and its folder are fsynced before the block returns, so the write survives a crash.
    Hidden (a leading dot), the temporary file is never read as data by a folder scan.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        temp.chmod(0o644)
        if durable:
            _fsync(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def write_atomic(path: Path, content: str | bytes, *, durable: bool = False) -> None:
    """Write text or bytes atomically (see atomic_destination)."""
    with atomic_destination(path, durable=durable) as temp:
        if isinstance(content, bytes):
            temp.write_bytes(content)
        else:
            temp.write_text(content)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A new hidden folder beside `path`, swapped in for it once the block succeeds (removed if it fails).

    An existing `path` is moved aside first and restored if the swap fails, then deleted.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _hidden_sibling(path, "tmp")
    temp.mkdir()
    try:
        yield temp
        if not path.exists():
            temp.rename(path)
            return
        old = _hidden_sibling(path, "old")
        path.rename(old)
        try:
            temp.rename(path)
        except OSError:
            old.rename(path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def fsync_directory(path: Path) -> None:
    """Make a rename or a new file in `path` durable."""
    _fsync(path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _hidden_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")
