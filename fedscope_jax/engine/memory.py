"""Memory is planned, not discovered: what a compiled program needs (XLA's memory analysis) against what the
device has, checked before the program first runs, so a round that cannot fit is refused with its sizes
instead of failing inside XLA with RESOURCE_EXHAUSTED.

On an accelerator the device's own limit (`memory_stats()["bytes_limit"]` less what is in use); on CPU the
host's available memory (/proc/meminfo MemAvailable). Where neither is known nothing is refused.
The estimate is conservative, not exact: arguments already resident on the device are counted both in use
and in the program's arguments, and with several CPU devices in one process each device's program is held
against the whole host's memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from fedscope_jax.errors import FedscopeError

__all__ = ["ProgramTooLarge", "available_bytes", "check_fits", "gib", "program_bytes"]

HEADROOM = 0.9   # share of the available memory a program may plan to use (the rest: the host's own arrays)


class ProgramTooLarge(FedscopeError):
    """A compiled program needs more memory than the device has (sizes in bytes; `arguments`: the part that is
    its inputs, e.g. parameters and optimizer state, where known)."""

    def __init__(self, needed: int, available: int, what: str = "the program", arguments: int = 0):
        self.needed, self.available, self.arguments = int(needed), int(available), int(arguments)
        super().__init__(f"{what} needs {gib(needed)} (XLA memory analysis: arguments, outputs and temporaries) "
                         f"but {gib(available)} is available on {jax.devices()[0].platform}")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def program_bytes(compiled: Any) -> int | None:
    """Bytes a compiled program holds while it runs (arguments + outputs + temporaries - donated aliases), or
    None where XLA gives no analysis."""
    try:
        mem = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - backends without the analysis
        return None
    if mem is None:
        return None
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               - mem.alias_size_in_bytes)


def available_bytes(device: Any = None) -> int | None:
    """Memory a program may use on `device` (default: this process's first), HEADROOM of what is free; None if
    unknown."""
    device = device or jax.local_devices()[0]
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - CPU devices may not report
        stats = None
    if stats and "bytes_limit" in stats:
        return int(HEADROOM * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    meminfo = Path("/proc/meminfo")
    if device.platform == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(HEADROOM * int(line.split()[1]) * 1024)
    return None


def check_fits(compiled: Any, what: str = "the program", available: int | None = None) -> None:
    """Raises ProgramTooLarge when `compiled` needs more than the available memory (known ones only)."""
    needed = program_bytes(compiled)
    available = available_bytes() if available is None else available
    if needed is not None and available is not None and needed > available:
        raise ProgramTooLarge(needed, available, what, compiled.memory_analysis().argument_size_in_bytes)
