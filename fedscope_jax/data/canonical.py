"""The canonical prepared dataset: Arrow IPC tables plus dataset.json (see docs/data-format.md).

Every reader (data.formats.*) and the synthetic generator write through `DatasetWriter`; every consumer
(batching, model, engine, enrichment) reads through `load_dataset`. The writer streams interactions in
chunks of numpy arrays, so datasets of millions of users never become Python objects per interaction.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from fedscope_jax.errors import FedscopeError
from fedscope_jax.utils.io import read_arrow, read_json, write_arrow, write_json

# Split labels of an interaction. "train": trained on and history for the user's later targets.
# "valid" / "test": an evaluation target (at most one per user each), ranked with the user's earlier
# interactions as history. "context": history only, never trained on (held-out users of some formats).
SPLITS: tuple[str, ...] = ("train", "valid", "test", "context")
TRAIN, VALID, TEST, CONTEXT = range(4)

ITEMS_FILE = "items.arrow"
INTERACTIONS_FILE = "interactions.arrow"
DATASET_FILE = "dataset.json"

_DOMAIN_TYPE = pa.dictionary(pa.int8(), pa.string())
_SPLIT_TYPE = pa.dictionary(pa.int8(), pa.string())

ITEM_FIELDS = (
    pa.field("item_id", pa.int32(), nullable=False),      # dense 0..n_items(domain)-1 within its domain
    pa.field("domain", _DOMAIN_TYPE, nullable=False),
    pa.field("source_id", pa.string(), nullable=False),   # e.g. the ASIN
    pa.field("title", pa.string(), nullable=True),
)
INTERACTIONS_SCHEMA = pa.schema([
    pa.field("user_id", pa.int64(), nullable=False),      # dense 0..users-1
    pa.field("domain", _DOMAIN_TYPE, nullable=False),
    pa.field("item_id", pa.int32(), nullable=False),
    pa.field("timestamp", pa.int64(), nullable=True),     # unix seconds; null when the source has order only
    pa.field("position", pa.int32(), nullable=False),     # 0-based index in the user's mixed chronological sequence
    pa.field("split", _SPLIT_TYPE, nullable=False),
])


@dataclasses.dataclass(frozen=True)
class CanonicalDataset:
    """A prepared dataset in memory. Interaction arrays are sorted by (user, position)."""

    path: Path
    meta: dict[str, Any]
    domains: tuple[str, ...]
    n_items: tuple[int, ...]          # per domain
    n_users: int
    user: np.ndarray                  # int64 [N]
    domain: np.ndarray                # int8  [N], index into `domains`
    item: np.ndarray                  # int32 [N], 0-based within the domain
    timestamp: np.ndarray             # int64 [N], -1 where unknown
    position: np.ndarray              # int32 [N]
    split: np.ndarray                 # int8  [N], index into SPLITS
    items: pa.Table                   # items.arrow as read

    @property
    def n_interactions(self) -> int:
        return int(self.user.shape[0])

    def user_offsets(self) -> np.ndarray:
        """int64 [n_users + 1]: interactions of user u are rows offsets[u]:offsets[u+1]."""
        return np.concatenate([[0], np.cumsum(np.bincount(self.user, minlength=self.n_users))]).astype(np.int64)


def _dict_array(indices: np.ndarray, names: Sequence[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(indices, pa.int8()), pa.array(list(names), pa.string()))


def items_table(domain_names: Sequence[str], domain: np.ndarray, item_id: np.ndarray,
                source_id: Sequence[str], title: Sequence[str | None],
                extra: dict[str, pa.Array] | None = None) -> pa.Table:
    """Builds items.arrow's table; `extra` adds metadata columns (e.g. categories)."""
    cols = {
        "item_id": pa.array(np.asarray(item_id, np.int32)),
        "domain": _dict_array(np.asarray(domain, np.int8), domain_names),
        "source_id": pa.array(source_id, pa.string()),
        "title": pa.array(title, pa.string()),
    }
    cols.update(extra or {})
    return pa.table(cols)


