"""The studies' datasets: where each comes from, how it is prepared, and the per-profile user subsets.

Prepared datasets and subsets are cached under the reproduction's output (`<out>/data/`), never in the
repository. A user subset keeps whole users (their every interaction) chosen by a seeded draw and re-indexes
the items that remain, topped up with the most popular other items to at least 2,000 per domain (compact item
tables keep the small profiles fast; the top-up leaves the 999-negative protocol enough candidates). An item
core (`max_items`) keeps only each domain's N most-trained items and drops every other interaction: denser
data on which a small model learns in a few rounds (the quick profile). `item_map.arrow` beside a subset
records each kept item's id in the full prepared dataset, so LLM attribute vectors can follow it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from fedscope_jax.errors import FedscopeError

ITEM_MAP_FILE = "item_map.arrow"


@dataclasses.dataclass(frozen=True)
class DatasetSource:
    """A shared dataset folder and the `fedscope data prepare` options it needs."""

    name: str
    folder: str
    format: str
    options: tuple[tuple[str, str], ...] = ()
    note: str = ""


DATASETS: dict[str, DatasetSource] = {d.name: d for d in (
    DatasetSource("abxi-food-kitchen", "abxi-food-kitchen", "abxi"),
    DatasetSource("llmcdsr-food-kitchen", "llmcdsr-food-kitchen", "llmcdsr",
                  note="held-out users' histories are context (never trained on)"),
    DatasetSource("c2dsr-movie-book", "c2dsr-movie-book", "c2dsr", (("history_split", "train"),),
                  note="the public copy lacks traindata_new.txt: held-out users' histories are trained on "
                       "(--history-split train, docs/data.md)"),
)}


def prepare_dataset(name: str, data_root: str | Path, cache: str | Path) -> Path:
    """`<cache>/<name>`: the prepared dataset (prepared once; reused when its dataset.json exists)."""
    from fedscope_jax.data.formats import prepare

    src = DATASETS[name]
    out = Path(cache) / name
    if (out / "dataset.json").is_file():
        return out
    folder = Path(data_root) / src.folder
    if not folder.is_dir():
        raise FedscopeError(f"dataset {name}: source folder {folder} not found (give --data-root, the folder "
                            "holding the shared datasets)")
    prepare(folder, out, fmt=src.format, name=name, force=True, **dict(src.options))
    return out


def subset_users(ds: Any, max_users: int, seed: int) -> np.ndarray:
    """Sorted user ids of a seeded subset of at most `max_users` users (0 = all).

    Users with an evaluation target (valid/test) fill at least half the subset when there are enough, so
    formats whose held-out users are not trained on (llmcdsr) keep both training and evaluation users."""
    from fedscope_jax.data.canonical import TEST, VALID

    if max_users <= 0 or max_users >= ds.n_users:
        return np.arange(ds.n_users)
    rng = np.random.default_rng(seed)
    has_eval = np.zeros(ds.n_users, bool)
    has_eval[ds.user[(ds.split == VALID) | (ds.split == TEST)]] = True
    evals, others = np.flatnonzero(has_eval), np.flatnonzero(~has_eval)
    n_eval = min(len(evals), max(max_users // 2, max_users - len(others)))
    chosen = np.concatenate([rng.choice(evals, n_eval, replace=False),
                             rng.choice(others, max_users - n_eval, replace=False)])
    return np.sort(chosen)


MIN_ITEMS = 2000


def _kept_items(ds: Any, dom: np.ndarray, item: np.ndarray, d: int, min_items: int) -> np.ndarray:
    """Sorted item ids of domain d kept in a subset: the subset's own items, topped up with the full dataset's
    most popular other items to at least min(min_items, all items), so the sampled evaluation protocol
    (999 negatives among the items a user never interacted with) still has enough candidates."""
    own = np.unique(item[dom == d])
    target = min(min_items, ds.n_items[d])
    if len(own) >= target:
        return own
    counts = np.bincount(ds.item[ds.domain == d], minlength=ds.n_items[d])
    counts[own] = -1
    order = np.argsort(-counts, kind="stable")
    return np.sort(np.concatenate([own, order[:target - len(own)]]))


def core_items(ds: Any, max_items: int) -> list[np.ndarray]:
    """Sorted ids of each domain's `max_items` items with the most train interactions (ties: lower id)."""
    from fedscope_jax.data.canonical import TRAIN

    out = []
    for d in range(len(ds.domains)):
        sel = (ds.domain == d) & (ds.split == TRAIN)
        counts = np.bincount(ds.item[sel], minlength=ds.n_items[d])
        out.append(np.sort(np.argsort(-counts, kind="stable")[:min(max_items, ds.n_items[d])]))
    return out


