"""`fedscope evaluate`: score a trained run's parameters on a split, both protocols, with the popularity anchor
(and, on the test split, the long-tail breakdown by the target item's train popularity)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedscope_jax.errors import FedscopeError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="evaluate a trained run on the valid or test targets",
                              description="Rank each target against 999 sampled negatives and the full item set "
                                          "(docs/model.md).")
    p.add_argument("--run", required=True, metavar="RUN", help="run directory written by `fedscope train`")
    p.add_argument("--data", metavar="DIR", help="prepared dataset (default: the one recorded in the run)")
    p.add_argument("--attributes", metavar="DIR", help="item_embeddings.arrow folder (default: the run's)")
    p.add_argument("--split", choices=["valid", "test"], default="test")
    p.add_argument("--protocol", choices=["fedscope", "feddcsr"],
                   help="evaluation protocol (default: the run's eval.protocol); feddcsr re-scores the run as the "
                        "FedDCSR code does, to set it beside that peer's numbers (docs/model.md)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import time
    from pathlib import Path

    import jax
    from flax import serialization

    from fedscope_jax.cli.train import print_table
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.eval.protocol import (eval_set, long_tail, model_ranks, popularity_ranks, popularity_scores,
                                            summarize)
    from fedscope_jax.model import init_params
    from fedscope_jax.train.config import from_dict, RunConfig
    from fedscope_jax.utils.io import read_json

    run_dir = Path(args.run)
    raw = read_json(run_dir / "config.json")
    cfg = from_dict(RunConfig, {k: raw[k] for k in ("model", "train", "eval") if k in raw})
    if args.protocol:
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, protocol=args.protocol))
    data = args.data or raw.get("data")
    if not data:
        raise FedscopeError(f"{run_dir / 'config.json'}: no dataset recorded; pass --data")
    ds = load_dataset(data)
    attributes = args.attributes or raw.get("attributes")
    semantic = None
    if attributes and not str(attributes).startswith("none ("):   # a reproduction cell records "none (why)"
        from fedscope_jax.experiments.datasets import semantic_tables
        semantic, _ = semantic_tables(attributes, data, ds)
    target = init_params(jax.random.key(0), cfg.model, ds.n_items, semantic)
    blob = (run_dir / "params.msgpack")
    if raw.get("mode") == "local" and not blob.is_file():
        raise FedscopeError(f"{run_dir}: a local-only run keeps no parameters (one model per client); its metrics "
                            "are in summary.json")
    if not blob.is_file():
        raise FedscopeError(f"{blob}: file not found (expected the run's parameters)")
    try:
        params = serialization.from_bytes(target, blob.read_bytes())
    except (ValueError, KeyError) as exc:
        raise FedscopeError(f"{blob}: does not match the run's config and dataset ({exc})") from None
    t0 = time.time()
    es = eval_set(ds, args.split, cfg.model.max_len, cfg.eval)
    t1 = time.time()
    ranks = model_ranks(params, cfg.model, es, semantic, cfg.eval.batch_size)
    t2 = time.time()
    model = summarize(es, ranks, ds.domains, cfg.eval.ks)
    pop = summarize(es, popularity_ranks(es, popularity_scores(ds)), ds.domains, cfg.eval.ks)
    result = {"split": args.split, "protocol": cfg.eval.protocol, "model": model, "popularity": pop,
              "seconds": {"build_targets": t1 - t0, "score": t2 - t1}, "targets": len(es)}
    if args.split == "test":
        result["long_tail"] = long_tail(es, ranks, ds, cfg.eval)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table([("model", p, model[p]) for p in ("sampled", "full")] +
                    [("popularity", p, pop[p]) for p in ("sampled", "full")])
        print(f"{len(es)} {args.split} targets: built in {t1 - t0:.2f} s, scored (both protocols, jitted, "
              f"includes compilation) in {t2 - t1:.2f} s")
    return 0
