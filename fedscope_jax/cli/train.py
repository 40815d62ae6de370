"""`fedscope train`: train the FedSCOPE model and write a run directory (docs/model.md).

--mode centralized pools every client's data (the non-private upper bound). --mode local trains one model per
client of the federated partition with no communication (the lower bound, fedscope_jax/train/local.py).
--mode federated runs the vectorized federated engine (fedscope_jax/train/federated.py, docs/engine.md).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from fedscope_jax.errors import FedscopeError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model and write a run directory",
                              description="Train the FedSCOPE model on a prepared dataset (docs/model.md).")
    p.add_argument("--mode", choices=["centralized", "local", "federated"], default="centralized",
                   help="centralized: all clients' data pooled; local: one model per client (--clients, "
                        "--scheme), no communication; federated: the vectorized engine")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset (fedscope data prepare)")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory to write")
    p.add_argument("--config", metavar="FILE", help="JSON config with sections model/train/eval/federated/privacy "
                   "(docs/model.md); flags given on the command line override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.dim=32 --set model.loss.alpha=0 (repeatable)")
    p.add_argument("--attributes", metavar="DIR", help="enrichment output holding item_embeddings.arrow; "
                   "without it the model is ID-only (the 'w/o LLM' ablation)")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    # --- federated options: added by the engine (fedscope_jax/train/federated.py) below this line ---
    from fedscope_jax.train.federated import add_arguments as add_federated_arguments  # light module

    add_federated_arguments(p)
    # --- end of federated options ---
    p.set_defaults(func=run)


def print_table(rows: list[tuple[str, str, dict[str, dict[str, float]]]]) -> None:
    """Prints (method, protocol, {domain: metrics}) rows as one aligned table."""
    keys = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
    print(f"{'method':<11} {'protocol':<8} {'domain':<12} " + " ".join(f"{k:>8}" for k in keys))
    for method, proto, by_domain in rows:
        for dom, m in by_domain.items():
            print(f"{method:<11} {proto:<8} {dom:<12} " + " ".join(f"{m[k]:8.4f}" for k in keys))


def run(args: argparse.Namespace) -> int:
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import apply_flags, load_config

    cfg = apply_flags(load_config(args.config, args.overrides), args)
    ds = load_dataset(args.data)
    semantic, coverage = None, None
    if args.attributes:
        from fedscope_jax.model.semantic import load_semantic
        semantic, coverage = load_semantic(args.attributes, ds.domains, ds.n_items)
    extra = {"data": str(args.data), "attributes": args.attributes, "semantic_coverage": coverage,
             "mode": args.mode}
    if args.mode == "federated":
        try:
            federated = importlib.import_module("fedscope_jax.train.federated")
        except ModuleNotFoundError as exc:
            if exc.name != "fedscope_jax.train.federated":
                raise
            raise FedscopeError("--mode federated: the federated engine (fedscope_jax/train/federated.py) "
                                "is not installed in this checkout") from None
        return int(federated.run(args, cfg, ds, semantic, extra) or 0)
    if args.mode == "local":
        from fedscope_jax.train.local import train_local

        summary = train_local(ds, cfg, args.out, semantic=semantic, force=args.force, extra_config=extra)
    else:
        from fedscope_jax.train.centralized import train_centralized

        summary = train_centralized(ds, cfg, args.out, semantic=semantic, force=args.force, extra_config=extra)
    print_table([("model", "sampled", summary["test"]), ("popularity", "sampled", summary["baselines"]["popularity"]),
                 ("model", "full", summary["test_full"]),
                 ("popularity", "full", summary["baselines"]["popularity_full"])])
    tr = summary["training"]
    if args.mode == "local":
        print(f"run written to {args.out} ({tr['clients']} clients, {tr['steps']} steps, up to "
              f"{tr['epochs_run_max']} epochs per client, {tr['seconds']:.0f} s)")
    else:
        print(f"run written to {args.out} ({tr['epochs_run']} epochs, best {tr['best_epoch']}, "
              f"{tr['seconds']:.0f} s)")
    return 0


__all__ = ["add_parser", "run"]
