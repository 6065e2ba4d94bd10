"""Errors and the exit codes the CLI maps them to (see README, "Exit codes")."""
from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_BAD_INPUT = 65       # a file that is not a readable LoRA adapter
EXIT_MISSING = 66         # a file, folder or index that does not exist
EXIT_UNAVAILABLE = 69     # a backend or GPU that is not available
EXIT_LOCKED = 75          # another writer holds the index lock


class LorasearchError(Exception):
    """Base class: carries a one-line message and the CLI exit code."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(str(self.message).split())


class BadAdapterError(LorasearchError):
    """The input exists but is not a LoRA adapter lorasearch can read. ``str()`` is ``"<path>: <reason>"``."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class MissingError(LorasearchError):
    exit_code = EXIT_MISSING


class UnavailableError(LorasearchError):
    exit_code = EXIT_UNAVAILABLE


class IndexLockedError(LorasearchError):
    exit_code = EXIT_LOCKED


class UsageError(LorasearchError):
    exit_code = EXIT_USAGE


class IncompatibleError(LorasearchError):
    """An operation mixes things that must not be mixed (e.g. two encoders in one index)."""

    exit_code = EXIT_USAGE
