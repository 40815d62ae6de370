"""ABXI's preprocessed Amazon pairs (Bian et al., WWW 2025): `<tag>_50_preprocessed.txt` + `map_item_50.txt`.

Each line is `user_idx item|unix_ts item|unix_ts ...` in time order; item ids are 1..|A| for domain A and
|A|+1..|A|+|B| for domain B (0 is ABXI's padding). The split is ABXI's leave-one-out on the mixed sequence:
last -> test, second-last -> valid, the rest train.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from fedscope_jax.data.formats.common import (RawDataset, domain_names, first_non_utf8, leave_one_out, lines,
                                              offsets_of, parse_int, parse_timestamp, stable_time_order)
from fedscope_jax.errors import FedscopeError, at

NAME = "abxi"
# ABXI's dataset tags and the domains they pair (A first).
KNOWN_TAGS = {"afk": ("food", "kitchen"), "abe": ("beauty", "electronics"), "amb": ("movie", "book")}
ITEM_MAP = "map_item_50.txt"
# Interactions a user needs for the leave-one-out split (train, valid, test).
MIN_LENGTH = 3


def detect(src: Path) -> bool:
    """True when `src` looks like an ABXI data folder."""
    return (src / ITEM_MAP).is_file() and any(src.glob("*_preprocessed.txt"))


def _sequence_file(src: Path) -> Path:
    found = sorted(src.glob("*_preprocessed.txt"))
    if len(found) != 1:
        raise FedscopeError(f"{src}: expected exactly one *_preprocessed.txt (ABXI sequences), found {len(found)}")
    return found[0]


def _item_map(path: Path) -> tuple[list[str], list[str]]:
    """ASINs of domain A and B items, indexed by 0-based local id."""
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found (ABXI item map)")
    first_non_utf8(path)  # also rejects an empty file, naming the line
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise at(path, exc.lineno, f"invalid JSON ({exc.msg}, column {exc.colno}); expected one object "
                 "{ASIN: [item_id, domain], ...}") from None
    if not isinstance(mapping, dict):
        raise FedscopeError(f"{path}: expected an object {{ASIN: [item_id, domain]}}")
    by_domain: list[dict[int, str]] = [{}, {}]
    for asin, value in mapping.items():
        if (not isinstance(value, list) or len(value) != 2 or value[1] not in (0, 1)
                or not isinstance(value[0], int)):
            raise FedscopeError(f"{path}: entry {asin!r} is {value!r}; expected [item_id, 0 or 1]")
        by_domain[value[1]][value[0]] = asin
    n_a = len(by_domain[0])
    out = []
    for d, (lo, ids) in enumerate(((1, by_domain[0]), (n_a + 1, by_domain[1]))):
        expected = range(lo, lo + len(ids))
        if sorted(ids) != list(expected):
            raise FedscopeError(f"{path}: domain {d} item ids are not the dense range {lo}..{lo + len(ids) - 1}")
        out.append([ids[i] for i in expected])
    return out[0], out[1]


def read(src: Path, domains: Sequence[str] | None = None) -> RawDataset:
    """Parses an ABXI folder into a RawDataset (leave-one-out split, timestamps, ASINs as source ids)."""
    src = Path(src)
    seq_path = _sequence_file(src)
    tag = seq_path.name.split("_")[0]
    names = domain_names(src, KNOWN_TAGS.get(tag, ("A", "B")), domains)
    asins_a, asins_b = _item_map(src / ITEM_MAP)
    n_a, n_b = len(asins_a), len(asins_b)

    src_user, gid, ts = [], [], []
    lengths = []
    n_all = n_a + n_b
    for n, line in lines(seq_path, "one line per user: `user item|ts item|ts ...`"):
        fields = line.split()
        src_user.append(parse_int(fields[0], seq_path, n, "user index"))
        if len(fields) - 1 < MIN_LENGTH:
            raise at(seq_path, n, f"user has {len(fields) - 1} interactions; leave-one-out needs at least "
                     f"{MIN_LENGTH} (train, valid, test) as `user item|ts item|ts ...`")
        for tok in fields[1:]:
            parts = tok.split("|")
            if len(parts) != 2:
                raise at(seq_path, n, f"token {tok[:40]!r} has {len(parts)} '|'-separated fields; "
                         "expected 2 (item|unix_ts)")
            item = parse_int(parts[0], seq_path, n, "item id")
            if not 1 <= item <= n_all:
                raise at(seq_path, n, f"unknown item id {item}; expected 1..{n_all} (the ids in {ITEM_MAP})")
            gid.append(item)
            ts.append(parse_timestamp(parts[1], seq_path, n))
        lengths.append(len(fields) - 1)

    src_user_arr = np.asarray(src_user, np.int64)
    gid_arr = np.asarray(gid, np.int64)
    ts_arr = np.asarray(ts, np.int64)
    if np.unique(src_user_arr).size != src_user_arr.size:
        raise FedscopeError(f"{seq_path}: a user index appears on more than one line")
    # Users in ascending source index; dense canonical ids by rank.
    order = np.argsort(src_user_arr, kind="stable")
    line_off = offsets_of(np.repeat(np.arange(len(lengths)), lengths), len(lengths))
    rows = np.concatenate([np.arange(line_off[i], line_off[i + 1]) for i in order]) if order.size else order
    lengths_sorted = np.asarray(lengths, np.int64)[order]
    user = np.repeat(np.arange(order.size, dtype=np.int64), lengths_sorted)
    gid_arr, ts_arr = gid_arr[rows], ts_arr[rows]
    offsets = offsets_of(user, order.size)
    # ABXI files are already in time order; a stable sort keeps them so and repairs any line that is not.
    perm = stable_time_order(ts_arr, offsets)
    resorted = int(np.unique(user[perm != np.arange(perm.size)]).size)
    gid_arr, ts_arr = gid_arr[perm], ts_arr[perm]
    domain = (gid_arr > n_a).astype(np.int8)
    item = np.where(domain == 0, gid_arr - 1, gid_arr - 1 - n_a).astype(np.int32)
    meta = {
        "source": {"path": str(src.resolve()), "sequences": seq_path.name, "abxi_tag": tag},
        "split_rule": "leave-one-out on the mixed sequence (last: test, second-last: valid)",
        "users_resorted_by_time": resorted,
    }
    return RawDataset(domains=names, source_ids=(tuple(asins_a), tuple(asins_b)),
                      titles=((None,) * n_a, (None,) * n_b), user=user, domain=domain, item=item,
                      split=leave_one_out(offsets), timestamp=ts_arr, meta=meta)
