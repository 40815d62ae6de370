"""`fedscope report`: tables (Markdown, CSV), plots (PNG) and report.md from run directories.

See docs/experiments.md. Heavy imports happen inside `run`.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("report", help="tables, plots and report.md from run directories",
                              description="Read run directories (a `fedscope reproduce` output with plan.json, "
                              "or any folder of single runs and sweeps), group runs that differ only in the seed, "
                              "and write mean/std tables, plots and report.md (docs/experiments.md).")
    p.add_argument("--runs", required=True, metavar="DIR", help="a reproduce output or a folder of run directories")
    p.add_argument("--out", required=True, metavar="DIR", help="report directory to write")
    p.add_argument("--benchmark", metavar="FILE", help="benchmark.json (fedscope benchmark) for the scaling plot")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedscope_jax.experiments.report import write_report

    path = write_report(args.runs, args.out, benchmark=args.benchmark)
    print(f"report written to {path}")
    return 0


__all__ = ["add_parser", "run"]
