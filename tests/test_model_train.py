"""`fedscope train --mode centralized` end to end on a tiny dataset: run directory, semantic input, errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from fedscope_jax.cli import main
from fedscope_jax.errors import FedscopeError
from fedscope_jax.model.semantic import load_semantic
from fedscope_jax.train.config import load_config
from fedscope_jax.utils.io import write_arrow
from model_helpers import write_tiny

SETTINGS = ["model.dim=8", "model.blocks=1", "model.max_len=6", "model.fusion_hidden=8",
            "model.loss.num_negatives=5", "train.epochs=3", "train.batch_size=16", "train.lr=0.01",
            "eval.num_negatives=20", "eval.buckets=2,4"]


def _sets(extra=()):
    return [a for s in [*SETTINGS, *extra] for a in ("--set", s)]


def _embeddings(path, ds, dim=4, bad_rows=()):
    rows = {"item_id": [], "domain": [], "vector": [], "status": []}
    rng = np.random.default_rng(0)
    for d, (name, n) in enumerate(zip(ds.domains, ds.n_items)):
        for i in range(0, n, 2):                       # every other item has a row, a few of them failed
            rows["item_id"].append(i)
            rows["domain"].append(name)
            ok = i % 6 != 4
            rows["vector"].append(rng.normal(size=dim).astype(np.float32).tolist() if ok else [np.nan] * dim)
            rows["status"].append("ok" if ok else "failed")
    for r in bad_rows:
        for k in rows:
            rows[k].append(r[k])
    table = pa.table({"item_id": pa.array(rows["item_id"], pa.int32()), "domain": pa.array(rows["domain"]),
                      "vector": pa.array(rows["vector"], pa.list_(pa.float32(), dim)),
                      "status": pa.array(rows["status"])})
    path.mkdir(parents=True, exist_ok=True)
    write_arrow(table, path / "item_embeddings.arrow")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, write_tiny(root / "data", users=40, n_items=(30, 40))


def test_centralized_run_directory_and_determinism(tiny, capsys):
    root, ds = tiny
    for name in ("run1", "run2"):
        assert main(["train", "--mode", "centralized", "--data", str(ds.path), "--out", str(root / name),
                     *_sets()]) == 0
    out = capsys.readouterr().out
    assert "popularity" in out and "run written" in out
    run = root / "run1"
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "summary.json", "params.msgpack"}
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["dim"] == 8 and cfg["eval"]["buckets"] == [2, 4] and cfg["mode"] == "centralized"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    s = json.loads((run / "summary.json").read_text())
    assert len(lines) == s["training"]["epochs_run"] == 3 and all("valid" in x for x in lines)
    for section in ("test", "test_full", "valid"):
        assert set(s[section]) == {"domA", "domB"}
        assert set(s[section]["domA"]) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR", "targets"}
    assert set(s["baselines"]) == {"popularity", "popularity_full"}
    assert list(s["cold_start"]["sampled"]["domB"]) == ["0-1", "2-3", ">3"]
    lt = s["long_tail"]["full"]["domA"]
    assert lt["targets"]["head"] + lt["targets"]["tail"] == s["test_full"]["domA"]["targets"]
    assert all(x["seqcl"] == 0.0 for x in lines)                       # the baseline term is off by default
    best = s["training"]["best_epoch"]
    assert lines[best - 1]["select"] == pytest.approx(s["training"]["best_valid_select"])
    # the summary's valid metrics are the best epoch's (the kept parameters)
    assert s["valid"]["domA"]["NDCG@10"] == pytest.approx(lines[best - 1]["valid"]["sampled"]["domA"]["NDCG@10"])
    s2 = json.loads((root / "run2" / "summary.json").read_text())
    assert s2["test"] == s["test"] and s2["test_full"] == s["test_full"]
    assert main(["train", "--data", str(ds.path), "--out", str(run), *_sets()]) == 2   # exists, no --force
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json"]) == 0                          # reloads params.msgpack
    ev = json.loads(capsys.readouterr().out)
    assert ev["model"]["sampled"] == s["test"] and ev["model"]["full"] == s["test_full"]
    assert ev["popularity"]["sampled"] == s["baselines"]["popularity"]
    assert ev["long_tail"] == s["long_tail"] and ev["protocol"] == "fedscope"
    # re-scored under the FedDCSR code's protocol: its candidates and tie rule, the same parameters
    assert main(["evaluate", "--run", str(run), "--json", "--protocol", "feddcsr"]) == 0
    peer = json.loads(capsys.readouterr().out)
    assert peer["protocol"] == "feddcsr" and peer["targets"] == ev["targets"]
    assert peer["model"]["full"]["domA"]["targets"] == s["test_full"]["domA"]["targets"]
    assert peer["model"]["sampled"] != ev["model"]["sampled"]


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_a_step_that_does_not_fit_the_memory_is_refused_before_training(tiny, capsys, monkeypatch, mode):
    """Memory is planned in the epoch trainers too: the step is compiled before it first runs and its XLA
    memory analysis checked; one that does not fit (here the device is told it has 1 KiB) is a one-line error
    naming the batch size and the full softmax that sizes it, never an XLA traceback, and nothing is written."""
    from fedscope_jax.engine import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device=None: 1024)
    root, ds = tiny
    run = root / f"too-large-{mode}"
    # model.dim 6: a step no other test compiled (a kept program would skip the check)
    assert main(["train", "--mode", mode, "--data", str(ds.path), "--out", str(run), "--clients", "2",
                 *_sets(["model.dim=6", "model.heads=1", "model.loss.rec=full"])]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size=16 (model.loss.rec=full: B x L x N logits" in err, err
    assert "the training step needs" in err and "even a batch of 1 does not fit" in err
    assert ("client 0: train.batch_size" in err) == (mode == "local")
    assert "Traceback" not in err and not run.exists()


def test_the_batch_that_fits_scales_what_grows_with_the_batch():
    """needed = inputs + what grows with the batch: 16 x (60 - 20) / (100 - 20) = 8."""
    from fedscope_jax.engine.memory import ProgramTooLarge
    from fedscope_jax.train.centralized import batch_that_fits

    cfg = load_config(None, ["train.batch_size=16"])
    assert str(batch_that_fits(cfg, ProgramTooLarge(100, 60, arguments=20))).endswith("train.batch_size=8 should fit")
    assert "even a batch of 1 does not fit" in str(batch_that_fits(cfg, ProgramTooLarge(100, 15, arguments=20)))


def test_semantic_attributes_feed_the_fusion_mlp(tiny, capsys):
    root, ds = tiny
    emb = _embeddings(root / "enrich", ds)
    tables, coverage = load_semantic(emb, ds.domains, ds.n_items)
    assert coverage["domA"] == {"items": 30, "with_vector": 10}
    mask = tables[0]["mask"]
    assert mask[0] == 0 and mask[1] == 1 and mask[2] == 0 and mask[5] == 0      # shifted ids; item 4 failed
    assert not tables[0]["vectors"][5].any()
    assert main(["train", "--data", str(ds.path), "--out", str(root / "sem"), "--attributes", str(emb),
                 *_sets(["train.epochs=1"])]) == 0
    cfg = json.loads((root / "sem" / "config.json").read_text())
    assert cfg["semantic_coverage"]["domB"]["with_vector"] == 14 and cfg["attributes"] == str(emb)
    dup = _embeddings(root / "dup", ds, bad_rows=[{"item_id": 0, "domain": "domA", "vector": [0.0] * 4,
                                                    "status": "ok"}])
    with pytest.raises(FedscopeError, match="duplicate item_id"):
        load_semantic(dup, ds.domains, ds.n_items)
    bad = _embeddings(root / "baddom", ds, bad_rows=[{"item_id": 0, "domain": "books", "vector": [0.0] * 4,
                                                       "status": "ok"}])
    assert main(["train", "--data", str(ds.path), "--out", str(root / "x"), "--attributes", str(bad), *_sets()]) == 2
    assert "books" in capsys.readouterr().err


def test_a_federated_run_without_item_ids_trains_checkpoints_and_scores(tiny, capsys):
    """model.item_ids=off end to end: a federated run trains, checkpoints (no zero-size or per-item array)
    and scores; its params hold no item table; without item vectors it stops with a one-line error."""
    from flax import serialization

    root, ds = tiny
    emb = _embeddings(root / "enrich-off", ds)
    run = root / "fed-off"
    assert main(["train", "--mode", "federated", "--data", str(ds.path), "--out", str(run), "--attributes", str(emb),
                 "--clients", "2", "--rounds", "2", "--eval-every", "1", "--privacy", "off",
                 *_sets(["model.item_ids=off"])]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["training"]["rounds_run"] == 2
    for d in ds.domains:
        assert 0.0 <= summary["test"][d]["NDCG@10"] <= 1.0
    params = serialization.msgpack_restore((run / "params.msgpack").read_bytes())
    assert all("item_emb" not in tower and "unknown_emb" in tower for tower in params.values())
    capsys.readouterr()
    assert main(["train", "--mode", "federated", "--data", str(ds.path), "--out", str(root / "fed-off-2"),
                 "--clients", "2", "--rounds", "1", "--privacy", "off", *_sets(["model.item_ids=off"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "model.item_ids=off" in err and "--attributes" in err and "\n" not in err


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(FedscopeError, match="model.loss.rec"):
        load_config(None, ["model.loss.rec=softmax"])
    with pytest.raises(FedscopeError, match="train.lrate"):
        load_config(None, ["train.lrate=1"])
    with pytest.raises(FedscopeError, match="model.heads"):
        load_config(None, ["model.dim=10", "model.heads=3"])
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": {"dim": "x"}}))
    with pytest.raises(FedscopeError, match="model.dim"):
        load_config(f)
    assert load_config(None, ["eval.ks=1,20"]).eval.ks == (1, 20)
