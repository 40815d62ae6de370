"""`fedscope train --mode federated` end to end on a tiny synthetic dataset: run directory contents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedscope_jax.cli import main
from fedscope_jax.errors import FedscopeError

TINY = ["--set", "model.dim=8", "--set", "model.blocks=1", "--set", "model.heads=1", "--set", "model.max_len=6",
        "--set", "train.batch_size=8", "--set", "model.loss.num_negatives=10", "--set", "eval.num_negatives=20",
        "--chunk-size", "1"]


def test_federated_run_directory(tiny_dataset: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "3",
                 "--scheme", "uniform", "--rounds", "2", "--eval-every", "2", *TINY]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in lines] == [1, 2]
    assert all(r["clients"] == 3 and r["included"] == 3 and 0 <= r["padding_waste"] < 1 for r in lines)
    assert "valid" in lines[1] and "valid" not in lines[0]
    assert all(r["loss"] > 0 and r["update_norm"] > 0 for r in lines)
    summary = json.loads((run / "summary.json").read_text())
    fed = summary["federated"]
    assert fed["clients"] == 3 and fed["chunk_size"] == 1 and fed["rounds"] == 2 and fed["devices"] >= 1
    assert set(summary["test"]) == {"A", "B"} and 0 <= summary["test"]["A"]["NDCG@10"] <= 1
    assert {"cold_start", "long_tail", "baselines"} <= set(summary)   # the shared final evaluation
    assert (run / "checkpoints").is_dir() and (run / "params.msgpack").is_file()
    # the default cadence (checkpoint_every 0) saves once a minute: two quick rounds leave only the last one's
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    tr = summary["training"]   # personalized DP by default: the final round is tested
    assert (tr["selection"], tr["best_round"], tr["rounds_run"], tr["stopped_early"]) == ("final", None, 2, False)
    assert "(2 of 2 rounds, tested the final round" in capsys.readouterr().out
    # without --resume the existing run is refused
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "3",
                 "--rounds", "2", *TINY]) == 2
    # --resume with other options is refused, naming the key; with the same ones it is a no-op
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "4",
                 "--scheme", "uniform", "--rounds", "2", "--eval-every", "2", "--resume", *TINY]) == 2
    assert "federated.clients" in capsys.readouterr().err
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "3",
                 "--scheme", "uniform", "--rounds", "2", "--eval-every", "2", "--resume", *TINY]) == 0
    # the run's own config.json is a --config file holding the same settings (its record keys left out)
    from fedscope_jax.train.config import RUN_RECORD_KEYS, load_config, to_dict
    record = json.loads((run / "config.json").read_text())
    assert {"data", "mode"} <= set(record) and "seed" in record["federated"]
    assert to_dict(load_config(run / "config.json")) == {k: v for k, v in record.items() if k not in RUN_RECORD_KEYS}
    record["train"]["seed"] = record["federated"]["seed"] = 2
    (tmp_path / "seed2.json").write_text(json.dumps(record))
    assert load_config(tmp_path / "seed2.json").federated.seed == 2
    (tmp_path / "mine.json").write_text(json.dumps({"data": "x", "model": {"dim": 8}}))   # not a run's record
    with pytest.raises(FedscopeError, match=r"mine\.json: unknown config key 'data'"):
        load_config(tmp_path / "mine.json")


def test_client_per_domain_setting(tiny_dataset: Path, tmp_path: Path):
    """--scheme domain without --clients: the scheme sets the count (one client a domain), not the default 8."""
    run = tmp_path / "run"
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run),
                 "--scheme", "domain", "--rounds", "1", *TINY]) == 0
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert line["clients"] == 2 and line["included"] == 2 and line["loss"] > 0


def test_schemes_that_fix_the_client_count(tiny_dataset: Path, tmp_path: Path, capsys):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.partition import partition
    from fedscope_jax.train.config import load_config

    cfg = load_config(None, ["federated.scheme=user"])          # a config file / --set without clients
    assert cfg.federated.clients == 0
    assert partition(load_dataset(tiny_dataset), cfg.federated.clients or None, "user").n_clients == 60
    assert load_config(None, ["federated.scheme=powerlaw"]).federated.clients == 8
    with pytest.raises(FedscopeError, match=r"--clients 0 .*only with --scheme user or domain"):
        load_config(None, ["federated.clients=0"])
    run = tmp_path / "run"                                        # an explicit count that does not fit is refused
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "8",
                 "--scheme", "domain", "--rounds", "1", *TINY]) == 2
    assert "--clients must equal the 2 domains" in capsys.readouterr().err and not run.exists()


def test_sampled_rounds_compile_one_round_program(tiny_dataset: Path, tmp_path: Path):
    """Sampling half of 8 power-law clients per round: fixed bucket slots keep every round's shapes."""
    run = tmp_path / "run"
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "8",
                 "--scheme", "powerlaw", "--fraction", "0.5", "--max-buckets", "3", "--rounds", "6",
                 "--eval-every", "6", *TINY]) == 0
    fed = json.loads((run / "summary.json").read_text())["federated"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(fed["buckets"]) >= 2 and all(r["clients"] == 4 for r in lines)
    assert sum(b["slots"] for b in fed["buckets"]) <= 4
    assert fed["timing"]["round_programs_compiled"] == 1


def test_chunk_candidates_stop_at_the_bucket_slots(tiny_dataset: Path, tmp_path: Path):
    """With 2 of 8 clients sampled per round the one bucket has 2 slots: larger chunks are not timed."""
    run = tmp_path / "run"
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "8",
                 "--scheme", "uniform", "--fraction", "0.25", "--max-buckets", "1", "--rounds", "2",
                 "--eval-every", "2", *TINY, "--chunk-size", "0"]) == 0
    fed = json.loads((run / "summary.json").read_text())["federated"]
    assert [b["slots"] for b in fed["buckets"]] == [2]
    assert set(fed["chunk_tuning_seconds"]) == {"1", "2"} and fed["chunk_size"] in (1, 2)


