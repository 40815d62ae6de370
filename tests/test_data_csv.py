"""The `csv` format (users' own data): exact output, optional items.csv and timestamps, errors naming lines."""

from __future__ import annotations

import numpy as np
import pytest

from fedscope_jax.data.canonical import TEST, TRAIN, VALID, load_dataset
from fedscope_jax.data.formats import detect_format, prepare
from fedscope_jax.errors import FedscopeError


def _folder(tmp_path, interactions: str, items: str | None = None):
    src = tmp_path / "mine"
    src.mkdir()
    (src / "interactions.csv").write_text(interactions)
    if items is not None:
        (src / "items.csv").write_text(items)
    return src


INTER = ("user,item,domain,timestamp\n"
         "bob,k1,kitchen,30\n"
         "ann,f1,food,10\n"
         "bob,f2,food,20\n"
         "ann,k1,kitchen,5\n"
         "bob,f1,food,30\n"
         "ann,f2,food,10\n")


def test_csv_without_items_file(tmp_path):
    src = _folder(tmp_path, INTER)
    assert detect_format(src) == "csv"
    meta = prepare(src, tmp_path / "out", domains=["food", "kitchen"])
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("food", "kitchen") and ds.n_items == (2, 1) and ds.n_users == 2
    # users by first appearance: bob=0, ann=1; bob: f2(20) k1(30) f1(30, later row); ann: k1(5) f1(10) f2(10)
    np.testing.assert_array_equal(ds.user, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(ds.domain, [0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(ds.item, [1, 0, 0, 0, 0, 1])      # food items by first appearance: f1=0, f2=1
    np.testing.assert_array_equal(ds.timestamp, [20, 30, 30, 5, 10, 10])
    np.testing.assert_array_equal(ds.split, [TRAIN, VALID, TEST] * 2)
    assert ds.items["source_id"].to_pylist() == ["f1", "f2", "k1"]
    assert meta["overlap_users"] == 2


def test_csv_with_items_file_and_metadata(tmp_path):
    items = ('domain,item,title,brand\n'
             'food,f2,"Tea, green",acme\n'
             'food,f1,Coffee,\n'
             'food,f9,Unused,zed\n'
             'kitchen,k1,Kettle,acme\n')
    src = _folder(tmp_path, INTER, items)
    prepare(src, tmp_path / "out")
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("kitchen", "food")                   # first appearance in interactions.csv
    assert ds.n_items == (1, 3)
    assert ds.items["title"].to_pylist() == ["Kettle", "Tea, green", "Coffee", "Unused"]
    assert ds.items["brand"].to_pylist() == ["acme", "acme", None, "zed"]
    np.testing.assert_array_equal(ds.item[ds.user == 0], [0, 0, 1])   # bob: f2 -> 0, k1 -> 0, f1 -> 1


def test_csv_one_domain_no_timestamps(tmp_path):
    src = _folder(tmp_path, "user,item\n1,a\n1,b\n2,a\n1,c\n")
    prepare(src, tmp_path / "out", domains=["books"])
    ds = load_dataset(tmp_path / "out")
    assert ds.domains == ("books",) and ds.meta["timestamps"] is False
    np.testing.assert_array_equal(ds.item, [0, 1, 2, 0])           # file order within a user
    np.testing.assert_array_equal(ds.split, [TRAIN, VALID, TEST, TRAIN])


@pytest.mark.parametrize("inter,items,message", [
    ("user,item,domain\nu,i,\n", None, r"interactions.csv:2: empty 'domain'"),
    ("user,domain\nu,a\n", None, r"interactions.csv:1: missing column 'item'"),
    ("user,item,timestamp\nu,i,2020-01-01\n", None, r"column 'timestamp' must hold integer unix seconds"),
    ("user,item,domain\nu,i,a\nu,j,a\n", "domain,item\na,i\n", r"interactions.csv:3: item 'j' \(domain 'a'\) is not"),
    ("user,item,domain\nu,i,a\n", "domain,item\na,i\nb,x\n", r"items.csv:3: domain 'b' has no interactions"),
])
def test_csv_errors_name_the_line(tmp_path, inter, items, message):
    with pytest.raises(FedscopeError, match=message):
        prepare(_folder(tmp_path, inter, items), tmp_path / "out")


def test_csv_domains_option_must_cover_the_data(tmp_path):
    with pytest.raises(FedscopeError, match=r"also has domain 'kitchen'"):
        prepare(_folder(tmp_path, INTER), tmp_path / "out", domains=["food"])
