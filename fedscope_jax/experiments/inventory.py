"""What a reproduction trains, counted without training it (`fedscope reproduce --inventory`).

Per cell: training runs, federated rounds, local steps (the padded step slots the compiled programs compute,
and the real ones), centralized / local-only epoch steps, validation passes and the targets they score. The
counts come from the same partition, batch sizes, sampling and size buckets as the trainers (host-only numpy,
seconds for the full profile). Priced with per-unit seconds measured on a device (`calibration`, from a
`fedscope benchmark --sweep` JSON made there; `hours`), they size a profile for that device. Federated slot
counts depend on the client chunk (each bucket's slots are padded up to a multiple of it) and assume every
sampled client trains (a client out of its privacy budget trains no steps but keeps its slot). A program
at a chunk of one client, a single run or a sweep, skips its padding steps (`engine.round.skips_padding`), so
it computes its real steps only; a vmapped chunk computes every slot (`computed_steps`, which the prices
use). Epoch-mode and non-private federated counts are upper bounds: early stopping
(`train.patience`) usually ends those runs before `train.epochs` / `federated.rounds`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from fedscope_jax.errors import FedscopeError


@dataclasses.dataclass(frozen=True)
class Work:
    """The training work of one cell (sums over a sweep's configurations)."""

    runs: int = 0               # training runs (a sweep: its distinct configurations)
    config_rounds: int = 0      # federated rounds, summed over runs
    slot_steps: int = 0         # federated local step slots of the programs, padding included (at a client chunk)
    real_steps: int = 0         # of those, the steps on real batches
    computed_steps: int = 0     # the steps computed: the slot steps, or the real ones where padding is skipped
    epoch_steps: int = 0        # centralized / local-only steps, at most (train.epochs; local: of every client)
    validations: int = 0        # validation passes (local-only: one per client and epoch), at most for epoch modes
    scored_targets: int = 0     # evaluation targets scored: validation passes and the final valid + test
    scored_target_items: int = 0   # the same, each target times the items of its domain (full-ranking cost)

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def client_steps(ds: Any, cfg: Any) -> tuple[np.ndarray, int]:
    """(local steps of each client in a round, clients) under cfg's partition and batch size."""
    from fedscope_jax.data.batching import train_sequences
    from fedscope_jax.data.partition import partition

    f = cfg.federated
    seqs = train_sequences(ds, cfg.model.max_len)
    part = partition(ds, f.clients or None, f.scheme, f.seed)
    rows = np.array([len(r) for r in seqs.client_rows(part)], np.int64)
    if cfg.privacy.unit == "user":   # the engine's own rule (DP-SGD steps a round)
        from fedscope_jax.train.federated import user_unit_steps

        return user_unit_steps(rows, cfg).steps_per_round, part.n_clients
    return f.local_epochs * (-(-rows // cfg.train.batch_size)), part.n_clients   # make_batches' S


def round_steps(steps_of: np.ndarray, cfg: Any, multiple: int = 1) -> tuple[list[int], list[int]]:
    """(real steps, slot steps) of each round of a federated run: the trainer's own sampling and bucket layout
    (`engine.population`: the helpers `train.loop` uses), with bucket slots padded to `multiple` (devices x
    client chunk)."""
    from fedscope_jax.engine.population import population_of_steps

    f = cfg.federated
    pop = population_of_steps(steps_of, f.seed, f.sampling, f.fraction, f.max_buckets)
    real, slots = [], []
    for r in range(f.rounds):
        _, sampled = pop.participants(r, [None])
        members, caps = pop.layout(sampled, multiple) if len(sampled) else ({}, {})
        real.append(int(sum(pop.steps_of[sampled[p]] for m in members.values() for p in m)))
        slots.append(int(sum(caps[b] * pop.plan.steps[b] for b in caps)))
    return real, slots


def targets(ds: Any) -> dict[str, tuple[int, int]]:
    """{"valid", "test"}: (targets, targets x items of the target's domain) of a prepared dataset."""
    from fedscope_jax.data.canonical import SPLITS

    split, domain = np.asarray(ds.split), np.asarray(ds.domain)
    items = np.asarray(ds.n_items, np.int64)[domain]
    return {name: (int(np.sum(split == SPLITS.index(name))), int(np.sum(items[split == SPLITS.index(name)])))
            for name in ("valid", "test")}


def _scored(ds: Any, passes: int) -> dict[str, int]:
    """Work's evaluation fields for `passes` validation passes plus the final valid + test evaluation."""
    t = targets(ds)
    return {"scored_targets": (passes + 1) * t["valid"][0] + t["test"][0],
            "scored_target_items": (passes + 1) * t["valid"][1] + t["test"][1]}


def federated_work(ds: Any, cfg: Any, configs: int = 1, multiple: int = 1, skips_padding: bool = False) -> Work:
    """One federated run of `cfg` (a sweep: `configs` runs sharing its data, sampling and programs), its
    bucket slots padded to `multiple`; with `skips_padding` (a chunk of one client,
    `engine.round.skips_padding`) it computes its real steps only."""
    steps_of, _ = client_steps(ds, cfg)
    real, slots = round_steps(steps_of, cfg, multiple)
    f = cfg.federated
    passes = f.rounds // f.eval_every + (1 if f.rounds % f.eval_every else 0)
    return Work(runs=configs, config_rounds=configs * f.rounds, slot_steps=configs * sum(slots),
                real_steps=configs * sum(real), computed_steps=configs * sum(real if skips_padding else slots),
                validations=configs * passes,
                **{k: configs * v for k, v in _scored(ds, passes).items()})


def epoch_work(ds: Any, cfg: Any, local: bool) -> Work:
    """A centralized run (pooled batches) or local-only run (each client alone), at most train.epochs each."""
    from fedscope_jax.data.batching import train_sequences

    tc = cfg.train
    passes = tc.epochs // tc.eval_every + (1 if tc.epochs % tc.eval_every else 0)
    if local:
        per_client, _ = client_steps(ds, dataclasses.replace(cfg, federated=dataclasses.replace(
            cfg.federated, local_epochs=1, local_steps=0)))
        per_epoch, models = int(per_client.sum()), int(np.sum(per_client > 0))
    else:
        per_epoch, models = -(-len(train_sequences(ds, cfg.model.max_len).user) // tc.batch_size), 1
    return Work(runs=1, epoch_steps=tc.epochs * per_epoch, validations=models * passes, **_scored(ds, passes))


def sweep_configs(cfg: Any, modes: Sequence[str], epsilons: Sequence[float]) -> int:
    """Distinct configurations a sweep of `cfg` trains (`train.sweep.distinct_points`: eps inf once)."""
    from fedscope_jax.train.sweep import distinct_points, sweep_points

    return len(distinct_points(sweep_points(cfg, modes, epsilons, [cfg.train.seed]))[0])


def counted_chunk(cfg: Any, chunk: int | None = None) -> int:
    """The client chunk a federated cell (single run or sweep) is counted at: its own `federated.chunk_size`, or
    where that is 0 (tuned on the device) `chunk` (a calibration's; 1 without one)."""
    return cfg.federated.chunk_size or chunk or 1


def cell_work(cell: Any, ds: Any, cfg: Any, chunk: int | None = None) -> Work:
    """The work of one reproduction cell (`experiments.cells.Cell`) on its prepared dataset. Federated bucket
    slots are padded to the client chunk it is counted at (`counted_chunk`); with every cohort's rows a
    multiple of that chunk, a chunk of one skips the padding steps of every cohort, any other none."""
    from fedscope_jax.engine.round import skips_padding

    if cell.mode in ("sweep", "federated"):
        own = counted_chunk(cfg, chunk)
        configs = sweep_configs(cfg, cell.sweep_modes, cell.sweep_epsilons) if cell.mode == "sweep" else 1
        return federated_work(ds, cfg, configs, own, skips_padding=skips_padding(own))
    if cell.mode in ("centralized", "local"):
        return epoch_work(ds, cfg, local=cell.mode == "local")
    raise FedscopeError(f"inventory: unknown cell mode {cell.mode!r}")


def calibration(bench: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Seconds per unit of work on the benchmark's device, from a `fedscope benchmark --sweep` report (`where`
    names it in errors): per computed step of the single-run and the sweep round programs (per slot step for a
    report from before computed counts; and the client chunk each ran with), per centralized / local-only step
    and per validation target-item (its `unit_costs`)."""
    if not isinstance(bench, Mapping):
        raise FedscopeError(f"{where}: expected a JSON object (a `fedscope benchmark --sweep` report), got "
                            f"{type(bench).__name__}")
    keys = ("one_by_one_seconds", "sweep_seconds", "one_by_one_slot_steps", "sweep_slot_steps",
            "one_by_one_chunk_sizes", "sweep_chunk_sizes", "unit_costs")
    missing = [k for k in keys if not bench.get(k)]
    if missing:
        raise FedscopeError(f"{where}: not a `fedscope benchmark --sweep` report with slot step counts and unit "
                            f"costs (no {', '.join(missing)}); run the sweep benchmark again with this version")
    for key in ("one_by_one_computed_steps", "sweep_computed_steps"):
        n = bench.get(key)
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0):
            raise FedscopeError(f"{where}: {key}: expected a step count > 0, got {n!r}")
    computed, sweep_computed = bench.get("one_by_one_computed_steps"), bench.get("sweep_computed_steps")
    for side in ("one_by_one", "sweep"):
        if not bench[f"{side}_slot_steps"] > 0 or not bench[f"{side}_seconds"] > 0:
            raise FedscopeError(f"{where}: {side}_slot_steps and {side}_seconds: expected > 0, got "
                                f"{bench[f'{side}_slot_steps']} and {bench[f'{side}_seconds']}")
    unit = bench["unit_costs"]
    for k in ("epoch_step_seconds", "seconds_per_validation_target_item"):
        if not isinstance(unit, Mapping) or not isinstance(unit.get(k), (int, float)) or unit[k] <= 0:
            raise FedscopeError(f"{where}: unit_costs.{k}: expected a number of seconds > 0, got "
                                f"{unit.get(k) if isinstance(unit, Mapping) else unit!r}")
    # a report from before the computed counts: its chunk-of-one programs are priced per slot (an underestimate)
    exact = {side: n is not None or int(min(bench[f"{side}_chunk_sizes"])) > 1
             for side, n in (("one_by_one", computed), ("sweep", sweep_computed))}
    return {"device": bench.get("device", "?"), "workload": bench.get("workload"),
            "per_computed_step": all(exact.values()),
            "step_shape": calibrated_shape(bench.get("workload")),
            "single_seconds_per_step": bench["one_by_one_seconds"] / (computed or bench["one_by_one_slot_steps"]),
            "sweep_seconds_per_step": bench["sweep_seconds"] / (sweep_computed or bench["sweep_slot_steps"]),
            "single_chunk": int(max(bench["one_by_one_chunk_sizes"])),
            "sweep_chunk": int(max(bench["sweep_chunk_sizes"])),
            "epoch_step_seconds": float(unit["epoch_step_seconds"]),
            "seconds_per_validation_target_item": float(unit["seconds_per_validation_target_item"])}


def calibrated_shape(workload: Any) -> dict[str, Any] | None:
    """The step shape (`train.config.STEP_SHAPE`) a sweep benchmark's `workload` ran at; None when its report
    does not say (then the shapes cannot be compared)."""
    from fedscope_jax.train.config import STEP_SHAPE

    if not isinstance(workload, Mapping) or not isinstance(workload.get("model"), Mapping):
        return None
    # reports written before model.loss.rec was recorded timed the sampled softmax, the only loss then
    flat = {"batch_size": workload.get("batch_size"), "rec": "sampled", **workload["model"]}
    return {k: flat[k] for k in STEP_SHAPE} if all(k in flat for k in STEP_SHAPE) else None


def shape_mismatch(calibrated: Mapping[str, Any], shapes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Where the cells' step shapes differ from the calibrated one: field -> {"calibrated": its value,
    "cells": {value: number of cells}} (the differing cells only); empty when every cell matches."""
    out: dict[str, Any] = {}
    for shape in shapes:
        for k, v in shape.items():
            if v != calibrated.get(k):
                cells = out.setdefault(k, {"calibrated": calibrated.get(k), "cells": {}})["cells"]
                cells[str(v)] = cells.get(str(v), 0) + 1
    return out


def hours(work: Work, mode: str, cal: Mapping[str, Any]) -> dict[str, float]:
    """Estimated hours of a cell's work on the calibration's device: `federated` (its computed steps, counted
    at its client chunk by `cell_work`, x the seconds per computed step of its program), `epochs`
    (centralized / local-only steps, at most) and `validation` (scored target-items; at most for the epoch modes).
    Compilation is not included."""
    per = cal["sweep_seconds_per_step" if mode == "sweep" else "single_seconds_per_step"]
    return {"federated": work.computed_steps * per / 3600.0,
            "epochs": work.epoch_steps * cal["epoch_step_seconds"] / 3600.0,
            "validation": work.scored_target_items * cal["seconds_per_validation_target_item"] / 3600.0}


def take_inventory(studies: Sequence[Any], all_studies: Mapping[str, Any], opts: Any,
                   cal: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The work of every cell of `studies` (`experiments.planning.Options`: profile, datasets, data root; the
    datasets are prepared under OUT/data as `fedscope reproduce` does). A cell shared by several studies
    (ablation's full FedSCOPE is main's) counts once, in the first. With `cal` (`calibration`), federated
    slots are counted at its client chunks (`cell_work`) and each cell and study gets its estimated hours
    (`hours`), with the cells whose fixed client chunk is not the calibration's listed."""
    from fedscope_jax.experiments.cells import run_config
    from fedscope_jax.experiments.planning import CellData, plan
    from fedscope_jax.train.config import step_shape

    cells_of = plan(list(studies), dict(all_studies), opts)
    data = CellData(opts)
    seen: set[str] = set()
    shapes: list[dict[str, int]] = []
    other_chunks: dict[str, int] = {}   # a fixed client chunk other than the calibration's (per program): cells
    out: dict[str, Any] = {"profile": opts.profile, "dry_run": opts.dry_run, "data": data.facts,
                           "calibration": dict(cal) if cal else None, "studies": {}}
    for name, cells in cells_of.items():
        study = all_studies[name]
        by_mode: dict[str, Work] = {}
        rows, spent, not_run = [], {"federated": 0.0, "epochs": 0.0, "validation": 0.0}, []
        for cell in cells:
            (path, ds, _, _, label), why = data.for_cell(study, cell)
            if why is not None:   # not run by the reproduction either
                not_run.append(f"{cell.method} on {cell.dataset}: {why}")
                continue
            rel = cell.relative_dir(str(path), label)
            if rel in seen:
                continue
            seen.add(rel)
            chunk = None if cal is None else cal["sweep_chunk" if cell.mode == "sweep" else "single_chunk"]
            cfg = run_config(cell, str(study.path))
            w = cell_work(cell, ds, cfg, chunk)
            own = counted_chunk(cfg, chunk)
            if cal is not None and cell.mode in ("federated", "sweep") and own != chunk:
                key = f"{own} ({'sweeps' if cell.mode == 'sweep' else 'single runs'})"
                other_chunks[key] = other_chunks.get(key, 0) + 1
            shapes.append(step_shape(cfg))
            by_mode[cell.mode] = by_mode.get(cell.mode, Work()) + w
            row = {"cell": rel, "mode": cell.mode, **dataclasses.asdict(w)}
            if cal is not None:
                row["hours"] = hours(w, cell.mode, cal)
                spent = {k: v + row["hours"][k] for k, v in spent.items()}
            rows.append(row)
        total = sum(by_mode.values(), Work())
        out["studies"][name] = {"cells": len(cells) - len(not_run), "not_run": len(not_run),
                                "not_run_why": sorted(set(not_run)), "new_cells": len(rows),
                                "total": dataclasses.asdict(total),
                                "by_mode": {m: dataclasses.asdict(w) for m, w in by_mode.items()},
                                "hours": spent if cal is not None else None, "per_cell": rows}
    if cal is not None:   # timings of another step size price these cells wrongly: said, not hidden
        out["calibration_mismatch"] = (shape_mismatch(cal["step_shape"], shapes) if cal.get("step_shape")
                                       else None)
        out["calibration_chunk_mismatch"] = other_chunks
    return out


def format_inventory(inv: Mapping[str, Any]) -> str:
    """The inventory as a plain-text table, one row per study and a total (and the estimated hours)."""
    cal = inv.get("calibration")
    parts = ("federated", "epochs", "validation")
    head = (f"{'study':<18} {'cells':>5} {'new':>4} {'runs':>5} {'fed rounds':>10} {'slot steps':>11} "
            f"{'real steps':>11} {'computed':>11} {'epoch steps<=':>13} {'validations<=':>13}"
            + ("".join(f" {'h ' + p[:5] + ('<=' if p != 'federated' else ''):>9}" for p in parts) if cal else ""))
    lines = [f"profile {inv['profile']}" + (" (dry run)" if inv.get("dry_run") else "") + "; "
             + "; ".join(f"{d}: {f['users']:,} users, {f['interactions']:,} interactions"
                         for d, f in inv["data"].items()), head]
    grand, grand_h = Work(), dict.fromkeys(parts, 0.0)

    def row(name: str, cells: str, new: str, t: Work, h: Mapping[str, float] | None) -> str:
        return (f"{name:<18} {cells:>5} {new:>4} {t.runs:>5} {t.config_rounds:>10,} {t.slot_steps:>11,} "
                f"{t.real_steps:>11,} {t.computed_steps:>11,} {t.epoch_steps:>13,} {t.validations:>13,}"
                + ("".join(f" {h[p]:>9.2f}" for p in parts) if h is not None else ""))

    for name, st in inv["studies"].items():
        t = Work(**st["total"])
        grand = grand + t
        if st.get("hours"):
            grand_h = {p: grand_h[p] + st["hours"][p] for p in parts}
        lines.append(row(name, str(st["cells"]), str(st["new_cells"]), t, st.get("hours")))
    lines.append(row("all", "", "", grand, grand_h if cal else None))
    for name, st in inv["studies"].items():
        if st.get("not_run"):
            lines.append(f"not run (not counted): {st['not_run']} cell(s) of {name} ("
                         + "; ".join(st.get("not_run_why", [])) + ")")
    chunk = (f"client chunk {cal['single_chunk']} (single runs) / {cal['sweep_chunk']} (sweeps), as calibrated"
             if cal else "client chunk 1")
    lines.append(f"slot steps: the local steps (batches of train.batch_size users) of the federated programs, "
                 f"padding included ({chunk}); computed: those the programs compute (a program at a chunk of one "
                 "client, single run or sweep, skips its padding steps); epoch steps (centralized, local-only) and "
                 "validations: at most (early stopping ends most runs sooner)")
    if cal:
        total = sum(grand_h.values())
        lines.append(f"hours on {cal['device']}: computed steps x {cal['single_seconds_per_step'] * 1e3:.2f} ms "
                     f"(single run) / {cal['sweep_seconds_per_step'] * 1e3:.2f} ms (per configuration in "
                     f"a sweep); epoch steps x {cal['epoch_step_seconds'] * 1e3:.2f} ms; validation "
                     f"target-items x {cal['seconds_per_validation_target_item'] * 1e9:.2f} ns. Total at most "
                     f"{total:.1f} h (federated {grand_h['federated']:.1f} h) plus compilation")
        lines += calibration_warnings(inv)
    return "\n".join(lines)


def calibration_warnings(inv: Mapping[str, Any]) -> list[str]:
    """Lines saying where the calibration's step differs from the counted cells' (its hours are then another
    model's), or that its report does not say what step it timed."""
    from fedscope_jax.train.config import STEP_SHAPE

    if "calibration_mismatch" not in inv:
        return []
    cal, lines = inv.get("calibration") or {}, []
    chunks = inv.get("calibration_chunk_mismatch") or {}
    if chunks:
        lines.append(f"warning: the calibration ran single runs at client chunk {cal.get('single_chunk')} and "
                     f"sweeps at {cal.get('sweep_chunk')}, but "
                     + ", ".join(f"{n} cell{'s' if n != 1 else ''} run at {c}" for c, n in sorted(chunks.items()))
                     + ": their hours price another program's step")
    if not cal.get("per_computed_step", True):
        lines.append("warning: the calibration's report predates computed step counts and its runs used client "
                     "chunk 1: their padding steps were skipped but counted, so these hours are too low (rerun "
                     "the sweep benchmark with this version)")
    mismatch = inv["calibration_mismatch"]
    if mismatch is None:
        return lines + ["warning: the calibration's report records no workload step shape (batch size, model "
                        "size): these hours assume it timed the cells' own step"]
    return lines + [f"warning: the calibration timed {k} {m['calibrated']}, but "
            + ", ".join(f"{n} cell{'s' if n != 1 else ''} use{'s' if n == 1 else ''} {v}"
                        for v, n in sorted(m["cells"].items()))
            + f": their hours price a step of another size (rerun the sweep benchmark with --set "
            f"{STEP_SHAPE[k]}=... to match)" for k, m in mismatch.items()]


__all__ = ["Work", "calibrated_shape", "calibration", "calibration_warnings", "cell_work", "client_steps",
           "counted_chunk", "epoch_work", "federated_work", "format_inventory", "hours", "round_steps",
           "shape_mismatch", "sweep_configs", "take_inventory", "targets"]