def write_subset(ds: Any, users: np.ndarray, out: str | Path, min_items: int = MIN_ITEMS,
                 max_items: int = 0) -> Path:
    """Writes the canonical dataset of `users` (renumbered 0..), items re-indexed per domain, plus item_map.arrow.

    max_items > 0: an item core. Only each domain's `max_items` most-trained items are kept and every
    interaction with another item is dropped (positions renumbered, split labels kept: a held-out target on a
    dropped item is gone); users left without interactions are dropped too."""
    import pyarrow as pa

    from fedscope_jax.data.canonical import DatasetWriter
    from fedscope_jax.utils.io import atomic_output_dir, write_arrow

    rows = np.flatnonzero(np.isin(ds.user, users))
    if max_items > 0:
        core = core_items(ds, max_items)
        keys = np.concatenate([d * max(ds.n_items) + c for d, c in enumerate(core)])
        rows = rows[np.isin(ds.domain[rows].astype(np.int64) * max(ds.n_items) + ds.item[rows], keys)]
        users = np.unique(ds.user[rows])
    new_user = np.searchsorted(users, ds.user[rows])
    dom, item = ds.domain[rows], ds.item[rows]
    if max_items > 0:
        kept = core
    else:
        kept = [_kept_items(ds, dom, item, d, min_items) for d in range(len(ds.domains))]
    starts = np.flatnonzero(np.r_[True, np.diff(new_user) != 0])
    position = np.arange(len(rows)) - np.repeat(starts, np.diff(np.r_[starts, len(rows)]))
    new_item = np.zeros(len(rows), np.int32)
    for d, k in enumerate(kept):
        sel = dom == d
        new_item[sel] = np.searchsorted(k, item[sel])
    ts = ds.timestamp[rows]
    idom = np.asarray(ds.items["domain"].cast(pa.string()).to_pylist(), dtype=object)
    iid = ds.items["item_id"].to_numpy()
    keep_rows, new_ids, doms = [], [], []
    for d, name in enumerate(ds.domains):
        sel = np.flatnonzero(idom == name)
        order = sel[np.argsort(iid[sel])]
        keep_rows.append(order[kept[d]])
        new_ids.append(np.arange(len(kept[d])))
        doms.append(np.full(len(kept[d]), d))
    keep_rows_a = np.concatenate(keep_rows)
    items = ds.items.take(pa.array(keep_rows_a))
    items = items.set_column(items.schema.get_field_index("item_id"), "item_id",
                             pa.array(np.concatenate(new_ids).astype(np.int32)))
    meta = {k: v for k, v in ds.meta.items() if k not in ("name", "format", "users", "interactions",
                                                          "overlap_users", "domains", "splits")}
    meta["subset"] = {"source": str(ds.path), "users": int(len(users)), "of_users": int(ds.n_users),
                      "max_items": int(max_items), "interactions": int(len(rows)), "of_interactions": int(len(ds.user))}
    with atomic_output_dir(out, force=True) as tmp:
        writer = DatasetWriter(tmp, ds.meta.get("name", "dataset"), ds.meta.get("format", "subset"), ds.domains,
                               [len(k) for k in kept], meta)
        writer.add(new_user, dom, new_item, position, ds.split[rows],
                   None if np.all(ts < 0) else ts)
        writer.close(items)
        write_arrow(pa.table({"domain": pa.array(np.concatenate(doms).astype(np.int8)),
                              "item_id": pa.array(np.concatenate(new_ids).astype(np.int32)),
                              "source_item_id": pa.array(np.concatenate(kept).astype(np.int32))}),
                    tmp / ITEM_MAP_FILE)
    return Path(out)


