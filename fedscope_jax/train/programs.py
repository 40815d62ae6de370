"""The compiled programs a process keeps: one object, `PROGRAMS`, that every trainer asks and that the
reproduction clears between cells.

Runs with equal settings in one process reuse programs instead of compiling them again: the seeds of a
reproduction cell, a sweep's seeds, the tests. A program is kept under a hashable key of what it is built
from (for a round program: the client config object, the server optimizer, the engine config, sweep or not,
the mesh, the config chunk). Objects that cannot be hashed by value (the semantic tables) are keyed by their
identity and kept alive with the entry, so an id is never reused while its entry lives.

Each XLA:CPU executable maps ~1,400 memory regions: a process that keeps the programs of ~45 different
reproduction cells reaches Linux's default vm.max_map_count (65,530) and crashes in LLVM (a segmentation
fault, no message), hence `clear()`, which the reproduction calls between cells and `get` calls by itself
before it builds a program in a process past half of that limit (`release_near_map_limit`).
"""

from __future__ import annotations

import collections
import gc
from pathlib import Path
from typing import Any, Callable, Hashable, TypeVar

import jax

from fedscope_jax.engine.sweep import round_program

T = TypeVar("T")

RELEASE_MARGIN = 0.1   # after a clear, the next waits until the map count has grown by this share of the limit

__all__ = ["PROGRAMS", "Programs", "mapped_regions", "max_mapped_regions"]


def mapped_regions() -> int | None:
    """How many memory regions this process maps (the lines of /proc/self/maps); None where that file does not
    exist (not Linux)."""
    try:
        return Path("/proc/self/maps").read_bytes().count(b"\n")
    except OSError:
        return None


def max_mapped_regions() -> int:
    """The kernel's limit on a process's memory regions (vm.max_map_count; Linux's default where unreadable)."""
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return 65_530


class Programs:
    """A cache of built programs (jitted functions, ahead-of-time compiled rounds, client configs), keyed by
    what they are built from; the least recently used beyond `max_entries` are dropped (a long process, e.g.
    a test session or a notebook, does not keep every program it ever compiled)."""

    def __init__(self, max_entries: int = 48, release_at: float = 0.5) -> None:
        self.max_entries = max_entries
        self.release_at = release_at   # the share of vm.max_map_count past which `get` clears before a build
        self._after_release = 0        # the map count right after the last clear (what callers still hold)
        self._entries: collections.OrderedDict[Hashable, tuple[Any, Any]] = collections.OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T], keep: Any = None) -> T:
        """The program under `key`, built once by `build()`; `keep`: an object to hold alive with the entry
        (e.g. one that `key` names by its id)."""
        entry = self._entries.get(key)
        if entry is None:
            self.release_near_map_limit()
            entry = (build(), keep)
            self._entries[key] = entry
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return entry[0]

    def round_program(self, client_cfg: Any, server_opt: Any, engine_cfg: Any, sweep: bool, mesh: Any = None,
                      config_chunk: int = 0) -> Any:
        """The ahead-of-time compiled round (`engine.sweep.round_program`) for these settings."""
        key = ("round", client_cfg, server_opt, engine_cfg, sweep, mesh, config_chunk)
        return self.get(key, lambda: round_program(client_cfg, server_opt, engine_cfg, sweep, mesh, config_chunk))

    def __len__(self) -> int:
        return len(self._entries)

    def release_near_map_limit(self, share: float | None = None) -> bool:
        """`clear()` if this process maps more than `share` (default `release_at`) of vm.max_map_count memory
        regions (each XLA:CPU executable maps ~1,400): LLVM would crash the process at the limit, in a later
        compile. Programs a caller still holds stay valid (a held jitted function compiles again when next
        called) but keep their maps, so after a clear that left the count above the threshold the next one waits
        for RELEASE_MARGIN more regions (no clear at every build). True if cleared."""
        regions = mapped_regions()
        if regions is None:
            return False
        limit = max_mapped_regions()
        if regions <= max(self.release_at if share is None else share, 0.0) * limit \
                or regions <= self._after_release + RELEASE_MARGIN * limit:
            return False
        self.clear()
        return True

    def clear(self) -> None:
        """Drops every kept program, and JAX's own caches of traced and compiled functions."""
        self._entries.clear()
        jax.clear_caches()
        gc.collect()
        self._after_release = mapped_regions() or 0


PROGRAMS = Programs()   # the process's programs (`fedscope reproduce` clears it between cells)
