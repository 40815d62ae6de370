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


def _item_list(path: Path, global_start: int = 0) -> tuple[list[str], list[int], int]:
    """ASINs and original ids of one domain, indexed by the item id of the third column, and where those ids
    start: 0 (C2DSR's own lists), or `global_start` (> 0) for a B list whose ids are already the global
    sequence ids (offset by |A|, a variant of later papers)."""
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
    count, start = len(asins), min(asins, default=0)
    starts = (0, global_start) if global_start else (0,)
    if start not in starts or sorted(asins) != list(range(start, start + count)):
        expected = " or ".join(f"{s}..{s + count - 1}" for s in starts)
        also = f" (global ids: |A| + index, from {global_start})" if global_start else ""
        raise FedscopeError(f"{path}: item indices are not the dense range {expected}{also}; they run "
                            f"{start}..{max(asins, default=0)} over {count} lines")
    return [asins[start + i] for i in range(count)], [orig[start + i] for i in range(count)], start


def _sequences(path: Path, n_items: int, kind: str
               ) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """(user index per line, length per line, item ids, second fields, line numbers) of one sequence file, in
    file order; the second fields are unix timestamps or, in a variant, positions (`_positions`)."""
    users, lengths, gid, ts, lines_at = [], [], [], [], []
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
            ts.append(parse_int(parts[1], path, n, "timestamp"))   # or a position: checked per dataset in read
            count += 1
        if count < MIN_LENGTH:
            need = "a training pair" if kind == "train" else f"history and the {kind} target"
            raise at(path, n, f"sequence has {count} item{'s' * (count != 1)}; expected at least {MIN_LENGTH} "
                     f"({need})")
        lengths.append(count)
        lines_at.append(n)
    return users, lengths, gid, ts, lines_at


def _positions(lengths: Sequence[int], ts: Sequence[int]) -> bool:
    """Whether every line's second fields are positions (a permutation of 0..L-1 or of 1..L) rather than unix
    timestamps (a variant of later papers; no real timestamps are that small)."""
    start = 0
    for n in lengths:
        got = sorted(ts[start:start + n])
        start += n
        if got != list(range(n)) and got != list(range(1, n + 1)):
            return False
    return True


def _check_timestamps(path: Path, lengths: Sequence[int], ts: Sequence[int], lines_at: Sequence[int]) -> None:
    """Every second field of a file read as unix seconds is one (the error names the line)."""
    start = 0
    for n, line in zip(lengths, lines_at):
        for t in ts[start:start + n]:
            parse_timestamp(str(t), path, line)
        start += n


def read(src: Path, domains: Sequence[str] | None = None, history_split: str = "context") -> RawDataset:
    """Parses a C2DSR folder into a RawDataset (user-level valid/test split, timestamps, ASIN source ids)."""
    src = Path(src)
    if history_split not in ("context", "train"):
        raise FedscopeError(f"--history-split: expected 'context' or 'train', got {history_split!r}")
    names = domain_names(src, ("A", "B"), domains)
    asins_a, orig_a, _ = _item_list(src / "Alist.txt")
    asins_b, orig_b, b_start = _item_list(src / "Blist.txt", global_start=len(asins_a))
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
    read_files = {k: _sequences(src / FILES[k], n_a + n_b, k) for k in present}
    positions = all(_positions(r[1], r[3]) for r in read_files.values())
    if not positions:
        for k, (_, lengths, _, ts, lines_at) in read_files.items():
            _check_timestamps(src / FILES[k], lengths, ts, lines_at)
    for k in present:
        users, lengths, gid, ts, lines_at = read_files[k]
        off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        for i, u in enumerate(users):
            if k != "train":
                if u in seen:
                    raise FedscopeError(_held_out_twice(src, FILES[k], u, lines_at[i], seen[u], positions))
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
        # layouts of later papers' copies, detected without guessing (docs/data.md, "C2DSR variants")
        "variants": (["b_ids_global"] if b_start else []) + (["positions"] if positions else []),
    }
    return RawDataset(domains=names, source_ids=(tuple(asins_a), tuple(asins_b)),
                      titles=((None,) * n_a, (None,) * n_b), user=user, domain=domain, item=item, split=split,
                      timestamp=None if positions else ts_arr, item_extra={"orig_id": (orig_a, orig_b)}, meta=meta)


# The one command that turns a C2DSR-layout folder into the `csv` format (run inside the folder, then
# `fedscope data prepare DIR --format csv`): every valid/test line's interactions under its user index, each
# (user, item, timestamp) once; the csv format then splits each user leave-one-out (not the published targets).
CSV_COMMAND = ("awk -F'\\t' -v na=$(grep -c '[^[:space:]]' Alist.txt) 'BEGIN{print \"user,domain,item,timestamp\"} "
               "{for(i=3;i<=NF;i++){split($i,t,\"|\"); k=$1 SUBSEP t[1] SUBSEP t[2]; "
               "if(t[1]!=\"\" && !(k in s)){s[k]=1; print $1\",\"(t[1]+0<na?\"A\":\"B\")\",\"t[1]\",\"t[2]}}}' "
               "validdata_new.txt testdata_new.txt > interactions.csv")


def _held_out_twice(src: Path, name: str, user: int, line: int, first: str, positions: bool) -> str:
    """The error for a user index with two held-out lines: the variant with one line per target domain (in
    one file), or a user in both files. Which line's history is whose is not in the data, so it is refused."""
    where = f"{src / name}:{line}: user index {user} also has a line in {first}"
    if first == name:
        where += (": the variant with one held-out line per target domain for the same user (later papers' "
                  "copies). How its lines' histories combine is not in the data, so it is not read as C2DSR")
    if positions:   # positions of two lines cannot be merged into one order: no command can convert it
        return (f"{where}. Its tokens hold positions, not timestamps, so the lines cannot be merged into one "
                "sequence either; give each user one line (docs/data.md, 'C2DSR variants')")
    return (f"{where}. Convert the folder to the csv format (one sequence per user, split leave-one-out, "
            f"not the published targets) inside it with: {CSV_COMMAND} ; then fedscope data prepare "
            f"{src} --format csv (docs/data.md, 'C2DSR variants')")
