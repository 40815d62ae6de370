"""`fedscope benchmark --sweep`: a privacy sweep trained as one program against its configurations one by one,
side by side in one process, with the unit costs (a centralized step, a validation pass) that
`fedscope reproduce --inventory --calibrate` prices a reproduction with (docs/sweep.md)."""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedscope_jax.data.batching import make_batches, train_sequences
from fedscope_jax.train.centralized import evaluate, make_optimizer, make_train_step
from fedscope_jax.train.config import step_shape
from fedscope_jax.train.federated import seed_context
from fedscope_jax.train.loop import Track, run_tracks
from fedscope_jax.train.sweep import distinct_points, sweep_points
from fedscope_jax.utils.progress import progress

__all__ = ["format_sweep_table", "run_sweep_benchmark", "unit_costs"]


def run_sweep_benchmark(ds: Any, cfg: Any, modes: tuple[str, ...] = ("personalized", "uniform"),
                        epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, float("inf")),
                        workdir: Any = None, config_chunks: tuple[int, ...] = (0,), repeats: int = 2,
                        on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Trains the configurations modes x epsilons (one seed: cfg.train.seed) of the FedSCOPE model on `ds`
    as one sweep (`run_tracks` with every configuration: the sweep program) and one by one (`run_tracks` per
    configuration: the single-run program, compiled once and reused for each), side by side in this process.

    Both sides are run `repeats` times, alternating (sweep first in even repeats, one-by-one first in odd
    ones) so that a load change on a shared machine hits both; the best repeat of each side is reported.
    Compiles happen in the first repeat and are reported apart from the training seconds (the round loops:
    sampling, batches, cohorts, privacy bookkeeping, rounds; no validation during the rounds, one checkpoint
    at the end). Configurations that are the same run (eps inf under each mode) are trained once on both
    sides. config_chunks: the sweep is timed per value (configs vectorized at once; 0 = the default for the
    device); the first is the reported `sweep_seconds`, all are in `sweep_by_config_chunk`. on_report: called
    with the report of the repeats so far after each repeat (`repeats_done`), so a caller can save the timings
    of a benchmark that is stopped early. After the first repeat it also times `unit_costs` (a centralized
    step, a validation pass): with the slot steps, what `fedscope reproduce --inventory --calibrate` prices."""
    fcfg = dataclasses.replace(cfg.federated, checkpoint_every=cfg.federated.rounds,
                               eval_every=cfg.federated.rounds)
    cfg = dataclasses.replace(cfg, federated=fcfg)
    points = sweep_points(cfg, modes, epsilons, [cfg.train.seed])
    trained, _ = distinct_points(points)
    ctx = seed_context(ds, cfg, None)
    sweeps: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(config_chunks))}
    singles: list[dict[str, Any]] = []
    sweep_states = single_states = sweep_facts = single_facts = None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)

        def tracks(prefix: str, pts: list[Any]) -> list[Any]:
            out = []
            for p in pts:
                (root / prefix / p.name).mkdir(parents=True)
                out.append(Track(root / prefix / p.name, ctx.session(p.cfg.privacy)))
            return out

        def sweep_side(rep: int) -> None:
            nonlocal sweep_states, sweep_facts
            for i, cc in enumerate(config_chunks):
                t0 = time.perf_counter()
                states, recs, facts = run_tracks(tracks(f"sweep{i}-{rep}", trained), ctx.source, ctx.n_clients,
                                                 ctx.params, ctx.client_cfg, fcfg, config_chunk=cc,
                                                 desc=f"sweep c={cc} ({len(trained)} configs)", pooled=ctx.pooled)
                sweeps[i].append({"config_chunk": facts[0]["program"]["config_chunk"],
                                  "wall_seconds": time.perf_counter() - t0, **facts[0]["timing"],
                                  "round_seconds": [r["seconds"] for r in recs[0]],
                                  **{k: len(trained) * _program_steps(recs, k)
                                     for k in ("slot_steps", "computed_steps")}})
                if i == 0:
                    sweep_states, sweep_facts = states, facts

        single_chunks: dict[str, int] = {}   # privacy mode -> the chunk size its first single run chose

        def single_side(rep: int) -> None:
            nonlocal single_states, single_facts
            t0 = time.perf_counter()
            states, facts, slot_steps, computed_steps = [], [], 0, 0
            for p in progress(trained, desc="one by one", unit="config"):
                # with chunk_size 0 only the first run of each privacy mode times the chunk candidates (setup, not
                # timed, but ~1 minute a run on CPU); the others reuse its chunk, as they reuse its program
                chunk = fcfg.chunk_size or single_chunks.get(p.cfg.privacy.mode, 0)
                s, recs, f = run_tracks(tracks(f"single-{rep}", [p]), ctx.source, ctx.n_clients, ctx.params,
                                        ctx.client_cfg, dataclasses.replace(fcfg, chunk_size=chunk), desc=p.name,
                                        pooled=ctx.pooled)
                slot_steps += sum(r.get("slot_steps", 0) for r in recs[0])
                computed_steps += sum(r.get("computed_steps", 0) for r in recs[0])
                single_chunks.setdefault(p.cfg.privacy.mode, f[0]["chunk_size"])
                states.append(s[0])
                facts.append(f[0])
            singles.append({"wall_seconds": time.perf_counter() - t0, "slot_steps": slot_steps,
                            "computed_steps": computed_steps,
                            **{k: sum(f["timing"][k] for f in facts) for k in facts[0]["timing"]}})
            single_states, single_facts = states, facts

        report: dict[str, Any] = {}
        unit_seconds = None
        for rep in range(max(1, repeats)):
            for side in ((sweep_side, single_side) if rep % 2 == 0 else (single_side, sweep_side)):
                side(rep)
            report = _sweep_report(ds, cfg, points, trained, sweeps, singles, sweep_states, single_states,
                                   sweep_facts, single_facts, max(1, repeats))
            report["unit_costs"] = unit_seconds
            if on_report is not None:
                on_report(report)
            if unit_seconds is None:   # once, after the first repeat is saved (the speedup comes first)
                report["unit_costs"] = unit_seconds = unit_costs(ctx)
                if on_report is not None:
                    on_report(report)
    return report


def unit_costs(ctx: Any, steps: int = 8) -> dict[str, Any]:
    """Seconds of the other work a reproduction does besides federated rounds, on this device: a centralized /
    local-only training step (`train.centralized.make_train_step`, batches of train.batch_size, synced every
    step as the trainers do) and a validation pass over `ctx`'s validation set (sampled and full ranking, as
    `train.centralized.evaluate`), both after their compilation (reported apart). Per target-item: a pass
    scores each target against its domain's items (full ranking), so `experiments.inventory` prices the
    validations of datasets with other catalogue sizes per target x items of its domain."""
    ds, cfg = ctx.ds, ctx.cfg
    mc, tc, ec = cfg.model, cfg.train, cfg.eval
    seqs = train_sequences(ds, mc.max_len)
    batches = make_batches(seqs, np.arange(len(seqs.user)), tc.batch_size, 1, np.random.default_rng(0))
    step = make_train_step(mc, tc.lr, tc.weight_decay)
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), ctx.params)   # the step donates its inputs
    opt_state = make_optimizer(tc.lr, tc.weight_decay).init(params)
    key = jax.random.key(0)
    times = []
    for s in range(steps + 1):   # the first call compiles
        batch = {k: batches[k][s % len(batches["seq"])] for k in ("seq", "target")}
        t0 = time.perf_counter()
        params, opt_state, loss, _ = step(params, opt_state, batch, jax.random.fold_in(key, s), None)
        float(loss)
        times.append(time.perf_counter() - t0)
    es = ctx.valid_set
    t0 = time.perf_counter()
    evaluate(params, mc, es, ds.domains, ec.ks, None, ec.batch_size)   # compiles
    compile_eval = time.perf_counter() - t0
    t0 = time.perf_counter()
    evaluate(params, mc, es, ds.domains, ec.ks, None, ec.batch_size)
    valid_seconds = time.perf_counter() - t0
    target_items = int(sum(np.sum(es.domain == d) * n for d, n in enumerate(ds.n_items)))
    return {"epoch_step_seconds": float(np.median(times[1:])), "epoch_step_first_call_seconds": times[0],
            "validation_seconds": valid_seconds, "validation_first_call_seconds": compile_eval,
            "validation_targets": int(len(es)), "validation_target_items": target_items,
            "seconds_per_validation_target_item": valid_seconds / max(target_items, 1)}


def _program_steps(records: Sequence[Sequence[Mapping[str, Any]]], key: str) -> int:
    """A sweep program's steps `key` per configuration: each round's, from any track that recorded it (a
    round where one track had no participant, or one that had stopped, is still computed for every config)."""
    by_round: dict[int, int] = {}
    for recs in records:
        for r in recs:
            by_round[r["round"]] = max(by_round.get(r["round"], 0), int(r.get(key, 0)))
    return sum(by_round.values())


def _sweep_report(ds: Any, cfg: Any, points: list[Any], trained: list[Any], sweeps: dict[int, list[dict]],
                  singles: list[dict[str, Any]], sweep_states: Any, single_states: Any, sweep_facts: Any,
                  single_facts: Any, repeats: int) -> dict[str, Any]:
    """The sweep benchmark's report from the repeats timed so far (best repeat per side)."""
    fcfg = cfg.federated
    diffs = {p.name: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s.params),
                                                                       jax.tree.leaves(o.params)))
             for p, s, o in zip(trained, sweep_states, single_states)}
    one_by_one_seconds = min(s["train_seconds"] for s in singles)
    by_chunk = [{"config_chunk": runs[0]["config_chunk"], "train_seconds": min(r["train_seconds"] for r in runs),
                 "compile_seconds": sum(r["compile_seconds"] for r in runs),
                 "train_seconds_per_repeat": [r["train_seconds"] for r in runs],
                 "round_seconds_per_repeat": [r["round_seconds"] for r in runs]} for runs in sweeps.values()]
    for b in by_chunk:
        b["speedup"] = one_by_one_seconds / b["train_seconds"]
    device = jax.devices()[0]
    shape = step_shape(cfg)
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "configs": [p.name for p in points],
        "configs_trained": [p.name for p in trained],
        "sweep_seconds": by_chunk[0]["train_seconds"],
        "one_by_one_seconds": one_by_one_seconds,
        "sweep_speedup": one_by_one_seconds / by_chunk[0]["train_seconds"],
        "sweep_compile_seconds": by_chunk[0]["compile_seconds"],
        "one_by_one_compile_seconds": sum(s["compile_seconds"] for s in singles),
        "sweep_config_chunk": by_chunk[0]["config_chunk"],
        "sweep_by_config_chunk": by_chunk,
        "one_by_one_train_seconds_per_repeat": [s["train_seconds"] for s in singles],
        # local step slots of the round programs (padding included; a sweep counts each configuration's), and
        # the steps they computed (a chunk of one client skips its padding: engine.round.computed_steps), so
        # that seconds / computed steps prices a step of either program (experiments.inventory)
        "sweep_slot_steps": sweeps[0][0]["slot_steps"],
        "one_by_one_slot_steps": singles[0]["slot_steps"],
        "sweep_computed_steps": sweeps[0][0]["computed_steps"],
        "one_by_one_computed_steps": singles[0]["computed_steps"],
        "repeats": repeats,
        "repeats_done": len(singles),
        "sweep_programs": sorted({json.dumps(f["program"], sort_keys=True) for f in sweep_facts}),
        "sweep_chunk_sizes": sorted({f["chunk_size"] for f in sweep_facts}),
        "one_by_one_chunk_sizes": sorted({f["chunk_size"] for f in single_facts}),
        "max_abs_param_diff_vs_one_by_one": diffs,
        "workload": {"dataset": str(ds.path), "users": int(ds.n_users), "n_items": list(ds.n_items),
                     "rounds": fcfg.rounds, "clients": fcfg.clients, "fraction": fcfg.fraction,
                     "sampling": fcfg.sampling, "scheme": fcfg.scheme, "local_epochs": fcfg.local_epochs,
                     "local_steps": fcfg.local_steps, "batch_size": shape.pop("batch_size"), "model": shape,
                     "seed": cfg.train.seed},
        "timing_note": "train seconds: the round loops (sampling, batches, cohorts, privacy bookkeeping, the "
                       "compiled rounds, one final checkpoint per configuration), compiles apart; best of "
                       "`repeats` alternating repeats per side, in this process",
    }


