"""Throughput of the data layer: `prepare` on each real dataset, `synthesize` and `partition` at a few sizes.

    .venv/bin/python benchmarks/data_prepare.py [--data ../shared/data] [--users 7144,100000,1000000] [--out FILE]

Prints a table and writes JSON {"results": [{"what", "users", "interactions", "seconds",
"interactions_per_s"}]}. Outputs go to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.data.formats import prepare
from fedscope_jax.data.partition import partition
from fedscope_jax.data.synth import SynthConfig, synthesize

REPO = Path(__file__).resolve().parents[1]
TITLES = {"abxi-food-kitchen": "llmcdsr-food-kitchen", "c2dsr-food-kitchen": "llmcdsr-food-kitchen",
          "c2dsr-movie-book": "llmcdsr-movie-book"}


def _row(what: str, meta: dict, seconds: float) -> dict:
    return {"what": what, "users": meta["users"], "interactions": meta["interactions"],
            "seconds": round(seconds, 3), "interactions_per_s": round(meta["interactions"] / seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="folder of real datasets")
    parser.add_argument("--users", default="7144,100000,1000000", help="synthetic sizes, comma-separated")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = []
    data = Path(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(p for p in data.iterdir() if p.is_dir()) if data.is_dir() else []:
            titles = data / TITLES[src.name] if src.name in TITLES else None
            t0 = time.perf_counter()
            meta = prepare(src, Path(tmp) / src.name, titles=titles)
            results.append(_row(f"prepare {src.name}", meta, time.perf_counter() - t0))
        for users in (int(u) for u in args.users.split(",")):
            out = Path(tmp) / f"synth-{users}"
            t0 = time.perf_counter()
            meta = synthesize(SynthConfig(users=users), out)
            results.append(_row("synthesize", meta, time.perf_counter() - t0))
            t0 = time.perf_counter()
            ds = load_dataset(out)
            results.append(_row("load_dataset", meta, time.perf_counter() - t0))
            t0 = time.perf_counter()
            partition(ds, min(512, users), "powerlaw", seed=0).summary(ds)
            results.append(_row("partition 512 powerlaw + summary", meta, time.perf_counter() - t0))
    print(f"{'what':<42} {'users':>10} {'interactions':>13} {'seconds':>8} {'inter/s':>12}")
    for r in results:
        print(f"{r['what']:<42} {r['users']:>10,} {r['interactions']:>13,} {r['seconds']:>8.2f} "
              f"{r['interactions_per_s']:>12,}")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
