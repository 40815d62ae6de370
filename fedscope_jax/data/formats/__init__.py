"""Readers of real source formats, and `prepare`, which turns a source folder into a canonical dataset.

    from fedscope_jax.data.formats import prepare
    meta = prepare("../shared/data/abxi-food-kitchen", "out/afk", titles="../shared/data/llmcdsr-food-kitchen")
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

from fedscope_jax.data.formats import abxi, amazon, c2dsr, csvfiles, llmcdsr, movielens
from fedscope_jax.data.formats.common import RawDataset, join_titles, write_raw
from fedscope_jax.errors import FedscopeError
from fedscope_jax.utils.io import atomic_output_dir

# Format name -> reader module (each has NAME, detect(src) and read(src, domains=None, **options)).
FORMATS: dict[str, ModuleType] = {m.NAME: m for m in (abxi, c2dsr, llmcdsr, amazon, movielens, csvfiles)}


def detect_format(src: str | os.PathLike) -> str:
    """The one format whose files `src` holds; an error when none or several match."""
    src = Path(src)
    if not src.is_dir():
        raise FedscopeError(f"{src}: not a directory (expected a source dataset folder)")
    found = [name for name, mod in FORMATS.items() if mod.detect(src)]
    if len(found) != 1:
        what = "no known format" if not found else f"several formats ({', '.join(found)})"
        raise FedscopeError(f"{src}: {what} recognised; pass --format one of {sorted(FORMATS)}")
    return found[0]


def read_source(src: str | os.PathLike, fmt: str | None = None, domains: Sequence[str] | None = None,
                titles: str | os.PathLike | None = None, **options: Any) -> tuple[str, RawDataset]:
    """Parses a source folder (format detected when `fmt` is None); `titles` joins ASIN titles (a folder of
    items_*.jsonl such as LLMCDSR's, or one .jsonl file)."""
    src = Path(src)
    fmt = fmt or detect_format(src)
    if fmt not in FORMATS:
        raise FedscopeError(f"--format {fmt!r}: expected one of {sorted(FORMATS)}")
    reader = FORMATS[fmt].read
    accepted = set(inspect.signature(reader).parameters) - {"src", "domains"}
    unknown = {k for k, v in options.items() if v is not None} - accepted
    if unknown:
        flag = lambda k: "--" + k.replace("_", "-")
        raise FedscopeError(f"option {flag(sorted(unknown)[0])} does not apply to format {fmt!r} "
                            f"(it takes {', '.join(map(flag, sorted(accepted))) or 'no options'})")
    raw = reader(src, domains=domains, **{k: v for k, v in options.items() if v is not None})
    if titles is not None:
        raw = join_titles(raw, Path(titles))
    return fmt, raw


def prepare(src: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None, name: str | None = None,
            domains: Sequence[str] | None = None, titles: str | os.PathLike | None = None, force: bool = False,
            **options: Any) -> dict[str, Any]:
    """Reads `src` and writes the canonical dataset directory `out` atomically; returns its dataset.json."""
    src = Path(src)
    fmt, raw = read_source(src, fmt, domains, titles, **options)
    with atomic_output_dir(out, force=force) as tmp:
        return write_raw(raw, tmp, name=name or src.resolve().name, fmt=fmt)


__all__ = ["FORMATS", "RawDataset", "detect_format", "prepare", "read_source"]
