"""The issue's malformed-input list, through the CLI: a one-line error naming the file, the line and what was
expected, exit code 2, and no output (nor temporary) directory left behind."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from fedscope_jax.cli import main

ABXI_SEQ = "afk_50_preprocessed.txt"
ABXI_GOOD = "0 1|100 4|200 2|300\n"


def _abxi(src: Path, second_line: bytes) -> None:
    item_map = {"a1": [1, 0], "a2": [2, 0], "a3": [3, 0], "b1": [4, 1], "b2": [5, 1]}
    (src / "map_item_50.txt").write_text(json.dumps(item_map))
    (src / ABXI_SEQ).write_bytes(ABXI_GOOD.encode() + second_line)


def _c2dsr(src: Path, overrides: dict[str, bytes]) -> None:
    files = {
        "Alist.txt": b"7\tA0\t0\n8\tA1\t1\n",
        "Blist.txt": b"9\tB0\t0\n",
        "userlist.txt": b"u0\t0\nu1\t1\nu2\t2\n",
        "validdata_new.txt": b"2\t0\t0|9|d|\t1|5|d|\t2|5|d|\n",
        "testdata_new.txt": b"0\t1\t2|1|d|\t1|2|d|\n",
    }
    files.update(overrides)
    for name, data in files.items():
        (src / name).write_bytes(data)


def _llmcdsr(src: Path, overrides: dict[str, bytes]) -> None:
    items_a = [{"local_id": i, "file_id": i, "asin": f"A{i}", "title": f"food {i}"} for i in range(2)]
    items_b = [{"local_id": i, "file_id": 2 + i, "asin": f"B{i}", "title": "pan"} for i in range(2)]
    files = {
        "num.txt": b"2\n2\n",
        "items_A.jsonl": "".join(json.dumps(r) + "\n" for r in items_a).encode(),
        "items_B.jsonl": "".join(json.dumps(r) + "\n" for r in items_b).encode(),
        "train_overlap.txt": b"1\t0,2,1\n",
        "train_A.txt": b"1\t1,0\n",
        "valid.txt": b"1\t2,0\n",
        "test.txt": b"1\t1,3,2\n",
    }
    files.update(overrides)
    for name, data in files.items():
        (src / name).write_bytes(data)


CASES = [
    # (case, format, files writer, file:line, message expected after it)
    ("wrong column count", "abxi", lambda s: _abxi(s, b"1 1|5|7 2|6 3|7\n"),
     f"{ABXI_SEQ}:2", r"token '1\|5\|7' has 3 '\|'-separated fields; expected 2 \(item\|unix_ts\)"),
    ("wrong column count", "c2dsr", lambda s: _c2dsr(s, {"Alist.txt": b"7\tA0\t0\n8\tA1\n"}),
     "Alist.txt:2", r"expected 3 tab-separated fields \(orig_id, ASIN, idx\), got 2"),
    ("wrong column count", "llmcdsr", lambda s: _llmcdsr(s, {"train_A.txt": b"1\t1,0\n2\t0,1\t7\n"}),
     "train_A.txt:2", r"3 tab-separated fields; expected 2"),
    ("non-integer id", "abxi", lambda s: _abxi(s, b"1 x|5 2|6 3|7\n"),
     f"{ABXI_SEQ}:2", r"expected an integer item id, got 'x'"),
    ("non-integer id", "c2dsr", lambda s: _c2dsr(s, {"testdata_new.txt": b"0\t1\t2|1|d|\tA1|2|d|\n"}),
     "testdata_new.txt:1", r"expected an integer item id, got 'A1'"),
    ("non-integer id", "llmcdsr", lambda s: _llmcdsr(s, {"valid.txt": b"1\t2,zero\n"}),
     "valid.txt:1", r"expected an integer item id, got 'zero'"),
    ("unknown item id", "abxi", lambda s: _abxi(s, b"1 9|5 2|6 3|7\n"),
     f"{ABXI_SEQ}:2", r"unknown item id 9; expected 1..5 \(the ids in map_item_50.txt\)"),
    ("unknown item id", "c2dsr", lambda s: _c2dsr(s, {"validdata_new.txt": b"2\t0\t0|9|d|\t3|5|d|\n"}),
     "validdata_new.txt:1", r"unknown item id 3; expected 0..2 \(Alist \+ Blist\)"),
    ("unknown item id", "llmcdsr", lambda s: _llmcdsr(s, {"test.txt": b"1\t1,4,2\n"}),
     "test.txt:1", r"unknown item id 4; expected 0..3"),
    ("bad timestamp", "abxi", lambda s: _abxi(s, b"1 1|-5 2|6 3|7\n"),
     f"{ABXI_SEQ}:2", r"bad timestamp '-5'; expected integer unix seconds"),
    ("bad timestamp", "abxi", lambda s: _abxi(s, b"1 1|2014-01-01 2|6 3|7\n"),
     f"{ABXI_SEQ}:2", r"bad timestamp '2014-01-01'; expected integer unix seconds"),
    ("bad timestamp", "c2dsr", lambda s: _c2dsr(s, {"testdata_new.txt": b"0\t1\t2|1388534400000|d|\t1|2|d|\n"}),
     "testdata_new.txt:1", r"bad timestamp '1388534400000'; expected integer unix seconds in 0..4102444800"),
    ("empty file", "abxi", lambda s: (_abxi(s, b""), (s / ABXI_SEQ).write_bytes(b"")),
     f"{ABXI_SEQ}:1", r"file is empty; expected one line per user"),
    ("empty file", "c2dsr", lambda s: _c2dsr(s, {"validdata_new.txt": b"\n \n"}),
     "validdata_new.txt:1", r"file is empty; expected one line per user"),
    ("empty file", "llmcdsr", lambda s: _llmcdsr(s, {"num.txt": b""}),
     "num.txt:1", r"file is empty; expected one integer count per line"),
    ("non-UTF-8", "abxi", lambda s: _abxi(s, b"1 1|5 2|6 3|7 \xff\n"),
     f"{ABXI_SEQ}:2", r"byte 0xff at column 15 is not valid UTF-8; expected UTF-8 text"),
    ("non-UTF-8", "c2dsr", lambda s: _c2dsr(s, {"Blist.txt": b"9\tB\xe90\t0\n"}),
     "Blist.txt:1", r"byte 0xe9 at column 4 is not valid UTF-8; expected UTF-8 text"),
    ("non-UTF-8", "llmcdsr", lambda s: _llmcdsr(s, {"items_B.jsonl": b'{"asin": "B\x80"}\n'}),
     "items_B.jsonl:1", r"byte 0x80 at column 12 is not valid UTF-8"),
    ("too few interactions", "abxi", lambda s: _abxi(s, b"1 1|5 2|6\n"),
     f"{ABXI_SEQ}:2", r"user has 2 interactions; leave-one-out needs at least 3"),
    ("too few interactions", "c2dsr", lambda s: _c2dsr(s, {"testdata_new.txt": b"0\t1\t2|1|d|\n"}),
     "testdata_new.txt:1", r"sequence has 1 item; expected at least 2 \(history and the test target\)"),
    ("too few interactions", "llmcdsr", lambda s: _llmcdsr(s, {"train_A.txt": b"1\t1,0\n2\t1\n"}),
     "train_A.txt:2", r"sequence has 1 item; expected at least 2"),
]


@pytest.mark.parametrize("case,fmt,write,where,message", CASES,
                         ids=[f"{c[1]}-{c[0].replace(' ', '-')}-{i}" for i, c in enumerate(CASES)])
def test_malformed_input_is_one_line_naming_file_and_line(tmp_path, capsys, case, fmt, write, where, message):
    src = tmp_path / "src"
    src.mkdir()
    write(src)
    out = tmp_path / "prepared"
    code = main(["data", "prepare", "--format", fmt, "--input", str(src), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.endswith("\n") and err.count("\n") == 1, err          # one line
    assert re.search(re.escape(str(src / where)) + ": " + message, err), err
    assert os.listdir(tmp_path) == ["src"]                         # no output, no temporary directory


def test_the_same_folders_are_fine_when_well_formed(tmp_path, capsys):
    """The writers above build valid folders when nothing is overridden (so each case fails for its reason)."""
    for fmt, write in (("abxi", lambda s: _abxi(s, b"1 1|5 2|6 3|7\n")), ("c2dsr", lambda s: _c2dsr(s, {})),
                       ("llmcdsr", lambda s: _llmcdsr(s, {}))):
        src = tmp_path / f"src-{fmt}"
        src.mkdir()
        write(src)
        assert main(["data", "prepare", "--format", fmt, "--input", str(src), "--output", str(tmp_path / fmt)]) == 0
