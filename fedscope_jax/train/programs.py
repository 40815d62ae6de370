"""The compiled programs a process keeps: one object, `PROGRAMS`, that every trainer asks and that the
reproduction clears between cells.

Runs with equal settings in one process reuse programs instead of compiling them again: the seeds of a
reproduction cell, a sweep's seeds, the tests. A program is kept under a hashable key of what it is built
from (for a round program: the client config object, the server optimizer, the engine config, sweep or not,
the mesh, the config chunk). Objects that cannot be hashed by value (the semantic tables) are keyed by their
identity and kept alive with the entry, so an id is never reused while its entry lives.

Each XLA:CPU executable maps ~1,400 memory regions: a process that keeps the programs of ~45 different
reproduction cells reaches Linux's default vm.max_map_count (65,530) and crashes in LLVM, hence `clear()`.
"""

from __future__ import annotations

import collections
import gc
from typing import Any, Callable, Hashable, TypeVar

import jax

from fedscope_jax.engine.sweep import round_program

T = TypeVar("T")

__all__ = ["PROGRAMS", "Programs"]


class Programs:
    """A cache of built programs (jitted functions, ahead-of-time compiled rounds, client configs), keyed by
    what they are built from; the least recently used beyond `max_entries` are dropped (a long process, e.g.
    a test session or a notebook, does not keep every program it ever compiled)."""

    def __init__(self, max_entries: int = 48) -> None:
        self.max_entries = max_entries
        self._entries: collections.OrderedDict[Hashable, tuple[Any, Any]] = collections.OrderedDict()

    def get(self, key: Hashable, build: Callable[[], T], keep: Any = None) -> T:
        """The program under `key`, built once by `build()`; `keep`: an object to hold alive with the entry
        (e.g. one that `key` names by its id)."""
        entry = self._entries.get(key)
        if entry is None:
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

    def clear(self) -> None:
        """Drops every kept program, and JAX's own caches of traced and compiled functions."""
        self._entries.clear()
        jax.clear_caches()
        gc.collect()


PROGRAMS = Programs()   # the process's programs (`fedscope reproduce` clears it between cells)
