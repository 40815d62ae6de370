"""Privacy dry run on the real abxi-food-kitchen data (64 powerlaw silos): what a default run spends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import real_dataset
from fedscope_jax.cli import main as cli_main
from fedscope_jax.privacy import dryrun
from fedscope_jax.privacy.ledger import check_ledger, read_ledger


def test_default_dry_run_on_abxi_food_kitchen(tmp_path, capsys):
    src = real_dataset("abxi-food-kitchen")
    out = tmp_path / "run"
    assert cli_main(["privacy", "dry-run", str(src), "--clients", "64", "--rounds", "50", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "eps_spent_max" in printed
    rows = read_ledger(out / "privacy_ledger.arrow")
    assert len(rows) == 64 and check_ledger(out / "privacy_ledger.arrow") == []
    sizes = np.array([r["n_examples"] for r in rows])
    assert sizes.sum() == 173_548 - 2 * 7_144  # train = all but each user's valid and test targets
    targets = np.array([r["eps_target"] for r in rows])
    spent = np.array([r["eps_spent"] for r in rows])
    assert np.all(spent <= targets) and np.allclose(spent, targets, rtol=1e-4)  # q = 1: the whole budget
    assert np.exp(np.mean(np.log(targets))) == pytest.approx(8.0, rel=1e-9)
    order = np.argsort(sizes, kind="stable")
    assert np.all(np.diff(targets[order]) >= 0)
    assert all(r["rounds_participated"] == 50 for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["clients_over_target"] == 0 and summary["stopped_clients"] == []
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(50))
    assert metrics[-1]["privacy/eps_spent_max"] == pytest.approx(spent.max())


def test_dry_run_with_sampling_stops_over_sampled_clients(tmp_path):
    src = real_dataset("abxi-food-kitchen")
    sizes = dryrun.client_sizes(src, 64, "powerlaw", 0, None)
    from fedscope_jax.privacy.config import PrivacyConfig
    summary = dryrun.dry_run(sizes, PrivacyConfig(participation_quantile=0.5), 40, 0.5, seed=1)
    assert summary["clients_over_target"] == 0
    assert len(summary["stopped_clients"]) > 0      # about half of the clients are sampled more than planned


def test_dry_run_reads_a_saved_partition(tmp_path):
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.formats import prepare
    from fedscope_jax.data.partition import partition, save_partition
    src = real_dataset("abxi-food-kitchen")
    prepare(src, tmp_path / "afk")
    dataset = load_dataset(tmp_path / "afk")
    part = partition(dataset, 16, "uniform", 3)
    save_partition(part, tmp_path / "part.arrow")
    sizes = dryrun.client_sizes(tmp_path / "afk", None, "powerlaw", 0, None, tmp_path / "part.arrow")
    np.testing.assert_array_equal(sizes, part.sizes(dataset)["train_interactions"])
    assert cli_main(["privacy", "dry-run", str(tmp_path / "afk"), "--partition", str(tmp_path / "part.arrow"),
                     "--rounds", "5", "--privacy", "uniform", "--epsilon", "2"]) == 0
