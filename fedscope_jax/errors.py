"""User-facing errors: one line that names what is at fault and what was expected."""

from __future__ import annotations


class FedscopeError(Exception):
    """An error caused by the user's input (file, option, config); printed as one line, exit code 2."""


def at(path: object, line: int | None, message: str) -> FedscopeError:
    """Builds a FedscopeError that points at `path` (and `line`, 1-based, when known)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return FedscopeError(f"{where}: {message}")


class ResumeMismatch(FedscopeError):
    """A run asked to resume was made with other settings (its stored config.json differs); the message names
    the key and the file. The reproduction catches it to start such a cell over."""
