"""Process-level helpers for the entry points: the accelerator check, and user errors as one line."""

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cifarlab.errors import ConfigError
from cifarlab_contract.errors import UserError

T = TypeVar("T")


def check_accelerator(accelerator: str) -> None:
    """Fail in a second, with the fix, when the requested accelerator does not exist on this machine."""
    import torch  # here, not at the top: entry points that never touch torch use this module too

    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("MPS is not available on this machine; use trainer.accelerator=auto (or trainer=cpu)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("no CUDA GPU is available on this machine; use trainer.accelerator=auto (or trainer=cpu)")


def user_errors_exit(task: Callable[..., T]) -> Callable[..., T]:
    """Turn errors the user can fix into one line on stderr and exit status 1, without a traceback.

    Config mistakes that surface inside Hydra's instantiate or Lightning's argument checks count as such; a bug
    raised inside a constructor that Hydra called does not, and keeps its traceback (`_configuration_error`).
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
            if isinstance(cause, UserError):
                return str(cause)
            if _configuration_error(cause):
                return f"invalid configuration: {error}".replace("\n", " ")
    return None


def _configuration_error(cause: BaseException | None) -> bool:
    """Whether the error under a Hydra InstantiationException is the config's fault: Hydra's own checks (no
    cause), a value a constructor refused (ValueError, what this repository's constructors raise for bad
    arguments), or an error raised in Hydra's own code: a target that cannot be located, arguments that do not fit
    the signature. Anything else was raised inside the constructor's code: a bug, not a config mistake."""
    from hydra.errors import InstantiationException

    if cause is None or isinstance(cause, ValueError):
        return True
    if isinstance(cause, InstantiationException):  # a constructor that itself instantiates
        return cause.__cause__ is None or _configuration_error(cause.__cause__)
    frame = cause.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and "hydra" in Path(frame.tb_frame.f_code.co_filename).parts
