"""`fedscope train --mode local`: one model per client, each target ranked by its own client's model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from fedscope_jax.cli import main
from fedscope_jax.data.batching import train_sequences
from fedscope_jax.data.partition import partition
from fedscope_jax.eval.protocol import model_ranks, summarize
from fedscope_jax.model import init_params
from fedscope_jax.train.config import load_config
from fedscope_jax.train.final_eval import eval_sets
from fedscope_jax.train.local import owner_of_targets, train_client, train_local
from model_helpers import write_tiny

SETTINGS = ["model.dim=8", "model.blocks=1", "model.max_len=6", "model.loss.num_negatives=5",
            "train.epochs=3", "train.batch_size=8", "train.lr=0.01", "eval.num_negatives=20", "eval.buckets=2,4",
            "eval.batch_size=64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return root, write_tiny(root / "data", users=36, n_items=(30, 40), single_domain_users=3)


def test_local_run_pools_each_clients_own_ranking(tiny, capsys):
    root, ds = tiny
    args = ["train", "--mode", "local", "--data", str(ds.path), "--out", str(root / "run"), "--clients", "3",
            "--scheme", "powerlaw", *[a for s in SETTINGS for a in ("--set", s)]]
    assert main(args) == 0
    assert "3 clients" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(root / "run")]) == 2                 # no parameters to re-score
    assert "keeps no parameters" in capsys.readouterr().err
    run = root / "run"
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "summary.json"}
    s = json.loads((run / "summary.json").read_text())
    assert {"test", "test_full", "valid", "valid_full", "cold_start", "long_tail", "training", "dataset",
            "local"} <= set(s)
    cfg = load_config(None, [*SETTINGS, "federated.clients=3"])
    part = partition(ds, 3, "powerlaw", cfg.train.seed)
    per = s["local"]["per_client"]
    sizes = [int((part.client_of_user == c).sum()) for c in range(3)]
    assert [p["users"] for p in per] == sizes and sizes[0] > sizes[2]          # powerlaw: client 0 largest
    seqs = train_sequences(ds, cfg.model.max_len)
    assert sum(p["users_trained"] for p in per) == len(seqs.user) == s["training"]["users_trained"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted({x["client"] for x in lines}) == [0, 1, 2]
    assert [sum(x["client"] == c for x in lines) for c in range(3)] == [p["epochs_run"] for p in per]

    # client 1 retrained alone gives exactly the recorded ranking of its own test targets
    sets = eval_sets(ds, cfg)
    owner = owner_of_targets(part, sets["test"])
    assert np.array_equal(owner, part.client_of_user[sets["test"].user])
    init = init_params(jax.random.split(jax.random.key(cfg.train.seed))[0], cfg.model, ds.n_items)
    mine = np.flatnonzero(owner_of_targets(part, sets["valid"]) == 1)
    params, facts = train_client(1, seqs.rows_of(part.users_of(1)), sets["valid"].subset(mine), init, seqs, ds, cfg)
    assert facts["epochs_run"] == per[1]["epochs_run"] and facts["best_epoch"] == per[1]["best_epoch"]
    es = sets["test"].subset(np.flatnonzero(owner == 1))
    got = summarize(es, model_ranks(params, cfg.model, es), ds.domains, cfg.eval.ks)
    assert got["sampled"] == per[1]["test"] and got["full"] == per[1]["test_full"]
    # the pooled metrics are the targets-weighted mean of the clients' own ones
    for d in ds.domains:
        n = [p["test"][d]["targets"] for p in per]
        assert sum(n) == s["test"][d]["targets"]
        pooled = sum(p["test"][d]["NDCG@10"] * k for p, k in zip(per, n) if k) / sum(n)
        assert pooled == pytest.approx(s["test"][d]["NDCG@10"])


def test_local_domain_scheme_and_untrained_clients(tiny):
    root, ds = tiny
    cfg = load_config(None, [*SETTINGS, "train.epochs=1", "federated.scheme=domain", "federated.clients=2"])
    s = train_local(ds, cfg, root / "dom")
    per = s["local"]["per_client"]
    # client d ranks every target of domain d
    assert [p["test_targets"] for p in per] == [s["test"][d]["targets"] for d in ds.domains]
    assert per[0]["test"][ds.domains[1]]["targets"] == 0 and s["local"]["untrained_clients"] == []
    # one client per user: a user without a training pair keeps the initial model (recorded, not hidden)
    lone = write_tiny(root / "lone", users=6, n_items=(30, 40), min_len=3, max_len=5, seed=1)   # 2 trainable
    cfg = load_config(None, [*SETTINGS, "train.epochs=1", "federated.scheme=user", "federated.clients=6"])
    s = train_local(lone, cfg, root / "users")
    per = s["local"]["per_client"]
    assert len(per) == 6 and len(s["local"]["untrained_clients"]) == 4
    assert s["local"]["untrained_clients"] == [p["client"] for p in per if not p["users_trained"]]
    assert all(p["epochs_run"] == 0 for p in per if not p["trained"])