def dataset_for(name: str, data_root: str | Path, cache: str | Path, max_users: int, seed: int = 0,
                max_items: int = 0) -> Path:
    """The prepared dataset `name`, or its cached subset: `max_users` users (0 = all) on the item core of
    `max_items` items per domain (0 = every item; see write_subset)."""
    from fedscope_jax.data.canonical import load_dataset

    full = prepare_dataset(name, data_root, cache)
    if max_users <= 0 and max_items <= 0:
        return full
    out = Path(cache) / (f"{name}-u{max_users}" + (f"-i{max_items}" if max_items > 0 else "") + f"-s{seed}")
    if (out / "dataset.json").is_file():
        return out
    ds = load_dataset(full)
    if (max_users <= 0 or max_users >= ds.n_users) and (max_items <= 0 or max_items >= max(ds.n_items)):
        return full
    return write_subset(ds, subset_users(ds, max_users, seed), out, max_items=max_items)


def semantic_for(dataset_dir: str | Path, ds: Any, attributes_root: str | Path | None,
                 name: str, root_flag: str = "--attributes-root") -> tuple[Any, dict[str, Any] | None, str]:
    """(semantic tables or None, coverage, attributes label) for dataset `name` prepared at `dataset_dir`.

    Reads `<attributes_root>/<name>/item_embeddings.arrow` (ids of the full prepared dataset) and follows a
    subset's item_map.arrow. Label "none (...)" says why a run is ID-only (`root_flag`: the option that gives
    the root, named when it was not given)."""
    from fedscope_jax.model.semantic import EMBEDDINGS_FILE

    if attributes_root is None:
        return None, None, f"none (no {root_flag})"
    file = Path(attributes_root) / name / EMBEDDINGS_FILE
    if not file.is_file():
        return None, None, f"none ({file} missing)"
    tables, coverage = semantic_tables(file, dataset_dir, ds)
    return tables, coverage, str(file)


def _made_for(file: str | Path, dataset_dir: str | Path) -> bool:
    """Whether the enrichment that wrote `file` (an item_embeddings.arrow or its directory) read exactly the
    items.arrow of `dataset_dir` (its run.json records that file's SHA-256)."""
    import hashlib
    import json

    path = Path(file)
    run = (path if path.is_dir() else path.parent) / "run.json"
    items = Path(dataset_dir) / "items.arrow"
    if not (run.is_file() and items.is_file()):
        return False
    try:
        recorded = json.loads(run.read_text(encoding="utf-8")).get("items_sha256")
    except (OSError, ValueError):
        return False
    return recorded == hashlib.sha256(items.read_bytes()).hexdigest()


def semantic_tables(file: str | Path, dataset_dir: str | Path, ds: Any) -> tuple[Any, dict[str, Any]]:
    """(semantic tables, coverage) of the dataset prepared at `dataset_dir` from an item_embeddings.arrow (or
    the enrichment directory holding it). Made for that dataset (its run.json names that items.arrow, or the
    dataset is no subset): read by its ids; else, for a subset, made for its full dataset: the subset's
    item_map.arrow maps the ids (a subset's own item ids are also valid ids of the full dataset, so the two
    cannot be told apart from the vectors alone)."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.model.semantic import load_semantic
    from fedscope_jax.utils.io import read_arrow

    map_file = Path(dataset_dir) / ITEM_MAP_FILE
    if not map_file.is_file() or _made_for(file, dataset_dir):
        return load_semantic(file, ds.domains, ds.n_items)
    source = load_dataset(ds.meta["subset"]["source"])
    tables, _ = load_semantic(file, source.domains, source.n_items)
    imap = read_arrow(map_file)
    mdom, msrc = imap["domain"].to_numpy(), imap["source_item_id"].to_numpy()
    out, coverage = [], {}
    for d, name_d in enumerate(ds.domains):
        src_ids = msrc[mdom == d]
        rows = np.concatenate([[0], src_ids + 1])   # shifted ids; row 0 is padding
        table = {k: v[rows] for k, v in tables[d].items()}
        out.append(table)
        coverage[name_d] = {"items": int(len(src_ids)), "with_vector": int(table["mask"][1:].sum())}
    return out, coverage
