"""Errors the user can fix: shown as one readable line, never as a traceback."""


class UserError(Exception):
    """Input the user controls is wrong (data, config, paths, hardware choice)."""


class DataError(UserError):
    """A dataset source or prepared dataset is missing, corrupt or inconsistent."""


class ConfigError(UserError):
    """A configuration value cannot work on this machine or with these inputs."""


class ExportError(UserError):
    """An exported model does not match the model it was exported from."""
