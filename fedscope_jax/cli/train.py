"""`fedscope train`: train the FedSCOPE model and write a run directory (docs/model.md).

--mode centralized pools every client's data (the non-private upper bound). --mode local trains one model per
client of the federated partition with no communication (the lower bound, fedscope_jax/train/local.py).
--mode federated runs the vectorized federated engine (fedscope_jax/train/federated.py, docs/engine.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from fedscope_jax.cli.flags import add_federated_arguments, apply_flags
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
    p.add_argument("--attributes", metavar="DIR", help="enrichment output holding item_embeddings.arrow (made for "
                   "--data, or for the full dataset of a subset: its item_map.arrow maps the ids); without it the "
                   "model is ID-only (the 'w/o LLM' ablation)")
    p.add_argument("--force", action="store_true", help="replace an existing run directory")
    add_federated_arguments(p)
    h = p.add_argument_group("several hosts (--mode federated; docs/engine.md, \"Devices and multi-host\")")
    h.add_argument("--multi-host", action="store_true",
                   help="join the other processes of this run (jax.distributed) and lay the clients over the "
                        "devices of all of them; without the three options below, the cluster's environment "
                        "(SLURM, Open MPI, JAX_COORDINATOR_ADDRESS) supplies them")
    h.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address (implies --multi-host)")
    h.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (implies --multi-host)")
    h.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1 (implies --multi-host); "
                   "process 0 writes RUN, process I > 0 the same files to RUN.processI")
    p.set_defaults(func=run)


def print_table(rows: list[tuple[str, str, dict[str, dict[str, float]]]]) -> None:
    """Prints (method, protocol, {domain: metrics}) rows as one aligned table."""
    keys = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "MRR")
    print(f"{'method':<11} {'protocol':<8} {'domain':<12} " + " ".join(f"{k:>8}" for k in keys))
    for method, proto, by_domain in rows:
        for dom, m in by_domain.items():
            print(f"{method:<11} {proto:<8} {dom:<12} " + " ".join(f"{m[k]:8.4f}" for k in keys))


def join_hosts(args: argparse.Namespace, cfg: Any) -> None:
    """--multi-host: joins the run's processes before any JAX computation; a process other than 0 writes its
    own copy of the run to RUN.processI (the same numbers: every process runs the same rounds), all of them
    their checkpoints together to RUN/checkpoints (`engine.hosts`)."""
    multi = args.multi_host or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id))
    if not multi:
        return
    if args.mode != "federated":
        raise FedscopeError(f"--multi-host: only --mode federated runs on several hosts, not --mode {args.mode}")
    if not cfg.federated.chunk_size:
        raise FedscopeError("--multi-host needs --chunk-size: timing the candidates on each process could choose "
                            "different chunks, and every process must run the same program")
    from fedscope_jax.engine import hosts

    hosts.initialize(args.coordinator, args.num_processes, args.process_id)
    args.out = str(hosts.run_dir(args.out))


def run(args: argparse.Namespace) -> int:
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import check_user_norm, load_config

    cfg = apply_flags(load_config(args.config, args.overrides), args)   # no JAX computation yet
    if args.mode != "federated":   # federated runs check it with the rest of their privacy settings
        check_user_norm(cfg, args.mode)
    join_hosts(args, cfg)
    ds = load_dataset(args.data)
    semantic, coverage = None, None
    if args.attributes:
        from fedscope_jax.experiments.datasets import semantic_tables
        semantic, coverage = semantic_tables(args.attributes, args.data, ds)
    extra = {"data": str(args.data), "attributes": args.attributes, "semantic_coverage": coverage,
             "mode": args.mode}
    if args.mode == "federated":
        return run_federated(args, cfg, ds, semantic, extra)
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


def run_federated(args: argparse.Namespace, cfg: Any, ds: Any, semantic: Any, extra: dict[str, Any]) -> int:
    """`--mode federated`: trains with the vectorized engine and prints the privacy spend and test NDCG@10."""
    from fedscope_jax.train.federated import train_federated

    summary = train_federated(ds, cfg, args.out, semantic, extra, resume=args.resume, force=args.force)
    privacy_facts, pcfg = summary["privacy"], cfg.privacy
    if pcfg.mode != "off":
        print(f"privacy ({pcfg.mode}): eps_spent min {privacy_facts['eps_spent_min']:.3g} / median "
              f"{privacy_facts['eps_spent_median']:.3g} / max {privacy_facts['eps_spent_max']:.3g} "
              f"(nominal {pcfg.epsilon:g}, delta {pcfg.delta:g}); "
              f"{len(privacy_facts['stopped_clients'])} clients stopped by their budget")
    tr = summary["training"]
    tested = (f"tested round {tr['best_round']} (best validation"
              + (", stopped early" if tr["stopped_early"] else "") + ")"
              if tr["selection"] == "best_valid" else "tested the final round")
    print(f"run written to {args.out} ({tr['rounds_run']} of {cfg.federated.rounds} rounds, {tested}, "
          f"chunk {summary['federated']['chunk_size']}, test " + ", ".join(f"{d} NDCG@10 {m.get('NDCG@10', float('nan')):.4f}"
                              for d, m in summary["test"].items()) + ")")
    return 0


__all__ = ["add_parser", "print_table", "run", "run_federated"]
