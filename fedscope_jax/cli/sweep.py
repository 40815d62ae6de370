"""`fedscope sweep`: privacy modes x epsilons x seeds, each seed's configurations in one compiled program
(fedscope_jax/train/sweep.py, docs/sweep.md)."""

from __future__ import annotations

import argparse
from typing import Any

from fedscope_jax.cli.flags import add_federated_arguments, apply_flags
from fedscope_jax.errors import FedscopeError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "sweep", help="train a privacy sweep (modes x epsilons x seeds) as one vmapped program per seed",
        description="Federated training of every configuration (privacy mode, epsilon, seed); the configurations "
        "of one seed train together in one compiled program (a vmapped config axis). Writes one run directory "
        "per configuration, like `fedscope train --mode federated`, and sweep.json (docs/sweep.md).",
        conflict_handler="resolve")
    p.add_argument("--data", required=True, metavar="DIR", help="prepared dataset (fedscope data prepare)")
    p.add_argument("--out", required=True, metavar="DIR", help="sweep directory to write")
    p.add_argument("--config", metavar="FILE", help="JSON config with sections model/train/eval/federated/privacy; "
                   "flags given on the command line override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.dim=32 (repeatable)")
    p.add_argument("--attributes", metavar="DIR", help="enrichment output holding item_embeddings.arrow")
    p.add_argument("--force", action="store_true", help="replace an existing sweep directory")
    add_federated_arguments(p)
    # The sweep's own axes replace the single-run --privacy / --epsilon flags (conflict_handler="resolve").
    g = p.add_argument_group("sweep axes")
    g.add_argument("--privacy", dest="sweep_modes", default="personalized,uniform", metavar="M1,M2",
                   help="privacy modes: personalized, uniform, central, or distributed alone (with "
                   "--privacy-unit user; default personalized,uniform)")
    g.add_argument("--epsilons", dest="sweep_epsilons", default="1,2,4,8,16,inf", metavar="E1,E2",
                   help="epsilons of the whole run per client; inf = no DP (default 1,2,4,8,16,inf)")
    g.add_argument("--seeds", dest="sweep_seeds", type=int, default=1, metavar="N",
                   help="number of seeds: train.seed, train.seed+1, ... (default 1)")
    g.add_argument("--config-chunk", type=int, default=0, metavar="N",
                   help="configurations vectorized at once in the sweep program (0 = all on an accelerator, "
                   "1 = a loop over configurations inside the program on CPU; default 0)")
    g.add_argument("--epsilon", dest="single_epsilon", help=argparse.SUPPRESS)
    # replaces the single-run --resume of the federated flags (conflict_handler="resolve")
    p.add_argument("--resume", dest="sweep_resume", action="store_true",
                   help="continue a killed sweep in --out from its checkpoints; finished seeds are kept (the "
                   "options must be those of the killed sweep; not with --force)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.single_epsilon is not None:
        raise FedscopeError("--epsilon: a sweep takes a list: use --epsilons, e.g. --epsilons 1,2,4,8,16,inf")
    if args.config_chunk < 0:
        raise FedscopeError(f"--config-chunk {args.config_chunk}: expected >= 0 (0 = the device's default)")
    if args.sweep_seeds < 1:
        raise FedscopeError(f"--seeds {args.sweep_seeds}: expected a number of seeds >= 1")
    from fedscope_jax.train.sweep import parse_epsilons, parse_modes

    modes = parse_modes(args.sweep_modes, "--privacy")
    epsilons = parse_epsilons(args.sweep_epsilons, "--epsilons")
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.sweep import run_sweep

    if modes == ("distributed",):   # the base config's mode, so that distributed-only options validate
        args.privacy = "distributed"
    cfg = apply_flags(load_config(args.config, args.overrides), args)
    seeds = [cfg.train.seed + i for i in range(args.sweep_seeds)]
    ds = load_dataset(args.data)
    semantic, coverage = None, None
    if args.attributes:
        from fedscope_jax.experiments.datasets import semantic_tables

        semantic, coverage = semantic_tables(args.attributes, args.data, ds)
    extra = {"data": str(args.data), "attributes": args.attributes, "semantic_coverage": coverage,
             "mode": "federated"}
    summaries = run_sweep(ds, cfg, modes, epsilons, seeds, args.out, semantic=semantic, force=args.force,
                          extra=extra, config_chunk=args.config_chunk, resume=args.sweep_resume)
    from fedscope_jax.train.sweep import sweep_points
    from fedscope_jax.utils.io import read_json

    report = read_json(f"{args.out}/sweep.json")
    print(f"{'configuration':<28} {'privacy':<12} {'eps_spent max':>13} " +
          " ".join(f"{d + ' NDCG@10':>18}" for d in ds.domains))
    for p, s in zip(sweep_points(cfg, modes, epsilons, seeds), summaries):
        spent = s["privacy"].get("eps_spent_max")
        print(f"{p.name:<28} {p.privacy_mode:<12} {spent if spent is not None else float('nan'):>13.3g} " +
              " ".join(f"{s['test'][d].get('NDCG@10', float('nan')):>18.4f}" for d in ds.domains))
    print(f"sweep written to {args.out}: {len(summaries)} configurations, compile {report['compile_seconds']:.1f} s, "
          f"training {report['train_seconds']:.1f} s")
    return 0


__all__ = ["add_parser", "run"]
