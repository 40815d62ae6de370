"""Small shared utilities (I/O, progress)."""

__all__ = ["io", "progress"]
