"""MovieLens CSV releases (ml-latest-small and alike): ratings.csv + movies.csv, one domain.

Every rating is an interaction; a user's sequence is their ratings stable-sorted by timestamp (ties in file
order), split leave-one-out (last: test, second-last: valid). Items are numbered in movies.csv order; the
movieId is the source id and `genres` is kept as an item column.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from fedscope_jax.data.formats.common import (RawDataset, first_non_utf8, leave_one_out, offsets_of,
                                              stable_time_order)
from fedscope_jax.errors import FedscopeError, at

NAME = "movielens"


def detect(src: Path) -> bool:
    """True when `src` looks like a MovieLens CSV release."""
    return (src / "ratings.csv").is_file() and (src / "movies.csv").is_file()


def _csv_rows(path: Path, columns: Sequence[str]):
    if not path.is_file():
        raise FedscopeError(f"{path}: file not found")
    first_non_utf8(path)  # names the first line that is not UTF-8, or an empty file
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:len(columns)]] != list(columns):
            raise at(path, 1, f"header {header!r}; expected it to start with {list(columns)}")
        for row in reader:
            if row:
                yield reader.line_num, row


def read(src: Path, domains: Sequence[str] | None = None, min_rating: float | None = None) -> RawDataset:
    """Parses a MovieLens folder into a one-domain RawDataset. `min_rating` keeps only ratings >= it."""
    src = Path(src)
    name = tuple(domains) if domains else ("movie",)
    if len(name) != 1 or not name[0]:
        raise FedscopeError(f"--domains: MovieLens has one domain; got {list(name)}")
    movies = src / "movies.csv"
    index: dict[int, int] = {}
    source_ids, titles, genres = [], [], []
    for n, row in _csv_rows(movies, ("movieId", "title", "genres")):
        if len(row) != 3:
            raise at(movies, n, f"expected 3 fields (movieId,title,genres), got {len(row)}")
        try:
            mid = int(row[0])
        except ValueError:
            raise at(movies, n, f"movieId {row[0]!r} is not an integer") from None
        if mid in index:
            raise at(movies, n, f"movieId {mid} repeated")
        index[mid] = len(source_ids)
        source_ids.append(row[0])
        titles.append(row[1].strip() or None)
        genres.append(row[2])

    ratings = src / "ratings.csv"
    users, items, stamps = [], [], []
    kept = dropped = 0
    for n, row in _csv_rows(ratings, ("userId", "movieId", "rating", "timestamp")):
        if len(row) != 4:
            raise at(ratings, n, f"expected 4 fields (userId,movieId,rating,timestamp), got {len(row)}")
        try:
            u, m, r, t = int(row[0]), int(row[1]), float(row[2]), int(row[3])
        except ValueError:
            raise at(ratings, n, f"row {row!r}: expected integer ids, a numeric rating and an integer "
                     "timestamp") from None
        if m not in index:
            raise at(ratings, n, f"movieId {m} not in {movies.name}")
        if min_rating is not None and r < min_rating:
            dropped += 1
            continue
        users.append(u)
        items.append(index[m])
        stamps.append(t)
        kept += 1
    src_user = np.asarray(users, np.int64)
    uniq, dense = np.unique(src_user, return_inverse=True)
    order = np.argsort(dense, kind="stable")  # group by user, file order within a user
    user = dense[order].astype(np.int64)
    item = np.asarray(items, np.int32)[order]
    ts = np.asarray(stamps, np.int64)[order]
    offsets = offsets_of(user, uniq.size)
    perm = stable_time_order(ts, offsets)
    item, ts = item[perm], ts[perm]
    meta = {
        "source": {"path": str(src.resolve()), "files": ["ratings.csv", "movies.csv"]},
        "split_rule": "leave-one-out by timestamp (last: test, second-last: valid)",
        "min_rating": min_rating,
        "ratings_dropped_below_min": dropped,
    }
    return RawDataset(domains=name, source_ids=(tuple(source_ids),), titles=(tuple(titles),), user=user,
                      domain=np.zeros(user.size, np.int8), item=item, split=leave_one_out(offsets), timestamp=ts,
                      item_extra={"genres": (genres,)}, meta=meta)
