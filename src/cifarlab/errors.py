"""Training's errors the user can fix: shown as one readable line, never as a traceback."""

from cifarlab_contract.errors import UserError


class DataError(UserError):
    """A dataset source or prepared dataset is missing, corrupt or inconsistent."""


class ConfigError(UserError):
    """A configuration value cannot work on this machine or with these inputs."""


class ExportError(UserError):
    """An exported model does not match the model it was exported from."""
