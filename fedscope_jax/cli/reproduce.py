"""`fedscope reproduce`: run the paper's studies (experiments/configs/*.json) and write the report.

See docs/experiments.md. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.spec import PROFILES


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("reproduce", help="run the paper's studies and write tables, plots and report.md",
                              description="Prepare the datasets, run every cell of the chosen studies (finished "
                              "cells are skipped, so a killed run resumes), then write the report "
                              "(docs/experiments.md).")
    p.add_argument("--profile", choices=list(PROFILES), default="quick",
                   help="quick: item-core subsets, small model, 3 seeds, 49-69 min on 2-core CPUs with --title-root "
                   "with federated runs of 10 rounds (2026-12-05), longer with the 40-round budget of 2026-12-06 "
                   "(docs/experiments.md); full: paper-like, sized for one GPU; cpu: the whole "
                   "abxi-food-kitchen, d 64, 1 block, length 50, one seed, the main and ablation studies, for a 2-core "
                   "CPU (main: 67 min on 2026-12-06, 97 min with the ablation's arms without DP)")
    p.add_argument("--studies", help="comma-separated study names (default: every file in --configs)")
    p.add_argument("--configs", metavar="DIR", help="study files (default: experiments/configs of this checkout)")
    p.add_argument("--datasets", help="comma-separated dataset names: run only their cells (default: each study's)")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the shared dataset folders (default: "
                   "$FEDSCOPE_SHARED_DATA, else ../shared/data beside this checkout)")
    p.add_argument("--attributes-root", metavar="DIR", help="enrichment outputs, one folder per dataset holding "
                   "item_embeddings.arrow; without it FedSCOPE runs ID-only, the no-ID arm on LLM vectors is not run, and the "
                   "report says so")
    p.add_argument("--title-root", metavar="DIR", help="title-only item vectors (`fedscope enrich --text title`), "
                   "one folder per dataset holding item_embeddings.arrow: the ablation's title-only arm and the "
                   "privacy study's no-ID arm on titles; without it those arms are not run and the report says so")
    p.add_argument("--dry-run", action="store_true", help="check every cell's config and run each study's cells "
                   "with a tiny budget (1 round / 1 epoch, tiny model, 120 users, one seed) under OUT/dry-run")
    p.add_argument("--smoke", action="store_true", help="run only the first cell of each study's methods and of each "
                   "privacy unit (with --dry-run: the fastest plumbing check)")
    cache = p.add_mutually_exclusive_group()
    cache.add_argument("--compile-cache", dest="compile_cache_dir", metavar="DIR",
                       help="keep compiled XLA programs under DIR instead of OUT/cache/xla (e.g. one cache "
                       "shared by several OUT folders; a subfolder per machine)")
    cache.add_argument("--no-compile-cache", dest="compile_cache", action="store_false", help="do not keep "
                       "compiled XLA programs (by default a program compiled once, by an earlier cell or an "
                       "earlier run into OUT, is read back from OUT/cache/xla instead of compiled again)")
    p.add_argument("--inventory", action="store_true", help="train nothing: count every cell's work (runs, "
                   "federated rounds, padded local steps, epochs, validations), print it per study and write "
                   "OUT/inventory.json")
    p.add_argument("--calibrate", metavar="FILE", help="with --inventory: a `fedscope benchmark --sweep` JSON "
                   "from the machine that will run the reproduction; adds each study's estimated hours there "
                   "(federated, epochs, validation; compilation apart), with a warning where the benchmark "
                   "timed another batch or model size than the cells use")
    p.add_argument("--benchmark", metavar="FILE", help="benchmark.json (fedscope benchmark) for the scaling plot")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (data cache, runs, report)")
    p.set_defaults(func=run)


def default_data_root() -> Path:
    import os

    env = os.environ.get("FEDSCOPE_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"


def inventory(args: argparse.Namespace, studies: list[Any], all_studies: dict[str, Any], opts: Any) -> int:
    """`--inventory`: the counted work of every cell (and its price with --calibrate); trains nothing."""
    from fedscope_jax.experiments.inventory import calibration, format_inventory, take_inventory
    from fedscope_jax.utils.io import read_json, write_json

    cal = None
    if args.calibrate:
        if not Path(args.calibrate).is_file():
            raise FedscopeError(f"--calibrate {args.calibrate}: no such file")
        cal = calibration(read_json(args.calibrate), args.calibrate)
    inv = take_inventory(studies, all_studies, opts, cal)
    path = (opts.out / "dry-run" if opts.dry_run else opts.out) / "inventory.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(inv, path)
    print(format_inventory(inv))
    print(f"per cell: {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from fedscope_jax.experiments.report import write_report
    from fedscope_jax.experiments.planning import Options
    from fedscope_jax.experiments.runner import reproduce
    from fedscope_jax.experiments.spec import choose_studies, read_studies, studies_dir

    names = [n.strip() for n in args.studies.split(",") if n.strip()] if args.studies else None
    where = studies_dir(args.configs)
    every = read_studies(where)
    all_studies = {s.name: s for s in every}
    studies = choose_studies(every, names, args.profile, where)
    if names is None:
        without = sorted(set(all_studies) - {s.name for s in studies})
        if without:
            print(f"profile {args.profile}: not in {', '.join(without)} (their study files have no such profile)")
    opts = Options(args.profile, Path(args.out), Path(args.data_root) if args.data_root else default_data_root(),
                   Path(args.attributes_root) if args.attributes_root else None, args.dry_run,
                   tuple(d.strip() for d in args.datasets.split(",") if d.strip()) if args.datasets else None,
                   args.smoke, args.compile_cache,
                   Path(args.compile_cache_dir) if args.compile_cache_dir else None,
                   Path(args.title_root) if args.title_root else None)
    if args.calibrate and not args.inventory:
        raise FedscopeError("--calibrate FILE: only with --inventory (it prices the counted steps)")
    if args.inventory:
        return inventory(args, studies, all_studies, opts)
    record = reproduce(studies, all_studies, opts)
    root = opts.out / "dry-run" if opts.dry_run else opts.out
    report = write_report(root, root / "report", benchmark=args.benchmark)
    print(f"{sum(len(s['cells']) for s in record['studies'].values())} cells in "
          f"{record['seconds_this_process']:.0f} s; report: {report}")
    if record.get("failed"):
        print(f"{len(record['failed'])} cell(s) failed (listed in the report): " + "; ".join(
            f"{k}: {v}" for k, v in record["failed"].items()), file=sys.stderr)
        return 1
    return 0


__all__ = ["add_parser", "run"]
