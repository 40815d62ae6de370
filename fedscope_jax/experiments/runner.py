"""`fedscope reproduce`: prepare the datasets, expand the studies into cells, run them in-process, report.

Layout of the output directory (`--out OUT`; a dry run writes OUT/dry-run/ instead, never mixed with OUT):
  data/                 prepared datasets and their per-profile user subsets (cache, reused)
  runs/<dataset>/...    one run directory per cell (config.json, metrics.jsonl, summary.json, cell.json)
  plan.json             the studies, their cells' directories, the profile, hardware, timings per study and
                        per cell (rewritten after every cell, so a killed reproduction keeps its timings)
  report/               `fedscope report` output (report.md, tables, plots)
  cache/xla/<host>/     JAX's persistent compilation cache (elsewhere with --compile-cache DIR; none with
                        --no-compile-cache): programs compiled by one cell, or by an earlier process, are read
                        back instead of compiled again
A cell whose summary.json exists is skipped, so a killed reproduction resumes where it stopped (a federated
cell with checkpoints resumes from its last round; a sweep cell keeps its finished seeds and resumes the rest).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fedscope_jax.engine.checkpoint import latest_round
from fedscope_jax.errors import FedscopeError, ResumeMismatch
from fedscope_jax.experiments.cells import Cell, run_config
from fedscope_jax.experiments.inventory import cell_work
from fedscope_jax.experiments.methods import METHODS
from fedscope_jax.experiments.planning import CellData, Options, plan, trainer
from fedscope_jax.experiments.spec import Study, dp_label
from fedscope_jax.train.config import config_mismatch, to_dict
from fedscope_jax.train.federated import RESULT_FREE
from fedscope_jax.train.programs import PROGRAMS
from fedscope_jax.train.sweep import sweep_points
from fedscope_jax.utils.io import read_json, write_json
from fedscope_jax.utils.progress import progress

CELL_FILE = "cell.json"
PLAN_FILE = "plan.json"
SWEEP_DONE = "sweep.done"

def reproduce(studies: list[Study], all_studies: dict[str, Study], opts: Options) -> dict[str, Any]:
    """Runs every cell (skipping finished ones) and writes plan.json; returns the plan."""
    root = opts.out / "dry-run" if opts.dry_run else opts.out
    root.mkdir(parents=True, exist_ok=True)
    plan_path = root / PLAN_FILE
    old: dict[str, Any] = {}
    if plan_path.is_file():
        old = read_json(plan_path)
        if old.get("profile") != opts.profile:
            raise FedscopeError(f"{plan_path}: holds a reproduction with profile {old.get('profile')!r}; use "
                                f"another --out for profile {opts.profile!r}")
    cells_of = plan(studies, all_studies, opts)
    data = CellData(opts)
    record: dict[str, Any] = {"profile": opts.profile, "dry_run": opts.dry_run, "data_root": str(opts.data_root),
                              "attributes_root": str(opts.attributes_root) if opts.attributes_root else None,
                              "title_root": str(opts.title_root) if opts.title_root else None,
                              "hardware": hardware(), "data": data.facts, "studies": {}}
    todo = []
    for name, cells in cells_of.items():
        study = all_studies[name]
        record["studies"][name] = {"title": study.title, "kind": study.kind, "reads": study.reads,
                                   "file": str(study.path), "description": study.description,
                                   "datasets": [d for d in study.datasets_for(opts.profile)
                                                if opts.datasets is None or d in opts.datasets], "cells": []}
        if study.kind == "cells" and study.profile(opts.profile).dp is not None:   # the profile's own DP list
            record["studies"][name]["profile_dp"] = [d.label for d in study.dp_for(opts.profile)]
        for cell in cells:
            (path, ds, semantic, coverage, label), why = data.for_cell(study, cell)
            if why is not None:
                record["studies"][name].setdefault("not_run", []).append(
                    {"method": cell.method, "dataset": cell.dataset, "seed": cell.seed, "why": why})
                continue
            cell_dir = root / "runs" / cell.relative_dir(str(path), label)
            record["studies"][name]["cells"].append(str(cell_dir.relative_to(root)))
            todo.append((study, cell, cell_dir, (ds, semantic, coverage, label, path)))
    record["status"] = "running"   # until the end: a killed process leaves it so
    record["cells_seconds"] = dict(old.get("cells_seconds", {}))   # cells trained by earlier processes

    def save() -> None:   # after every cell: a killed reproduction keeps the time of its finished cells
        _totals(record, old)
        write_json(record, plan_path)

    cache_dir = compile_cache_dir(opts.out, opts.compile_cache_root) if opts.compile_cache else None
    with _quick_compiles(opts.dry_run), persistent_compile_cache(cache_dir) as (cache, compiles):
        record["compile_cache"] = cache
        record["xla_compiles_this_process"] = compiles   # updated in place while the cells run
        save()   # a report of a partial reproduction shows what is missing
        _run_all(todo, record, opts, save)
    return record


def _totals(record: dict[str, Any], old: dict[str, Any]) -> None:
    """The `*_total` keys: what the processes before this one recorded (`old`, the plan.json this process
    found at its start) plus this process so far; recomputed from `old` each time, so never counted twice."""
    old_studies = old.get("studies", {})
    for name, info in record["studies"].items():
        before = old_studies.get(name, {})
        for key in ("seconds", "cpu_seconds"):
            info[f"{key}_total"] = before.get(f"{key}_total", 0.0) + info.get(f"{key}_this_process", 0.0)
    for key in ("seconds", "cpu_seconds"):
        # a plan.json from before the top-level totals: its studies' totals are what earlier processes spent
        before = old.get(f"{key}_total", sum(s.get(f"{key}_total", 0.0) for s in old_studies.values()))
        record[f"{key}_total"] = before + record.get(f"{key}_this_process", 0.0)


@contextlib.contextmanager
def _quick_compiles(enabled: bool):
    """A dry run checks plumbing, not speed: XLA skips most optimizations while it runs (compiles faster)."""
    import jax

    if not enabled:
        yield
        return
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


# Programs that compile faster than this are not written to the persistent cache (JAX's default: 1 s). In the
# quick ablation (docs/experiments.md) the round programs take 7-12 s each, ~45 compilations (evaluation,
# initialization) 0.1-1 s, and ~790 tiny ones (mostly eager operations) ~16 s together: not worth a file each.
CACHE_MIN_COMPILE_SECONDS = 0.1


def compile_cache_dir(out: Path, root: Path | None = None) -> Path:
    """<root, default OUT/cache/xla>/<machine>-<hash of the CPU's model and feature flags>: XLA:CPU builds
    code for the host CPU's instruction set, so an OUT (or a shared root) used on another machine starts a
    cache of its own there."""
    import hashlib

    cpu = ""
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
        cpu = "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags", "Features"))}))
    tag = hashlib.sha256(f"{platform.machine()}\n{platform.processor()}\n{cpu}".encode()).hexdigest()[:12]
    return (root if root is not None else out / "cache" / "xla") / f"{platform.machine() or 'cpu'}-{tag}"


@contextlib.contextmanager
def persistent_compile_cache(path: Path | None):
    """JAX's persistent compilation cache in `path` while the block runs (None: left as it is), restored
    after. Yields (what plan.json records about the cache, counts of this process's XLA compilations).

    `jax.clear_caches()` (release_programs, between cells) empties the in-memory caches only: a program
    compiled again later in the process, or by a later process, is read from `path` instead (still traced
    and lowered; the key covers the program, jaxlib version, compile options and XLA flags)."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings: dict[str, Any] = {"jax_compilation_cache_dir": str(path) if path else None,
                                "jax_persistent_cache_min_compile_time_secs": CACHE_MIN_COMPILE_SECONDS}
    if jax.default_backend() == "cpu":
        # JAX also turns on XLA's GPU autotuning cache in <path>/..., and that path enters every key: a moved or
        # copied OUT would miss every entry. It does nothing on CPU.
        settings["jax_persistent_cache_enable_xla_caches"] = "none"
    before = {k: getattr(jax.config, k) for k in settings}
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        for k, v in settings.items():
            jax.config.update(k, v)
        compilation_cache.reset_cache()   # the cache object is made once per process: point it at `path`
    where = jax.config.jax_compilation_cache_dir   # with --no-compile-cache, JAX_COMPILATION_CACHE_DIR may be set
    enabled = bool(where) and bool(jax.config.jax_enable_compilation_cache)
    cache = {"enabled": enabled, "dir": where if enabled else None,
             "min_compile_seconds": jax.config.jax_persistent_cache_min_compile_time_secs if enabled else None}
    compiles = {"programs": 0, "seconds": 0.0, "cache_hits": 0, "cache_writes": 0}

    def on_duration(event: str, seconds: float, **_: Any) -> None:
        if event == "/jax/core/compile/backend_compile_duration":   # XLA compile, or read from the cache
            compiles["programs"] += 1
            compiles["seconds"] += seconds

    def on_event(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            compiles["cache_hits"] += 1
        elif event == "/jax/compilation_cache/cache_misses":   # recorded when an entry is written
            compiles["cache_writes"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield cache, compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)
        if path is not None:
            for k, v in before.items():
                jax.config.update(k, v)
            compilation_cache.reset_cache()


def progress_weights(todo: list[Any]) -> tuple[list[int], int]:
    """Each cell's share of the progress bar, and the share already done: its counted local steps
    (`experiments.inventory`: federated computed steps, slots counted at client chunk 1; centralized /
    local-only steps at most), so the bar's rate and time left follow the work (the full profile's cells
    differ 7-fold in size with the dataset) rather than the cell count. A cell listed again (a study sharing
    another's) weighs 0, and cells a killed reproduction finished start the bar, so that a resumed one does not
    count them in its rate."""
    out, done, seen = [], 0, set()
    for study, cell, cell_dir, (ds, *_rest) in todo:
        if cell_dir in seen:
            out.append(0)
            continue
        seen.add(cell_dir)
        try:
            w = cell_work(cell, ds, run_config(cell, str(study.path)))
            out.append(max(1, w.computed_steps + w.epoch_steps))
        except FedscopeError:   # e.g. no client has training data: the cell fails (and is reported) when it runs
            out.append(1)
        if (cell_dir / (SWEEP_DONE if cell.mode == "sweep" else "summary.json")).is_file():
            done += out[-1]
    return out, done


def _run_all(todo: list[Any], record: dict[str, Any], opts: Options, save: Callable[[], None]) -> None:
    """Runs the cells in order. After each: its time added to its study's and this process's seconds, and to
    `cells_seconds` when it trained or failed (a finished cell skipped costs nothing); then `save()`."""
    weights, finished = progress_weights(todo)
    bar = progress(total=sum(weights), initial=finished, desc="reproduce" + (" (dry run)" if opts.dry_run else ""),
                   unit="step", unit_scale=sum(weights) >= 10_000)   # 1.04M/1.97M, but 64/80
    failed: dict[str, str] = record.setdefault("failed", {})
    cells_seconds: dict[str, dict[str, float]] = record.setdefault("cells_seconds", {})
    done_dirs: set[Path] = set()
    t_all, c_all = time.time(), _cpu_seconds()
    last_group = None
    for i, (study, cell, cell_dir, (ds, semantic, coverage, label, path)) in enumerate(todo):
        bar.set_postfix_str(f"cell {i + 1}/{len(todo)} {study.name}: {cell.dataset}/{cell.method}/{cell.label}"
                            f"/seed{cell.seed}")
        t0, c0 = time.time(), _cpu_seconds()
        rel = str(cell_dir.relative_to(cell_dir.parents[3]))   # as listed in the study's "cells"
        worked = False
        if cell_dir not in done_dirs:
            done_dirs.add(cell_dir)
            group = (study.name, cell.dataset, cell.method, cell.dp, cell.variant)
            if last_group is not None and group != last_group:
                release_programs()   # the seeds of one cell share programs; the next cell compiles its own
            last_group = group
            try:
                worked = run_cell(cell, cell_dir, ds, semantic, coverage, label, path, study)
            except FedscopeError as exc:   # recorded, reported and in the exit code; the other cells still run
                worked = True
                failed[rel] = str(exc)
                print(f"cell failed: {cell_dir}: {exc}", file=sys.stderr)
        wall, cpu = time.time() - t0, _cpu_seconds() - c0
        info = record["studies"][study.name]
        info["seconds_this_process"] = info.get("seconds_this_process", 0.0) + wall
        info["cpu_seconds_this_process"] = info.get("cpu_seconds_this_process", 0.0) + cpu
        if worked:   # a cell resumed after a kill: this process's part added to what earlier ones recorded
            before = cells_seconds.get(rel, {})
            cells_seconds[rel] = {"seconds": before.get("seconds", 0.0) + wall,
                                  "cpu_seconds": before.get("cpu_seconds", 0.0) + cpu}
        record["seconds_this_process"] = time.time() - t_all
        record["cpu_seconds_this_process"] = _cpu_seconds() - c_all
        save()
        if worked:   # a cell skipped as finished is in the bar's initial count
            bar.update(weights[i])
    bar.close()
    record["seconds_this_process"] = time.time() - t_all
    record["cpu_seconds_this_process"] = _cpu_seconds() - c_all
    record["load_average_at_end"] = list(os.getloadavg())
    record["status"] = "complete" if not failed else f"{len(failed)} cell(s) failed"
    save()


def release_programs() -> None:
    """Drops every compiled program this process holds (`train.programs.PROGRAMS` and JAX's own caches).

    Each XLA:CPU executable maps ~1,400 memory regions; a process that keeps the programs of ~45 different
    cells reaches Linux's default vm.max_map_count (65,530), and LLVM then fails ("Cannot allocate memory")
    and the process crashes. The reproduction releases them between cells (never between the seeds of a
    cell, which reuse them); with the compilation cache on, a later cell reads a released program back from
    OUT/cache/xla instead of compiling it again."""
    PROGRAMS.clear()


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): on a shared machine, the wall time an unshared
    one would need is at most this (XLA uses both cores, so usually less)."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def hardware() -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "devices": jax.device_count(),
            "cpu_cores": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "jax": jax.__version__}


