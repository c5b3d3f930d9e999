"""Process-level helpers for the entry points: accelerator checks, atomic writes, file digests, one-line user errors."""

import contextlib
import functools
import hashlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cifarlab.errors import ConfigError, UserError

T = TypeVar("T")


def check_accelerator(accelerator: str) -> None:
    """Fail in a second, with the fix, when the requested accelerator does not exist on this machine."""
    import torch  # here, not at the top: entry points that never touch torch use this module too

    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("MPS is not available on this machine; use trainer.accelerator=auto (or trainer=cpu)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU is available on this machine; use trainer.accelerator=auto (or trainer=cpu)")


@contextlib.contextmanager
def atomic_destination(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, moved over it once the block succeeds: readers see the old file or the
    new one, never a half-written one. The file gets mode 0644, not mkstemp's 0600, so that other users (a
    container's non-root server, say) can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(descriptor)
    temp = Path(temp_name)
    try:
        yield temp
        temp.chmod(0o644)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write text or bytes atomically (see atomic_destination)."""
    with atomic_destination(path) as temp:
        if isinstance(content, bytes):
            temp.write_bytes(content)
        else:
            temp.write_text(content)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def user_errors_exit(task: Callable[..., T]) -> Callable[..., T]:
    """Turn errors the user can fix into one line on stderr and exit status 1, without a traceback.

    Config mistakes that surface inside Hydra's instantiate or Lightning's argument checks count as such.
    """

    @functools.wraps(task)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return task(*args, **kwargs)
        except Exception as error:
            message = _user_message(error)
            if message is None:
                raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)

    return wrapper


def _user_message(error: Exception) -> str | None:
    """The line to show for an error the user can fix; None for anything else (a bug: keep its traceback).

    Hydra and Lightning are consulted only once loaded: a task that never imported them cannot raise their errors,
    and an entry point without them starts without their import time (seconds, with torch).
    """
    if isinstance(error, UserError):
        return str(error)
    if "lightning.fabric" in sys.modules:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        if isinstance(error, MisconfigurationException):
            return str(error)
    if "hydra" in sys.modules:
        from hydra.errors import InstantiationException

        if isinstance(error, InstantiationException):
            cause = error.__cause__
            return str(cause) if isinstance(cause, UserError) else f"invalid configuration: {error}".replace("\n", " ")
    return None
