"""Times the evaluation protocol on a prepared dataset: building the targets, compiling, and scoring.

    .venv/bin/python benchmarks/model_eval.py --data DIR [--split test] [--out FILE.json]

Scoring cost does not depend on training, so freshly initialized default parameters are scored. Prints one
line per phase and writes JSON with the same figures plus process CPU time (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from fedscope_jax.data.canonical import load_dataset
from fedscope_jax.eval.protocol import EvalConfig, eval_set, model_ranks
from fedscope_jax.model import ModelConfig, init_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--out")
    args = ap.parse_args()
    ds = load_dataset(args.data)
    cfg, ecfg = ModelConfig(), EvalConfig()
    params = init_params(jax.random.key(0), cfg, ds.n_items)
    wall, cpu = {}, {}
    t, c = time.perf_counter(), time.process_time()
    es = eval_set(ds, args.split, cfg.max_len, ecfg)
    wall["build_targets"], cpu["build_targets"] = time.perf_counter() - t, time.process_time() - c
    for phase in ("first_call_with_compile", "steady_state"):
        t, c = time.perf_counter(), time.process_time()
        model_ranks(params, cfg, es, batch_size=ecfg.batch_size)
        wall[phase], cpu[phase] = time.perf_counter() - t, time.process_time() - c
    result = {"dataset": ds.meta.get("name"), "targets": len(es), "device": jax.devices()[0].device_kind,
              "wall_seconds": wall, "cpu_seconds": cpu}
    for k in wall:
        print(f"{k:<26} wall {wall[k]:7.2f} s   cpu {cpu[k]:7.2f} s")
    print(f"{len(es)} targets, {ds.meta.get('name')}, {result['device']}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
