"""Errors that name what the user must change."""

from __future__ import annotations


class AcadlmError(Exception):
    """Base class for errors raised by acadlm-plugins.

    ``user_error``: the message names what the user must change, so ``tune run`` prints it as
    one line; False for an error that reports a bug of ours, which keeps its traceback."""

    user_error: bool = True


class ConfigError(AcadlmError, ValueError):
    """A config value cannot work. The message names the key and the fix."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key, self.problem, self.fix = key, problem, fix
        message = f"config `{key}`: {problem}"
        if fix:
            message += f" Fix: {fix}"
        super().__init__(message)


class DataError(AcadlmError, ValueError):
    """A data file is missing or malformed. The message names the file (and line) and the fix."""


class DefaultsMissingError(AcadlmError, FileNotFoundError):
    """The embedded default model or corpus has not been built yet."""
