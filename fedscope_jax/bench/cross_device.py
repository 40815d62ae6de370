"""`fedscope benchmark --cross-device`: many one-user clients against a few silos, on the FedSCOPE model and
the same real users, side by side in one process (docs/engine.md).

Cross-device: one client a user (`--scheme user`), each row a round of C clients drawn uniformly from the
users with training data (the round a Poisson or fixed-fraction sample of rate C / users would give).
Silo: the same users in `silos` power-law silos, all in the round. Each is one round of the model the users
train (train.federated's client: loss, local optimizer, batch size, local epochs), vectorized (chunk size
chosen by timing) and sequential, from the same cohorts (`bench.engine.time_engines`). The unit of work is a
user-step: one user's sequence in one local step. A user's cost as a client against its cost inside a silo's
batch is the ratio of the silo's user-steps per second to the cross-device ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from fedscope_jax.bench.engine import time_engines
from fedscope_jax.engine.cohort import plan_buckets
from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.train.config import step_shape
from fedscope_jax.train.federated import seed_context
from fedscope_jax.utils.progress import progress

__all__ = ["format_cross_device_table", "run_cross_device_benchmark"]


def _workload(ds: Any, cfg: Any, scheme: str, clients: int) -> Any:
    """The seed context of `cfg` with this partition and no DP (privacy is not the cost)."""
    fcfg = dataclasses.replace(cfg.federated, scheme=scheme, clients=clients, sampling="fraction",
                               fraction=1.0)
    run_cfg = dataclasses.replace(cfg, federated=fcfg, privacy=PrivacyConfig(mode="off"))
    return seed_context(ds, run_cfg, None)


def _row(ctx: Any, ids: np.ndarray, cfg: Any, repeats: int, note: Callable[[str], None], workload: str
         ) -> dict[str, Any]:
    shards = {int(c): ctx.source(0, int(c)) for c in ids}
    plan = plan_buckets([shards[int(c)] for c in ids], cfg.federated.max_buckets)
    user_steps = int(sum(np.sum(s.batch["user_mask"]) for s in shards.values()))
    t = time_engines(shards, ids, plan, {}, ctx.client_cfg, ctx.params, "off", repeats, cfg.train.seed + 1,
                     note=note, desc=f"{workload} C={len(ids)}: chunk sizes")
    vm, seq = min(t["vmap_seconds"]), min(t["sequential_seconds"])
    return {"workload": workload, "clients": int(len(ids)), "user_steps": user_steps,
            "slot_steps": int(t["pad"].slot_steps), "real_steps": int(t["pad"].real_steps),
            "batch_width": [int(c.data.batch["seq"].shape[2]) for c in t["cohorts"]],
            "chunk_size": t["chunk"], "chunk_tuning_seconds": t["chunk_tuning_seconds"],
            "vmap_round_seconds": t["vmap_seconds"], "sequential_round_seconds": t["sequential_seconds"],
            "vmap_user_steps_per_s": user_steps / vm, "sequential_user_steps_per_s": user_steps / seq,
            "speedup": seq / vm, "max_abs_diff_vs_sequential": t["max_abs_diff"]}


def run_cross_device_benchmark(ds: Any, cfg: Any, clients: Sequence[int] = (64, 256, 1024), silos: int = 8,
                               repeats: int = 3, on_report: Callable[[dict[str, Any]], None] | None = None
                               ) -> dict[str, Any]:
    """The silo row, then one cross-device row per client count (each: vectorized and sequential rounds, best
    of `repeats`). on_report: called with the report after each row (a stopped benchmark keeps its rows)."""
    cross = _workload(ds, cfg, "user", 0)
    trainable = np.flatnonzero([len(rows) > 0 for rows in _rows_of(cross)])
    too_many = [c for c in clients if c > len(trainable)]
    if too_many:
        raise FedscopeError(f"--clients {','.join(map(str, too_many))}: the dataset has {len(trainable)} users with "
                            f"training data (one a client); give counts up to {len(trainable)}")
    silo = _workload(ds, cfg, "powerlaw", silos)
    rng = np.random.default_rng([cfg.train.seed, 0xC0DE])
    report: dict[str, Any] = {
        "benchmark": "cross_device", "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "device_count": jax.device_count(), "jax": jax.__version__, "dataset": ds.meta.get("name", ds.path.name),
        "users_with_training_data": int(len(trainable)), "repeats": repeats,
        "workload": {"silos": silos, "clients": list(clients), **step_shape(cfg),
                     "client_opt": cfg.federated.client_opt, "privacy": "off"},
        "rows": [], "complete": False,
    }
    plan = [("silo", silo, np.arange(silos))] + [
        ("cross-device", cross, np.sort(rng.choice(trainable, size=c, replace=False))) for c in clients]
    with progress(total=len(plan), desc="benchmark (cross-device)", unit="row") as bar:
        for i, (name, ctx, ids) in enumerate(plan):
            note = lambda phase, name=name, n=len(ids): bar.set_postfix_str(f"{name} C={n}: {phase}")  # noqa: E731
            report["rows"].append(_row(ctx, ids, cfg, repeats, note, name))
            report["complete"] = i == len(plan) - 1
            _ratios(report)
            bar.update(1)
            if on_report is not None:
                on_report(report)
    return report


def _rows_of(ctx: Any) -> list[np.ndarray]:
    """Each client's training rows (one user a client under the user scheme)."""
    from fedscope_jax.data.batching import train_sequences

    return train_sequences(ctx.ds, ctx.cfg.model.max_len).client_rows(ctx.part)


def _ratios(report: dict[str, Any]) -> None:
    """A user's cost as a one-user client over its cost inside a silo's batch (vectorized rounds), per row."""
    silo = next(r for r in report["rows"] if r["workload"] == "silo")
    for r in report["rows"]:
        r["user_cost_vs_silo"] = silo["vmap_user_steps_per_s"] / r["vmap_user_steps_per_s"]


def format_cross_device_table(report: dict[str, Any]) -> str:
    """A plain-text table of the cross-device benchmark."""
    w = report["workload"]
    head = (f"{'workload':<13} {'C':>5} {'user-steps':>10} {'vmap s':>8} {'seq s':>8} {'speedup':>8} "
            f"{'vmap us/s':>10} {'cost/user':>9} {'chunk':>6} {'maxdiff':>8}")
    lines = [f"device {report['device']} x{report['device_count']}; {report['dataset']}: "
             f"{report['users_with_training_data']} users with training data; dim {w['dim']}, length "
             f"{w['max_len']}, batch {w['batch_size']}, {w['silos']} silos; best of {report['repeats']}", head]
    for r in report["rows"]:
        lines.append(f"{r['workload']:<13} {r['clients']:>5} {r['user_steps']:>10} "
                     f"{min(r['vmap_round_seconds']):>8.3f} {min(r['sequential_round_seconds']):>8.3f} "
                     f"{r['speedup']:>8.2f} {r['vmap_user_steps_per_s']:>10.1f} {r['user_cost_vs_silo']:>8.2f}x "
                     f"{r['chunk_size']:>6} {r['max_abs_diff_vs_sequential']:>8.1e}")
    lines.append("cost/user: a user's cost as a one-user client over its cost inside a silo's batch (vectorized)")
    return "\n".join(lines)