def run_cell(cell: Cell, cell_dir: Path, ds: Any, semantic: Any, coverage: Any, label: str, dataset_dir: Path,
             study: Study) -> bool:
    """Trains one cell into `cell_dir` unless its summary.json exists (then returns False, True otherwise);
    writes cell.json last."""
    cfg = run_config(cell, str(study.path))
    method = METHODS[cell.method]
    sem = semantic if method.vectors != "none" else None
    attributes = label if method.vectors != "none" else "none (method uses no attributes)"
    ident = {**cell.identity(), "attributes": attributes, "semantic_coverage": coverage if sem is not None else None,
             "dataset_dir": str(dataset_dir), "overrides": list(cell.overrides)}
    if cell.mode == "sweep":
        return run_sweep_cell(cell, cell_dir, ds, cfg, sem, ident)
    if (cell_dir / "summary.json").is_file():
        changed = _settings_changed(cell_dir, cfg)
        if changed is None:
            return False
        print(f"{cell_dir}: trained with other settings ({changed}); training it again", file=sys.stderr)
    extra = {"data": str(dataset_dir), "attributes": attributes, "semantic_coverage": ident["semantic_coverage"],
             "mode": method.mode, "experiment": ident}
    fn = trainer(cell.mode)
    if cell.mode == "federated":
        # resumed from its last checkpoint; a cell killed before its first one (its checkpoints/ folder empty)
        # starts over
        resume = latest_round(cell_dir / "checkpoints") is not None and (cell_dir / "config.json").is_file()
        try:
            fn(ds, cfg, cell_dir, sem, extra, resume=resume, force=not resume)
        except ResumeMismatch:
            if not resume:
                raise
            fn(ds, cfg, cell_dir, sem, extra, resume=False, force=True)   # config changed: start over
    else:
        fn(ds, cfg, cell_dir, semantic=sem, force=True, extra_config=extra)
    write_json(ident, cell_dir / CELL_FILE)
    return True


