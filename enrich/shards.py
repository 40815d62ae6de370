"""Items table -> shards; shard files; the resume check and the final assembly (pyarrow/numpy only).

A shard is a contiguous run of the selected items, ordered by (domain, item_id); it may span a domain
boundary, so every shard but the last is full and each vLLM call gets a full batch. Each finished shard is two Arrow
files written atomically (temp file + rename), embeddings first, attributes last; a shard counts as done
only when both exist. A killed job restarted with the same arguments skips the done shards, and the
assembly checks that the final tables hold exactly one row per selected item.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from enrich import schema as schema_lib

ITEMS_FILE = "items.arrow"
ATTRIBUTES_FILE = "attributes.arrow"
EMBEDDINGS_FILE = "item_embeddings.arrow"
SUMMARY_FILE = "enrich.json"
RUN_FILE = "run.json"
SHARD_DIR = "shards"
BASE_COLUMNS = ("item_id", "domain", "source_id", "title")


class JobError(Exception):
    """A user-facing error of the enrichment job (printed as one line naming the file or option at fault)."""


def domain_type() -> pa.DataType:
    return pa.dictionary(pa.int8(), pa.string())


def domain_array(names: Sequence[str], domains: Sequence[str]) -> pa.DictionaryArray:
    """A domain column over the full, fixed list of domain names (so every shard has the same dictionary)."""
    lookup = {d: i for i, d in enumerate(domains)}
    idx = np.array([lookup[n] for n in names], np.int8)
    return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int8()), pa.array(list(domains), pa.string()))


def attributes_schema(domains: Sequence[str] | None = None) -> pa.Schema:
    return pa.schema([
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("domain", domain_type(), nullable=False),
        *schema_lib.arrow_fields(),
        pa.field("raw_json", pa.string(), nullable=True),
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("attempts", pa.int8(), nullable=False),
        pa.field("generated_tokens", pa.int32(), nullable=False),
        pa.field("error", pa.string(), nullable=True),
    ])


def embeddings_schema(dim: int) -> pa.Schema:
    return pa.schema([
        pa.field("item_id", pa.int32(), nullable=False),
        pa.field("domain", domain_type(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), dim), nullable=False),
        pa.field("status", pa.string(), nullable=False),
    ])


def read_arrow(path: Path) -> pa.Table:
    if not path.is_file():
        raise JobError(f"{path}: file not found (expected an Arrow IPC file)")
    try:
        with pa.memory_map(str(path), "r") as source:
            return ipc.open_file(source).read_all()
    except pa.ArrowInvalid as exc:
        raise JobError(f"{path}: not a valid Arrow IPC file ({exc})") from None


def write_arrow(table: pa.Table, path: Path) -> None:
    """Atomic Arrow IPC write (temp file in the same directory + rename); one dictionary per column."""
    table = table.combine_chunks()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class Items:
    """items.arrow as read: rows plus decoded domain names, in a fixed domain order."""

    table: pa.Table
    domain_names: tuple[str, ...]     # per row
    domains: tuple[str, ...]          # all domains, stable order
    item_id: np.ndarray               # int32 per row
    metadata_columns: tuple[str, ...]


def load_items(data_dir: Path) -> Items:
    """Reads `<data_dir>/items.arrow` and checks the canonical columns (docs/data-format.md)."""
    path = Path(data_dir) / ITEMS_FILE
    table = read_arrow(path)
    for col in BASE_COLUMNS:
        if col not in table.column_names:
            raise JobError(f"{path}: missing column {col!r} (expected item_id, domain, source_id, title)")
    names = tuple(pc.cast(table["domain"], pa.string()).to_pylist()) if table.num_rows else ()
    if any(n is None for n in names):
        raise JobError(f"{path}: column 'domain' has nulls")
    order: list[str] = []
    meta = Path(data_dir) / "dataset.json"
    if meta.is_file():
        try:
            order = [d["name"] for d in json.loads(meta.read_text(encoding="utf-8"))["domains"]]
        except (KeyError, TypeError, json.JSONDecodeError):
            order = []
    for n in names:
        if n not in order:
            order.append(n)
    item_id = table["item_id"].to_numpy().astype(np.int32)
    keys = set()
    for d, i in zip(names, item_id.tolist()):
        if (d, i) in keys:
            raise JobError(f"{path}: duplicate item ({d!r}, item_id {i})")
        keys.add((d, i))
    extra = tuple(c for c in table.column_names if c not in BASE_COLUMNS)
    return Items(table, names, tuple(order), item_id, extra)


@dataclasses.dataclass(frozen=True)
class Shard:
    name: str            # e.g. "shard-00003" (its index in the plan)
    rows: np.ndarray     # row indices into the items table, ordered by (domain, item_id)

    @property
    def size(self) -> int:
        return int(self.rows.size)

    def domains(self, items: "Items") -> list[str]:
        """Domain name of each row."""
        return [items.domain_names[r] for r in self.rows.tolist()]


def plan_shards(items: Items, domains: Sequence[str] | None, limit: int | None, shard_size: int) -> list[Shard]:
    """Shards of the selected domains (all by default), the first `limit` items of each, `shard_size` per shard."""
    if shard_size < 1:
        raise JobError(f"--shard-size {shard_size}: expected a positive integer")
    if limit is not None and limit < 1:
        raise JobError(f"--limit {limit}: expected a positive integer")
    selected = list(items.domains) if not domains else list(domains)
    unknown = [d for d in selected if d not in items.domains]
    if unknown:
        raise JobError(f"--domains {unknown[0]!r}: not in items.arrow; expected one of {list(items.domains)}")
    names = np.array(items.domain_names, dtype=object)
    ordered = []
    for d in selected:
        rows = np.flatnonzero(names == d)
        rows = rows[np.argsort(items.item_id[rows], kind="stable")]
        ordered.append(rows if limit is None else rows[:limit])
    rows = np.concatenate(ordered) if ordered else np.zeros(0, np.int64)
    return [Shard(f"shard-{k:05d}", rows[start:start + shard_size])
            for k, start in enumerate(range(0, rows.size, shard_size))]


def shard_paths(out: Path, shard: Shard) -> tuple[Path, Path]:
    base = Path(out) / SHARD_DIR
    return base / f"{shard.name}.attributes.arrow", base / f"{shard.name}.embeddings.arrow"


def shard_done(out: Path, shard: Shard) -> bool:
    attr, emb = shard_paths(out, shard)
    return attr.is_file() and emb.is_file()


def write_shard(out: Path, shard: Shard, attributes: pa.Table, embeddings: pa.Table) -> None:
    """Writes one finished shard: embeddings first, attributes last (the 'done' marker)."""
    if attributes.num_rows != shard.size or embeddings.num_rows != shard.size:
        raise RuntimeError(f"shard {shard.name}: {attributes.num_rows}/{embeddings.num_rows} rows for {shard.size} items")
    attr, emb = shard_paths(out, shard)
    attr.parent.mkdir(parents=True, exist_ok=True)
    write_arrow(embeddings, emb)
    write_arrow(attributes, attr)


def check_run(out: Path, fingerprint: dict[str, Any], force: bool) -> None:
    """Starts or resumes `out`: a different earlier run there is an error unless `force` (then it is discarded)."""
    out = Path(out)
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
        if previous != fingerprint:
            if not force:
                diff = sorted(k for k in set(fingerprint) | set(previous or {})
                              if (previous or {}).get(k) != fingerprint.get(k))
                raise JobError(f"{run_file}: an earlier run with different arguments ({', '.join(diff)}) is there; "
                               "use another --out or pass --force to discard it")
            _discard(out)
    elif out.exists() and any(out.iterdir()):
        if not force:
            raise JobError(f"{out}: exists and is not an enrichment output; use another --out or pass --force")
        _discard(out)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json(fingerprint, run_file)


def _discard(out: Path) -> None:
    import shutil

    for child in out.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def assemble(out: Path, shards: Sequence[Shard], items: Items) -> tuple[pa.Table, pa.Table]:
    """Concatenates the shard files into attributes.arrow and item_embeddings.arrow (atomic writes).

    Checks that every selected item appears exactly once in both tables, rows in shard order.
    """
    out = Path(out)
    attrs, embs = [], []
    for shard in shards:
        attr_path, emb_path = shard_paths(out, shard)
        a, e = read_arrow(attr_path), read_arrow(emb_path)
        expected = items.item_id[shard.rows]
        for path, t in ((attr_path, a), (emb_path, e)):
            if not np.array_equal(t["item_id"].to_numpy(), expected) or \
                    pc.cast(t["domain"], pa.string()).to_pylist() != shard.domains(items):
                raise JobError(f"{path}: rows do not match the shard's items; delete the file and rerun to redo it")
        attrs.append(a)
        embs.append(e)
    if not attrs:
        raise JobError("no items selected (check --domains and --limit)")
    attributes = pa.concat_tables(attrs).combine_chunks()
    embeddings = pa.concat_tables(embs).combine_chunks()
    keys = list(zip(pc.cast(attributes["domain"], pa.string()).to_pylist(), attributes["item_id"].to_pylist()))
    if len(set(keys)) != len(keys) or len(keys) != sum(s.size for s in shards):
        raise JobError(f"{out}: assembled table has duplicate or missing items")
    write_arrow(attributes, out / ATTRIBUTES_FILE)
    write_arrow(embeddings, out / EMBEDDINGS_FILE)
    return attributes, embeddings