class DatasetWriter:
    """Streams a canonical dataset into `out_dir` (which should be an atomic_output_dir's temp directory).

    Call `add(...)` with chunks of interactions (each chunk holds whole users, users in increasing order,
    rows ordered by position), then `close(items)` to write items.arrow and dataset.json.
    """

    def __init__(self, out_dir: str | os.PathLike, name: str, fmt: str, domains: Sequence[str],
                 n_items: Sequence[int], extra_meta: dict[str, Any] | None = None):
        if len(domains) != len(n_items) or not domains:
            raise ValueError("domains and n_items must be non-empty and of equal length")
        self.out_dir = Path(out_dir)
        self.name, self.fmt = name, fmt
        self.domains, self.n_items = tuple(domains), tuple(int(n) for n in n_items)
        self.extra_meta = dict(extra_meta or {})
        self._sink = pa.OSFile(str(self.out_dir / INTERACTIONS_FILE), "wb")
        self._writer = ipc.new_file(self._sink, INTERACTIONS_SCHEMA)
        self._last_user = -1
        self._n = 0
        self._dom_inter = np.zeros(len(domains), np.int64)
        self._dom_users = np.zeros(len(domains), np.int64)
        self._overlap = 0
        self._users = 0
        self._split_counts = np.zeros((len(SPLITS), len(domains)), np.int64)

    def add(self, user: np.ndarray, domain: np.ndarray, item: np.ndarray, position: np.ndarray,
            split: np.ndarray, timestamp: np.ndarray | None = None) -> None:
        """Appends a chunk of interactions (whole users, ascending user ids, rows in position order)."""
        user = np.asarray(user, np.int64)
        if user.size == 0:
            return
        domain = np.asarray(domain, np.int8)
        item = np.asarray(item, np.int32)
        position = np.asarray(position, np.int32)
        split = np.asarray(split, np.int8)
        if np.any(np.diff(user) < 0) or user[0] <= self._last_user:
            raise ValueError("DatasetWriter.add: users must arrive in increasing order, each user in one chunk")
        if domain.min() < 0 or domain.max() >= len(self.domains):
            raise ValueError("DatasetWriter.add: domain index out of range")
        bad = (item < 0) | (item >= np.asarray(self.n_items)[domain])
        if bad.any():
            raise ValueError(f"DatasetWriter.add: item id out of range for its domain at row {int(np.argmax(bad))}")
        ts = None if timestamp is None else pa.array(np.asarray(timestamp, np.int64))
        batch = pa.record_batch([
            pa.array(user), _dict_array(domain, self.domains), pa.array(item),
            ts if ts is not None else pa.nulls(user.size, pa.int64()),
            pa.array(position), _dict_array(split, SPLITS)], schema=INTERACTIONS_SCHEMA)
        self._writer.write_batch(batch)
        # statistics
        self._last_user = int(user[-1])
        self._n += user.size
        np.add.at(self._dom_inter, domain, 1)
        np.add.at(self._split_counts, (split, domain), 1)
        uniq_users, first = np.unique(user, return_index=True)
        self._users += uniq_users.size
        present = np.zeros((uniq_users.size, len(self.domains)), bool)
        present[np.searchsorted(uniq_users, user), domain] = True
        self._dom_users += present.sum(0)
        self._overlap += int((present.sum(1) > 1).sum())

    def close(self, items: pa.Table) -> dict[str, Any]:
        """Writes items.arrow and dataset.json; returns the dataset.json content."""
        self._writer.close()
        self._sink.close()
        write_arrow(items, self.out_dir / ITEMS_FILE)
        meta = {
            "name": self.name,
            "format": self.fmt,
            "users": int(self._users),
            "interactions": int(self._n),
            "overlap_users": int(self._overlap),
            "domains": [
                {"name": d, "items": self.n_items[i], "users": int(self._dom_users[i]),
                 "interactions": int(self._dom_inter[i])} for i, d in enumerate(self.domains)],
            "splits": {s: {d: int(self._split_counts[k, i]) for i, d in enumerate(self.domains)}
                       for k, s in enumerate(SPLITS)},
        }
        meta.update(self.extra_meta)
        write_json(meta, self.out_dir / DATASET_FILE)
        return meta


def _indices(column: pa.ChunkedArray, expected: Sequence[str], path: Path, field: str) -> np.ndarray:
    """Maps a dictionary<int8,string> column to int8 indices into `expected` (chunks may differ in dictionary)."""
    out = []
    lookup = {name: i for i, name in enumerate(expected)}
    for chunk in column.chunks:
        names = chunk.dictionary.to_pylist()
        unknown = [n for n in names if n not in lookup]
        if unknown:
            raise FedscopeError(f"{path}: column {field!r} has value {unknown[0]!r}; expected one of {list(expected)}")
        remap = np.array([lookup[n] for n in names], np.int8)
        out.append(remap[chunk.indices.to_numpy(zero_copy_only=False)] if len(names) else
                   np.zeros(len(chunk), np.int8))
    return np.concatenate(out) if out else np.zeros(0, np.int8)


def load_dataset(path: str | os.PathLike) -> CanonicalDataset:
    """Reads and validates a prepared dataset directory."""
    path = Path(path)
    if not path.is_dir():
        raise FedscopeError(f"{path}: not a directory (expected a prepared dataset; run `fedscope data prepare`)")
    meta = read_json(path / DATASET_FILE)
    try:
        domains = tuple(d["name"] for d in meta["domains"])
        n_items = tuple(int(d["items"]) for d in meta["domains"])
        n_users = int(meta["users"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FedscopeError(f"{path / DATASET_FILE}: missing or bad field {exc} (expected name/domains/users)") from None
    inter = read_arrow(path / INTERACTIONS_FILE)
    ipath = path / INTERACTIONS_FILE
    for field in INTERACTIONS_SCHEMA:
        if field.name not in inter.column_names:
            raise FedscopeError(f"{ipath}: missing column {field.name!r}")
    user = inter["user_id"].to_numpy().astype(np.int64)
    domain = _indices(inter["domain"], domains, ipath, "domain")
    item = inter["item_id"].to_numpy().astype(np.int32)
    ts_col = inter["timestamp"]
    timestamp = ts_col.fill_null(-1).to_numpy().astype(np.int64)
    position = inter["position"].to_numpy().astype(np.int32)
    split = _indices(inter["split"], SPLITS, ipath, "split")
    if user.size and (user.min() < 0 or user.max() >= n_users):
        raise FedscopeError(f"{ipath}: user_id out of range [0, {n_users})")
    order_ok = np.all((np.diff(user) > 0) | ((np.diff(user) == 0) & (np.diff(position) > 0)))
    if not order_ok:
        raise FedscopeError(f"{ipath}: rows must be sorted by (user_id, position)")
    if item.size and np.any((item < 0) | (item >= np.asarray(n_items)[domain])):
        raise FedscopeError(f"{ipath}: item_id out of range for its domain")
    items = read_arrow(path / ITEMS_FILE)
    return CanonicalDataset(path=path, meta=meta, domains=domains, n_items=n_items, n_users=n_users, user=user,
                            domain=domain, item=item, timestamp=timestamp, position=position, split=split,
                            items=items)
