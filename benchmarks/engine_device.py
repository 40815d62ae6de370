"""Device check of the engine for a session with a GPU: vectorized == sequential on the device, then the
benchmark; writes $OUT/engine_benchmark.json and prints the table after each client count (so a run cut
short by its time limit keeps the rows it finished).

Run from the repository root on the device machine (its python already has jax/flax/optax/orbax; the package
comes from the working tree on PYTHONPATH, as benchmarks/device_check.sh sets it up):
    PYTHONPATH=$PWD python benchmarks/engine_device.py --clients 8,32,128,512
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", default="8,32,128,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    args = parser.parse_args()

    import jax

    from fedscope_jax.bench.engine import BenchmarkConfig, format_table, run_benchmark
    from fedscope_jax.utils.io import write_json

    print("devices:", jax.devices(), flush=True)
    # the reference model: its agreement check (1e-4, below) holds with its local Adam at 1e-3; the FedSCOPE
    # model's Adam at 1e-2 turns float noise into larger differences (docs/engine.md)
    cfg = BenchmarkConfig(clients=tuple(int(c) for c in args.clients.split(",")), repeats=args.repeats,
                          dim=args.dim, max_len=args.max_len, model="reference")
    out = Path(os.environ.get("OUT", "."))

    def save(partial: dict) -> None:   # after each C: a run stopped by its time limit keeps the rows it finished
        write_json(partial, out / "engine_benchmark.json")
        print(format_table(partial), flush=True)

    report = run_benchmark(cfg, on_report=save)
    bad = [r["clients"] for r in report["results"] if r["max_abs_diff_vs_sequential"] > 1e-4]
    if bad:
        print(f"vectorized != sequential (max abs diff > 1e-4) at C = {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
