"""`fedscope benchmark --privacy-unit user`: the round of user-level DP (DP-SGD over the users of every silo)
against the non-private round with the same settings, side by side in one process (docs/privacy.md)."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.train.config import step_shape
from fedscope_jax.train.federated import client_config, seed_context
from fedscope_jax.train.loop import Track, run_tracks

__all__ = ["format_unit_table", "run_unit_benchmark"]

SIDES = ("non-private", "non-private-local", "user-level")


def run_unit_benchmark(ds: Any, cfg: Any, epsilon: float = 8.0, repeats: int = 2, workdir: Any = None,
                       on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains `cfg` (one seed) three times per repeat: without DP (privacy.mode off) with dense item tables,
    as the user unit's update is (its noise reaches every row), so the ratio is the cost of DP-SGD itself;
    without DP as `fedscope train` runs it (local item vocabularies where it can: "non-private-local"); and with
    user-level personalized DP at `epsilon` (per-user clipping, Gaussian noise every local step, Poisson
    sampled batches). The order alternates between repeats. Reports the best repeat of each side's round loop
    (rounds only: one validation and one checkpoint at the end, compiles reported apart) and the user-level
    side's ratio to each non-private one. on_report: called with the report after each repeat (a stopped
    benchmark keeps what it finished)."""
    if cfg.federated.local_steps:
        raise FedscopeError(f"fedscope benchmark --privacy-unit user: federated.local_steps="
                            f"{cfg.federated.local_steps} would fix the user-level side's steps a round while the "
                            "non-private sides take --local-epochs passes (unequal work); leave it at 0")
    fcfg = dataclasses.replace(cfg.federated, checkpoint_every=cfg.federated.rounds,
                               eval_every=cfg.federated.rounds)
    off = dataclasses.replace(cfg, federated=fcfg, privacy=PrivacyConfig(mode="off"))
    user = dataclasses.replace(off, privacy=dataclasses.replace(cfg.privacy, mode="personalized", unit="user",
                                                                epsilon=float(epsilon)))
    dense = dataclasses.replace(client_config(off, n_domains=len(ds.domains)), sparse_tables=())
    contexts = {"non-private": (off, seed_context(ds, off, None, dense)),
                "non-private-local": (off, seed_context(ds, off, None)),
                "user-level": (user, seed_context(ds, user, None))}
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for rep in range(max(1, repeats)):
            for side in (SIDES if rep % 2 == 0 else SIDES[::-1]):
                run_cfg, ctx = contexts[side]
                out = Path(tmp) / f"{side}-{rep}"
                out.mkdir()
                t0 = time.perf_counter()
                _, recs, facts = run_tracks([Track(out, ctx.session(run_cfg.privacy))], ctx.source, ctx.n_clients,
                                            ctx.params, ctx.client_cfg, fcfg, desc=side)
                runs[side].append({"wall_seconds": time.perf_counter() - t0, **facts[0]["timing"],
                                   "chunk_size": facts[0]["chunk_size"],
                                   "round_seconds": [r["seconds"] for r in recs[0]]})
            report = _report(ds, off, epsilon, runs, rep + 1, max(1, repeats))
            if on_report is not None:
                on_report(report)
    return report


def _report(ds: Any, cfg: Any, epsilon: float, runs: dict[str, list[dict[str, Any]]], done: int,
            repeats: int) -> dict[str, Any]:
    best = {side: min(r["train_seconds"] for r in runs[side]) for side in SIDES}
    rounds = cfg.federated.rounds
    return {
        "benchmark": "privacy_unit", "device": str(jax.devices()[0].platform), "device_count": jax.device_count(),
        "dataset": getattr(ds, "name", None), "epsilon": epsilon, "repeats": repeats, "repeats_done": done,
        "complete": done == repeats,
        "workload": {"clients": cfg.federated.clients, "rounds": rounds, "local_epochs": cfg.federated.local_epochs,
                     "local_steps": cfg.federated.local_steps, "user_microbatch": cfg.federated.user_microbatch,
                     **step_shape(cfg)},
        "train_seconds": best,
        "round_seconds": {side: best[side] / rounds for side in SIDES},
        "compile_seconds": {side: runs[side][0]["compile_seconds"] for side in SIDES},
        "ratio": best["user-level"] / best["non-private"],
        "ratio_local": best["user-level"] / best["non-private-local"],
        "repeats_seconds": runs,
    }


def format_unit_table(report: dict[str, Any]) -> str:
    """A plain-text summary of the privacy-unit benchmark."""
    w = report["workload"]
    return "\n".join([
        f"device {report['device']} x{report['device_count']}; {w['clients']} clients, {w['rounds']} rounds, "
        f"batch {w['batch_size']}, dim {w['dim']}, user microbatch {w['user_microbatch']}; best of "
        f"{report['repeats_done']} repeat(s)",
        f"{'':<18} {'s/round':>9} {'compile s':>10}",
        *[f"{side:<18} {report['round_seconds'][side]:>9.3f} {report['compile_seconds'][side]:>10.2f}"
          for side in SIDES],
        f"user-level / non-private: {report['ratio']:.2f}x with dense item tables on both sides, "
        f"{report['ratio_local']:.2f}x against local item vocabularies (eps {report['epsilon']:g}, personalized, "
        f"user unit)",
    ])
