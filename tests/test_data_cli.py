"""`fedscope data ...` end to end, in process: exit codes, printed summaries, one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np

from conftest import real_dataset
from fedscope_jax.cli import main
from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.data.partition import load_partition


def test_prepare_info_partition(tmp_path, capsys):
    out = tmp_path / "afk"
    src = real_dataset("abxi-food-kitchen")
    assert main(["data", "prepare", str(src), "--out", str(out), "--titles",
                 str(real_dataset("llmcdsr-food-kitchen"))]) == 0
    printed = capsys.readouterr().out
    assert "users 7,144  interactions 173,548" in printed and "title: 95.2%" in printed
    assert main(["data", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sequence_length"] == {"min": 10, "mean": 24.293, "max": 50}
    assert main(["data", "partition", str(out), "--clients", "16", "--seed", "1", "--json",
                 "--out", str(tmp_path / "p.arrow")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["clients"] == 16 and summary["scheme"] == "powerlaw"
    part = load_partition(tmp_path / "p.arrow")
    assert np.bincount(part.client_of_user).tolist()[0] == summary["users_per_client"]["max"]
    # a synthetic twin of the prepared set, with one size overridden
    assert main(["data", "synth", "--like", str(out), "--users", "500", "--out", str(tmp_path / "twin")]) == 0
    twin = load_dataset(tmp_path / "twin")
    assert twin.n_users == 500 and twin.n_items == (11837, 16258) and twin.domains == ("food", "kitchen")
    assert twin.meta["name"] == "synthetic-like-abxi-food-kitchen"


def test_synth_command(tmp_path, capsys):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--out", str(out), "--users", "200", "--items", "50,60", "--topics", "5",
                 "--domains", "x,y", "--seed", "9"]) == 0
    ds = load_dataset(out)
    assert ds.n_users == 200 and ds.n_items == (50, 60) and ds.domains == ("x", "y")
    assert ds.meta["synthetic"]["seed"] == 9


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["data", "info", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing: not a directory" in err
    out = tmp_path / "o"
    assert main(["data", "synth", "--out", str(out), "--users", "10", "--items", "5,5"]) == 2
    assert "field 'items'" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(out), "--users", "10", "--items", "50,50"]) == 0
    assert main(["data", "synth", "--out", str(out), "--users", "10", "--items", "50,50"]) == 2
    assert "output exists; pass --force" in capsys.readouterr().err


def test_issue_flag_forms(tmp_path, capsys):
    """The issue's spelling: prepare --format --input --output --titles FILE, partition --data, synth --output."""
    out = tmp_path / "afk"
    titles = real_dataset("llmcdsr-food-kitchen") / "items_B.jsonl"       # a single .jsonl file (kitchen titles)
    assert main(["data", "prepare", "--format", "abxi", "--input", str(real_dataset("abxi-food-kitchen")),
                 "--output", str(out), "--titles", str(titles), "--domains", "food,kitchen", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["users"] == 7144 and meta["titles"]["items_with_title"]["food"] == 0
    assert meta["titles"]["items_with_title"]["kitchen"] == 15756       # as with the whole folder
    assert main(["data", "partition", "--data", str(out), "--clients", "8", "--scheme", "dirichlet",
                 "--alpha", "0.1", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "8 clients, scheme dirichlet, seed 3, alpha 0.1" in printed and "label skew (both" in printed
    assert main(["data", "synth", "--output", str(tmp_path / "s"), "--users", "300", "--items-a", "70",
                 "--items-b", "90", "--overlap", "0.5", "--seed", "2", "--json"]) == 0
    syn = json.loads(capsys.readouterr().out)
    assert [d["items"] for d in syn["domains"]] == [70, 90] and syn["users"] == 300
    assert 0.35 < syn["overlap_users"] / 300 < 0.65 and syn["synthetic"]["seed"] == 2


def test_flag_and_positional_conflicts(tmp_path, capsys):
    assert main(["data", "prepare", "--output", str(tmp_path / "o")]) == 2
    assert "--input DIR is required" in capsys.readouterr().err
    assert main(["data", "prepare", "a", "--input", "b", "--output", str(tmp_path / "o")]) == 2
    assert "both given" in capsys.readouterr().err
    assert main(["data", "partition", "--data", str(tmp_path), "--scheme", "uniform", "--clients", "2",
                 "--attribute", "domain"]) == 2
    assert "--attribute does not apply to --scheme uniform (only dirichlet)" in capsys.readouterr().err
    assert main(["data", "synth", "--output", str(tmp_path / "s"), "--items", "5,5", "--items-a", "9"]) == 2
    assert "--items and --items-a/--items-b both given" in capsys.readouterr().err
    assert main(["data", "prepare", "--input", str(real_dataset("abxi-food-kitchen")), "--output",
                 str(tmp_path / "o"), "--titles", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl: not found (expected a folder with items_*.jsonl or a .jsonl file)" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []                              # nothing written by any failed command
