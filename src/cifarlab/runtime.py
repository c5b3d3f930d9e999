"""Process-level helpers for the entry points: accelerator checks, atomic writes, one-line user errors."""

import functools
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cifarlab.errors import ConfigError, UserError

T = TypeVar("T")


def check_accelerator(accelerator: str) -> None:
    """Fail in a second, with the fix, when the requested accelerator does not exist on this machine."""
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("MPS is not available on this machine; use trainer.accelerator=auto (or trainer=cpu)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU is available on this machine; use trainer.accelerator=auto (or trainer=cpu)")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write text (or bytes) so that readers see the old file or the new one, never a half-written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb" if isinstance(content, bytes) else "w") as handle:
            handle.write(content)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def user_errors_exit(task: Callable[..., T]) -> Callable[..., T]:
    """Turn errors the user can fix into one line on stderr and exit status 1, without a traceback.

    Config mistakes that surface inside Hydra's instantiate or Lightning's argument checks count as such.
    """
    from hydra.errors import InstantiationException
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    @functools.wraps(task)
    def wrapper(*args: object, **kwargs: object) -> T:
        try:
            return task(*args, **kwargs)
        except (UserError, MisconfigurationException) as error:
            message = str(error)
        except InstantiationException as error:
            cause = error.__cause__
            if isinstance(cause, UserError):
                message = str(cause)
            else:
                message = f"invalid configuration: {error}".replace("\n", " ")
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(1)

    return wrapper
