"""Privacy dry run: what a federated run on a dataset would spend, per client, without training.

The accounting of a run depends only on the clients' sizes, the privacy config, the number of rounds and
who takes part in each round, not on the model, so it can be computed before (or instead of) training:

    fedscope privacy dry-run ../shared/data/abxi-food-kitchen --clients 64 --rounds 50 --out out/afk-privacy

DATASET is a prepared dataset directory or a raw source folder (prepared into a temporary directory that is
deleted afterwards). Clients come from `fedscope_jax.data.partition`; participation is Poisson sampled at
--sampling-rate with --seed, refused clients are skipped, exactly as the ledger protocol prescribes.
Writes privacy_ledger.arrow, metrics.jsonl (one privacy row per round) and summary.json into --out.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.utils.io import atomic_output_dir, write_json
from fedscope_jax.utils.progress import progress


def client_sizes(dataset_path: str | Path, clients: int | None, scheme: str, seed: int, alpha: float | None,
                 partition_file: str | Path | None = None) -> np.ndarray:
    """Train interactions per client of `dataset_path` (prepared dir or raw source), under a saved partition
    (`fedscope data partition ... --out FILE`) or one made here with `fedscope_jax.data.partition`."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.formats import prepare
    from fedscope_jax.data.partition import load_partition, partition

    def sizes_of(dataset) -> np.ndarray:
        if partition_file is not None:
            part = load_partition(partition_file)
        else:
            part = partition(dataset, clients, scheme, seed, alpha=alpha)
        return part.sizes(dataset)["train_interactions"]

    path = Path(dataset_path)
    if (path / "dataset.json").is_file():
        return sizes_of(load_dataset(path))
    with tempfile.TemporaryDirectory(prefix="fedscope-dryrun-") as tmp:
        prepare(path, Path(tmp) / "dataset")
        return sizes_of(load_dataset(Path(tmp) / "dataset"))


def dry_run(sizes: np.ndarray, config: PrivacyConfig, rounds: int, sampling_rate: float, seed: int,
            out: str | Path | None = None, force: bool = False) -> dict:
    """Plans, runs the ledger protocol for `rounds` rounds and returns (and optionally writes) the summary."""
    from fedscope_jax.privacy.ledger import PrivacyLedger
    from fedscope_jax.privacy.plan import plan_privacy

    plan = plan_privacy(config, sizes, sampling_rate, rounds)
    ledger = PrivacyLedger(plan, np.arange(sizes.size), sizes)
    rng = np.random.default_rng(seed)
    rows = []
    for t in progress(range(rounds), desc="privacy dry run", unit="round"):
        eligible = ledger.begin_round(t)
        participated = eligible & (rng.random(sizes.size) < plan.sampling_rates)
        rows.append(ledger.end_round(participated, track_eps=config.accountant == "rdp"))  # PLD: costly per round
    summary = ledger.summary()
    eps = ledger.eps_spent
    summary.update({"clients": int(sizes.size), "rounds": rounds, "sampling_rate": sampling_rate,
                    "epsilon_nominal": config.epsilon, "eps_spent_min": float(eps.min()),
                    "eps_spent_median": float(np.median(eps)),
                    "eps_target_median": float(np.median(plan.eps_targets)),
                    "noise_multiplier_median": float(np.median(plan.noise_multipliers)),
                    "config": config.to_dict()})
    if out is not None:
        with atomic_output_dir(out, force=force) as tmp:
            ledger.write(tmp)
            with open(tmp / "metrics.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row) + "\n")
            write_json(summary, tmp / "summary.json")
    return summary


def summary_table(sizes: np.ndarray, summary: dict) -> str:
    keys = ["clients", "rounds", "sampling_rate", "mode", "accountant", "amplification", "delta",
            "epsilon_nominal", "eps_target_min", "eps_target_median", "eps_target_max", "noise_multiplier_min",
            "noise_multiplier_median", "noise_multiplier_max", "eps_spent_min", "eps_spent_median",
            "eps_spent_max", "clients_over_target"]
    lines = [f"client train interactions: min {sizes.min()}, median {int(np.median(sizes))}, max {sizes.max()}"]
    lines += [f"{k:>24}: {summary[k]:.6g}" if isinstance(summary[k], float) else f"{k:>24}: {summary[k]}"
              for k in keys]
    lines.append(f"{'stopped_clients':>24}: {len(summary['stopped_clients'])}")
    return "\n".join(lines)
