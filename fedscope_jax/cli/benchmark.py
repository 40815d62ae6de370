"""`fedscope benchmark`: the vectorized federated engine vs its sequential reference, or (--sweep) a privacy
sweep as one vmapped program vs its configurations one by one (docs/engine.md, docs/sweep.md)."""

from __future__ import annotations

import argparse
import functools
from typing import Any, Callable

from fedscope_jax.errors import FedscopeError

ENGINE_DEFAULTS = {"max_len": 50, "dim": 64, "batch_size": 32, "local_epochs": 1}


def _int_list(text: str, minimum: int) -> tuple[int, ...]:
    """Comma-separated integers, each >= minimum (an argparse type)."""
    what = "positive integers" if minimum == 1 else f"integers >= {minimum}"
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


_ints = functools.partial(_int_list, minimum=1)
_ints0 = functools.partial(_int_list, minimum=0)


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("benchmark", help="engine speed: vectorized vs sequential; --sweep: sweep vs one by one",
                              description="Times federated rounds of the vectorized engine and of the sequential "
                              "reference side by side on synthetic data sized like abxi-food-kitchen, or on the "
                              "real users of a prepared two-domain dataset (--data); prints a "
                              "table and writes JSON (docs/engine.md). With --sweep: trains the privacy sweep "
                              "(6 epsilons x personalized, uniform) of the FedSCOPE model on --data as one vmapped "
                              "program and one configuration after another, side by side (docs/sweep.md).")
    p.add_argument("--clients", type=_ints, metavar="C1,C2,...",
                   help="client counts to measure (default 8,32,128,512); with --sweep: the number of clients K "
                   "(default: the config's federated.clients)")
    p.add_argument("--out", metavar="FILE.json", help="write the JSON report here (rewritten after each client "
                   "count, or each --sweep repeat, with \"complete\" / \"repeats_done\": a stopped benchmark keeps "
                   "what it finished)")
    p.add_argument("--data", metavar="DIR", help="a prepared two-domain dataset (fedscope data prepare): benchmark "
                   "its real train sequences instead of synthetic users (required by --sweep)")
    p.add_argument("--users", type=int, help="synthetic users (default: abxi-food-kitchen's 7144); not with --data")
    p.add_argument("--max-len", type=int, help="sequence length (default 50; --sweep: model.max_len)")
    p.add_argument("--dim", type=int, help="model width (default 64; --sweep: model.dim)")
    p.add_argument("--batch-size", type=int, help="users per local step (default 32; --sweep: train.batch_size)")
    p.add_argument("--local-epochs", type=int, help="(default 1; --sweep: federated.local_epochs)")
    p.add_argument("--repeats", type=int, help="timed rounds per engine, alternating, best kept (default 4); "
                   "--sweep: alternating repeats of both sides, best kept (default 2)")
    p.add_argument("--noise-mode", choices=["off", "per_client", "sum"], default="sum")
    p.add_argument("--model", choices=["fedscope", "reference"], default="fedscope",
                   help="the model timed: fedscope (default: the model `fedscope train` builds, at the run "
                   "config's defaults but for --dim, --max-len, --batch-size, --local-epochs, --seed) or "
                   "reference (the engine's "
                   "one-layer test model, the table of before 2026-12-05)")
    p.add_argument("--seed", type=int, help="(default 0; --sweep: train.seed)")
    s = p.add_argument_group("sweep benchmark (--sweep)")
    s.add_argument("--sweep", action="store_true", help="time the sweep program against one-by-one runs")
    s.add_argument("--rounds", type=int, help="federated rounds per configuration (default: federated.rounds)")
    s.add_argument("--fraction", type=float, help="sampled fraction of clients per round (default: federated.fraction)")
    s.add_argument("--chunk-size", type=int, help="clients per vmapped chunk (default: federated.chunk_size; 0 = tune)")
    s.add_argument("--config-chunk", type=_ints0, default=(0,), metavar="N1,N2",
                   help="configurations vectorized at once in the sweep program; several values are each timed "
                   "(the first is reported as sweep_seconds); 0 = all on an accelerator, 1 on CPU (default 0)")
    s.add_argument("--epsilons", default="1,2,4,8,16,inf", metavar="E1,E2", help="(default 1,2,4,8,16,inf)")
    s.add_argument("--privacy", default="personalized,uniform", metavar="M1,M2", help="(default personalized,uniform)")
    s.add_argument("--config", metavar="FILE", help="JSON run config (sections model/train/eval/federated/privacy)")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.blocks=1 (repeatable)")
    u = p.add_argument_group("privacy-unit benchmark (--privacy-unit user; the --sweep group's config flags apply)")
    u.add_argument("--privacy-unit", choices=["user"], help="time the user-level private round (DP-SGD over "
                   "the users of every silo, personalized budgets) against the non-private round with the same "
                   "settings, side by side on --data (docs/privacy.md)")
    u.add_argument("--epsilon", type=float, default=8.0, help="the user-level budget (default 8)")
    x = p.add_argument_group("cross-device benchmark (--cross-device; the --sweep group's config flags apply)")
    x.add_argument("--cross-device", action="store_true", help="time rounds of one-user clients (the FedSCOPE "
                   "model, one client a user of --data; --clients: clients a round, default 64,256,1024) against "
                   "the same users in --silos power-law silos, vectorized and sequential (docs/engine.md)")
    x.add_argument("--silos", type=int, default=8, help="silos of the silo workload (default 8)")
    q = p.add_argument_group("peer benchmark (--peer feddcsr)")
    q.add_argument("--peer", choices=["feddcsr"], help="time the FedDCSR peer's FedSASRec workload (one client a "
                   "domain of --data, hidden 256, length 16, batch 256, full softmax) on our engine, seconds a local "
                   "step beside the peer's PyTorch code (docs/engine.md)")
    q.add_argument("--steps", type=int, help="local steps timed per client (default 4)")
    q.add_argument("--peer-result", metavar="FILE.json", help="the peer's seconds a step from "
                   "benchmarks/feddcsr_peer_step.py --out (default: the figures recorded on the project's 2-core "
                   "reference CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fedscope_jax.utils.io import write_json

    def save(partial: dict[str, Any]) -> None:   # after each client count / repeat (the last one: the report)
        if args.out:
            write_json(partial, args.out)

    if sum(map(bool, (args.sweep, args.privacy_unit, args.cross_device, args.peer))) > 1:
        raise FedscopeError("--sweep, --privacy-unit, --cross-device and --peer are four benchmarks; give one")
    if not args.peer and (args.steps is not None or args.peer_result):
        raise FedscopeError(f"{'--steps' if args.steps is not None else '--peer-result'}: only with --peer")
    if args.model != "fedscope" and (args.sweep or args.privacy_unit or args.cross_device or args.peer):
        raise FedscopeError(f"--model {args.model}: only for the engine benchmark (the others time the FedSCOPE "
                            "model)")
    if args.sweep:
        report, table = _run_sweep(args, save)
    elif args.privacy_unit:
        report, table = _run_unit(args, save)
    elif args.cross_device:
        report, table = _run_cross_device(args, save)
    elif args.peer:
        report, table = _run_peer(args, save)
    else:
        if args.data and args.users is not None:
            raise FedscopeError(f"--users: only for synthetic data (--data {args.data} benchmarks that dataset's "
                                "users)")
        _refuse(args, ("rounds", "fraction", "chunk_size"), "only with --sweep or --privacy-unit")
        _refuse(args, ("config",), "only with --sweep, --privacy-unit or --cross-device")
        from fedscope_jax.bench.engine import BenchmarkConfig, format_table, run_benchmark

        opts = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in ENGINE_DEFAULTS.items()}
        cfg = BenchmarkConfig(clients=args.clients or (8, 32, 128, 512),
                              users=args.users if args.users is not None else 7144, data=args.data,
                              repeats=args.repeats if args.repeats is not None else 4,
                              noise_mode=args.noise_mode, seed=args.seed or 0, model=args.model, **opts)
        report = run_benchmark(cfg, on_report=save)
        table = format_table(report)
    print(table)
    if args.out:   # written by save() after the last client count / repeat
        print(f"written to {args.out}")
    return 0


