"""Source-format readers: exact output on tiny hand-written folders, error messages, and the real datasets'
published statistics (PROVENANCE.md of each folder in ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import real_dataset
from fedscope_jax.data.canonical import CONTEXT, SPLITS, TEST, TRAIN, VALID, load_dataset
from fedscope_jax.data.formats import detect_format, prepare, read_source
from fedscope_jax.errors import FedscopeError


def _write(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _abxi(tmp_path: Path) -> Path:
    # A items 1..3, B items 4..5. User 1 is listed first in the file; user 0 has a tie on its last two stamps.
    item_map = {"a1": [1, 0], "a2": [2, 0], "a3": [3, 0], "b1": [4, 1], "b2": [5, 1]}
    return _write(tmp_path / "src-food-kitchen", {
        "afk_50_preprocessed.txt": "1 5|10 1|20 3|30\n0 1|100 4|200 2|300 5|300\n",
        "map_item_50.txt": json.dumps(item_map),
    })


def _titles(tmp_path: Path) -> Path:
    rows_a = [{"local_id": 0, "file_id": 0, "asin": "a2", "title": "Green tea"}]
    rows_b = [{"local_id": 0, "file_id": 1, "asin": "b2", "title": "Kettle"}]
    return _write(tmp_path / "titles", {"items_A.jsonl": "\n".join(json.dumps(r) for r in rows_a) + "\n",
                                        "items_B.jsonl": "\n".join(json.dumps(r) for r in rows_b) + "\n"})


def test_abxi_tiny_exact(tmp_path):
    src = _abxi(tmp_path)
    assert detect_format(src) == "abxi"
    meta = prepare(src, tmp_path / "out", titles=_titles(tmp_path))
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("food", "kitchen")          # from ABXI's tag "afk"
    assert ds.n_items == (3, 2) and ds.n_users == 2
    # user 0: a1 b1 a2 b2 (ids 0-based per domain), user 1: b2 a1 a3
    np.testing.assert_array_equal(ds.user, [0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.domain, [0, 1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(ds.item, [0, 0, 1, 1, 1, 0, 2])
    np.testing.assert_array_equal(ds.position, [0, 1, 2, 3, 0, 1, 2])
    np.testing.assert_array_equal(ds.timestamp, [100, 200, 300, 300, 10, 20, 30])
    np.testing.assert_array_equal(ds.split, [TRAIN, TRAIN, VALID, TEST, TRAIN, VALID, TEST])
    assert ds.items["source_id"].to_pylist() == ["a1", "a2", "a3", "b1", "b2"]
    assert ds.items["title"].to_pylist() == [None, "Green tea", None, None, "Kettle"]
    assert meta["titles"]["interactions_with_title"] == 3   # a2 (user 0), b2 (users 0 and 1)
    assert meta["overlap_users"] == 2
    assert meta["splits"]["test"] == {"food": 1, "kitchen": 1}


def test_abxi_bad_token_names_file_and_line(tmp_path):
    src = _abxi(tmp_path)
    (src / "afk_50_preprocessed.txt").write_text("0 1|5 2|6 3|7\n1 2|x 1|2 3|4\n")
    with pytest.raises(FedscopeError, match=r"afk_50_preprocessed.txt:2: bad timestamp 'x'"):
        prepare(src, tmp_path / "out")
    (src / "afk_50_preprocessed.txt").write_text("0 1|5 9|6 2|7\n")
    with pytest.raises(FedscopeError, match=r"afk_50_preprocessed.txt:1: unknown item id 9; expected 1..5"):
        prepare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()      # atomic: nothing half-written


def _c2dsr(tmp_path: Path, with_train: bool = False) -> Path:
    files = {
        "Alist.txt": "7\tA0\t0\n8\tA1\t1\n",
        "Blist.txt": "9\tB0\t0\n",
        "userlist.txt": "u0\t0\nu1\t1\nu2\t2\n",
        # user 2 (valid): tokens out of time order; stable sort gives A1(5) B0(5) A0(9) -> target A0
        "validdata_new.txt": "2\t0\t0|9|d|\t1|5|d|\t2|5|d|\t\n",
        # user 0 (test): B0(1) A1(2) -> target A1
        "testdata_new.txt": "0\t1\t2|1|d|\t1|2|d|\n",
    }
    if with_train:
        files["traindata_new.txt"] = "5\t2\t0|1|d|\t2|3|d|\n"
    return _write(tmp_path / "c2", files)


def test_c2dsr_tiny_exact(tmp_path):
    src = _c2dsr(tmp_path)
    assert detect_format(src) == "c2dsr"
    meta = prepare(src, tmp_path / "out", domains=["x", "y"])
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("x", "y") and ds.n_items == (2, 1)
    # canonical user 0 = source user 0 (test line), user 1 = source user 2 (valid line)
    np.testing.assert_array_equal(ds.user, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.domain, [1, 0, 0, 1, 0])
    np.testing.assert_array_equal(ds.item, [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(ds.timestamp, [1, 2, 5, 5, 9])
    np.testing.assert_array_equal(ds.split, [CONTEXT, TEST, CONTEXT, CONTEXT, VALID])
    assert meta["complete"] is False and meta["missing_files"] == ["traindata_new.txt"]
    assert ds.items["orig_id"].to_pylist() == [7, 8, 9]


def test_c2dsr_history_as_train_and_train_file(tmp_path):
    src = _c2dsr(tmp_path, with_train=True)
    prepare(src, tmp_path / "out", history_split="train")
    ds = load_dataset(tmp_path / "out")
    assert ds.n_users == 3                              # the train line is a user of its own, numbered last
    np.testing.assert_array_equal(ds.split, [TRAIN, TEST, TRAIN, TRAIN, VALID, TRAIN, TRAIN])
    assert ds.meta["complete"] is True


def test_c2dsr_user_in_two_files_is_an_error(tmp_path):
    src = _c2dsr(tmp_path)
    (src / "testdata_new.txt").write_text("2\t1\t2|1|d|\t1|2|d|\n")
    with pytest.raises(FedscopeError, match=r"testdata_new.txt:1: user index 2 also has a line in validdata_new"):
        prepare(src, tmp_path / "out")


def test_c2dsr_variants_of_later_papers(tmp_path):
    """B ids already global (|A| + index) and positions instead of timestamps read as the original layout
    does; a user with one held-out line per target domain is refused, naming the variant and the csv command."""
    import subprocess

    from fedscope_jax.data.formats.c2dsr import CSV_COMMAND

    prepare(_c2dsr(tmp_path / "orig"), tmp_path / "orig-out")
    ref = load_dataset(tmp_path / "orig-out")
    glob = _c2dsr(tmp_path / "glob")
    (glob / "Blist.txt").write_text("9\tB0\t2\n")          # |A| = 2: B's index 0 is the global id 2
    pos = _c2dsr(tmp_path / "pos")                            # the same orders as positions (0-based, 1-based)
    (pos / "validdata_new.txt").write_text("2\t0\t0|2|\t1|0|\t2|1|\n")
    (pos / "testdata_new.txt").write_text("0\t1\t2|1|\t1|2|\n")
    for src, variants in ((glob, ["b_ids_global"]), (pos, ["positions"])):
        meta = prepare(src, tmp_path / f"{src.parent.name}-out")
        ds = load_dataset(tmp_path / f"{src.parent.name}-out")
        assert meta["variants"] == ds.meta["variants"] == variants
        for field in ("user", "domain", "item", "split"):
            np.testing.assert_array_equal(getattr(ds, field), getattr(ref, field))
        assert ds.n_items == ref.n_items and ds.items["source_id"].to_pylist() == ["A0", "A1", "B0"]
    assert ref.meta["variants"] == [] and (load_dataset(tmp_path / "pos-out").timestamp == -1).all()
    (glob / "Blist.txt").write_text("9\tB0\t5\n")
    with pytest.raises(FedscopeError, match=r"Blist.txt: item indices are not the dense range 0..0 or 2..2"):
        prepare(glob, tmp_path / "bad")
    two = _c2dsr(tmp_path / "two")   # user 2 twice in valid (targets A then B), user 0 with 3 interactions
    (two / "validdata_new.txt").write_text("2\t0\t0|9|d|\t1|5|d|\n2\t3\t0|9|d|\t1|5|d|\t2|11|d|\n")
    (two / "testdata_new.txt").write_text("0\t1\t2|1|d|\t1|2|d|\t0|3|d|\n")
    with pytest.raises(FedscopeError, match=r"validdata_new.txt:2: user index 2 .* one held-out line per target "
                                            r"domain .*awk") as err:
        prepare(two, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    # the command the error gives, run in the folder, makes a csv dataset of users 2 and 0, each once
    assert CSV_COMMAND in str(err.value)
    assert CSV_COMMAND.replace(" > interactions.csv", "") in (Path(__file__).parents[1] / "docs/data.md").read_text()
    subprocess.run(["bash", "-c", CSV_COMMAND], cwd=two, check=True)
    assert (two / "interactions.csv").read_text().splitlines() == [
        "user,domain,item,timestamp", "2,A,0,9", "2,A,1,5", "2,B,2,11", "0,B,2,1", "0,A,1,2", "0,A,0,3"]
    prepare(two, tmp_path / "csv-out", fmt="csv")
    csv = load_dataset(tmp_path / "csv-out")
    assert csv.n_users == 2 and len(csv.user) == 6
    # with positions two lines cannot be merged into one order: no command is offered
    (two / "validdata_new.txt").write_text("2\t0\t0|1|\t1|0|\n2\t3\t0|1|\t1|0|\t2|2|\n")
    (two / "testdata_new.txt").write_text("0\t1\t2|0|\t1|1|\t0|2|\n")
    with pytest.raises(FedscopeError, match=r"positions, not timestamps, so the lines cannot be merged") as err:
        prepare(two, tmp_path / "bad", fmt="c2dsr")   # the folder holds interactions.csv now, too
    assert "awk" not in str(err.value)


def test_option_for_another_format_is_refused(tmp_path):
    with pytest.raises(FedscopeError, match=r"--history-split does not apply to format 'abxi'"):
        read_source(_abxi(tmp_path), history_split="train")


def _llmcdsr(tmp_path: Path) -> Path:
    items_a = [{"local_id": i, "file_id": i, "asin": f"A{i}", "title": f"food {i}"} for i in range(2)]
    items_b = [{"local_id": i, "file_id": 2 + i, "asin": f"B{i}", "title": None if i else "pan"} for i in range(2)]
    return _write(tmp_path / "llm-movie-book", {
        "num.txt": "2\n2\n",
        "instance_num.txt": "1 / 1 / 1\n",
        "items_A.jsonl": "".join(json.dumps(r) + "\n" for r in items_a),
        "items_B.jsonl": "".join(json.dumps(r) + "\n" for r in items_b),
        "train_overlap.txt": "1\t0,2,1\n",
        "train_A.txt": "1\t1,0\n",
        "train_B.txt": "1\t3,2\n",
        "valid.txt": "1\t2,0\n",
        "test.txt": "1\t1,3,2\n",
    })


def test_llmcdsr_tiny_exact(tmp_path):
    src = _llmcdsr(tmp_path)
    assert detect_format(src) == "llmcdsr"
    meta = prepare(src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("movie", "book")
    np.testing.assert_array_equal(ds.user, [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4])
    np.testing.assert_array_equal(ds.domain, [0, 1, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(ds.item, [0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(ds.split, [0] * 7 + [CONTEXT, VALID, CONTEXT, CONTEXT, TEST])
    assert (ds.timestamp == -1).all() and meta["timestamps"] is False
    assert meta["user_ranges"] == {"train_overlap": [0, 1], "train_A": [1, 2], "train_B": [2, 3],
                                   "valid": [3, 4], "test": [4, 5]}
    assert ds.items["title"].to_pylist() == ["food 0", "food 1", "pan", None]
    assert meta["overlap_users"] == 3


def test_llmcdsr_row_count_mismatch(tmp_path):
    src = _llmcdsr(tmp_path)
    (src / "instance_num.txt").write_text("2 / 1 / 1\n")
    with pytest.raises(FedscopeError, match=r"train_A.txt: 1 rows but instance_num.txt says 2"):
        prepare(src, tmp_path / "out")


def test_movielens_tiny_exact(tmp_path):
    src = _write(tmp_path / "ml", {
        "movies.csv": 'movieId,title,genres\n10,"Heat, The (1995)",Crime\n3,Up (2009),Animation\n',
        "ratings.csv": "userId,movieId,rating,timestamp\n7,3,4.0,50\n7,10,2.0,40\n2,10,5,1\n7,3,3.5,40\n",
    })
    assert detect_format(src) == "movielens"
    meta = prepare(src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("movie",) and ds.n_items == (2,)
    np.testing.assert_array_equal(ds.user, [0, 1, 1, 1])
    np.testing.assert_array_equal(ds.item, [0, 0, 1, 1])       # user 7: (40, 10) (40, 3) (50, 3): ties keep file order
    np.testing.assert_array_equal(ds.split, [TRAIN, TRAIN, VALID, TEST])
    assert ds.items["title"].to_pylist() == ["Heat, The (1995)", "Up (2009)"]
    assert ds.items["genres"].to_pylist() == ["Crime", "Animation"]
    prepare(src, tmp_path / "out2", min_rating=3.0)
    assert load_dataset(tmp_path / "out2").n_interactions == 3


def test_unknown_folder(tmp_path):
    with pytest.raises(FedscopeError, match="no known format recognised"):
        detect_format(_write(tmp_path / "x", {"a.txt": "1"}))


# --- the real datasets: numbers from each folder's PROVENANCE.md -----------------------------------------

def _split_counts(ds, split: int) -> list[int]:
    return [int(((ds.split == split) & (ds.domain == d)).sum()) for d in range(len(ds.domains))]


def test_real_abxi_food_kitchen(tmp_path):
    src = real_dataset("abxi-food-kitchen")
    meta = prepare(src, tmp_path / "afk", titles=real_dataset("llmcdsr-food-kitchen"))
    ds = load_dataset(tmp_path / "afk")
    assert ds.n_users == 7144 and ds.n_items == (11837, 16258) and ds.n_interactions == 173548
    assert [d["interactions"] for d in meta["domains"]] == [83663, 89885]
    assert _split_counts(ds, TEST)[1] == 4725 and _split_counts(ds, VALID)[1] == 4307
    assert meta["overlap_users"] == 7144
    lengths = np.diff(ds.user_offsets())
    assert lengths.min() == 10 and lengths.max() == 50 and abs(lengths.mean() - 24.3) < 0.05
    assert meta["titles"]["interactions_with_title"] == 165229
    assert meta["titles"]["items_with_title"] == {"food": 7601, "kitchen": 15756}
    assert meta["users_resorted_by_time"] == 0


def test_real_abxi_beauty_electronics(tmp_path):
    meta = prepare(real_dataset("abxi-beauty-electronics"), tmp_path / "abe")
    ds = load_dataset(tmp_path / "abe")
    assert ds.domains == ("beauty", "electronics") and ds.n_items == (10379, 14188)
    assert ds.n_users == 4474 and [d["interactions"] for d in meta["domains"]] == [50329, 63800]
    assert _split_counts(ds, TEST)[1] == 2599 and _split_counts(ds, VALID)[1] == 2388


@pytest.mark.parametrize("name,users,inter,b_targets,titled", [
    ("c2dsr-food-kitchen", (8173, 8406), (80447, 82787), (5451, 5659), 0.775),
    ("c2dsr-movie-book", (7644, 7708), (73476, 74729), (5612, 5730), None),
])
def test_real_c2dsr(tmp_path, name, users, inter, b_targets, titled):
    titles = real_dataset("llmcdsr-food-kitchen") if titled else None
    meta = prepare(real_dataset(name), tmp_path / name, titles=titles)
    ds = load_dataset(tmp_path / name)
    assert ds.n_users == sum(users) and ds.n_interactions == sum(inter)
    assert _split_counts(ds, VALID)[1] == b_targets[0] and _split_counts(ds, TEST)[1] == b_targets[1]
    assert int((ds.split == VALID).sum()) == users[0] and int((ds.split == TEST).sum()) == users[1]
    assert int((ds.split == TRAIN).sum()) == 0 and meta["complete"] is False
    lengths = np.diff(ds.user_offsets())
    assert lengths.min() == 6 and lengths.max() == 15
    # every held-out user's target is its latest interaction
    ends = ds.user_offsets()[1:] - 1
    assert np.isin(ds.split[ends], [VALID, TEST]).all()
    assert np.all(np.diff(ds.timestamp)[np.diff(ds.user) == 0] >= 0)
    if titled:
        assert round(meta["titles"]["interaction_fraction"], 3) == titled


def test_real_llmcdsr(tmp_path):
    meta = prepare(real_dataset("llmcdsr-food-kitchen"), tmp_path / "fk")
    ds = load_dataset(tmp_path / "fk")
    assert ds.n_items == (8661, 27637) and ds.n_users == 5472 + 38191 + 7501 + 960 + 937
    assert meta["overlap_users"] == 9398 and meta["titles"]["interaction_fraction"] == 1.0
    assert _split_counts(ds, VALID) == [960 - 597, 597] and _split_counts(ds, TEST) == [937 - 637, 637]
    assert [d["interactions"] for d in meta["domains"]][0] == 37281 + 45849 + 8739 + 6447
    meta = prepare(real_dataset("llmcdsr-movie-book"), tmp_path / "mb")
    assert meta["missing_files"] == ["train_B.txt"] and meta["overlap_users"] == 8317
    assert meta["titles"]["items_with_title"] == {"movie": 12875, "book": 0}


def test_real_movielens(tmp_path):
    meta = prepare(real_dataset("movielens-latest-small"), tmp_path / "ml")
    ds = load_dataset(tmp_path / "ml")
    assert ds.n_users == 610 and ds.n_items == (9742,) and ds.n_interactions == 100836
    assert meta["splits"]["test"] == {"movie": 610} and meta["splits"]["valid"] == {"movie": 610}
    assert set(SPLITS[s] for s in np.unique(ds.split)) == {"train", "valid", "test"}


@pytest.mark.parametrize("name", ["abxi-food-kitchen", "abxi-beauty-electronics", "c2dsr-food-kitchen",
                                  "c2dsr-movie-book", "llmcdsr-food-kitchen", "llmcdsr-movie-book",
                                  "movielens-latest-small"])
def test_real_split_invariants(tmp_path, name):
    """Every real source: positions 0..n-1, time order, at most one valid and one test target per user, and no
    training (or history) row after a user's valid target or at/after its test target (no leakage)."""
    prepare(real_dataset(name), tmp_path / "ds")
    ds = load_dataset(tmp_path / "ds")
    off = ds.user_offsets()
    lengths = np.diff(off)
    np.testing.assert_array_equal(ds.position, np.arange(ds.n_interactions) - np.repeat(off[:-1], lengths))
    same_user = np.diff(ds.user) == 0
    if ds.meta["timestamps"]:
        assert np.all(np.diff(ds.timestamp)[same_user] >= 0)
    for split in (VALID, TEST):
        assert np.bincount(ds.user[ds.split == split], minlength=ds.n_users).max() <= 1
    # the latest position per user of each split: history < valid < test, and test is the user's last row
    def last_pos(split):
        out = np.full(ds.n_users, -1)
        rows = ds.split == split
        np.maximum.at(out, ds.user[rows], ds.position[rows])
        return out
    history = np.maximum(last_pos(TRAIN), last_pos(CONTEXT))
    valid, test = last_pos(VALID), last_pos(TEST)
    assert np.all((valid < 0) | (history < valid))
    assert np.all((test < 0) | ((history < test) & (valid < test) & (test == lengths - 1)))
    assert np.all((valid < 0) | (test >= 0) | (valid == lengths - 1))   # a valid-only user: target is last
