"""`fedscope benchmark --data DIR`: the engine benchmark on the real users of a prepared dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedscope_jax.data.canonical import TRAIN, load_dataset
from fedscope_jax.data.synth import SynthConfig, synthesize
from fedscope_jax.errors import FedscopeError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 30-user, two-domain prepared dataset."""
    path = tmp_path_factory.mktemp("bench-data") / "tiny"
    synthesize(SynthConfig(users=30, items=(20, 25), min_length=6, max_length=12, mean_length=8.0, min_per_domain=3,
                           topics=3, name="tiny"), path)
    return path


def _expected(ds, user: int, domain: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """seq / pos of one user in one domain, straight from the interactions: last max_len + 1 train items."""
    rows = (ds.user == user) & (ds.domain == domain) & (ds.split == TRAIN)
    items = ds.item[rows][np.argsort(ds.position[rows])][-(max_len + 1):] + 1
    seq, pos = np.zeros(max_len, np.int32), np.zeros(max_len, np.int32)
    n = max(len(items) - 1, 0)
    seq[:n], pos[:n] = items[:-1][:n], items[1:]
    return seq, pos


def test_real_clients_give_each_user_to_one_client_with_its_train_items(tiny):
    from fedscope_jax.data.batching import train_sequences
    from fedscope_jax.data.partition import partition
    from fedscope_jax.engine import reference_model as rm
    from fedscope_jax.bench.engine import BenchmarkConfig, real_clients, real_user_batches

    ds = load_dataset(tiny)
    cfg = BenchmarkConfig(clients=(3,), dim=8, max_len=8, batch_size=4, negatives=5, data=str(tiny))
    model = rm.ReferenceConfig(n_items_a=ds.n_items[0], n_items_b=ds.n_items[1], dim=8, max_len=8)
    shards = real_clients(ds, cfg, 3, model)
    part = partition(ds, 3, "powerlaw", cfg.seed, alpha=cfg.size_alpha)
    seqs = train_sequences(ds, 8)
    counts = [int(s.batch["user_mask"].sum()) for s in shards]
    assert counts == [len(seqs.rows_of(part.users_of(c))) for c in range(3)]
    assert sum(counts) == len(seqs.user) == ds.n_users          # every user, each on exactly one client
    assert counts[0] >= counts[1] >= counts[2]                   # power-law sizes, client 0 the largest
    for shard in shards:                                         # localized: ids index the client's vocabulary
        for name in "ab":
            assert shard.batch[f"seq_{name}"].max() < len(shard.vocab[name]) and shard.vocab[name][0] == 0
            assert shard.batch[f"neg_{name}"].shape == (shard.n_steps, 5)
        assert shard.batch["seq_a"].shape == (shard.n_steps, 4, 8)
        pad = shard.batch["user_mask"] == 0                      # padding users: all-zero rows
        assert all(not shard.batch[k][pad].any() for k in ("seq_a", "pos_a", "seq_b", "pos_b"))

    # hand-picked users, batched alone (max_len 3: longer histories are cut to their last 4 items): their train
    # items, 1-based, shifted by one, padding at the end; a domain with a single train item stays empty
    seqs3 = train_sequences(ds, 3)
    per = np.zeros((ds.n_users, 2), np.int64)
    np.add.at(per, (ds.user[ds.split == TRAIN], ds.domain[ds.split == TRAIN]), 1)
    longest, short = int(np.argmax(per.min(1))), int(np.argmin(per.min(1)))
    assert per[longest].max() > 4 and per[short].min() == 1
    for user in (longest, short):
        batch, step_mask = real_user_batches(seqs3, seqs3.rows_of([user]), ds.n_items, 4, 5,
                                             np.random.default_rng(0))
        assert step_mask.tolist() == [True] and batch["user_mask"].tolist() == [[1.0, 0.0, 0.0, 0.0]]
        for d, name in enumerate("ab"):
            seq, pos = _expected(ds, user, d, 3)
            np.testing.assert_array_equal(batch[f"seq_{name}"][0, 0], seq)
            np.testing.assert_array_equal(batch[f"pos_{name}"][0, 0], pos)
            assert not batch[f"seq_{name}"][0, 1:].any() and not batch[f"pos_{name}"][0, 1:].any()
            negs = batch[f"neg_{name}"]
            assert negs.shape == (1, 5) and negs.min() >= 1 and negs.max() <= ds.n_items[d]
    assert (_expected(ds, longest, int(np.argmax(per[longest])), 3)[0] > 0).sum() == 3   # cut to max_len


def _spy_writes(monkeypatch) -> list[dict]:
    """Copies of every report the CLI writes (it imports write_json when it runs)."""
    from fedscope_jax.utils import io

    written, real = [], io.write_json

    def spy(obj, path):
        written.append(json.loads(json.dumps(obj)))
        return real(obj, path)
    monkeypatch.setattr(io, "write_json", spy)
    return written


def test_benchmark_cli_on_a_prepared_dataset(tiny, tmp_path, capsys, monkeypatch):
    """The engine benchmark on a prepared dataset's users (here with the engine's reference model, which
    compiles in seconds; the FedSCOPE model, the default, below)."""
    from fedscope_jax.cli import main

    model = "reference"

    out = tmp_path / "bench.json"
    written = _spy_writes(monkeypatch)
    assert main(["benchmark", "--data", str(tiny), "--clients", "2,3", "--dim", "8", "--max-len", "8",
                 "--batch-size", "8", "--repeats", "1", "--model", model, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"data: tiny ({tiny}): 30 users, 20 + 25 items" in printed and f"model: {model}" in printed
    # rewritten after each client count, so a stopped benchmark keeps its finished rows; the last is the report
    assert [(len(w["results"]), w["complete"]) for w in written] == [(1, False), (2, True)]
    report = json.loads(out.read_text())
    assert [r["clients"] for r in report["results"]] == [2, 3]
    for key in ("device", "peak_flops"):
        assert key in report
    assert report["data"]["source"] == "dataset" and report["data"]["users"] == 30
    assert report["data"]["items"] == [20, 25] and report["data"]["path"] == str(tiny)
    assert report["data"]["train_interactions"] == int((load_dataset(tiny).split == TRAIN).sum())
    assert report["workload"]["users"] == 30 and report["workload"]["data"] == str(tiny)
    assert report["workload"]["model"] == model
    row = report["results"][0]
    for key in ("clients", "vmap_updates_per_s", "sequential_updates_per_s", "speedup", "flops_per_round",
                "flops_utilization", "padding_waste", "peak_memory_bytes"):
        assert key in row
    assert row["clients"] == 2 and row["flops_per_round"] > 0
    assert row["max_abs_diff_vs_sequential"] < 1e-4


def test_benchmark_of_the_fedscope_model_on_synthetic_users(tmp_path):
    """Without --data the FedSCOPE model trains a synthesized dataset of --users users sized like
    abxi-food-kitchen's catalogues; the report says the data were synthetic."""
    from fedscope_jax.bench.engine import BenchmarkConfig, run_benchmark

    report = run_benchmark(BenchmarkConfig(clients=(2,), users=24, items_a=40, items_b=50, dim=8, max_len=8,
                                           batch_size=8, repeats=1))
    assert report["data"] == {"source": "synthetic", "users": 24, "items": [40, 50]}
    row = report["results"][0]
    assert row["clients"] == 2 and row["flops_per_round"] > 0 and row["max_abs_diff_vs_sequential"] < 1e-4
    with pytest.raises(FedscopeError, match="--model 'bert': expected one of fedscope, reference"):
        BenchmarkConfig(model="bert")


@pytest.mark.parametrize("chunk", [1, 3])
def test_benchmark_counts_the_flops_its_chunk_executes(tiny, monkeypatch, chunk):
    """flops_per_round_executed counts the steps the timed program computes: at a chunk of one client its real
    steps only (padding steps are skipped), at a vmapped chunk every step slot."""
    import fedscope_jax.bench.engine as be

    def fixed(make, candidates, desc):   # the chunk under test instead of the timed choice
        make(chunk)
        return chunk, {chunk: 0.0}

    monkeypatch.setattr(be, "autotune_chunk_size", fixed)
    report = be.run_benchmark(be.BenchmarkConfig(clients=(3,), data=str(tiny), dim=8, max_len=6, batch_size=8,
                                                 negatives=5, max_buckets=1, repeats=1, model="reference"))
    row = report["results"][0]
    assert row["chunk_size"] == chunk and row["padding_waste"] > 0   # there are padding steps to skip
    if chunk == 1:
        assert row["flops_per_round_executed"] == pytest.approx(row["flops_per_round"])
    else:
        assert row["flops_per_round_executed"] > 1.01 * row["flops_per_round"]


def test_benchmark_data_errors(tiny, tmp_path, capsys):
    from fedscope_jax.cli import main

    assert main(["benchmark", "--cross-device", "--model", "reference", "--data", str(tiny)]) == 2
    assert "--model reference: only for the engine benchmark" in capsys.readouterr().err

    assert main(["benchmark", "--data", str(tiny), "--users", "10"]) == 2
    assert "--users: only for synthetic data" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["benchmark", "--data", str(missing), "--clients", "2"]) == 2
    err = capsys.readouterr().err
    assert f"--data {missing}: no dataset.json" in err and "fedscope data prepare" in err
    from fedscope_jax.bench.engine import load_benchmark_data

    with pytest.raises(FedscopeError, match="no dataset.json"):
        load_benchmark_data(str(missing))
    three = tmp_path / "three"
    synthesize(SynthConfig(users=6, items=(5, 5, 5), domains=("A", "B", "C"), min_length=6, max_length=9,
                           mean_length=7.0, min_per_domain=2, topics=2), three)
    with pytest.raises(FedscopeError, match=f"--data {three}: .*two domain towers.*3 domain"):
        load_benchmark_data(str(three))


def test_sweep_benchmark_cli(tiny, tmp_path, monkeypatch):
    """`benchmark --sweep`: both sides train the distinct configurations; with one configuration at a time the
    sweep program runs the single run's round, so the parameters are bitwise equal; the JSON is rewritten
    after each repeat."""
    from fedscope_jax.cli import main

    out = tmp_path / "sweep.json"
    written = _spy_writes(monkeypatch)
    tiny_model = ["--set", "model.blocks=1", "--set", "model.heads=1", "--set", "model.loss.num_negatives=5",
                  "--set", "eval.num_negatives=10", "--set", "federated.scheme=powerlaw",
                  "--set", "federated.max_buckets=1"]   # clients of several sizes in one bucket: padding steps
    assert main(["benchmark", "--sweep", "--data", str(tiny), "--epsilons", "4,inf", "--rounds", "2",
                 "--clients", "3", "--fraction", "1", "--chunk-size", "1", "--dim", "8", "--max-len", "6",
                 "--batch-size", "8", "--config-chunk", "1,2", "--repeats", "2", *tiny_model,
                 "--out", str(out)]) == 0
    assert [w["repeats_done"] for w in written] == [1, 1, 2]   # the first repeat, then with its unit costs
    report = json.loads(out.read_text())
    assert report["configs"] == [f"{m}-eps{e}-seed0" for m in ("personalized", "uniform") for e in ("4", "inf")]
    assert report["configs_trained"] == ["personalized-eps4-seed0", "personalized-epsinf-seed0",
                                         "uniform-eps4-seed0"]             # eps inf is one run, trained once
    assert report["sweep_speedup"] == pytest.approx(report["one_by_one_seconds"] / report["sweep_seconds"])
    chunks = report["sweep_by_config_chunk"]
    assert [b["config_chunk"] for b in chunks] == [1, 2] and report["sweep_config_chunk"] == 1
    assert all(len(b["train_seconds_per_repeat"]) == 2 and b["train_seconds"] == min(b["train_seconds_per_repeat"])
               for b in chunks)
    assert report["one_by_one_seconds"] == min(report["one_by_one_train_seconds_per_repeat"])
    assert set(report["max_abs_param_diff_vs_one_by_one"]) == set(report["configs_trained"])
    assert max(report["max_abs_param_diff_vs_one_by_one"].values()) == 0.0
    assert report["workload"]["rounds"] == 2 and report["workload"]["clients"] == 3
    # the step it timed, as the inventory's calibration reads it back to compare with the cells it prices
    from fedscope_jax.experiments.inventory import calibrated_shape
    assert calibrated_shape(report["workload"]) == {"batch_size": 8, "dim": 8, "blocks": 1, "max_len": 6,
                                                    "num_negatives": 5, "rec": "gbce"}
    # both sides computed the same padded steps: 3 configurations x 2 rounds of the same cohorts
    assert report["sweep_slot_steps"] == report["one_by_one_slot_steps"] > 0
    assert report["sweep_slot_steps"] % 6 == 0
    # the steps the single runs computed: at a chunk of one client its real ones, not its padding slots
    assert report["one_by_one_chunk_sizes"] == [1]
    assert 0 < report["one_by_one_computed_steps"] < report["one_by_one_slot_steps"]
    # and the sweep, at a client chunk of one too, skips the same padding steps of every configuration
    assert report["sweep_chunk_sizes"] == [1]
    assert report["sweep_computed_steps"] == report["one_by_one_computed_steps"]
    unit = report["unit_costs"]   # timed once, after the first repeat was written, and kept in later writes
    assert written[0]["unit_costs"] is None and written[1]["unit_costs"] == unit
    assert unit["epoch_step_seconds"] > 0 and unit["validation_seconds"] > 0
    assert unit["validation_target_items"] >= unit["validation_targets"] * min(report["workload"]["n_items"])


def test_privacy_unit_benchmark_cli(tiny, tmp_path, monkeypatch, capsys):
    """`benchmark --privacy-unit user`: the user-level private round and the non-private ones (dense item tables;
    local vocabularies), side by side, in alternating repeats; the ratios are of the best repeats; the JSON is
    rewritten after each repeat."""
    from fedscope_jax.cli import main

    out = tmp_path / "unit.json"
    written = _spy_writes(monkeypatch)
    tiny_model = ["--set", "model.blocks=1", "--set", "model.heads=1", "--set", "model.loss.num_negatives=5",
                  "--set", "eval.num_negatives=10", "--set", "federated.scheme=uniform"]
    assert main(["benchmark", "--privacy-unit", "user", "--data", str(tiny), "--rounds", "2", "--clients", "2",
                 "--chunk-size", "1", "--dim", "8", "--max-len", "6", "--batch-size", "4", "--repeats", "2",
                 *tiny_model, "--out", str(out)]) == 0
    assert "user-level / non-private:" in capsys.readouterr().out
    assert [(w["repeats_done"], w["complete"]) for w in written] == [(1, False), (2, True)]
    report = json.loads(out.read_text())
    sides = report["repeats_seconds"]
    assert set(sides) == {"non-private", "non-private-local", "user-level"} and all(len(v) == 2
                                                                                     for v in sides.values())
    assert all(len(r["round_seconds"]) == 2 for v in sides.values() for r in v)
    best = {s: min(r["train_seconds"] for r in v) for s, v in sides.items()}
    assert report["train_seconds"] == best
    assert report["ratio"] == pytest.approx(best["user-level"] / best["non-private"])
    assert report["ratio_local"] == pytest.approx(best["user-level"] / best["non-private-local"])
    assert report["workload"]["batch_size"] == 4 and report["epsilon"] == 8.0
    assert main(["benchmark", "--privacy-unit", "user", "--sweep", "--data", str(tiny)]) == 2
    assert "four benchmarks; give one" in capsys.readouterr().err
    assert main(["benchmark", "--privacy-unit", "user", "--clients", "2"]) == 2
    assert "--privacy-unit needs --data DIR" in capsys.readouterr().err
    assert main(["benchmark", "--privacy-unit", "user", "--data", str(tiny), "--batch-size", "40", "--clients", "2",
                 *tiny_model]) == 2
    assert "fewer than the expected batch" in capsys.readouterr().err    # refused before anything is timed
