"""User-facing errors: one line that names what is at fault and what was expected."""

from __future__ import annotations


class FedscopeError(Exception):
    """An error caused by the user's input (file, option, config); printed as one line, exit code 2."""


def at(path: object, line: int | None, message: str) -> FedscopeError:
    """Builds a FedscopeError that points at `path` (and `line`, 1-based, when known)."""
    where = f"{path}:{line}" if line is not None else f"{path}"
    return FedscopeError(f"{where}: {message}")
