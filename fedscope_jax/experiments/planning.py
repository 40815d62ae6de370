"""What a reproduction will run: its options, the cells of the chosen studies (every cell's config and trainer
checked before anything runs) and their prepared datasets. Shared by the runner (`experiments.runner`) and the
inventory (`experiments.inventory`), which count or train the same cells."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.cells import DRY_RUN_USERS, Cell, expand, run_config
from fedscope_jax.experiments.datasets import DATASETS, dataset_for, semantic_for
from fedscope_jax.experiments.methods import METHODS
from fedscope_jax.experiments.spec import Study

__all__ = ["CellData", "Options", "TRAINERS", "plan", "trainer"]

# What each training mode needs, as (module, function, who builds it): a missing one is a clear error.
TRAINERS = {
    "federated": ("fedscope_jax.train.federated", "train_federated", "the federated engine"),
    "centralized": ("fedscope_jax.train.centralized", "train_centralized", "centralized training"),
    "local": ("fedscope_jax.train.local", "train_local", "the local-only baseline (train/local.py)"),
    "sweep": ("fedscope_jax.train.sweep", "run_sweep", "the sweep axis (train/sweep.py)"),
}


def trainer(mode: str) -> Callable[..., Any]:
    """The training function of `mode`; a FedscopeError naming the missing module otherwise."""
    module, func, what = TRAINERS[mode]
    try:
        fn = getattr(importlib.import_module(module), func, None)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        fn = None
    if fn is None:
        raise FedscopeError(f"{what}: {module}.{func} is not in this checkout; the cells of mode {mode!r} "
                            "cannot run (no result is faked)")
    return fn


@dataclasses.dataclass(frozen=True)
class Options:
    profile: str
    out: Path
    data_root: Path
    attributes_root: Path | None = None
    dry_run: bool = False
    datasets: tuple[str, ...] | None = None    # restrict every study to these datasets (None: the study's)
    smoke: bool = False    # keep the first cell of each (study, method) and of each privacy unit: a fast plumbing check
    compile_cache: bool = True   # JAX's persistent compilation cache (compile_cache_dir)
    compile_cache_root: Path | None = None   # where that cache lives (None: OUT/cache/xla)
    title_root: Path | None = None   # title-only item vectors (`fedscope enrich --text title`), one folder per dataset


def plan(studies: list[Study], all_studies: dict[str, Study], opts: Options) -> dict[str, list[Cell]]:
    """{study: cells}; a derived study also pulls in the cells of the study it reads. Checks every cell's
    RunConfig and that every training mode it needs exists (before anything runs)."""
    names = [s.name for s in studies]
    for s in studies:
        if s.reads and s.reads not in names:
            names.insert(names.index(s.name), s.reads)
    out: dict[str, list[Cell]] = {}
    for name in names:
        study = all_studies[name]
        cells = expand(study, opts.profile, opts.dry_run)
        if opts.datasets is not None:
            unknown = [d for d in opts.datasets if d not in DATASETS]
            if unknown:
                raise FedscopeError(f"--datasets: unknown dataset {unknown[0]!r}; expected among {', '.join(DATASETS)}")
            cells = [c for c in cells if c.dataset in opts.datasets]
        if opts.smoke:
            first: dict[str, Cell] = {}
            for c in cells:
                first.setdefault(c.method, c)
            programs = {c.program for c in first.values()}
            for c in cells:   # and the study's first cell of a program (privacy unit, distributed) no method's has
                if c.program not in programs:
                    programs.add(c.program)
                    first[f"{c.method}/{c.program}"] = c
            cells = list(first.values())
        for cell in cells:
            run_config(cell, str(study.path))
            trainer(cell.mode)
        out[name] = cells
    return out


def _limits(study: Study, dataset: str, opts: Options) -> tuple[int, int]:
    """(users, items per domain) kept of `dataset` under the study's profile (0 = all)."""
    prof = study.profile(opts.profile)
    users = prof.users_for(dataset)
    return (min(users or DRY_RUN_USERS, DRY_RUN_USERS) if opts.dry_run else users), prof.max_items


class CellData:
    """The prepared datasets (and attribute tables) of a reproduction's cells, each loaded once:
    `get(study, dataset)` -> (dataset dir, dataset, semantic, coverage, attributes label); `facts` holds
    what plan.json records about each one (users, items, interactions kept)."""

    def __init__(self, opts: Options):
        self.opts = opts
        self.loaded: dict[tuple[str, int, int], tuple[Path, Any, Any, Any, str]] = {}
        self.titles: dict[tuple[str, int, int], tuple[Any, Any, str]] = {}
        self.facts: dict[str, dict[str, Any]] = {}

    def for_cell(self, study: Study, cell: Cell) -> tuple[tuple[Path, Any, Any, Any, str], str | None]:
        """((dataset dir, dataset, semantic, coverage, label), why not run or None) of a cell: the LLM
        attribute vectors (the label keys every cell's directory), or for the title-only arm (method vectors
        "title") the vectors of --title-root; a cell that needs its vectors (`Method.needs_vectors`, or item IDs
        turned off by its profile or variant) is not run without them (never ID-only under its name), nor is an
        arm that would repeat FedSCOPE's cells without LLM vectors (`Method.skip_without_llm`)."""
        path, ds, semantic, coverage, label = self.get(study, cell.dataset)
        method = METHODS[cell.method]
        if method.skip_without_llm and semantic is None:
            return (path, ds, semantic, coverage, label), f"the same runs as fedscope's without LLM vectors ({label})"
        if method.vectors != "title":
            needs = method.needs_vectors or run_config(cell, str(study.path)).model.item_ids == "off"
            return (path, ds, semantic, coverage, label), (label if needs and semantic is None else None)
        key = (cell.dataset, *_limits(study, cell.dataset, self.opts))
        if key not in self.titles:
            self.titles[key] = semantic_for(path, ds, self.opts.title_root, cell.dataset, "--title-root")
        sem, cov, title_label = self.titles[key]
        return (path, ds, sem, cov, title_label), (title_label if sem is None else None)

    def get(self, study: Study, name: str) -> tuple[Path, Any, Any, Any, str]:
        users, items = _limits(study, name, self.opts)
        if (name, users, items) not in self.loaded:
            path = dataset_for(name, self.opts.data_root, self.opts.out / "data", users, max_items=items)
            ds = load_dataset(path)
            semantic, coverage, label = semantic_for(path, ds, self.opts.attributes_root, name)
            self.loaded[(name, users, items)] = (path, ds, semantic, coverage, label)
            self.facts[path.name] = {"dataset": name, "users": int(ds.n_users),
                                     "items": [int(n) for n in ds.n_items], "interactions": int(len(ds.user)),
                                     "max_users": users, "max_items": items}
        return self.loaded[(name, users, items)]
