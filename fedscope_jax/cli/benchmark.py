"""`fedscope benchmark`: the vectorized federated engine vs its sequential reference (docs/engine.md)."""

from __future__ import annotations

import argparse
from typing import Any

from fedscope_jax.errors import FedscopeError


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("benchmark", help="client-updates/s of the vectorized engine vs sequential",
                              description="Times federated rounds of the vectorized engine and of the sequential "
                              "reference side by side on synthetic data sized like abxi-food-kitchen; prints a "
                              "table and writes JSON (docs/engine.md).")
    p.add_argument("--clients", type=_ints, default=(8, 32, 128, 512), metavar="C1,C2,...",
                   help="client counts to measure (default 8,32,128,512)")
    p.add_argument("--out", metavar="FILE.json", help="write the JSON report here")
    p.add_argument("--data", metavar="DIR", help="a prepared dataset (not supported yet: synthetic only)")
    p.add_argument("--users", type=int, default=7144, help="synthetic users (default: abxi-food-kitchen's 7144)")
    p.add_argument("--max-len", type=int, default=32, help="sequence length (default 32)")
    p.add_argument("--dim", type=int, default=32, help="model width (default 32)")
    p.add_argument("--batch-size", type=int, default=32, help="users per local step (default 32)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4, help="timed rounds per engine, alternating, best kept (default 4)")
    p.add_argument("--noise-mode", choices=["off", "per_client", "sum"], default="sum")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.data:
        raise FedscopeError(f"--data {args.data}: benchmarking on a prepared dataset is not implemented yet; "
                            "run without --data for the synthetic abxi-food-kitchen-sized workload")
    from fedscope_jax.engine.benchmark import BenchmarkConfig, format_table, run_benchmark
    from fedscope_jax.utils.io import write_json

    cfg = BenchmarkConfig(clients=args.clients, users=args.users, max_len=args.max_len, dim=args.dim,
                          batch_size=args.batch_size, local_epochs=args.local_epochs, repeats=args.repeats,
                          noise_mode=args.noise_mode, seed=args.seed)
    report = run_benchmark(cfg)
    print(format_table(report))
    if args.out:
        write_json(report, args.out)
        print(f"written to {args.out}")
    return 0


__all__ = ["add_parser", "run"]
