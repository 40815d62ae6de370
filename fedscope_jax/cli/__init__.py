"""The `fedscope` command line: one module per subcommand, imported lazily so `--help` stays fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from fedscope_jax.errors import FedscopeError

# Subcommand name -> module under fedscope_jax.cli. Each module has `add_parser(subparsers)`, which
# registers its parser and sets `func` (called with the parsed args, returns an exit code).
COMMANDS = ("data", "enrich", "train", "evaluate", "sweep", "benchmark", "reproduce", "report", "privacy")

__all__ = ["COMMANDS", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedscope",
        description="Simulate federated cross-domain sequential recommendation (FedSCOPE) in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"fedscope_jax.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"fedscope_jax.cli.{name}":
                raise
            continue  # command not built yet
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FedscopeError as exc:
        print(f"fedscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fedscope {args.command}: interrupted", file=sys.stderr)
        return 130