@pytest.mark.parametrize("field, value, message", [
    ("clients", -1, "--clients -1: expected >= 1"), ("rounds", -1, "--rounds -1: expected >= 1"),
    ("clients", 0, "--clients 0 (the scheme's own count): only with --scheme user or domain, got --scheme "
                   "powerlaw; give a count >= 1"),
    ("local_epochs", 0, "--local-epochs 0: expected >= 1"), ("chunk_size", -1, "--chunk-size -1: expected >= 0"),
    ("eval_every", 0, "--eval-every 0: expected >= 1"), ("checkpoint_every", -1, "--checkpoint-every -1: expected >= 0"),
    ("fraction", 1.5, "--fraction 1.5: expected 0 < fraction <= 1")])
def test_federated_config_errors_name_the_one_flag_at_fault(field, value, message):
    from fedscope_jax.train.federated_config import FederatedConfig

    with pytest.raises(FedscopeError) as err:
        FederatedConfig(**{field: value})
    assert str(err.value) == message


def test_a_chunk_that_does_not_fit_the_memory_is_refused_before_training(tiny_dataset: Path, tmp_path: Path,
                                                                          capsys, monkeypatch):
    """Memory is planned: the round program is compiled before the first round and its XLA memory analysis is
    checked against the device's memory; a chunk that does not fit is a one-line error, never an XLA
    RESOURCE_EXHAUSTED traceback. (Here the device is told it has 1 KiB.)"""
    from fedscope_jax.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1024)
    run = tmp_path / "run"
    # model.dim 12: a program no other test compiled (a kept executable would skip the check)
    assert main(["train", "--mode", "federated", "--data", str(tiny_dataset), "--out", str(run), "--clients", "3",
                 "--rounds", "2", *TINY, "--set", "model.dim=12", "--chunk-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--chunk-size 2: the round program needs" in err and "but 0.00 GiB is available" in err
    assert "a smaller chunk may not fit either" in err and "Traceback" not in err
    assert not (run / "metrics.jsonl").exists()
