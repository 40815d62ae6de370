"""C2DSR's Amazon pairs (Cao et al., CIKM 2022): Alist/Blist/userlist + valid/test (and train) sequence files.

Sequence lines are `user_idx \t seq_idx \t item|unix_ts|date| \t ...`, NOT stored in time order; like C2DSR's
loader we stable-sort each line by timestamp and take the last item as the target. Item ids below |A| are
domain A, the others domain B (id - |A|).

The split is by user: a line of validdata_new.txt is one user whose last item is a `valid` target, a line of
testdata_new.txt one whose last item is a `test` target. Their earlier items are history: `context` by default
(C2DSR trains on traindata_new.txt, which is another set of sequences), or `train` with history_split="train".
Each line of traindata_new.txt, when the file is present, becomes its own training user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fedscope_jax.data.canonical import CONTEXT, TEST, TRAIN, VALID
from fedscope_jax.data.formats.common import (RawDataset, domain_names, lines, offsets_of, parse_int,
                                              parse_timestamp, stable_time_order)
from fedscope_jax.errors import FedscopeError, at

NAME = "c2dsr"
# Items a sequence line needs: a target and at least one history item (or one training pair).
MIN_LENGTH = 2
FILES = {"train": "traindata_new.txt", "valid": "validdata_new.txt", "test": "testdata_new.txt"}


def detect(src: Path) -> bool:
    """True when `src` looks like a C2DSR data folder."""
    return (src / "Alist.txt").is_file() and (src / "Blist.txt").is_file() and (src / "userlist.txt").is_file()


def _item_list(path: Path) -> tuple[list[str], list[int]]:
    """ASINs and original ids of one domain, indexed by the 0-based item id of the third column."""
    asins: dict[int, str] = {}
    orig: dict[int, int] = {}
    for n, line in lines(path, "one line per item: `orig_id \\t ASIN \\t idx`"):
        fields = line.split("\t")
        if len(fields) != 3:
            raise at(path, n, f"expected 3 tab-separated fields (orig_id, ASIN, idx), got {len(fields)}")
        idx = parse_int(fields[2], path, n, "item index")
        if idx in asins:
            raise at(path, n, f"item index {idx} appears twice")
        asins[idx], orig[idx] = fields[1], parse_int(fields[0], path, n, "original id")
    if sorted(asins) != list(range(len(asins))):
        raise FedscopeError(f"{path}: item indices are not the dense range 0..{len(asins) - 1}")
    return [asins[i] for i in range(len(asins))], [orig[i] for i in range(len(asins))]


def _sequences(path: Path, n_items: int, kind: str) -> tuple[list[int], list[int], list[int], list[int]]:
    """(user index per line, length per line, item ids, timestamps) of one sequence file, in file order."""
    users, lengths, gid, ts = [], [], [], []
    for n, line in lines(path, "one line per user: `user_idx \\t seq_idx \\t item|ts|date| ...`"):
        fields = line.split("\t")
        if len(fields) < 3:
            raise at(path, n, f"{len(fields)} tab-separated fields; expected at least 3 "
                     "(`user_idx \\t seq_idx \\t item|ts|date| ...`)")
        users.append(parse_int(fields[0], path, n, "user index"))
        count = 0
        for tok in fields[2:]:
            tok = tok.strip()
            if not tok:
                continue
            parts = tok.split("|")
            if len(parts) < 2:
                raise at(path, n, f"token {tok[:40]!r} has 1 '|'-separated field; expected item|unix_ts|date|")
            item = parse_int(parts[0], path, n, "item id")
            if not 0 <= item < n_items:
                raise at(path, n, f"unknown item id {item}; expected 0..{n_items - 1} (Alist + Blist)")
            gid.append(item)
            ts.append(parse_timestamp(parts[1], path, n))
            count += 1
        if count < MIN_LENGTH:
            need = "a training pair" if kind == "train" else f"history and the {kind} target"
            raise at(path, n, f"sequence has {count} item{'s' * (count != 1)}; expected at least {MIN_LENGTH} "
                     f"({need})")
        lengths.append(count)
    return users, lengths, gid, ts


def read(src: Path, domains: Sequence[str] | None = None, history_split: str = "context") -> RawDataset:
    """Parses a C2DSR folder into a RawDataset (user-level valid/test split, timestamps, ASIN source ids)."""
    src = Path(src)
    if history_split not in ("context", "train"):
        raise FedscopeError(f"--history-split: expected 'context' or 'train', got {history_split!r}")
    names = domain_names(src, ("A", "B"), domains)
    asins_a, orig_a = _item_list(src / "Alist.txt")
    asins_b, orig_b = _item_list(src / "Blist.txt")
    n_a, n_b = len(asins_a), len(asins_b)
    n_listed = sum(1 for _ in lines(src / "userlist.txt"))

    present = [k for k in ("train", "valid", "test") if (src / FILES[k]).is_file()]
    for k in ("valid", "test"):
        if k not in present:
            raise FedscopeError(f"{src / FILES[k]}: file not found (C2DSR {k} sequences)")
    hist = TRAIN if history_split == "train" else CONTEXT
    # Evaluation users keep their userlist index order; each training line is a user of its own, after them.
    blocks = []  # (sort key, length, gid, ts, target split, history split)
    seen: dict[int, str] = {}
    for k in present:
        users, lengths, gid, ts = _sequences(src / FILES[k], n_a + n_b, k)
        off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for i, u in enumerate(users):
            if k != "train":
                if u in seen:
                    raise FedscopeError(f"{src / FILES[k]}: user index {u} also has a line in {seen[u]}")
                seen[u] = FILES[k]
            key = (0, u) if k != "train" else (1, i)
            blocks.append((key, lengths[i], gid[off[i]:off[i + 1]], ts[off[i]:off[i + 1]],
                           {"train": TRAIN, "valid": VALID, "test": TEST}[k], TRAIN if k == "train" else hist))
    blocks.sort(key=lambda b: b[0])
    lengths_arr = np.asarray([b[1] for b in blocks], np.int64)
    user = np.repeat(np.arange(len(blocks), dtype=np.int64), lengths_arr)
    gid_arr = np.asarray([g for b in blocks for g in b[2]], np.int64)
    ts_arr = np.asarray([t for b in blocks for t in b[3]], np.int64)
    offsets = offsets_of(user, len(blocks))
    perm = stable_time_order(ts_arr, offsets)  # C2DSR's loader: stable sort by timestamp
    gid_arr, ts_arr = gid_arr[perm], ts_arr[perm]
    split = np.repeat(np.asarray([b[5] for b in blocks], np.int8), lengths_arr)
    last = offsets[1:] - 1
    split[last] = np.asarray([b[4] for b in blocks], np.int8)
    domain = (gid_arr >= n_a).astype(np.int8)
    item = np.where(domain == 0, gid_arr, gid_arr - n_a).astype(np.int32)
    missing = [FILES[k] for k in ("train",) if k not in present]
    meta = {
        "source": {"path": str(src.resolve()), "files": [FILES[k] for k in present]},
        "split_rule": ("by user: valid/test lines' last item (after a stable sort by timestamp) is the target, "
                       f"earlier items are {history_split}; train lines are training users"),
        "history_split": history_split,
        "complete": not missing,
        "missing_files": missing,
        "userlist_users": n_listed,
    }
    return RawDataset(domains=names, source_ids=(tuple(asins_a), tuple(asins_b)),
                      titles=((None,) * n_a, (None,) * n_b), user=user, domain=domain, item=item, split=split,
                      timestamp=ts_arr, item_extra={"orig_id": (orig_a, orig_b)}, meta=meta)
