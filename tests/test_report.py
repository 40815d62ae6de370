"""fedscope report: tables hold the mean and sample std over seeds of the summaries' numbers; plots and
report.md are written, for a reproduce output (plan.json) and for a plain folder of single runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.cli import main
from fedscope_jax.errors import FedscopeError


def _metrics(ndcg: float) -> dict[str, float]:
    return {"HR@10": 2 * ndcg, "NDCG@10": ndcg, "MRR": ndcg / 2, "targets": 10}


def _run(root: Path, rel: str, cell: dict | None, ndcgs: tuple[float, float], seed: int, mode: str = "federated",
         privacy: tuple[str, float] = ("off", 8.0), eps_spent: float | None = None,
         cold: bool = False, unit: str | None = None, training: dict | None = None, protocol: str = "") -> Path:
    d = root / rel
    d.mkdir(parents=True)
    summary = {"test": {"food": _metrics(ndcgs[0]), "kitchen": _metrics(ndcgs[1])},
               "test_full": {"food": _metrics(ndcgs[0] / 10), "kitchen": _metrics(ndcgs[1] / 10)},
               "training": {"mode": mode, "device": "cpu", **(training or {})}, "dataset": {"name": "toy"},
               "privacy": {"eps_spent_median": eps_spent} if eps_spent is not None else {"mode": "off"},
               "baselines": {"popularity": {"food": _metrics(0.05), "kitchen": _metrics(0.07)},
                             "popularity_full": {"food": _metrics(0.005), "kitchen": _metrics(0.007)}},
               "protocol": {"sampled_negatives": 99, **({"name": protocol} if protocol else {})}}
    if cold:
        summary["cold_start"] = {"sampled": {dom: {"1-2": {"targets": 4, "model": _metrics(v)},
                                                   ">10": {"targets": 6, "model": _metrics(2 * v)}}
                                             for dom, v in zip(("food", "kitchen"), ndcgs)}}
    config = {"train": {"seed": seed}, "federated": {"seed": seed, "clients": 4}, "mode": mode,
              "privacy": {"mode": privacy[0], "epsilon": privacy[1], **({"unit": unit} if unit else {})},
              "model": {"dim": 8}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "config.json").write_text(json.dumps(config))
    key = "round" if mode == "federated" else "epoch"
    (d / "metrics.jsonl").write_text("".join(json.dumps({key: r, "valid": {"select": 0.01 * r * (1 + seed)}}) + "\n"
                                             for r in (1, 2, 3)))
    if cell is not None:
        (d / "cell.json").write_text(json.dumps({**cell, "seed": seed}))
    return d


def _cell(method: str, dp: str, mode: str = "federated", eps: float | None = None, pmode: str | None = None) -> dict:
    return {"dataset": "toy", "method": method, "label": method.upper(), "mode": mode, "dp": dp,
            "privacy_mode": pmode, "epsilon": eps, "variant": "base", "variant_axis": "", "variant_value": None,
            "profile": "quick", "dry_run": False, "attributes": "none (no --attributes-root)"}


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_of_a_reproduce_output(tmp_path):
    root = tmp_path / "rep"
    values = {0: (0.10, 0.20), 1: (0.14, 0.30), 2: (0.12, 0.10)}
    cells = []
    for s, v in values.items():
        chosen = {"selection": "best_valid", "best_round": 10 * (s + 1), "rounds_run": 10 * (s + 3)}
        cells.append(str(_run(root, f"runs/toy/fedscope/off-seed{s}", _cell("fedscope", "off"), v, s,
                              cold=True, training=chosen).relative_to(root)))
        cells.append(str(_run(root, f"runs/toy/centralized/off-seed{s}", _cell("centralized", "n/a", "centralized"),
                              (0.3, 0.4), s, mode="centralized", training={"best_epoch": 7},
                              protocol="feddcsr").relative_to(root)))
    sweep = root / "runs/toy/fedscope/sweep-seed0"
    for mode in ("personalized", "uniform"):
        for eps in (1.0, 8.0):
            _run(sweep, f"{mode}-eps{eps:g}-seed0", _cell("fedscope", f"{mode}-eps{eps:g}", eps=eps, pmode=mode),
                 (eps / 100, eps / 50), 0, privacy=(mode, eps), eps_spent=eps * 0.9,
                 training={"selection": "final", "best_round": None, "rounds_run": 50})
    _run(sweep, "personalized-epsinf-seed0", _cell("fedscope", "off", pmode="off"), (0.2, 0.2), 0)
    copy = _run(sweep, "uniform-epsinf-seed0", _cell("fedscope", "off", pmode="off"), (0.2, 0.2), 0)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "sweep": {"same_as": "personalized-epsinf-seed0"}}))
    user = root / "runs/toy/fedscope/sweep-user-seed0"      # the user unit's sweep: its own program per seed
    _run(user, "personalized-eps1-seed0", _cell("fedscope", "personalized-user-eps1", eps=1.0, pmode="personalized"),
         (0.05, 0.06), 0, privacy=("personalized", 1.0), eps_spent=0.95, unit="user")
    _run(user, "personalized-epsinf-seed0", _cell("fedscope", "off-user", pmode="off"), (0.15, 0.15), 0, unit="user")
    studies = {
        "main": {"title": "Main", "kind": "cells", "cells": cells, "datasets": ["toy"]},
        "privacy_utility": {"title": "PU", "kind": "sweep", "cells": [str(sweep.relative_to(root)),
                                                                       str(user.relative_to(root))],
                            "datasets": ["toy"]},
        "cold_start": {"title": "Cold", "kind": "derived", "reads": "main", "cells": [], "datasets": ["toy"]},
        "convergence": {"title": "Conv", "kind": "derived", "reads": "main", "cells": [], "datasets": ["toy"]},
    }
    (root / "plan.json").write_text(json.dumps({"profile": "quick", "dry_run": False, "status": "complete",
                                                "hardware": {"device": "cpu", "cpu_cores": 2}, "studies": studies,
                                                "data": {"toy-u30-i10-s0": {"dataset": "toy", "users": 28,
                                                                            "items": [10, 10], "interactions": 300,
                                                                            "max_users": 30, "max_items": 10}}}))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(root), "--out", str(out)]) == 0
    rows = {(r["method"], r["domain"]): r for r in _csv(out / "main.csv")}
    food = rows[("FEDSCOPE", "food")]
    v = np.array([0.10, 0.14, 0.12])
    assert float(food["NDCG@10 mean"]) == pytest.approx(v.mean())
    assert float(food["NDCG@10 std"]) == pytest.approx(v.std(ddof=1))
    assert float(food["HR@10 mean"]) == pytest.approx(2 * v.mean())
    assert float(food["NDCG@10 (full) mean"]) == pytest.approx(v.mean() / 10)
    assert food["seeds"] == "3" and food["dp"] == "off" and food["attributes"] == "none"
    assert (food["selection"], food["tested round/epoch"], food["protocol"]) == ("best valid", "10/20/30", "fedscope")
    kit = rows[("FEDSCOPE", "kitchen")]
    assert float(kit["NDCG@10 std"]) == pytest.approx(np.std([0.2, 0.3, 0.1], ddof=1))
    pop = rows[("Popularity (reference)", "kitchen")]    # one reference row per domain, from the baselines
    assert float(pop["NDCG@10 mean"]) == pytest.approx(0.07) and float(pop["NDCG@10 (full) mean"]) == 0.007
    assert pop["seeds"] == "-" and sum(r["method"] == "Popularity (reference)" for r in rows.values()) == 2
    cen = rows[("CENTRALIZED", "food")]
    assert cen["dp"] == "n/a" and float(cen["NDCG@10 std"]) == 0.0
    assert (cen["selection"], cen["tested round/epoch"], cen["protocol"]) == ("best valid", "7/7/7", "feddcsr")
    pu = _csv(out / "privacy_utility.csv")
    assert len(pu) == 2 * 7       # 5 client-unit groups (inf once: the copy is not counted) + 2 user ones, x 2 domains
    p1 = next(r for r in pu if r["dp"] == "personalized-eps1" and r["domain"] == "food")
    assert float(p1["NDCG@10 mean"]) == pytest.approx(0.01) and p1["NDCG@10 std"] == "nan"
    assert float(p1["eps_spent (median) mean"]) == pytest.approx(0.9) and p1["unit"] == "client"
    assert (p1["selection"], p1["tested round/epoch"]) == ("final", "-")
    # a federated summary from before runs selected tested its final round
    assert next(r for r in pu if r["dp"] == "off" and r["domain"] == "food")["selection"] == "final"
    u1 = next(r for r in pu if r["dp"] == "personalized-user-eps1" and r["domain"] == "kitchen")
    assert float(u1["NDCG@10 mean"]) == pytest.approx(0.06) and u1["unit"] == "user"
    off = {r["dp"]: r for r in pu if r["domain"] == "food" and r["dp"].startswith("off")}
    assert sorted(off) == ["off", "off-user"] and off["off"]["unit"] == off["off-user"]["unit"] == "-"
    assert [r["dp"] for r in pu if r["domain"] == "food"] == [   # user unit first; no DP last in each unit
        "personalized-user-eps1", "off-user", "personalized-eps1", "personalized-eps8", "uniform-eps1", "uniform-eps8",
        "off"]
    cold = {(r["method"], r["domain"], r["bucket"]): r for r in _csv(out / "cold_start_cold_start.csv")}
    assert float(cold[("FEDSCOPE", "food", ">10")]["NDCG@10 mean"]) == pytest.approx(2 * v.mean())
    for png in ("privacy_utility_toy.png", "convergence_toy.png", "cold_start_cold_start_toy.png"):
        assert (out / png).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "unit: what one DP record is, 'user'" in report
    assert "'final' (the last round: every private run" in report
    assert "profile: **quick**" in report and "cpu" in report and "FedSCOPE ran ID-only" in report
    assert "`toy-u30-i10-s0`: 28 users, 10 + 10 items, 300 interactions (30 users drawn; item core of 10" in report
    assert "against 99 sampled negatives" in report and "HR@10 = 0.100 and NDCG@10 ~ 0.0454" in report
    for link in ("main.md", "main.csv", "privacy_utility_toy.png", "convergence_toy.png"):
        assert f"({link})" in report
    assert "long_tail" in report                  # says that the summaries have no long-tail breakdown


def test_report_of_plain_runs_and_benchmark(tmp_path):
    for s in (0, 1):
        _run(tmp_path / "runs", f"a{s}", None, (0.1 + s / 10, 0.2), s)
        _run(tmp_path / "runs", f"b{s}", None, (0.3, 0.3), s, privacy=("uniform", 4.0), eps_spent=3.9)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"device": "cpu", "peak_flops": 1e9,
                                 "results": [{"clients": 8, "speedup": 1.1}, {"clients": 64, "speedup": 1.5}]}))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(out), "--benchmark", str(bench)]) == 0
    rows = _csv(out / "runs.csv")
    off = [r for r in rows if r["dp"] == "off" and r["domain"] == "food"]
    assert len(off) == 1 and float(off[0]["NDCG@10 mean"]) == pytest.approx(0.15)
    assert float(off[0]["NDCG@10 std"]) == pytest.approx(math.sqrt(2) * 0.05)
    assert any(r["dp"] == "uniform-eps4" for r in rows)
    assert (out / "engine_scaling.png").is_file() and (out / "privacy_utility_toy.png").is_file()
    assert "engine_scaling.png" in (out / "report.md").read_text()
    bench.write_text(json.dumps({"device": "cpu", "configs": 12, "sweep_seconds": 10.0, "one_by_one_seconds": 30.0,
                                 "sweep_speedup": 3.0}))
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(out), "--benchmark", str(bench)]) == 0
    assert "Sweep of 12 configurations as one program: 10.0 s against 30.0 s one by one (speedup 3.00x" in \
        (out / "report.md").read_text()


def test_report_of_plain_sweeps_groups_seeds_and_keeps_the_distributed_eps_inf_apart(tmp_path):
    """`fedscope report` on `fedscope sweep` folders: a configuration's seeds form one group (config.json's sweep
    section names the seed), and a distributed sweep's eps-inf point (one step a round over all silos' users) is
    not merged with a local-noise sweep's ("off-user")."""
    for sweep, mode in (("dist", "distributed"), ("local", "personalized")):
        for s in (0, 1):
            for eps in (4.0, math.inf):
                name = f"{mode}-eps{eps:g}-seed{s}"
                private = math.isfinite(eps)
                shift = 0.05 if mode == "personalized" else 0.0   # a run grouped under the other label shows
                d = _run(tmp_path / "runs" / sweep, name, None, (0.1 + s / 10 + private / 100 + shift, 0.2), s,
                         privacy=(mode, eps) if private else ("off", 8.0), eps_spent=eps if private else None,
                         unit="user")
                cfg = json.loads((d / "config.json").read_text())
                cfg["sweep"] = {"name": name, "mode": mode, "epsilon": eps if private else "inf", "seed": s,
                                "privacy_mode": mode if private else "off"}
                (d / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0
    food = {r["dp"]: r for r in _csv(out / "runs.csv") if r["domain"] == "food"}
    assert sorted(food) == ["distributed-user-eps4", "off-distributed", "off-user", "personalized-user-eps4"]
    assert {r["seeds"] for r in food.values()} == {"2"}
    assert float(food["off-distributed"]["NDCG@10 mean"]) == pytest.approx(0.15)
    assert float(food["distributed-user-eps4"]["NDCG@10 mean"]) == pytest.approx(0.16)
    assert float(food["off-user"]["NDCG@10 mean"]) == pytest.approx(0.20)
    assert food["off-distributed"]["unit"] == "-" and food["distributed-user-eps4"]["unit"] == "user"


def test_report_errors(tmp_path):
    with pytest.raises(FedscopeError, match="no run directory"):
        from fedscope_jax.experiments.report import write_report
        write_report(tmp_path, tmp_path / "out")
    assert main(["report", "--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2


def test_long_tail_layout_is_read(tmp_path):
    from fedscope_jax.experiments.tables import breakdown_rows, group_runs, load_run

    runs = []
    for s, head in enumerate((0.2, 0.4)):
        d = _run(tmp_path, f"r{s}", _cell("local", "n/a", "local"), (0.1, 0.1), s, mode="local")
        summary = json.loads((d / "summary.json").read_text())
        summary["long_tail"] = {"sampled": {"food": {"head": _metrics(head), "tail": _metrics(head / 4),
                                                     "targets": {"head": 3, "tail": 9}, "head_train_share": 0.4}}}
        (d / "summary.json").write_text(json.dumps(summary))
        runs.append(load_run(d))
    rows = {r["bucket"]: r for r in breakdown_rows(group_runs(runs), "long_tail")}
    assert set(rows) == {"head", "tail"} and rows["head"]["targets"] == 3 and rows["tail"]["targets"] == 9
    assert rows["head"]["NDCG@10"][0] == pytest.approx(0.3)
    assert rows["tail"]["NDCG@10"][1] == pytest.approx(np.std([0.05, 0.1], ddof=1))


def test_local_curve_is_the_mean_over_clients(tmp_path):
    from fedscope_jax.experiments.plots import curve
    from fedscope_jax.experiments.tables import load_run

    d = _run(tmp_path, "local", _cell("local", "n/a", "local"), (0.1, 0.1), 0, mode="local")
    lines = [{"client": c, "epoch": e, "select": 0.1 * c + e} for c in (0, 1) for e in (1, 2)]
    lines.append({"client": 1, "epoch": 3, "select": 5.0})                     # client 0 stopped early
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    x, y = curve(load_run(d))
    assert x.tolist() == [1, 2, 3] and y == pytest.approx([1.05, 2.05, 5.0])


def test_seed_band_keeps_the_rounds_of_seeds_that_ran_longer():
    """Early stopping ends seeds at different rounds: the band covers every round any seed reached, each point
    the mean / min / max of the seeds there (hand-computed)."""
    from fedscope_jax.experiments.plots import seed_band

    a = (np.array([2, 4, 6]), np.array([0.1, 0.2, 0.3]))
    b = (np.array([2, 4]), np.array([0.3, 0.4]))
    x, mean, lo, hi = seed_band([a, b])
    np.testing.assert_array_equal(x, [2, 4, 6])
    np.testing.assert_allclose(mean, [0.2, 0.3, 0.3])
    np.testing.assert_allclose(lo, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(hi, [0.3, 0.4, 0.3])


def test_random_ranking_matches_hand_computed_values():
    from fedscope_jax.experiments.report import random_ranking

    ideal = sum(1 / math.log2(r + 1) for r in range(1, 11))          # 4.5436 for ranks 1..10
    assert random_ranking(99) == pytest.approx((0.1, ideal / 100))
    assert random_ranking(999) == pytest.approx((0.01, 0.0045436), rel=1e-4)
    assert random_ranking(4) == pytest.approx((1.0, sum(1 / math.log2(r + 1) for r in range(1, 6)) / 5))


def test_report_states_the_timings_of_a_stopped_reproduction(tmp_path):
    """plan.json of a reproduction stopped after some cells (status still 'running'): the report states the
    totals over every process, the compilation cache and, per study, the median and slowest timed cells."""
    root = tmp_path / "rep"
    cells = [str(_run(root, f"runs/toy/fedscope/off-seed{s}", _cell("fedscope", "off"), (0.1, 0.2), s)
                 .relative_to(root)) for s in (0, 1, 2)]
    plan = {"profile": "quick", "dry_run": False, "status": "running", "hardware": {"device": "cpu"},
            "seconds_this_process": 50.0, "cpu_seconds_this_process": 90.0, "seconds_total": 130.0,
            "cpu_seconds_total": 250.0, "compile_cache": {"enabled": True, "dir": "OUT/cache/xla/x86_64-abc"},
            "xla_compiles_this_process": {"programs": 40, "seconds": 61.4, "cache_hits": 12, "cache_writes": 20},
            "cells_seconds": {cells[0]: {"seconds": 70.0, "cpu_seconds": 140.0},
                              cells[1]: {"seconds": 20.0, "cpu_seconds": 40.0},
                              cells[2]: {"seconds": 30.0, "cpu_seconds": 60.0},
                              "runs/other/x": {"seconds": 999.0, "cpu_seconds": 999.0}},
            "studies": {"main": {"title": "Main", "kind": "cells", "cells": cells, "datasets": ["toy"],
                                 "seconds_total": 120.0, "cpu_seconds_total": 240.0}}}
    (root / "plan.json").write_text(json.dumps(plan))
    assert main(["report", "--runs", str(root), "--out", str(tmp_path / "out")]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert ("- status: running (or stopped before its end: the timings below cover its finished cells); 50 s wall "
            "/ 90 s CPU in the last `fedscope reproduce` process; 130 s wall / 250 s CPU in every process that "
            "worked on this folder; XLA compilation cache on (`OUT/cache/xla/x86_64-abc`), that process: 40 XLA "
            "compilations, 61 s compiling or reading them, 12 read from the cache\n") in report
    assert "120 s wall, 240 s CPU." in report
    assert (f"Per cell (3 trained; wall seconds in `plan.json`, `cells_seconds`): median 30 s, slowest "
            f"`{cells[0]}` (70 s), `{cells[2]}` (30 s), `{cells[1]}` (20 s).") in report


def test_privacy_series_keeps_methods_apart(tmp_path):
    """With several methods in a privacy study (FedSCOPE and its no-ID arm), each method gets its own lines; with
    one method the labels stay bare."""
    from fedscope_jax.experiments.plots import privacy_series
    from fedscope_jax.experiments.tables import group_runs, load_run

    runs = []
    for method, base in (("fedscope", 0.05), ("fedscope_noid", 0.08)):
        runs.append(load_run(_run(tmp_path, f"{method}/p8", _cell(method, "personalized-user-eps8", eps=8.0,
                                                                   pmode="personalized"),
                                  (base, base), 0, privacy=("personalized", 8.0), eps_spent=8.0, unit="user")))
        runs.append(load_run(_run(tmp_path, f"{method}/off", _cell(method, "off", pmode="off"), (0.2, 0.2), 0)))
    by_mode, nodp = privacy_series(group_runs(runs))
    assert by_mode == {"FEDSCOPE: personalized (user unit)": [(8.0, pytest.approx(0.05), pytest.approx(math.nan,
                                                                                                       nan_ok=True))],
                       "FEDSCOPE_NOID: personalized (user unit)": [(8.0, pytest.approx(0.08),
                                                                    pytest.approx(math.nan, nan_ok=True))]}
    assert sorted(n for n, _, _ in nodp) == ["FEDSCOPE: off", "FEDSCOPE_NOID: off"]
    one, _ = privacy_series(group_runs(runs[:2]))
    assert list(one) == ["personalized (user unit)"]
    from fedscope_jax.experiments.plots import privacy_utility
    assert privacy_utility(group_runs(runs), tmp_path / "pu.png", "two methods").stat().st_size > 1000


def test_attributes_column_names_the_vectors():
    from fedscope_jax.experiments.tables import _short_attr

    assert _short_attr("/t/titles/afk/item_embeddings.arrow", "fedscope_title_noid") == "title"
    assert _short_attr("/t/llm/afk/item_embeddings.arrow", "fedscope") == "LLM"
    assert _short_attr("none (no --attributes-root)", "fedscope") == "none" and _short_attr(None) == "none"


def test_cells_at_or_below_popularity_are_named_with_their_curves(tmp_path):
    """A trained cell whose mean test NDCG@10 is at or below the popularity ranking's (0.05 / 0.07 here) is
    listed in the report with its value, and its validation curve is drawn; cells above it are not listed."""
    root = tmp_path / "rep"
    cells = []
    at = {**_cell("fedscope", "off"), "variant": "clients=50"}
    for s in range(2):
        cells.append(str(_run(root, f"runs/toy/fedsasrec/off-seed{s}", _cell("fedsasrec", "off"),
                              (0.10, 0.06 + 0.01 * s), s).relative_to(root)))      # kitchen 0.065 <= 0.07
        cells.append(str(_run(root, f"runs/toy/fedscope/off-seed{s}", _cell("fedscope", "off"),
                              (0.10, 0.08), s).relative_to(root)))
        cells.append(str(_run(root, f"runs/toy/fedscope/off-c50-seed{s}", at, (0.05, 0.08), s).relative_to(root)))
    studies = {"main": {"title": "Main", "kind": "cells", "cells": cells, "datasets": ["toy"]}}
    (root / "plan.json").write_text(json.dumps({"profile": "quick", "dry_run": False, "status": "complete",
                                                "hardware": {"device": "cpu"}, "studies": studies}))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(root), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "**2 cell(s) at or below the popularity ranking**" in report
    assert "- FEDSASREC (off) on toy kitchen: 0.0650 against 0.0700" in report
    assert "- FEDSCOPE (off) clients=50 on toy food: 0.0500 against 0.0500" in report     # "at" counts
    assert "FEDSCOPE (off) on toy" not in report
    assert (out / "main_below_popularity_toy.png").stat().st_size > 1000
    assert "(main_below_popularity_toy.png)" in report


def test_vector_arms_are_paired_by_seed(tmp_path):
    """The ablation's item-vector arms (LLM attributes, title vectors, ID only) get a table of per-seed
    differences: mean and sample std over the seeds both arms ran, hand-computed here; a seed one arm lacks is
    left out, and a method outside those arms (FedSASRec) is not paired."""
    root = tmp_path / "rep"
    arms = {"fedscope": ("/x/llm/toy/item_embeddings.arrow", {0: (0.30, 0.20), 1: (0.34, 0.22), 2: (0.50, 0.90)}),
            "fedscope_title": ("/x/titles/toy/item_embeddings.arrow", {0: (0.28, 0.21), 1: (0.30, 0.20)}),
            "fedscope_wo_llm": ("none", {0: (0.25, 0.20), 1: (0.27, 0.18), 2: (0.26, 0.19)}),
            "fedsasrec": ("none", {0: (0.9, 0.9), 1: (0.9, 0.9), 2: (0.9, 0.9)})}
    cells = []
    for method, (attributes, values) in arms.items():
        for s, v in values.items():
            cell = {**_cell(method, "off"), "attributes": attributes}
            cells.append(str(_run(root, f"runs/toy/{method}/off-seed{s}", cell, v, s).relative_to(root)))
    for method, v in (("fedscope", (0.40, 0.30)), ("fedscope_wo_llm", (0.20, 0.10))):  # another variant, seed 0
        cell = {**_cell(method, "off"), "attributes": arms[method][0], "variant": "d64"}
        cells.append(str(_run(root, f"runs/toy/{method}/d64-off-seed0", cell, v, 0).relative_to(root)))
    studies = {"ablation": {"title": "Ablation", "kind": "cells", "cells": cells, "datasets": ["toy"]}}
    (root / "plan.json").write_text(json.dumps({"profile": "quick", "dry_run": False, "status": "complete",
                                                "hardware": {"device": "cpu"}, "studies": studies}))
    out = tmp_path / "report"
    assert main(["report", "--runs", str(root), "--out", str(out)]) == 0
    approx = lambda x: pytest.approx(x, rel=1e-5)  # noqa: E731  (the CSV keeps 6 significant digits)
    assert "**What the item vectors add**" in (out / "report.md").read_text()
    variants = {(r["variant"], r["A vs B"], r["domain"]): r for r in _csv(out / "ablation_vectors.csv")}
    assert sorted(k for k in variants if k[0] == "d64") == [("d64", "LLM vs none", d) for d in ("food", "kitchen")]
    assert float(variants["d64", "LLM vs none", "kitchen"]["A - B mean"]) == pytest.approx(0.2, rel=1e-5)
    rows = {(ab, d): r for (v, ab, d), r in variants.items() if v == "base"}
    assert sorted(rows) == [(ab, d) for ab in ("LLM vs none", "LLM vs title", "title vs none")
                            for d in ("food", "kitchen")]
    r = rows["LLM vs title", "food"]                    # seeds 0, 1: differences 0.02, 0.04
    assert r["seeds"] == "2" and r["A / B"] == f"{0.32 / 0.29:.3f}"
    assert float(r["NDCG@10 A mean"]) == approx(0.32) and float(r["NDCG@10 B mean"]) == approx(0.29)
    assert float(r["A - B mean"]) == approx(0.03) and float(r["A - B std"]) == approx(0.02 ** 0.5 / 10)
    assert float(r["full: A - B mean"]) == approx(0.003)          # full ranking: the values / 10
    r = rows["LLM vs none", "food"]                     # seeds 0-2: differences 0.05, 0.07, 0.24
    assert r["seeds"] == "3" and float(r["A - B mean"]) == approx(0.12)
    assert float(r["A - B std"]) == approx(math.sqrt((0.07 ** 2 + 0.05 ** 2 + 0.12 ** 2) / 2))
    r = rows["title vs none", "kitchen"]                # differences 0.01, 0.02
    assert float(r["A - B mean"]) == approx(0.015) and float(r["A - B std"]) == approx(0.5 ** 0.5 / 100)