def format_sweep_table(report: dict[str, Any]) -> str:
    """A plain-text summary of the sweep benchmark."""
    n, k = len(report["configs"]), len(report["configs_trained"])
    return "\n".join([
        f"device {report['device']} x{report['device_count']}; {n} configurations ({k} distinct runs), "
        f"{report['workload']['rounds']} rounds, {report['workload']['clients']} clients",
        f"{'':<12} {'train s':>9} {'compile s':>10}",
        *[f"{'sweep c=' + str(b['config_chunk']):<12} {b['train_seconds']:>9.2f} {b['compile_seconds']:>10.2f}"
          for b in report["sweep_by_config_chunk"]],
        f"{'one by one':<12} {report['one_by_one_seconds']:>9.2f} {report['one_by_one_compile_seconds']:>10.2f}",
        f"sweep_speedup {report['sweep_speedup']:.2f}x (one-by-one train s / sweep c={report['sweep_config_chunk']} "
        f"train s); max |param diff| "
        f"{max(report['max_abs_param_diff_vs_one_by_one'].values()):.1e}",
        *_unit_lines(report),
    ])


def _unit_lines(report: dict[str, Any]) -> list[str]:
    """The per-unit seconds a reproduction estimate uses (`fedscope reproduce --inventory --calibrate`)."""
    lines = []
    single = report.get("one_by_one_computed_steps") or report.get("one_by_one_slot_steps")
    sweep = report.get("sweep_computed_steps") or report.get("sweep_slot_steps")
    if single and sweep:   # what `fedscope reproduce --inventory --calibrate` prices a step at
        lines.append(f"per computed step: {report['one_by_one_seconds'] / single * 1e3:.2f} ms one by one "
                     f"({single:,} steps), {report['sweep_seconds'] / sweep * 1e3:.2f} ms per configuration in "
                     f"the sweep ({sweep:,}); slot steps, padding included: {report.get('one_by_one_slot_steps', 0):,}"
                     " a side")
    unit = report.get("unit_costs")
    if unit:
        lines.append(f"centralized step {unit['epoch_step_seconds'] * 1e3:.2f} ms (first call "
                     f"{unit['epoch_step_first_call_seconds']:.1f} s); validation pass "
                     f"{unit['validation_seconds']:.2f} s for {unit['validation_targets']:,} targets (first call "
                     f"{unit['validation_first_call_seconds']:.1f} s)")
    return lines
