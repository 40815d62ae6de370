"""Atomic output directories and Arrow IPC read/write helpers.

Every command that writes a directory (prepared datasets, run directories, enrichment output) writes into a
temporary sibling directory and renames it into place at the end, so an error or a kill never leaves a
half-written output behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.ipc as ipc

from fedscope_jax.errors import FedscopeError


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that replaces `path` only when the block ends without error.

    An existing non-empty `path` is an error unless `force` is set (then it is replaced at the end).
    """
    final = Path(path)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not force:
        raise FedscopeError(f"{final}: output exists; pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def write_arrow(table: pa.Table, path: str | os.PathLike) -> None:
    """Writes `table` as an Arrow IPC file (atomically: temp file + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_arrow(path: str | os.PathLike) -> pa.Table:
    """Reads an Arrow IPC file, with an error that names the file when it is missing or not Arrow."""
    path = Path(path)
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found (expected an Arrow IPC file)")
    try:
        with pa.memory_map(str(path), "r") as source:
            return ipc.open_file(source).read_all()
    except pa.ArrowInvalid as exc:
        raise FedscopeError(f"{path}: not a valid Arrow IPC file ({exc})") from None


def write_json(obj: Any, path: str | os.PathLike) -> None:
    """Writes pretty JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    """Reads JSON with an error that names the file and position on failure."""
    path = Path(path)
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found (expected JSON)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FedscopeError(f"{path}: invalid JSON ({exc})") from None
