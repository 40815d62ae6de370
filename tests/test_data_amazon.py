"""The `amazon` format: review dumps (gzip and plain, strict and loose JSON), metadata, filters, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.cli import main
from fedscope_jax.data.canonical import TEST, TRAIN, VALID, load_dataset
from fedscope_jax.data.formats import detect_format, prepare
from fedscope_jax.data.formats.amazon import kcore_filter, select_domains
from fedscope_jax.errors import FedscopeError

FOOD = "reviews_Grocery_and_Gourmet_Food_5.json.gz"
KITCHEN = "reviews_Home_and_Kitchen_5.json"


def _review(user: str, asin: str, ts: int, rating: float = 5.0) -> dict:
    return {"reviewerID": user, "asin": asin, "reviewerName": "x", "overall": rating, "unixReviewTime": ts,
            "reviewTime": "01 1, 2014", "summary": "ok"}


def _write_lines(path: Path, rows: list, loose: bool = False) -> None:
    text = "".join((repr(r) if loose else json.dumps(r)) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def _folder(tmp_path: Path, food: list, kitchen: list, meta: bool = True) -> Path:
    src = tmp_path / "amz"
    src.mkdir()
    _write_lines(src / FOOD, food)
    _write_lines(src / KITCHEN, kitchen)
    if meta:
        # 2014 metadata is "loose JSON" (Python literals, single quotes)
        _write_lines(src / "meta_Grocery_and_Gourmet_Food.json.gz", [
            {"asin": "F1", "title": "Green tea", "categories": [["Grocery", "Tea"], ["Grocery", "Drinks"]]},
            {"asin": "F9", "title": "never reviewed"},
            {"asin": "F2", "categories": [["Grocery"]]},
        ], loose=True)
        _write_lines(src / "meta_Home_and_Kitchen.json", [{"asin": "K1", "title": "Kettle", "category": ["Home"]}])
    return src


# Hand-made k-core case (k = 3) that needs four passes to settle (see test_kcore_iterates):
#   pass 1 drops item F3 (1 review); u4 falls to 2 reviews; pass 2 drops u4; item K2 falls to 2 reviews;
#   pass 3 drops K2; u5 falls to 2 reviews; pass 4 drops u5; then nothing changes.
KCORE_FOOD = [
    _review("u1", "F1", 10), _review("u1", "F2", 20),
    _review("u2", "F1", 10), _review("u2", "F2", 20),
    _review("u3", "F1", 10), _review("u3", "F2", 20),
    _review("u4", "F2", 10), _review("u4", "F3", 20),
    _review("u5", "F1", 10),
    _review("u6", "F1", 20), _review("u6", "F2", 30),
]
KCORE_KITCHEN = [
    _review("u1", "K1", 30), _review("u2", "K1", 30), _review("u3", "K1", 5),
    _review("u4", "K2", 30),
    _review("u5", "K1", 20), _review("u5", "K2", 30),
    _review("u6", "K2", 10), _review("u6", "K1", 40),
]


def test_kcore_iterates_to_a_fixed_point(tmp_path):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN)
    assert detect_format(src) == "amazon"
    meta = prepare(src, tmp_path / "out", kcore=3, domains=["food", "kitchen"])
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("food", "kitchen") and ds.n_items == (2, 1)
    assert ds.items["source_id"].to_pylist() == ["F1", "F2", "K1"]
    assert ds.n_users == 4 and meta["filter_stats"]["filter_passes"] == 4
    assert meta["filter_stats"]["rows_removed_by_filters"] == 7     # F3, u4's F2 + K2, u6's K2, u5's F1 + K1 + K2
    # users by reviewerID: u1 u2 u3 u6; u3's kitchen review is its earliest
    np.testing.assert_array_equal(ds.user, [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(ds.domain, [0, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0, 1])
    np.testing.assert_array_equal(ds.item, [0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(ds.timestamp, [10, 20, 30, 10, 20, 30, 5, 10, 20, 20, 30, 40])
    np.testing.assert_array_equal(ds.split, [TRAIN, VALID, TEST] * 4)
    # without the k-core only the 3-interaction minimum of leave-one-out applies: u4 (F2 F3 K2) stays
    prepare(src, tmp_path / "all", kcore=0)
    assert load_dataset(tmp_path / "all").n_users == 6


def test_kcore_filter_can_cascade_to_nothing():
    user = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    item = np.array([0, 1, 2, 0, 1, 2, 0, 1, 3, 3, 0])
    keep, passes = kcore_filter(user, item, np.zeros(11, np.int8), 1, kcore=3, overlap_only=False)
    # pass 1 drops items 2 and 3 (2 rows each) and user 3 (2 rows): users 0-2 are left with 2 rows each,
    # so pass 2 drops them all
    assert not keep.any() and passes == 2
    keep, passes = kcore_filter(user, item, np.zeros(11, np.int8), 1, kcore=2, overlap_only=False)
    # users need max(kcore, 3) = 3 rows: pass 1 drops user 3, leaving item 3 with 1 row; pass 2 drops it,
    # leaving user 2 with 2 rows; pass 3 drops user 2; items 0-2 keep 2 rows each
    np.testing.assert_array_equal(keep, user <= 1)
    assert passes == 3


def test_titles_categories_gzip_and_loose_json(tmp_path):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN)
    meta = prepare(src, tmp_path / "out", kcore=3, domains=["food", "kitchen"])
    ds = load_dataset(tmp_path / "out")
    assert ds.items["title"].to_pylist() == ["Green tea", None, "Kettle"]
    assert ds.items["categories"].to_pylist() == [["Grocery", "Tea", "Drinks"], ["Grocery"], ["Home"]]
    assert meta["source"]["metadata"] == {"food": "meta_Grocery_and_Gourmet_Food.json.gz",
                                          "kitchen": "meta_Home_and_Kitchen.json"}
    # F1 has a title (4 of the 12 interactions), K1 too (4), F2 not
    assert meta["titles"]["interactions_with_title"] == 8


def test_domains_from_file_names_and_selection(tmp_path):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN, meta=False)
    (src / "reviews_Movies_and_TV_5.json").write_text(json.dumps(_review("u1", "M1", 1)) + "\n")
    assert [n for n, _ in select_domains(src, None)] == ["Grocery_and_Gourmet_Food", "Home_and_Kitchen",
                                                         "Movies_and_TV"]
    assert [p.name for _, p in select_domains(src, ["kitchen", "food"])] == [KITCHEN, FOOD]
    assert [p.name for _, p in select_domains(src, ["movie"])] == ["reviews_Movies_and_TV_5.json"]
    with pytest.raises(FedscopeError, match=r"--domains and: matches 3 review files"):
        select_domains(src, ["and"])
    with pytest.raises(FedscopeError, match=r"--domains book: matches no review file"):
        select_domains(src, ["book"])


def test_overlap_only_and_min_rating(tmp_path):
    food = [_review("a", "F1", 1), _review("a", "F2", 2), _review("a", "F3", 3),          # food only
            _review("b", "F1", 1), _review("b", "F2", 2, rating=2.0), _review("b", "F1", 9)]   # repeat of F1
    kitchen = [_review("b", "K1", 3), _review("b", "K2", 4)]
    src = _folder(tmp_path, food, kitchen, meta=False)
    meta = prepare(src, tmp_path / "o1", kcore=0, domains=["food", "kitchen"])
    assert meta["users"] == 2 and meta["overlap_users"] == 1
    assert meta["filter_stats"]["repeated_reviews_dropped"] == 1
    meta = prepare(src, tmp_path / "o2", kcore=0, overlap_only=True, domains=["food", "kitchen"])
    assert meta["users"] == 1 and meta["overlap_users"] == 1 and meta["interactions"] == 4
    # b without its 2-star review keeps F1 K1 K2
    meta = prepare(src, tmp_path / "o3", kcore=0, overlap_only=True, min_rating=4, domains=["food", "kitchen"])
    assert meta["interactions"] == 3 and meta["filter_stats"]["below_min_rating"] == {"food": 1, "kitchen": 0}
    with pytest.raises(FedscopeError, match=r"no interactions left after the filters \(--kcore 5"):
        prepare(src, tmp_path / "o4", domains=["food", "kitchen"])


@pytest.mark.parametrize("line,message", [
    ('{"reviewerID": "u", "asin": "F1"}', r"_5.json:2: review has no 'unixReviewTime'"),
    ('{"reviewerID": "u", "asin": "F1", "unixReviewTime": "01 2, 2014"}', r"_5.json:2: bad timestamp '01 2, 2014'"),
    ('{"reviewerID": "u", "asin": "F1", "unixReviewTime": 1388534400000}', r"_5.json:2: bad timestamp"),
    ('{"reviewerID": "u", "asin": ', r"_5.json:2: invalid JSON .*expected one review object per line"),
    ('["u", "F1", 5]', r"_5.json:2: a JSON list; expected one review object"),
])
def test_bad_review_lines_name_file_and_line(tmp_path, line, message):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN, meta=False)
    (src / KITCHEN).write_text(json.dumps(_review("u1", "K1", 1)) + "\n" + line + "\n")
    with pytest.raises(FedscopeError, match=message):
        prepare(src, tmp_path / "out")


def test_cli_prepare_amazon_with_flags(tmp_path, capsys):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN)
    out = tmp_path / "out"
    assert main(["data", "prepare", "--format", "amazon", "--input", str(src), "--output", str(out),
                 "--domains", "food,kitchen", "--kcore", "3", "--overlap-only"]) == 0
    assert "users 4  interactions 12" in capsys.readouterr().out
    assert main(["data", "prepare", "--format", "amazon", "--input", str(src), "--output", str(out),
                 "--kcore", "3"]) == 2
    assert "output exists; pass --force" in capsys.readouterr().err
    assert main(["data", "prepare", "--format", "abxi", "--input", str(src), "--output", str(tmp_path / "x"),
                 "--kcore", "3"]) == 2
    assert "--kcore does not apply to format 'abxi'" in capsys.readouterr().err


def test_arrow_fast_path_and_line_reader_agree(tmp_path):
    """Strict JSON goes through Arrow's reader; loose JSON (Python literals) line by line: same dataset."""
    from fedscope_jax.data.formats.amazon import read_reviews_fast

    (tmp_path / "s").mkdir()
    strict = _folder(tmp_path / "s", KCORE_FOOD, KCORE_KITCHEN, meta=False)
    loose = tmp_path / "l" / "amz"
    loose.mkdir(parents=True)
    _write_lines(loose / FOOD, KCORE_FOOD, loose=True)
    _write_lines(loose / KITCHEN, KCORE_KITCHEN, loose=True)
    assert read_reviews_fast(strict / FOOD, None) is not None and read_reviews_fast(loose / FOOD, None) is None
    for src, out in ((strict, tmp_path / "a"), (loose, tmp_path / "b")):
        prepare(src, out, kcore=3, min_rating=1.0)
    a, b = load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b")
    for name in ("user", "domain", "item", "timestamp", "split"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.items["source_id"].to_pylist() == b.items["source_id"].to_pylist()


def test_empty_and_non_utf8_review_files(tmp_path):
    src = _folder(tmp_path, KCORE_FOOD, KCORE_KITCHEN, meta=False)
    with gzip.open(src / FOOD, "wb") as f:
        f.write(json.dumps(_review("u1", "F1", 1)).encode() + b"\n" + b'{"reviewerID": "u\xff2"}\n')
    with pytest.raises(FedscopeError, match=r"_Food_5.json.gz:2: byte 0xff at column 18 is not valid UTF-8"):
        prepare(src, tmp_path / "out")
    with gzip.open(src / FOOD, "wb") as f:
        f.write(b"\n")
    with pytest.raises(FedscopeError, match=r"_Food_5.json.gz:1: file is empty; expected one review object"):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