def _settings_changed(cell_dir: Path, cfg: Any) -> str | None:
    """How a finished cell's stored settings differ from the ones it would run with now (e.g. after a default
    changed), or None: only the five config sections count, not where the data or the output lives."""
    path = cell_dir / "config.json"
    if not path.is_file():
        return "no config.json"
    now = to_dict(cfg)
    stored = read_json(path)
    return config_mismatch({k: stored[k] for k in now if k in stored}, now, RESULT_FREE)


def run_sweep_cell(cell: Cell, sweep_dir: Path, ds: Any, cfg: Any, sem: Any, ident: dict[str, Any]) -> bool:
    """One run_sweep program for the cell's seed (modes x epsilons); cell.json written into each of its runs.
    False when the sweep had finished before (nothing run).

    An existing sweep directory (a killed reproduction) is resumed; one whose config no longer matches the
    cell's is trained again from scratch (as run_cell does for a federated cell)."""
    done = sweep_dir / SWEEP_DONE
    if done.is_file():
        return False
    extra = {"attributes": ident["attributes"], "semantic_coverage": ident["semantic_coverage"],
             "mode": "federated", "experiment": ident}
    modes, epsilons = list(cell.sweep_modes), list(cell.sweep_epsilons)
    sweep = functools.partial(trainer("sweep"), ds, cfg, modes, epsilons, [cell.seed], sweep_dir, semantic=sem,
                              extra=extra)
    resume = sweep_dir.exists()
    try:
        sweep(resume=resume, force=False)
    except ResumeMismatch:
        if not resume:
            raise
        sweep(resume=False, force=True)   # config changed: start over
    for point in sweep_points(cfg, modes, epsilons, [cell.seed]):
        run = sweep_dir / point.name
        if not (run / "summary.json").is_file():
            raise FedscopeError(f"{run}: run_sweep wrote no summary.json for this configuration")
        mode, eps = point.privacy_mode, point.epsilon
        write_json({**ident, "dp": dp_label(mode, eps, cell.sweep_unit, point.mode == "distributed"),
                    "privacy_mode": mode,
                    "sweep_mode": point.mode, "epsilon": eps if math.isfinite(eps) else None,
                    "seed": point.seed}, run / CELL_FILE)
    done.write_text("ok\n", encoding="utf-8")
    return True
