"""The public Amazon review dumps (McAuley et al.; 2014 and 2018 releases), one category per domain.

A source folder holds one review file per category and, optionally, its metadata file:

- reviews: `reviews_<Category>_5.json.gz` (2014 5-core), `reviews_<Category>.json.gz`, `<Category>_5.json.gz` or
  `<Category>.json.gz` (2018); plain `.json` / `.jsonl` work too. One JSON object per line with `reviewerID`,
  `asin`, `unixReviewTime` (unix seconds) and optionally `overall` (the rating).
- metadata: `meta_<Category>.json.gz` (or plain), one object per line with `asin` and optionally `title`,
  `categories` (2014: a list of category paths) or `category` (2018: one path). The 2014 files are Python
  literals ("loose JSON", single quotes), read with `ast.literal_eval` when a line is not strict JSON.

Domains are the review files' categories in file-name order, or those `--domains` selects (a name matches a
category case-insensitively, whole or by the starts of its words: `food` selects Grocery_and_Gourmet_Food,
`movie` selects Movies_and_TV). Filters, in order: `min_rating`; repeated reviews of an item by a user (the
earliest is kept); then, iterated until nothing changes, items with fewer than `kcore` reviews in their domain,
users with fewer than max(`kcore`, 3) reviews (3 = what leave-one-out needs) and, with `overlap_only`, users
without a review in every domain. Users are numbered by reviewerID, items by ASIN within a domain; a user's
sequence is its reviews sorted by time (ties: domain order, then file order), split leave-one-out.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from fedscope_jax.data.formats.common import (MAX_TIMESTAMP, RawDataset, leave_one_out, lines, offsets_of,
                                              parse_timestamp)
from fedscope_jax.errors import FedscopeError, at
from fedscope_jax.utils.progress import progress

NAME = "amazon"
SUFFIXES = (".json.gz", ".jsonl.gz", ".json", ".jsonl")
META_PREFIX = "meta_"
REVIEW_KEYS = ("reviewerID", "asin", "unixReviewTime")
# Interactions a user needs for the leave-one-out split (train, valid, test).
MIN_LENGTH = 3
DEFAULT_KCORE = 5
_REVIEW_SCHEMA = pa.schema([("reviewerID", pa.string()), ("asin", pa.string()), ("unixReviewTime", pa.int64()),
                            ("overall", pa.float64())])
_ASIN = re.compile(r"""["']asin["']\s*:\s*["']([^"']+)["']""")


def _stem(path: Path) -> str | None:
    """The file name without its JSON suffix, or None when it is not a JSON-lines file."""
    for suffix in SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return None


def category_of(path: Path) -> str:
    """`reviews_Grocery_and_Gourmet_Food_5.json.gz` -> `Grocery_and_Gourmet_Food` (also for meta_ files)."""
    stem = _stem(path) or path.name
    for prefix in ("reviews_", META_PREFIX):
        stem = stem.removeprefix(prefix)
    return stem.removesuffix("_5")


def _json_files(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_file() and _stem(p) is not None)


def review_files(src: Path) -> list[Path]:
    """Review files of a folder: every JSON-lines file that is not `meta_*`, in file-name order."""
    return [p for p in _json_files(src) if not p.name.startswith(META_PREFIX)]


def meta_files(src: Path) -> dict[str, Path]:
    """Lower-cased category -> its `meta_*` file."""
    return {category_of(p).lower(): p for p in _json_files(src) if p.name.startswith(META_PREFIX)}


def detect(src: Path) -> bool:
    """True when `src` holds Amazon review dumps named like the public releases (`reviews_*` / `meta_*`)."""
    return any(p.name.startswith(("reviews_", META_PREFIX)) for p in _json_files(src))


def _matches(name: str, category: str) -> bool:
    """`name` selects `category`: equal (case-insensitive) or each of its words starts a category word in order."""
    name, category = name.lower(), category.lower()
    if name == category:
        return True
    words = [w for w in re.split(r"[_\-\s&,]+", category) if w]
    wanted = [w for w in re.split(r"[_\-\s&,]+", name) if w]
    i = 0
    for w in words:
        if i < len(wanted) and w.startswith(wanted[i]):
            i += 1
    return bool(wanted) and i == len(wanted)


def select_domains(src: Path, domains: Sequence[str] | None) -> list[tuple[str, Path]]:
    """(domain name, review file) per domain, A first."""
    files = review_files(src)
    if not files:
        raise FedscopeError(f"{src}: no review files (expected reviews_<Category>_5.json.gz or <Category>.json "
                            "with one review object per line)")
    if not domains:
        return [(category_of(p), p) for p in files]
    if len(set(d.lower() for d in domains)) != len(domains) or not all(domains):
        raise FedscopeError(f"--domains: expected distinct non-empty names, got {list(domains)}")
    chosen = []
    for name in domains:
        hits = [p for p in files if _matches(name, category_of(p))]
        if len(hits) != 1:
            what = "no review file" if not hits else f"{len(hits)} review files ({', '.join(p.name for p in hits)})"
            raise FedscopeError(f"--domains {name}: matches {what} in {src}; expected exactly one of "
                                f"{[category_of(p) for p in files]}")
        chosen.append((name, hits[0]))
    if len({p for _, p in chosen}) != len(chosen):
        raise FedscopeError(f"--domains {','.join(domains)}: two names select the same review file")
    return chosen


def _object(line: str, path: Path, n: int, expected: str) -> dict[str, Any]:
    """One JSON object per line; Python-literal ("loose JSON", 2014 metadata) lines are accepted too."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        try:
            obj = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise at(path, n, f"invalid JSON ({exc.msg}, column {exc.colno}); expected {expected}") from None
    if not isinstance(obj, dict):
        raise at(path, n, f"a JSON {type(obj).__name__}; expected {expected}")
    return obj


def _read_reviews_slow(path: Path, min_rating: float | None) -> tuple[list[str], list[str], list[int], int]:
    """(reviewerID, asin, timestamp) per kept review, line by line: loose JSON, exact line-numbered errors."""
    expected = "one review object per line with reviewerID, asin, unixReviewTime"
    u_out, a_out, t_out = [], [], []
    dropped = 0
    for n, line in progress(lines(path, expected), desc=f"read {path.name}", unit=" reviews"):
        obj = _object(line, path, n, expected)
        missing = [k for k in REVIEW_KEYS if k not in obj]
        if missing:
            raise at(path, n, f"review has no {missing[0]!r}; expected keys {', '.join(REVIEW_KEYS)}")
        user, asin = obj["reviewerID"], obj["asin"]
        if not isinstance(user, str) or not user or not isinstance(asin, str) or not asin:
            raise at(path, n, f"reviewerID {user!r} / asin {asin!r}; expected non-empty strings")
        stamp = obj["unixReviewTime"]
        ts = parse_timestamp(stamp if isinstance(stamp, (int, str)) and not isinstance(stamp, bool) else repr(stamp),
                             path, n)
        if min_rating is not None:
            rating = obj.get("overall")
            try:
                rating = float(rating)
            except (TypeError, ValueError):
                raise at(path, n, f"'overall' is {rating!r}; expected a numeric rating (--min-rating)") from None
            if rating < min_rating:
                dropped += 1
                continue
        u_out.append(user)
        a_out.append(asin)
        t_out.append(ts)
    return u_out, a_out, t_out, dropped


def read_reviews_fast(path: Path, min_rating: float | None) -> tuple[pa.Array, pa.Array, np.ndarray, int] | None:
    """The same with Arrow's JSON reader (strict JSON, ~15x faster); None when any check fails, so that the
    line-by-line reader reports the first bad line."""
    options = pajson.ParseOptions(explicit_schema=_REVIEW_SCHEMA, unexpected_field_behavior="ignore")
    with progress(total=1, desc=f"read {path.name}", unit=" file") as bar:
        try:  # a path (not a Python file object): Arrow reads .gz itself, in its own threads
            table = pajson.read_json(str(path), parse_options=options)
        except (pa.ArrowInvalid, OSError, EOFError):
            return None
        bar.update(1)
    if table.num_rows == 0:
        return None
    for col in REVIEW_KEYS + (("overall",) if min_rating is not None else ()):
        if table[col].null_count:
            return None
    user, asin = table["reviewerID"].combine_chunks(), table["asin"].combine_chunks()
    ts = table["unixReviewTime"].to_numpy()
    if (pc.min(pc.utf8_length(user)).as_py() == 0 or pc.min(pc.utf8_length(asin)).as_py() == 0
            or ts.min() < 0 or ts.max() > MAX_TIMESTAMP):
        return None
    dropped = 0
    if min_rating is not None:
        keep = table["overall"].to_numpy() >= min_rating
        dropped = int((~keep).sum())
        user, asin, ts = user.filter(pa.array(keep)), asin.filter(pa.array(keep)), ts[keep]
    return user, asin, ts, dropped


def _read_reviews(path: Path, min_rating: float | None) -> tuple[pa.Array, pa.Array, np.ndarray, int]:
    """(reviewerID, asin, timestamp) per kept review of one file, and how many fell below min_rating."""
    fast = read_reviews_fast(path, min_rating)
    if fast is not None:
        return fast
    u, a, t, dropped = _read_reviews_slow(path, min_rating)
    return pa.array(u, pa.string()), pa.array(a, pa.string()), np.asarray(t, np.int64), dropped


def _categories(obj: dict[str, Any]) -> list[str] | None:
    """Distinct category labels in order: 2014 `categories` (list of paths) or 2018 `category` (one path)."""
    raw = obj.get("categories", obj.get("category"))
    if not isinstance(raw, list):
        return None
    flat = [c for path in raw for c in (path if isinstance(path, list) else [path])]
    return list(dict.fromkeys(str(c).strip() for c in flat if str(c).strip())) or None


def _read_meta(path: Path, wanted: set[str]) -> dict[str, tuple[str | None, list[str] | None]]:
    """asin -> (title, categories) for the ASINs in `wanted`; lines of other ASINs are skipped unparsed."""
    expected = "one metadata object per line with asin (and title, categories)"
    out: dict[str, tuple[str | None, list[str] | None]] = {}
    for n, line in progress(lines(path, expected), desc=f"read {path.name}", unit=" items"):
        quick = _ASIN.search(line)
        if quick and quick.group(1) not in wanted:
            continue  # an item the reviews do not keep: not parsed (metadata files are large)
        obj = _object(line, path, n, expected)
        asin = obj.get("asin")
        if not isinstance(asin, str):
            raise at(path, n, f"asin {asin!r}; expected {expected}")
        if asin in wanted and asin not in out:
            title = obj.get("title")
            out[asin] = (title.strip() if isinstance(title, str) and title.strip() else None, _categories(obj))
    return out


def kcore_filter(user: np.ndarray, gitem: np.ndarray, domain: np.ndarray, n_domains: int, kcore: int,
                 overlap_only: bool) -> tuple[np.ndarray, int]:
    """Keep-mask of rows after the iterated filter, and the number of passes that removed rows.

    Each pass drops, at once, rows of items with < kcore rows, of users with < max(kcore, MIN_LENGTH) rows and,
    with `overlap_only`, of users missing a domain; passes repeat until one removes nothing.
    """
    keep = np.ones(user.size, bool)
    n_users = int(user.max()) + 1 if user.size else 0
    n_items = int(gitem.max()) + 1 if gitem.size else 0
    min_user = max(kcore, MIN_LENGTH)
    passes = 0
    while True:
        u, g, d = user[keep], gitem[keep], domain[keep]
        item_ok = np.bincount(g, minlength=n_items) >= kcore
        user_ok = np.bincount(u, minlength=n_users) >= min_user
        if overlap_only:
            present = np.zeros((n_users, n_domains), bool)
            present[u, d] = True
            user_ok &= present.all(1)
        drop = ~(item_ok[g] & user_ok[u])
        if not drop.any():
            return keep, passes
        idx = np.flatnonzero(keep)
        keep[idx[drop]] = False
        passes += 1


def read(src: Path, domains: Sequence[str] | None = None, kcore: int = DEFAULT_KCORE, overlap_only: bool = False,
         min_rating: float | None = None) -> RawDataset:
    """Parses Amazon review (and metadata) files into a RawDataset: filtered, time-ordered, leave-one-out."""
    src = Path(src)
    if not src.is_dir():
        raise FedscopeError(f"{src}: not a directory (expected a folder of Amazon review files)")
    if not isinstance(kcore, int) or kcore < 0:
        raise FedscopeError(f"--kcore {kcore}: expected an integer >= 0 (0 = no k-core filter)")
    chosen = select_domains(src, domains)
    names = tuple(name for name, _ in chosen)
    metas = meta_files(src)

    reviewers, d_parts, a_parts, t_parts = [], [], [], []
    asin_of: list[np.ndarray] = []
    stats: dict[str, Any] = {"reviews": {}, "below_min_rating": {}}
    for d, (name, path) in enumerate(chosen):
        users, asins, t, dropped = _read_reviews(path, min_rating)
        if len(users) == 0:
            raise at(path, 1, f"no reviews left (after --min-rating {min_rating}); expected at least one")
        items = pc.dictionary_encode(asins)
        a_parts.append(items.indices.to_numpy().astype(np.int64))
        asin_of.append(items.dictionary.to_numpy(zero_copy_only=False))
        reviewers.append(users)
        d_parts.append(np.full(len(users), d, np.int8))
        t_parts.append(t)
        stats["reviews"][name] = len(users) + dropped
        stats["below_min_rating"][name] = dropped
    encoded = pc.dictionary_encode(pa.chunked_array(reviewers).combine_chunks())
    user = encoded.indices.to_numpy().astype(np.int64)
    reviewer = encoded.dictionary.to_numpy(zero_copy_only=False)
    domain = np.concatenate(d_parts)
    local_item = np.concatenate(a_parts)
    ts = np.concatenate(t_parts)
    item_offset = np.concatenate([[0], np.cumsum([len(a) for a in asin_of])]).astype(np.int64)
    gitem = item_offset[domain] + local_item

    # time order per user: (timestamp, domain, file row); then drop repeats of (user, item) after the first
    order = np.lexsort((np.arange(user.size), domain, ts, user))
    user, domain, gitem, ts = user[order], domain[order], gitem[order], ts[order]
    pair = user * int(item_offset[-1]) + gitem
    _, first = np.unique(pair, return_index=True)
    unique_rows = np.zeros(user.size, bool)
    unique_rows[first] = True
    stats["repeated_reviews_dropped"] = int(user.size - first.size)
    user, domain, gitem, ts = user[unique_rows], domain[unique_rows], gitem[unique_rows], ts[unique_rows]

    keep, passes = kcore_filter(user, gitem, domain, len(names), kcore, overlap_only)
    stats["filter_passes"] = passes
    stats["rows_removed_by_filters"] = int((~keep).sum())
    user, domain, gitem, ts = user[keep], domain[keep], gitem[keep], ts[keep]
    if user.size == 0:
        raise FedscopeError(f"{src}: no interactions left after the filters (--kcore {kcore}"
                            f"{', --overlap-only' if overlap_only else ''}); expected a smaller --kcore")

    # dense ids: users by reviewerID, items by ASIN within their domain
    kept_users = np.unique(user)
    by_name = kept_users[np.argsort(reviewer[kept_users].astype(str), kind="stable")]
    user_rank = np.full(reviewer.size, -1, np.int64)
    user_rank[by_name] = np.arange(by_name.size)
    source_ids, dense_of = [], np.full(int(item_offset[-1]), -1, np.int64)
    for d in range(len(names)):
        kept = np.unique(gitem[domain == d])
        asins = asin_of[d][kept - item_offset[d]].astype(str)
        by_asin = np.argsort(asins, kind="stable")
        dense_of[kept[by_asin]] = np.arange(kept.size)
        source_ids.append(tuple(asins[by_asin].tolist()))
    new_user = user_rank[user]
    regroup = np.argsort(new_user, kind="stable")  # rows stay in time order within a user
    user, domain, gitem, ts = new_user[regroup], domain[regroup], gitem[regroup], ts[regroup]
    item = dense_of[gitem].astype(np.int32)
    offsets = offsets_of(user, by_name.size)

    titles, categories, meta_used = [], [], {}
    for d, (name, path) in enumerate(chosen):
        mpath = metas.get(category_of(path).lower())
        found = _read_meta(mpath, set(source_ids[d])) if mpath else {}
        if mpath:
            meta_used[name] = mpath.name
        titles.append(tuple(found.get(a, (None, None))[0] for a in source_ids[d]))
        categories.append([found.get(a, (None, None))[1] for a in source_ids[d]])
    meta = {
        "source": {"path": str(src.resolve()), "reviews": {n: p.name for n, p in chosen}, "metadata": meta_used},
        "split_rule": "leave-one-out by review time (last: test, second-last: valid)",
        "filters": {"kcore": kcore, "min_user_interactions": max(kcore, MIN_LENGTH), "overlap_only": overlap_only,
                    "min_rating": min_rating},
        "filter_stats": stats,
    }
    extra = {"categories": tuple(categories)} if meta_used else {}
    return RawDataset(domains=names, source_ids=tuple(source_ids), titles=tuple(titles), user=user, domain=domain,
                      item=item, split=leave_one_out(offsets), timestamp=ts, item_extra=extra, meta=meta)