def _refuse(args: argparse.Namespace, flags: tuple[str, ...], why: str, also: tuple[str, ...] = ()) -> None:
    """One error naming every flag of `flags` given on the command line (and `also`), and `why` they are not
    taken there."""
    given = [f"--{k.replace('_', '-')}" for k in flags if getattr(args, k) is not None] + list(also)
    if given:
        raise FedscopeError(f"{', '.join(given)}: {why}")


def _run_config(args: argparse.Namespace, flag: str, client_counts: bool = False) -> Any:
    """The run config of --sweep / --privacy-unit / --cross-device: --config, then --set, then the flags given.
    client_counts: --clients is a list of client counts the benchmark measures, not federated.clients."""
    import dataclasses

    from fedscope_jax.train.config import load_config

    if not args.data:
        raise FedscopeError(f"{flag} needs --data DIR (a prepared dataset, e.g. fedscope data prepare --format abxi)")
    if args.clients is not None and len(args.clients) != 1 and not client_counts:
        raise FedscopeError(f"--clients with {flag}: expected one number of clients, got {list(args.clients)}")
    cfg = load_config(args.config, args.overrides)
    if cfg.federated.weighting != "uniform":
        raise FedscopeError(f"{flag}: federated.weighting={cfg.federated.weighting} changes the server's mean, not "
                            "the work timed; the benchmarks weigh uniformly, leave it at uniform")
    fed = {k: v for k, v in {"clients": args.clients[0] if args.clients and not client_counts else None,
                             "rounds": args.rounds,
                             "fraction": args.fraction, "chunk_size": args.chunk_size,
                             "local_epochs": args.local_epochs}.items() if v is not None}
    model = {k: v for k, v in {"dim": args.dim, "max_len": args.max_len}.items() if v is not None}
    train = {k: v for k, v in {"batch_size": args.batch_size, "seed": args.seed}.items() if v is not None}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model),
                               train=dataclasses.replace(cfg.train, **train),
                               federated=dataclasses.replace(cfg.federated, **fed))


