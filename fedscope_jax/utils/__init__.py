"""Small shared utilities (I/O, progress)."""
