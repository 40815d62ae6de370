"""`fedscope benchmark --peer feddcsr`: the FedDCSR peer's FedSASRec workload on our engine, seconds a local
step beside the peer's own PyTorch code on the same machine (docs/engine.md, "The peer's workload").

The workload (FedDCSR's published settings): one client a domain (`--scheme domain`), a SASRec of hidden 256,
4 heads, 2 blocks, length 16, sharing only its encoder, batches of 256 users, the full softmax, Adam at
lr 1e-3 and 3 local epochs. Each row times the first `steps` local steps of its clients (one round of a
truncated client: seconds a step do not depend on which steps) vectorized (chunk size chosen by timing) and
sequential: one row per domain client, then the round of both. The peer's seconds a step come from
benchmarks/feddcsr_peer_step.py (its trainer's `train_batch`, batches of the same shape and catalogue), given
as a file or, by default, the figures recorded on the project's 2-core reference CPU (`RECORDED`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from fedscope_jax.bench.engine import time_engines
from fedscope_jax.engine.cohort import ClientShard, plan_buckets
from fedscope_jax.errors import FedscopeError
from fedscope_jax.train.config import load_config, step_shape
from fedscope_jax.train.federated import seed_context
from fedscope_jax.utils.progress import progress

__all__ = ["PEERS", "RECORDED", "format_peer_table", "peer_config", "run_peer_benchmark"]

# The run config of each peer's workload (--set syntax)
PEERS = {
    "feddcsr": ("federated.scheme=domain", "federated.clients=2", "federated.local_epochs=3",
                "federated.client_opt=adam", "federated.client_lr=0.001", "federated.aggregate=group_mean",
                "model.dim=256", "model.heads=4", "model.blocks=2", "model.max_len=16", "model.dropout=0.3",
                "model.shared_encoder=true", "model.loss.rec=full", "model.loss.alpha=0", "train.batch_size=256",
                "privacy.mode=off"),
}

# benchmarks/feddcsr_peer_step.py on the project's reference machine (2 cores, no GPU), 2026-12-05: torch
# 2.13.0+cpu, 2 threads, median of 8 steps on abxi-food-kitchen's catalogues (11,837 and 16,258 items).
RECORDED = {"feddcsr": {"source": "recorded: benchmarks/feddcsr_peer_step.py on the project's 2-core reference CPU, "
                                  "2026-12-05 (torch 2.13.0+cpu); on other hardware run it and pass --peer-result",
                        "domains": [{"items": 11837, "median_seconds": 0.800},
                                    {"items": 16258, "median_seconds": 1.034}]}}


def peer_config(name: str) -> Any:
    """The run config of peer `name`'s workload."""
    if name not in PEERS:
        raise FedscopeError(f"--peer {name!r}: expected one of {', '.join(sorted(PEERS))}")
    return load_config(None, list(PEERS[name]))


def _truncated(shard: ClientShard, steps: int) -> ClientShard:
    """The client's first `steps` local steps."""
    mask = None if shard.step_mask is None else shard.step_mask[:steps]
    return ClientShard({k: v[:steps] for k, v in shard.batch.items()}, shard.vocab, mask)


def _peer_seconds(peer: dict[str, Any], n_items: Sequence[int]) -> list[float]:
    """The peer's seconds a step of each domain; its catalogues must be the dataset's."""
    got = [int(d["items"]) for d in peer["domains"]]
    if got != [int(n) for n in n_items]:
        raise FedscopeError(f"the peer's figures are for catalogues of {got} items, the dataset has "
                            f"{list(map(int, n_items))}: run benchmarks/feddcsr_peer_step.py --items "
                            f"{','.join(map(str, n_items))} and pass its --out file as --peer-result")
    return [float(d["median_seconds"]) for d in peer["domains"]]


