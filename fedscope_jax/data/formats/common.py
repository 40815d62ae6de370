"""What every source-format reader shares: the parsed `RawDataset`, split rules, the title join and the writer.

A reader turns one source layout (ABXI, C2DSR, LLMCDSR, MovieLens) into a `RawDataset` of flat numpy arrays;
`write_raw` then assigns positions and streams it through `DatasetWriter` in chunks of whole users, so every
format ends in the same canonical files (docs/data-format.md).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import pyarrow as pa

from fedscope_jax.data.canonical import CONTEXT, SPLITS, TEST, TRAIN, VALID, DatasetWriter, items_table
from fedscope_jax.errors import FedscopeError, at
from fedscope_jax.utils.progress import progress

# Users written per DatasetWriter.add call: bounds the memory of one Arrow record batch.
USERS_PER_CHUNK = 65_536
# Latest accepted timestamp (2100-01-01 UTC): larger values are milliseconds or garbage.
MAX_TIMESTAMP = 4_102_444_800


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """A source dataset parsed into flat arrays, before positions are assigned and files written.

    Interaction rows are grouped by user (ascending dense ids 0..n_users-1) and, within a user, in sequence
    order (chronological, ties in source order).
    """

    domains: tuple[str, ...]
    source_ids: tuple[tuple[str, ...], ...]          # per domain, indexed by item id
    titles: tuple[tuple[str | None, ...], ...]       # per domain, indexed by item id (None = unknown)
    user: np.ndarray                                 # int64 [N]
    domain: np.ndarray                               # int8  [N]
    item: np.ndarray                                 # int32 [N], 0-based within the domain
    split: np.ndarray                                # int8  [N], index into SPLITS
    timestamp: np.ndarray | None = None              # int64 [N] unix seconds; None when the source has order only
    item_extra: dict[str, tuple[Sequence[Any], ...]] = dataclasses.field(default_factory=dict)  # per domain
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # format-specific facts for dataset.json

    @property
    def n_items(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.source_ids)

    @property
    def n_users(self) -> int:
        return int(self.user[-1]) + 1 if self.user.size else 0


def open_binary(path: Path) -> BinaryIO:
    """Opens a file for binary reading, transparently gunzipping `*.gz`."""
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, path: Path, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise at(path, n, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not valid UTF-8; "
                 "expected UTF-8 text") from None


def lines(path: Path, expected: str = "at least one non-blank line") -> Iterator[tuple[int, str]]:
    """Yields (1-based line number, line without its newline) of a UTF-8 text file (`.gz` allowed).

    Blank lines are skipped. A line that is not UTF-8, or a file without any non-blank line, raises a
    FedscopeError naming the file and line (`expected` says what the file should have held).
    """
    found = False
    with open_binary(path) as f:
        try:
            for n, raw in enumerate(f, 1):
                line = _decode(raw, path, n).rstrip("\r\n")
                if n == 1:
                    line = line.removeprefix("\ufeff")
                if line.strip():
                    found = True
                    yield n, line
        except (OSError, EOFError) as exc:  # truncated or corrupt gzip
            raise FedscopeError(f"{path}: cannot read ({exc})") from None
    if not found:
        raise at(path, 1, f"file is empty; expected {expected}")


def first_non_utf8(path: Path) -> None:
    """Raises the `lines` error for the first line of `path` that is not UTF-8 (for readers using csv)."""
    for _ in lines(path):
        pass


def parse_int(token: str, path: Path, line: int, what: str) -> int:
    """int(token), or a FedscopeError naming the file, line and what was expected."""
    try:
        return int(token)
    except ValueError:
        raise at(path, line, f"expected an integer {what}, got {token[:40]!r}") from None


def parse_timestamp(token: str, path: Path, line: int) -> int:
    """A unix timestamp in seconds (1970..2100), or a FedscopeError naming the file and line."""
    try:
        value = int(token)
    except ValueError:
        value = None
    if value is None or not 0 <= value <= MAX_TIMESTAMP:
        raise at(path, line, f"bad timestamp {str(token)[:40]!r}; expected integer unix seconds in "
                 f"0..{MAX_TIMESTAMP} (1970-2100)")
    return value


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Reads a JSON-lines file into a list of objects (error names the line)."""
    out = []
    for n, line in lines(path, "one JSON object per line"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise at(path, n, f"invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict):
            raise at(path, n, "expected a JSON object per line")
        out.append(obj)
    return out


def domain_names(src: Path, default: tuple[str, str], override: Sequence[str] | None) -> tuple[str, ...]:
    """Domain names: `override` if given, else the folder's `<...>-<a>-<b>` suffix, else `default`."""
    if override:
        names = tuple(override)
        if len(names) != len(default) or len(set(names)) != len(names) or not all(names):
            raise FedscopeError(f"--domains: expected {len(default)} distinct non-empty names, got {list(names)}")
        return names
    parts = src.resolve().name.split("-")
    if len(parts) >= 3 and parts[-1] and parts[-2] and parts[-1] != parts[-2]:
        return (parts[-2].lower(), parts[-1].lower())
    return default


def leave_one_out(offsets: np.ndarray) -> np.ndarray:
    """Split labels for users' sequences (rows offsets[u]:offsets[u+1]): last -> test, second-last -> valid.

    Users with 2 interactions get (train, test); with 1, (train). This is ABXI's / SASRec's convention.
    """
    n = int(offsets[-1])
    split = np.full(n, TRAIN, np.int8)
    lengths = np.diff(offsets)
    ends = offsets[1:]
    split[ends[lengths >= 2] - 1] = TEST
    split[ends[lengths >= 3] - 2] = VALID
    return split


def last_as_target(offsets: np.ndarray, target: int, history: int = CONTEXT) -> np.ndarray:
    """Split labels for held-out users: each user's last row is `target`, the rest `history`."""
    split = np.full(int(offsets[-1]), history, np.int8)
    split[offsets[1:][np.diff(offsets) > 0] - 1] = target
    return split


def offsets_of(user: np.ndarray, n_users: int) -> np.ndarray:
    """int64 [n_users + 1] row offsets of grouped, ascending user ids."""
    return np.concatenate([[0], np.cumsum(np.bincount(user, minlength=n_users))]).astype(np.int64)


def stable_time_order(timestamp: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Row permutation sorting each user's rows by timestamp, ties kept in source order (a stable sort)."""
    user = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    return np.lexsort((np.arange(timestamp.size), timestamp, user))


def title_files(titles: Path) -> list[Path]:
    """The JSON-lines title files `--titles` names: a folder's items_*.jsonl, or one .jsonl(.gz) file."""
    titles = Path(titles)
    if titles.is_file():
        if not titles.name.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            raise FedscopeError(f"--titles {titles}: expected a folder with items_*.jsonl or a .jsonl file")
        return [titles]
    if not titles.is_dir():
        raise FedscopeError(f"--titles {titles}: not found (expected a folder with items_*.jsonl or a .jsonl file)")
    files = sorted(titles.glob("items_*.jsonl"))
    if not files:
        raise FedscopeError(f"--titles {titles}: no items_*.jsonl files (expected LLMCDSR's items_A/B.jsonl)")
    return files


def load_asin_titles(titles: Path) -> dict[str, str]:
    """ASIN -> title from JSON lines with `asin` and `title` (LLMCDSR's items_A/B.jsonl); null titles skipped.

    `titles` is a folder holding items_*.jsonl or a single .jsonl file; the first title of an ASIN wins.
    """
    out: dict[str, str] = {}
    for path in title_files(titles):
        for row in read_json_lines(path):
            asin, title = row.get("asin"), row.get("title")
            if isinstance(asin, str) and isinstance(title, str) and title.strip():
                out.setdefault(asin, title)
    return out


def join_titles(raw: RawDataset, titles_dir: Path) -> RawDataset:
    """Fills missing titles by joining items' source ids (ASINs) with an LLMCDSR title table (folder or file)."""
    table = load_asin_titles(titles_dir)
    titles = tuple(tuple(t if t is not None else table.get(s) for s, t in zip(src, old))
                   for src, old in zip(raw.source_ids, raw.titles))
    meta = dict(raw.meta, titles_joined_from=str(Path(titles_dir).resolve()))
    return dataclasses.replace(raw, titles=titles, meta=meta)


def title_coverage(raw: RawDataset) -> dict[str, Any]:
    """Items with a title per domain and the fraction of interactions whose item has a title."""
    has = [np.array([t is not None for t in ts], bool) for ts in raw.titles]
    covered = 0
    for d, h in enumerate(has):
        if h.size:
            covered += int(h[raw.item[raw.domain == d]].sum())
    n = int(raw.user.size)
    return {
        "items_with_title": {name: int(h.sum()) for name, h in zip(raw.domains, has)},
        "interactions_with_title": covered,
        "interaction_fraction": round(covered / n, 6) if n else 0.0,
    }


def validate_raw(raw: RawDataset, where: str) -> None:
    """Checks the invariants `write_raw` relies on (a reader bug, not user input, if it fails)."""
    n = raw.user.size
    for name in ("domain", "item", "split"):
        if getattr(raw, name).shape != (n,):
            raise ValueError(f"{where}: {name} has shape {getattr(raw, name).shape}, expected ({n},)")
    if raw.timestamp is not None and raw.timestamp.shape != (n,):
        raise ValueError(f"{where}: timestamp has the wrong shape")
    if n and (raw.user[0] != 0 or np.any(np.diff(raw.user) < 0) or np.any(np.diff(raw.user) > 1)):
        raise ValueError(f"{where}: users must be dense 0..U-1 and grouped in ascending order")


def write_raw(raw: RawDataset, out_dir: str | os.PathLike, name: str, fmt: str) -> dict[str, Any]:
    """Writes `raw` as a canonical dataset into `out_dir` (an atomic_output_dir temp dir); returns dataset.json."""
    validate_raw(raw, f"{fmt} reader")
    n_users = raw.n_users
    offsets = offsets_of(raw.user, n_users)
    position = (np.arange(raw.user.size, dtype=np.int64) - np.repeat(offsets[:-1], np.diff(offsets))).astype(np.int32)
    extra_meta = dict(raw.meta)
    extra_meta["timestamps"] = raw.timestamp is not None
    extra_meta["titles"] = title_coverage(raw)
    writer = DatasetWriter(out_dir, name=name, fmt=fmt, domains=raw.domains, n_items=raw.n_items,
                           extra_meta=extra_meta)
    starts = list(range(0, n_users, USERS_PER_CHUNK))
    for u0 in progress(starts, desc=f"write {name}", unit="chunk"):
        a, b = int(offsets[u0]), int(offsets[min(u0 + USERS_PER_CHUNK, n_users)])
        writer.add(raw.user[a:b], raw.domain[a:b], raw.item[a:b], position[a:b], raw.split[a:b],
                   None if raw.timestamp is None else raw.timestamp[a:b])
    dom = np.concatenate([np.full(n, d, np.int8) for d, n in enumerate(raw.n_items)])
    iid = np.concatenate([np.arange(n, dtype=np.int32) for n in raw.n_items])
    extra = {col: pa.array([v for per_dom in values for v in per_dom]) for col, values in raw.item_extra.items()}
    items = items_table(raw.domains, dom, iid, [s for per in raw.source_ids for s in per],
                        [t for per in raw.titles for t in per], extra)
    return writer.close(items)


__all__ = ["MAX_TIMESTAMP", "RawDataset", "SPLITS", "USERS_PER_CHUNK", "domain_names", "first_non_utf8",
           "join_titles", "last_as_target", "leave_one_out", "lines", "load_asin_titles", "offsets_of", "open_binary",
           "parse_int", "parse_timestamp", "read_json_lines", "stable_time_order", "title_coverage", "title_files",
           "write_raw"]
