"""`fedscope privacy`: privacy measurements that train nothing (docs/privacy.md).

- `dry-run DATASET`: what a federated run on a dataset would spend per client (the ledger protocol without
  training; fedscope_jax/privacy/dryrun.py);
- `secagg-error`: what simulated secure aggregation adds to a sum (quantization error) and its speed
  (fedscope_jax/privacy/secagg_error.py).
"""

from __future__ import annotations

import argparse
from typing import Any

from fedscope_jax.cli.flags import add_privacy_arguments, privacy_config_from_args

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("privacy", help="privacy measurements without training (dry run, secagg error)",
                              description="Privacy measurements that train nothing (docs/privacy.md).")
    sub = p.add_subparsers(dest="privacy_command", metavar="WHAT")
    sub.required = True
    d = sub.add_parser("dry-run", help="per-client privacy spend of a federated run, without training",
                       description="The accounting of a run depends only on the clients' sizes, the privacy "
                       "config, the rounds and who takes part: this runs the ledger protocol (Poisson "
                       "participation at --sampling-rate, refused clients skipped) and prints what each client "
                       "would spend.")
    d.add_argument("dataset", help="prepared dataset directory or raw source folder (prepared into a temporary "
                   "directory)")
    d.add_argument("--clients", type=int, default=64)
    d.add_argument("--scheme", default="powerlaw", help="partition scheme (fedscope data partition)")
    d.add_argument("--alpha", type=float, default=None, help="partition exponent/concentration (its default)")
    d.add_argument("--partition", help="a saved partition.arrow (fedscope data partition) instead of the above")
    d.add_argument("--rounds", type=int, default=50)
    d.add_argument("--sampling-rate", type=float, default=1.0, help="per-round participation probability")
    d.add_argument("--seed", type=int, default=0, help="partition and participation seed")
    d.add_argument("--out", help="write privacy_ledger.arrow, metrics.jsonl, summary.json here")
    d.add_argument("--force", action="store_true", help="replace an existing --out")
    add_privacy_arguments(d)
    d.set_defaults(func=dry_run)
    s = sub.add_parser("secagg-error", help="quantization error and speed of simulated secure aggregation",
                       description="Draws updates uniform in [-bound, bound], runs the whole secure-aggregation "
                       "protocol in one jit and prints the error against the plain float64 sum, the worst-case "
                       "bound and the time of one aggregation.")
    s.add_argument("--clients", type=int, nargs="+", default=[16, 64])
    s.add_argument("--dim", type=int, default=100_000)
    s.add_argument("--bound", type=float, default=1.0)
    s.add_argument("--levels", type=int, default=None, help="quantization levels L (default: finest that fits)")
    s.add_argument("--neighbors", type=int, default=None, help="masking partners per client (default: all)")
    s.add_argument("--dropout", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=secagg_error)


def dry_run(args: argparse.Namespace) -> int:
    from fedscope_jax.privacy.dryrun import client_sizes, dry_run as run_dry, summary_table

    config = privacy_config_from_args(args)
    sizes = client_sizes(args.dataset, args.clients, args.scheme, args.seed, args.alpha, args.partition)
    summary = run_dry(sizes, config, args.rounds, args.sampling_rate, args.seed, args.out, args.force)
    print(summary_table(sizes, summary))
    return 0


def secagg_error(args: argparse.Namespace) -> int:
    from fedscope_jax.privacy.secagg_error import COLUMNS, measure

    print(" | ".join(COLUMNS))
    for n in args.clients:
        r = measure(n, args.dim, args.bound, args.levels, args.neighbors, args.dropout, args.seed)
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS))
    return 0