def _run_sweep(args: argparse.Namespace,
               save: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], str]:
    """`--sweep`: the run config from --config / --set / the flags given, then the side-by-side timing."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.bench.sweep import format_sweep_table, run_sweep_benchmark
    from fedscope_jax.train.sweep import parse_epsilons, parse_modes

    cfg = _run_config(args, "--sweep")
    modes = parse_modes(args.privacy, "--privacy")
    epsilons = parse_epsilons(args.epsilons, "--epsilons")
    report = run_sweep_benchmark(load_dataset(args.data), cfg, modes, epsilons, config_chunks=args.config_chunk,
                                 repeats=args.repeats if args.repeats is not None else 2, on_report=save)
    return report, format_sweep_table(report)


def _run_unit(args: argparse.Namespace,
              save: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], str]:
    """`--privacy-unit user`: the user-level private round against the non-private one, side by side."""
    import math

    from fedscope_jax.bench.privacy_unit import format_unit_table, run_unit_benchmark
    from fedscope_jax.data.canonical import load_dataset

    cfg = _run_config(args, "--privacy-unit")
    if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
        raise FedscopeError(f"--epsilon {args.epsilon}: expected a finite budget > 0")
    report = run_unit_benchmark(load_dataset(args.data), cfg, args.epsilon,
                                repeats=args.repeats if args.repeats is not None else 2, on_report=save)
    return report, format_unit_table(report)


def _run_cross_device(args: argparse.Namespace,
                      save: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], str]:
    """`--cross-device`: rounds of one-user clients against the same users in silos, side by side."""
    from fedscope_jax.bench.cross_device import format_cross_device_table, run_cross_device_benchmark
    from fedscope_jax.data.canonical import load_dataset

    _refuse(args, ("rounds", "fraction", "chunk_size"), "not with --cross-device (one round per row, every sampled "
            "client in it, the chunk size timed)")
    if args.silos < 1:
        raise FedscopeError(f"--silos {args.silos}: expected >= 1")
    if args.repeats is not None and args.repeats < 1:
        raise FedscopeError(f"--repeats {args.repeats}: expected >= 1 timed round per engine")
    cfg = _run_config(args, "--cross-device", client_counts=True)
    report = run_cross_device_benchmark(load_dataset(args.data), cfg, args.clients or (64, 256, 1024), args.silos,
                                        repeats=args.repeats if args.repeats is not None else 3, on_report=save)
    return report, format_cross_device_table(report)


def _run_peer(args: argparse.Namespace, save: Callable[[dict[str, Any]], None]) -> tuple[dict[str, Any], str]:
    """`--peer feddcsr`: the peer's workload on our engine, its seconds a step beside the peer's."""
    import json
    from pathlib import Path

    from fedscope_jax.bench.peer import format_peer_table, run_peer_benchmark
    from fedscope_jax.data.canonical import load_dataset

    if not args.data:
        raise FedscopeError("--peer needs --data DIR (a prepared two-domain dataset, e.g. fedscope data prepare "
                            "--format abxi)")
    _refuse(args, ("clients", "users", "max_len", "dim", "batch_size", "local_epochs", "rounds", "fraction",
                   "chunk_size", "config", "seed"),
            "not with --peer (its workload is the peer's published settings, bench/peer.py PEERS; --steps and "
            "--repeats set how much is timed)", also=("--set",) if args.overrides else ())
    peer = None
    if args.peer_result:
        try:
            peer = json.loads(Path(args.peer_result).read_text(encoding="utf-8"))
            peer["domains"] = [{"items": int(d["items"]), "median_seconds": float(d["median_seconds"])}
                               for d in peer["domains"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FedscopeError(f"--peer-result {args.peer_result}: expected the JSON that "
                                f"benchmarks/feddcsr_peer_step.py --out writes ({exc})") from None
        peer["source"] = f"measured: {args.peer_result} (torch {peer.get('torch', '?')})"
    report = run_peer_benchmark(load_dataset(args.data), args.peer, args.steps if args.steps is not None else 4,
                                args.repeats if args.repeats is not None else 2, peer, on_report=save)
    return report, format_peer_table(report)


__all__ = ["add_parser", "run"]
