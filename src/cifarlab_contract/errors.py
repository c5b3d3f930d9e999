"""The base of errors the user can fix: entry points show them as one readable line, never as a traceback."""


class UserError(Exception):
    """Input the user controls is wrong (data, config, paths, hardware choice, registry state)."""