def run_peer_benchmark(ds: Any, name: str = "feddcsr", steps: int = 4, repeats: int = 2,
                       peer: dict[str, Any] | None = None,
                       on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One row per domain client, then the round of both (each: `steps` local steps a client, vectorized and
    sequential, best of `repeats`), with the peer's seconds a step beside ours. on_report: called after each
    row (a stopped benchmark keeps its rows)."""
    if steps < 1 or repeats < 1:
        raise FedscopeError(f"--steps {steps} / --repeats {repeats}: expected >= 1 each")
    cfg = peer_config(name)
    peer = peer if peer is not None else RECORDED[name]
    peer_s = _peer_seconds(peer, ds.n_items)
    ctx = seed_context(ds, cfg, None)
    shards = {c: _truncated(ctx.source(0, c), steps) for c in range(ctx.n_clients)}
    report: dict[str, Any] = {
        "benchmark": "peer", "peer": name, "peer_source": peer.get("source", "--peer-result"),
        "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}", "jax": jax.__version__,
        "dataset": ds.meta.get("name", ds.path.name), "repeats": repeats, "settings": list(PEERS[name]),
        "workload": {**step_shape(cfg), "local_steps_timed": steps}, "rows": [], "complete": False}
    plan_rows = [(ds.domains[c], np.array([c])) for c in range(ctx.n_clients)] + [("round", np.arange(ctx.n_clients))]
    with progress(total=len(plan_rows), desc=f"benchmark (peer {name})", unit="row") as bar:
        for i, (label, ids) in enumerate(plan_rows):
            note = lambda phase, label=label: bar.set_postfix_str(f"{label}: {phase}")  # noqa: E731
            picked = {int(c): shards[int(c)] for c in ids}
            plan = plan_buckets(list(picked.values()), cfg.federated.max_buckets)
            t = time_engines(picked, ids, plan, {}, ctx.client_cfg, ctx.params, "off", repeats, cfg.train.seed + 1,
                             note=note, desc=f"{label}: chunk sizes")
            real = int(sum(s.real_steps for s in picked.values()))
            ours = min(t["vmap_seconds"]) / real
            theirs = float(np.mean([peer_s[int(c)] for c in ids]))   # a round's step: the mean over its clients
            report["rows"].append({
                "row": label, "clients": [int(c) for c in ids], "steps": real, "chunk_size": t["chunk"],
                "vmap_round_seconds": t["vmap_seconds"], "sequential_round_seconds": t["sequential_seconds"],
                "seconds_per_step": ours, "sequential_seconds_per_step": min(t["sequential_seconds"]) / real,
                "peer_seconds_per_step": theirs, "speed_vs_peer": theirs / ours,
                "max_abs_diff_vs_sequential": t["max_abs_diff"]})
            report["complete"] = i == len(plan_rows) - 1
            bar.update(1)
            if on_report is not None:
                on_report(report)
    return report


def format_peer_table(report: dict[str, Any]) -> str:
    """A plain-text table of the peer benchmark."""
    w = report["workload"]
    lines = [f"device {report['device']}; {report['dataset']}; peer {report['peer']}: dim {w['dim']}, length "
             f"{w['max_len']}, batch {w['batch_size']}, loss {w['rec']}; {w['local_steps_timed']} local steps a "
             f"client, best of {report['repeats']}",
             f"{'row':<10} {'steps':>5} {'chunk':>5} {'s/step':>8} {'seq s/step':>10} {'peer s/step':>11} "
             f"{'speed vs peer':>13} {'maxdiff':>8}"]
    for r in report["rows"]:
        lines.append(f"{r['row']:<10} {r['steps']:>5} {r['chunk_size']:>5} {r['seconds_per_step']:>8.3f} "
                     f"{r['sequential_seconds_per_step']:>10.3f} {r['peer_seconds_per_step']:>11.3f} "
                     f"{r['speed_vs_peer']:>12.2f}x {r['max_abs_diff_vs_sequential']:>8.1e}")
    lines.append(f"peer: {report['peer_source']}")
    return "\n".join(lines)
