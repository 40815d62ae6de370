"""Your own data as CSV: `interactions.csv` (user, item[, domain][, timestamp]) and optional `items.csv`.

- interactions.csv: one row per interaction with a header. `user` and `item` are any strings; `domain` names
  the item's domain (omit the column for one-domain data); `timestamp` (integer unix seconds, optional) orders a
  user's sequence, ties and missing column meaning file order.
- items.csv (optional): `domain` (if interactions have it), `item`, optional `title`, any other columns kept as
  string metadata. It fixes each domain's catalogue and item order; without it items are numbered in order of
  first appearance within their domain.
Users are numbered in order of first appearance, domains likewise unless --domains gives the order. Split:
leave-one-out on each user's mixed sequence (last test, second-last valid).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from fedscope_jax.data.formats.common import RawDataset, first_non_utf8, leave_one_out, offsets_of
from fedscope_jax.errors import FedscopeError, at

NAME = "csv"
INTERACTIONS = "interactions.csv"
ITEMS = "items.csv"
DEFAULT_DOMAIN = "items"


def detect(src: Path) -> bool:
    """True when `src` holds an interactions.csv."""
    return (src / INTERACTIONS).is_file()


def _read(path: Path) -> pa.Table:
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f), [])
        types = {c.strip(): pa.string() for c in header if c.strip() != "timestamp"}  # ids stay strings
        return pacsv.read_csv(str(path), convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False))
    except UnicodeDecodeError:
        first_non_utf8(path)  # raises, naming the line
        raise
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise FedscopeError(f"{path}: cannot parse as CSV with a header ({str(exc).splitlines()[0]})") from None


def _require(table: pa.Table, path: Path, columns: Sequence[str]) -> None:
    for col in columns:
        if col not in table.column_names:
            raise at(path, 1, f"missing column {col!r} (header has {table.column_names})")
        nulls = table[col].is_null()
        if pc.any(nulls).as_py():
            row = int(np.argmax(nulls.to_numpy(zero_copy_only=False)))
            raise at(path, row + 2, f"empty {col!r}")


def _first_appearance(values: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    enc = pc.dictionary_encode(values).combine_chunks()
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64), enc.dictionary.to_pylist()


def read(src: Path, domains: Sequence[str] | None = None) -> RawDataset:
    """Parses a folder of CSV files (see the module docstring) into a RawDataset."""
    src = Path(src)
    ipath = src / INTERACTIONS
    inter = _read(ipath)
    _require(inter, ipath, ("user", "item"))
    has_domain = "domain" in inter.column_names
    if has_domain:
        _require(inter, ipath, ("domain",))
        dom_code, dom_names = _first_appearance(inter["domain"])
    else:
        dom_code, dom_names = np.zeros(inter.num_rows, np.int64), [DEFAULT_DOMAIN]
    if domains:
        order = list(domains)
        if len(set(order)) != len(order):
            raise FedscopeError(f"--domains: names repeat in {order}")
        if not has_domain:
            if len(order) != 1:
                raise FedscopeError(f"--domains: {ipath} has no domain column, so exactly one name is expected")
            dom_names = order
        else:
            unknown = sorted(set(dom_names) - set(order))
            if unknown:
                raise FedscopeError(f"--domains {','.join(order)}: {ipath} also has domain {unknown[0]!r}")
            remap = np.array([order.index(n) for n in dom_names], np.int64)
            dom_code, dom_names = remap[dom_code] if dom_code.size else dom_code, order
    n_dom = len(dom_names)
    if n_dom > 127:
        raise FedscopeError(f"{ipath}: {n_dom} domains; at most 127 are supported (int8 domain index)")
    item_str = inter["item"].combine_chunks()

    # catalogue per domain
    titles: list[list[str | None]] = []
    source_ids: list[list[str]] = []
    extra_cols: dict[str, list[list[str | None]]] = {}
    item = np.empty(inter.num_rows, np.int32)
    ipath_items = src / ITEMS
    if ipath_items.is_file():
        items = _read(ipath_items)
        _require(items, ipath_items, ("item",) + (("domain",) if has_domain else ()))
        item_dom = (np.array([dom_names.index(d) if d in dom_names else -1 for d in items["domain"].to_pylist()])
                    if has_domain else np.zeros(items.num_rows, np.int64))
        if (item_dom < 0).any():
            row = int(np.argmax(item_dom < 0))
            raise at(ipath_items, row + 2, f"domain {items['domain'][row].as_py()!r} has no interactions in "
                     f"{INTERACTIONS} (domains: {dom_names})")
        others = [c for c in items.column_names if c not in ("item", "domain", "title")]
        for d in range(n_dom):
            rows = np.flatnonzero(item_dom == d)
            part = items.take(pa.array(rows))
            ids = part["item"].combine_chunks()
            if pc.count_distinct(ids).as_py() != len(ids):
                raise FedscopeError(f"{ipath_items}: an item of domain {dom_names[d]!r} is listed twice")
            source_ids.append(ids.to_pylist())
            titles.append(part["title"].to_pylist() if "title" in part.column_names else [None] * len(ids))
            for c in others:
                extra_cols.setdefault(c, []).append([None if v is None else str(v) for v in part[c].to_pylist()])
            sel = np.flatnonzero(dom_code == d)
            found = pc.index_in(item_str.take(pa.array(sel)), value_set=ids)
            pos = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)  # -1: not listed
            if (pos < 0).any():
                row = int(sel[np.argmax(pos < 0)])
                raise at(ipath, row + 2, f"item {item_str[row].as_py()!r} (domain {dom_names[d]!r}) is not in {ITEMS}")
            item[sel] = pos
    else:
        for d in range(n_dom):
            sel = np.flatnonzero(dom_code == d)
            codes, names = _first_appearance(pa.chunked_array([item_str.take(pa.array(sel))]))
            item[sel] = codes
            source_ids.append(names)
            titles.append([None] * len(names))

    # users and sequence order
    user_code, _ = _first_appearance(inter["user"])
    n_users = int(user_code.max()) + 1 if user_code.size else 0
    keys = [np.arange(inter.num_rows)]
    ts = None
    if "timestamp" in inter.column_names:
        col = inter["timestamp"]
        if not pa.types.is_integer(col.type):
            raise at(ipath, 1, f"column 'timestamp' must hold integer unix seconds, got {col.type}")
        _require(inter, ipath, ("timestamp",))
        ts = col.to_numpy().astype(np.int64)
        keys.append(ts)
    keys.append(user_code)
    order = np.lexsort(keys)
    user = user_code[order]
    offsets = offsets_of(user, n_users)
    files = [INTERACTIONS] + ([ITEMS] if ipath_items.is_file() else [])
    meta = {"source": {"path": str(src.resolve()), "files": files},
            "split_rule": "leave-one-out on the mixed sequence (last: test, second-last: valid)"}
    return RawDataset(domains=tuple(dom_names), source_ids=tuple(tuple(s) for s in source_ids),
                      titles=tuple(tuple(t) for t in titles), user=user, domain=dom_code[order].astype(np.int8),
                      item=item[order], split=leave_one_out(offsets), timestamp=None if ts is None else ts[order],
                      item_extra={c: tuple(v) for c, v in extra_cols.items()}, meta=meta)

