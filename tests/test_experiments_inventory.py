"""`fedscope reproduce --inventory`: the counted work equals what the trainers do, and its pricing."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from conftest import SETTINGS

from fedscope_jax.cli import main
from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments import inventory as inv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fedscope_jax.data.canonical import load_dataset

    out = tmp_path_factory.mktemp("data") / "syn"
    assert main(["data", "synth", "--out", str(out), "--users", "90", "--items-a", "80", "--items-b", "90",
                 "--max-length", "16", "--mean-length", "12", "--min-length", "10"]) == 0
    return load_dataset(out)


def config(*extra: str):
    from fedscope_jax.train.config import load_config

    return load_config(None, [*SETTINGS, *extra])


def test_federated_counts_equal_the_rounds_a_run_records(tiny, tmp_path):
    """Sampled rounds (fraction 0.5) of power-law clients in 2 size buckets with chunks of 2: the inventory's
    real and slot steps per round are the ones the engine's cohorts had, and its validations the run's."""
    from fedscope_jax.train.federated import train_federated

    cfg = config("federated.clients=7", "federated.fraction=0.5", "federated.max_buckets=2",
                 "federated.chunk_size=2", "federated.rounds=5", "federated.eval_every=2", "train.batch_size=8")
    train_federated(tiny, cfg, tmp_path / "run")
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_of, n = inv.client_steps(tiny, cfg)
    assert n == 7 and len(set(steps_of.tolist())) > 2   # clients of several sizes: buckets matter
    real, slots = inv.round_steps(steps_of, cfg, multiple=2)
    assert real == [r["real_steps"] for r in records]
    assert slots == [r["slot_steps"] for r in records]
    assert any(s > r for s, r in zip(slots, real))   # padding is counted
    w = inv.federated_work(tiny, cfg, multiple=2)
    assert (w.runs, w.config_rounds, w.slot_steps, w.real_steps) == (1, 5, sum(slots), sum(real))
    assert w.validations == sum("valid" in r for r in records) == 3   # rounds 2, 4 and the last
    from fedscope_jax.eval.protocol import eval_set

    valid, test = (len(eval_set(tiny, split, cfg.model.max_len, cfg.eval)) for split in ("valid", "test"))
    t = inv.targets(tiny)
    assert t["valid"][0] == valid > 0 and t["test"][0] == test > 0
    assert t["valid"][0] * min(tiny.n_items) <= t["valid"][1] <= t["valid"][0] * max(tiny.n_items)
    assert w.scored_targets == 4 * valid + test   # 3 validations + the final valid and test
    assert w.computed_steps == w.slot_steps == sum(r["computed_steps"] for r in records)   # a vmapped chunk
    # a chunk of one client pads less, and skips the padding steps it has (engine/round.py)
    assert sum(inv.round_steps(steps_of, cfg, multiple=1)[1]) <= w.slot_steps
    one = config("federated.clients=7", "federated.fraction=0.5", "federated.max_buckets=2",
                 "federated.chunk_size=1", "federated.rounds=5", "federated.eval_every=2", "train.batch_size=8")
    fed = SimpleNamespace(mode="federated")
    w1 = inv.cell_work(fed, tiny, one)   # a chunk of one of its own: counted at one, its padding skipped
    assert w1.computed_steps == w1.real_steps == w.real_steps < w1.slot_steps
    train_federated(tiny, one, tmp_path / "one")   # as the run records it
    ones = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["computed_steps"] for r in ones] == [r["real_steps"] for r in ones] == real
    assert sum(r["slot_steps"] for r in ones) == w1.slot_steps
    assert inv.cell_work(fed, tiny, one, chunk=2) == w1   # its own chunk, not a calibration's
    tuned = config("federated.clients=7", "federated.fraction=0.5", "federated.max_buckets=2",
                   "federated.chunk_size=0", "federated.rounds=5", "federated.eval_every=2", "train.batch_size=8")
    assert inv.cell_work(fed, tiny, tuned, chunk=2) == w            # tuned: at the calibration's chunk
    assert inv.cell_work(fed, tiny, tuned) == w1                     # tuned, no calibration: at one
    sweep = SimpleNamespace(mode="sweep", sweep_modes=("personalized",), sweep_epsilons=(1.0, 2.0))
    ws = inv.cell_work(sweep, tiny, tuned)   # at a chunk of one a sweep skips its padding steps too
    assert ws.computed_steps == ws.real_steps == 2 * w1.real_steps and ws.slot_steps == 2 * w1.slot_steps
    assert inv.cell_work(sweep, tiny, tuned, chunk=2).computed_steps == 2 * w.slot_steps
    assert inv.cell_work(sweep, tiny, one, chunk=2) == ws   # a sweep's own chunk, not a calibration's


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_epoch_counts_equal_the_steps_a_run_takes(tiny, tmp_path, mode):
    """Without early stopping (patience > epochs) a run takes exactly the counted steps and validations."""
    from fedscope_jax.train.centralized import train_centralized
    from fedscope_jax.train.local import train_local

    cfg = config("train.epochs=2", "train.patience=5", "train.batch_size=8", "federated.clients=3")
    summary = (train_local if mode == "local" else train_centralized)(tiny, cfg, tmp_path / mode)
    w = inv.epoch_work(tiny, cfg, local=mode == "local")
    assert w.epoch_steps == summary["training"]["steps"] > 0
    assert (w.runs, w.config_rounds, w.slot_steps) == (1, 0, 0)
    logged = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
    valid_clients = {r.get("client") for r in logged if "valid" in r}
    assert w.validations >= sum("valid" in r for r in logged) == 2 * len(valid_clients)


def test_sweep_configs_match_the_sweeps_dedupe():
    from fedscope_jax.train.sweep import distinct_points, sweep_points

    cfg = config()
    for (modes, eps), n in (((("personalized", "uniform"), (1.0, 2.0, math.inf)), 5), ((("central",), (4.0,)), 1),
                            ((("personalized", "uniform", "central"), (1.0, 2.0, 4.0, 8.0, 16.0, math.inf)), 16)):
        trained, _ = distinct_points(sweep_points(cfg, modes, eps, [0]))
        assert inv.sweep_configs(cfg, modes, eps) == len(trained) == n
    assert inv.sweep_configs(cfg, ("personalized", "uniform", "central"), (1, 2, 4, 8, 16, math.inf)) == 16


def test_calibration_prices_each_unit_and_names_a_bad_file():
    bench = {"one_by_one_seconds": 30.0, "sweep_seconds": 6.0, "one_by_one_slot_steps": 1500,
             "sweep_slot_steps": 1500, "one_by_one_chunk_sizes": [4], "sweep_chunk_sizes": [4], "device": "gpu:H100",
             "unit_costs": {"epoch_step_seconds": 0.01, "seconds_per_validation_target_item": 1e-8}}
    cal = inv.calibration(bench, "b.json")
    assert cal["single_seconds_per_step"] == pytest.approx(0.02)
    assert cal["sweep_seconds_per_step"] == pytest.approx(0.004)
    assert cal["single_chunk"] == cal["sweep_chunk"] == 4
    w = inv.Work(runs=1, config_rounds=100, slot_steps=400_000, computed_steps=360_000, epoch_steps=720_000,
                 scored_target_items=36 * 10**10)
    assert inv.hours(w, "federated", cal) == pytest.approx({"federated": 2.0, "epochs": 2.0, "validation": 1.0})
    assert inv.hours(w, "sweep", cal)["federated"] == pytest.approx(0.4)
    # a benchmark whose single runs skipped padding steps (chunk 1) is priced per step it computed
    cal1 = inv.calibration({**bench, "one_by_one_chunk_sizes": [1], "one_by_one_computed_steps": 1000}, "b.json")
    assert cal1["single_seconds_per_step"] == pytest.approx(0.03) and cal1["single_chunk"] == 1
    assert cal1["per_computed_step"] and cal["per_computed_step"]   # chunk 4: every slot is computed
    # a sweep at chunk 1 skips padding steps too: priced per computed step, said where its report lacks them
    ones = {**bench, "one_by_one_chunk_sizes": [1], "one_by_one_computed_steps": 1000, "sweep_chunk_sizes": [1]}
    assert not inv.calibration(ones, "b.json")["per_computed_step"]
    assert not inv.calibration({**ones, "sweep_chunk_sizes": [1, 4]}, "b.json")["per_computed_step"]
    cal1 = inv.calibration({**ones, "sweep_computed_steps": 1200}, "b.json")
    assert cal1["sweep_seconds_per_step"] == pytest.approx(0.005) and cal1["per_computed_step"]
    for key in ("one_by_one_computed_steps", "sweep_computed_steps"):
        with pytest.raises(FedscopeError, match=rf"b\.json: {key}: expected a step count > 0"):
            inv.calibration({**bench, key: 0}, "b.json")
    # an old chunk-1 report (no computed count) and cells at another chunk than the calibration's are said
    old1 = inv.calibration({**bench, "one_by_one_chunk_sizes": [1]}, "b.json")
    assert not old1["per_computed_step"]
    warn = inv.calibration_warnings({"calibration": old1, "calibration_mismatch": {},
                                     "calibration_chunk_mismatch": {"4": 3}})
    assert len(warn) == 2 and "3 cells run at 4" in warn[0] and "predates computed step counts" in warn[1]
    assert inv.calibration_warnings({"calibration": cal1, "calibration_mismatch": {},
                                     "calibration_chunk_mismatch": {}}) == []
    old = {k: v for k, v in bench.items() if k not in ("sweep_slot_steps", "unit_costs")}
    with pytest.raises(FedscopeError, match=r"b\.json: .*no sweep_slot_steps, unit_costs"):
        inv.calibration(old, "b.json")
    with pytest.raises(FedscopeError, match=r"b\.json: expected a JSON object .* got list"):
        inv.calibration([bench], "b.json")
    with pytest.raises(FedscopeError, match=r"unit_costs\.epoch_step_seconds: expected a number"):
        inv.calibration({**bench, "unit_costs": {"seconds_per_validation_target_item": 1e-8}}, "b.json")
    with pytest.raises(FedscopeError, match="one_by_one_slot_steps and one_by_one_seconds"):
        inv.calibration({**bench, "one_by_one_seconds": -1.0}, "b.json")


def test_calibration_says_where_it_timed_another_step():
    """Hours priced with a benchmark of another batch or model size are flagged, field by field."""
    workload = {"batch_size": 256, "model": {"dim": 16, "blocks": 2, "max_len": 10, "num_negatives": 100}}
    shape = inv.calibrated_shape(workload)
    # a report without the loss (written before it was recorded) timed the sampled softmax
    assert shape == {"batch_size": 256, "dim": 16, "blocks": 2, "max_len": 10, "num_negatives": 100,
                     "rec": "sampled"}
    assert inv.calibrated_shape({**workload, "model": {**workload["model"], "rec": "full"}})["rec"] == "full"
    assert inv.shape_mismatch(shape, [{**shape, "rec": "full"}]) == {"rec": {"calibrated": "sampled",
                                                                            "cells": {"full": 1}}}
    assert inv.calibrated_shape(None) is None and inv.calibrated_shape({"batch_size": 8}) is None
    cells = [{**shape, "dim": 64, "max_len": 50}, {**shape, "dim": 64, "max_len": 50}, {**shape, "dim": 32}, shape]
    mismatch = inv.shape_mismatch(shape, cells)
    assert mismatch == {"dim": {"calibrated": 16, "cells": {"64": 2, "32": 1}},
                        "max_len": {"calibrated": 10, "cells": {"50": 2}}}
    assert inv.shape_mismatch(shape, [shape, shape]) == {}
    lines = inv.calibration_warnings({"calibration_mismatch": mismatch})
    assert lines == ["warning: the calibration timed dim 16, but 1 cell uses 32, 2 cells use 64: their hours price "
                     "a step of another size (rerun the sweep benchmark with --set model.dim=... to match)",
                     "warning: the calibration timed max_len 10, but 2 cells use 50: their hours price a step of "
                     "another size (rerun the sweep benchmark with --set model.max_len=... to match)"]
    assert inv.calibration_warnings({"calibration_mismatch": {}}) == []
    assert inv.calibration_warnings({}) == []                      # not calibrated: nothing to say
    assert "records no workload step shape" in inv.calibration_warnings({"calibration_mismatch": None})[0]


def test_reproduce_inventory_counts_every_study_without_training(shared_data, tmp_path, capsys):
    from fedscope_jax.experiments.inventory import Work

    out = tmp_path / "inv"
    assert main(["reproduce", "--profile", "quick", "--inventory", "--datasets", "abxi-food-kitchen",
                 "--data-root", str(shared_data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "slot steps" in text and "privacy_utility" in text
    report = json.loads((out / "inventory.json").read_text())
    assert not (out / "runs").exists() and not (out / "plan.json").exists()   # nothing trained
    studies = report["studies"]
    # ablation's full-FedSCOPE cells are main's: counted once, in main
    assert studies["ablation"]["cells"] - studies["ablation"]["new_cells"] == 6
    # the title-only arm (no --title-root given) and "w/o LLM" (no --attributes-root: it would be FedSCOPE's)
    assert studies["ablation"]["not_run"] == 12
    assert ("not run (not counted): 12 cell(s) of ablation (fedscope_title on abxi-food-kitchen: none (no "
            "--title-root") in text
    assert "fedscope_wo_llm on abxi-food-kitchen: the same runs as fedscope's without LLM vectors (none" in text
    # the privacy study's no-ID arms (3 programs x 3 seeds each) need item vectors: neither root is given
    assert studies["privacy_utility"]["not_run"] == 18
    assert "not run (not counted): 18 cell(s) of privacy_utility (fedscope_noid on abxi-food-kitchen: none (" in text
    assert "fedscope_title_noid on abxi-food-kitchen: none (no --title-root" in text
    sweep = studies["privacy_utility"]["by_mode"]["sweep"]
    # per seed: the client unit's 2 modes x 6 epsilons and the user unit's, the eps-inf copy once in each (10
    # rounds), and the distributed program's 6 epsilons (200 rounds of its own, `distributed_set`)
    assert sweep["runs"] == 3 * (2 * 11 + 6) and sweep["config_rounds"] == 3 * (2 * 11 * 10 + 6 * 200)
    main_modes = studies["main"]["by_mode"]
    assert Work(**main_modes["centralized"]).epoch_steps > 0 and Work(**main_modes["federated"]).slot_steps > 0
    assert main(["reproduce", "--calibrate", str(out / "inventory.json"), "--out", str(out)]) == 2
    assert "only with --inventory" in capsys.readouterr().err
    assert main(["reproduce", "--inventory", "--calibrate", str(out / "inventory.json"), "--datasets",
                 "abxi-food-kitchen", "--data-root", str(shared_data), "--out", str(out)]) == 2
    assert "not a `fedscope benchmark --sweep` report" in capsys.readouterr().err
    # a calibration timed at another model width: priced all the same, and said (in the table and the JSON)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({
        "device": "gpu:test", "one_by_one_seconds": 3.0, "sweep_seconds": 1.0, "one_by_one_slot_steps": 100,
        "sweep_slot_steps": 100, "one_by_one_chunk_sizes": [1], "sweep_chunk_sizes": [1],
        "unit_costs": {"epoch_step_seconds": 0.01, "seconds_per_validation_target_item": 1e-9},
        "workload": {"batch_size": 64, "model": {"dim": 7, "blocks": 2, "max_len": 20, "num_negatives": 100}}}))
    assert main(["reproduce", "--profile", "quick", "--inventory", "--calibrate", str(bench), "--datasets",
                 "abxi-food-kitchen", "--data-root", str(shared_data), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads((out / "inventory.json").read_text())
    dims = report["calibration_mismatch"]["dim"]
    assert dims["calibrated"] == 7 and sum(dims["cells"].values()) == sum(
        st["new_cells"] for st in report["studies"].values())
    assert "warning: the calibration timed dim 7, but" in text and "hours on gpu:test" in text


def test_reproduce_progress_weighs_cells_by_their_counted_steps(shared_data, tmp_path):
    """The reproduction's bar: a cell weighs its counted steps, a cell listed again 0, a finished one starts it."""
    from fedscope_jax.experiments.cells import run_config
    from fedscope_jax.experiments.planning import CellData, Options, plan
    from fedscope_jax.experiments.runner import progress_weights
    from fedscope_jax.experiments.spec import load_studies

    opts = Options("quick", tmp_path, shared_data, datasets=("abxi-food-kitchen",))
    studies = {s.name: s for s in load_studies(None)}
    data = CellData(opts)
    todo = []
    for name, cells in plan([studies["ablation"]], studies, opts).items():
        for cell in cells:
            path, ds, sem, cov, label = data.get(studies[name], cell.dataset)
            todo.append((studies[name], cell, tmp_path / cell.relative_dir(str(path), label),
                         (ds, sem, cov, label, path)))
    todo.append(todo[0])   # listed twice (as when two studies share a cell)
    weights, done = progress_weights(todo)
    assert done == 0 and weights[-1] == 0 and all(w > 0 for w in weights[:-1])
    first = todo[0]
    w0 = inv.cell_work(first[1], first[3][0], run_config(first[1], "ablation"))
    assert weights[0] == w0.computed_steps == w0.real_steps < w0.slot_steps   # chunk 1: padding skipped
    first[2].mkdir(parents=True)
    (first[2] / "summary.json").write_text("{}")
    assert progress_weights(todo)[1] == weights[0]

