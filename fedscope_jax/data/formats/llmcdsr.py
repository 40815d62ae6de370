"""LLMCDSR's Amazon pairs (Xin et al., TOIS 2025): num.txt, items_{A,B}.jsonl and sequence files.

Sequence files hold `row_id \t id,id,...` in chronological order, no timestamps; ids below |A| are domain A,
the others domain B (id - |A|). Every row of every file is a separate user (row ids are not shared):
- train_overlap.txt (both domains), train_A.txt (A only), train_B.txt (B only): all `train`;
- valid.txt / test.txt: held-out overlapped users; last item is the `valid` / `test` target, earlier items
  `context` (history only), as in LLMCDSR's evaluation.
Users are numbered in that file order; dataset.json records each file's user range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from fedscope_jax.data.canonical import CONTEXT, TEST, TRAIN, VALID
from fedscope_jax.data.formats.common import (RawDataset, domain_names, last_as_target, lines, parse_int,
                                              read_json_lines)
from fedscope_jax.errors import FedscopeError, at

NAME = "llmcdsr"
# Items a row needs: a target and at least one history item (or one training pair).
MIN_LENGTH = 2
# Sequence files in user-numbering order, and whether the file may be absent (partial snapshots).
SEQUENCE_FILES = ("train_overlap.txt", "train_A.txt", "train_B.txt", "valid.txt", "test.txt")
REQUIRED = ("train_overlap.txt", "valid.txt", "test.txt")
INSTANCE_ORDER = ("train_A.txt", "train_B.txt", "train_overlap.txt")  # rows listed in instance_num.txt


def detect(src: Path) -> bool:
    """True when `src` looks like an LLMCDSR data folder."""
    return (src / "num.txt").is_file() and (src / "items_A.jsonl").is_file()


def _ints_file(path: Path) -> list[int]:
    return [parse_int(line.strip(), path, n, "count") for n, line in lines(path, "one integer count per line")]


def _items(path: Path, n: int, first_file_id: int) -> tuple[list[str], list[str | None]]:
    """ASINs and titles of one domain from items_X.jsonl, checked against num.txt and the file ids."""
    rows = read_json_lines(path)
    asins: list[str | None] = [None] * n
    titles: list[str | None] = [None] * n
    for line, row in enumerate(rows, 1):
        local, file_id, asin = row.get("local_id"), row.get("file_id"), row.get("asin")
        if not isinstance(local, int) or not 0 <= local < n:
            raise at(path, line, f"local_id {local!r} outside 0..{n - 1} (num.txt)")
        if file_id != first_file_id + local:
            raise at(path, line, f"file_id {file_id!r}; expected {first_file_id + local} (local_id + offset)")
        if not isinstance(asin, str) or asins[local] is not None:
            raise at(path, line, f"asin {asin!r} missing or local_id {local} repeated")
        title = row.get("title")
        asins[local] = asin
        titles[local] = title.strip() if isinstance(title, str) and title.strip() else None
    if any(a is None for a in asins):
        raise FedscopeError(f"{path}: {sum(a is None for a in asins)} of {n} items missing (num.txt says {n})")
    return asins, titles  # type: ignore[return-value]


def _sequences(path: Path, n_items: int) -> tuple[list[int], list[int]]:
    lengths, gid = [], []
    for n, line in lines(path, "one line per user: `row_id \\t id,id,...`"):
        fields = line.split("\t")
        if len(fields) != 2:
            raise at(path, n, f"{len(fields)} tab-separated fields; expected 2 (`row_id \\t id,id,...`)")
        ids = [parse_int(t, path, n, "item id") for t in fields[1].split(",") if t.strip()]
        if len(ids) < MIN_LENGTH:
            raise at(path, n, f"sequence has {len(ids)} item{'s' * (len(ids) != 1)}; expected at least "
                     f"{MIN_LENGTH} (history and a target, or a training pair)")
        bad = [i for i in ids if not 0 <= i < n_items]
        if bad:
            raise at(path, n, f"unknown item id {bad[0]}; expected 0..{n_items - 1} (num.txt: |A| + |B|)")
        lengths.append(len(ids))
        gid.extend(ids)
    return lengths, gid


def read(src: Path, domains: Sequence[str] | None = None) -> RawDataset:
    """Parses an LLMCDSR folder into a RawDataset (titles included, order-only sequences)."""
    src = Path(src)
    names = domain_names(src, ("A", "B"), domains)
    counts = _ints_file(src / "num.txt")
    if len(counts) != 2:
        raise FedscopeError(f"{src / 'num.txt'}: expected two lines (|A| and |B|), got {len(counts)}")
    n_a, n_b = counts
    asins_a, titles_a = _items(src / "items_A.jsonl", n_a, 0)
    asins_b, titles_b = _items(src / "items_B.jsonl", n_b, n_a)
    expected_rows = {}
    if (src / "instance_num.txt").is_file():
        raw = (src / "instance_num.txt").read_text(encoding="utf-8").replace("/", " ").split()
        expected_rows = {f: parse_int(t, src / "instance_num.txt", 1, "row count")
                         for f, t in zip(INSTANCE_ORDER, raw)}

    lengths: list[int] = []
    gid: list[int] = []
    split_parts: list[np.ndarray] = []
    ranges: dict[str, list[int]] = {}
    missing = []
    for fname in SEQUENCE_FILES:
        path = src / fname
        if not path.is_file():
            if fname in REQUIRED:
                raise FedscopeError(f"{path}: file not found (LLMCDSR sequences)")
            missing.append(fname)
            continue
        ls, g = _sequences(path, n_a + n_b)
        if fname in expected_rows and expected_rows[fname] != len(ls):
            raise FedscopeError(f"{path}: {len(ls)} rows but instance_num.txt says {expected_rows[fname]}")
        ranges[fname.removesuffix(".txt")] = [len(lengths), len(lengths) + len(ls)]
        target = {"valid.txt": VALID, "test.txt": TEST}.get(fname)
        file_offsets = np.concatenate([[0], np.cumsum(ls)]).astype(np.int64)
        split_parts.append(np.full(int(file_offsets[-1]), TRAIN, np.int8) if target is None
                           else last_as_target(file_offsets, target, history=CONTEXT))
        lengths.extend(ls)
        gid.extend(g)

    gid_arr = np.asarray(gid, np.int64)
    user = np.repeat(np.arange(len(lengths), dtype=np.int64), np.asarray(lengths, np.int64))
    domain = (gid_arr >= n_a).astype(np.int8)
    item = np.where(domain == 0, gid_arr, gid_arr - n_a).astype(np.int32)
    meta = {
        "source": {"path": str(src.resolve()), "files": [f for f in SEQUENCE_FILES if f not in missing]},
        "split_rule": ("train_* rows are training users; valid/test rows are held-out users whose last item is "
                       "the target and earlier items context"),
        "user_ranges": ranges,
        "complete": not missing,
        "missing_files": missing,
    }
    return RawDataset(domains=names, source_ids=(tuple(asins_a), tuple(asins_b)),
                      titles=(tuple(titles_a), tuple(titles_b)), user=user, domain=domain, item=item,
                      split=np.concatenate(split_parts) if split_parts else np.zeros(0, np.int8),
                      timestamp=None, meta=meta)
