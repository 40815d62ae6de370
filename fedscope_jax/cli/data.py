"""`fedscope data {prepare,synth,info,partition}`: make, inspect and split canonical datasets (docs/data.md).

The issue's flag forms (`prepare --input DIR --output DIR`, `partition --data DIR`, `synth --output DIR
--items-a N --items-b N`) and the earlier positional / `--out` forms are the same options.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from fedscope_jax.errors import FedscopeError


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("data", help="prepare, synthesize, inspect and partition datasets",
                                   description="Make, inspect and split canonical datasets (docs/data.md).")
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION")
    sub.required = True

    p = sub.add_parser("prepare", help="convert a source dataset folder (ABXI, C2DSR, LLMCDSR, Amazon reviews, "
                       "MovieLens, your own CSV)")
    p.add_argument("src", nargs="?", help="source folder (same as --input)")
    p.add_argument("--input", dest="input_dir", metavar="DIR",
                   help="source folder, e.g. ../shared/data/abxi-food-kitchen")
    p.add_argument("--output", "--out", dest="out", required=True, metavar="DIR", help="output dataset directory")
    p.add_argument("--format", choices=["abxi", "c2dsr", "llmcdsr", "amazon", "movielens", "csv"],
                   help="default: detected from the files present")
    p.add_argument("--name", help="dataset name (default: the source folder's name)")
    p.add_argument("--domains", type=_names, help="domain names, A first, comma-separated (default: from the "
                   "format or the folder name's '-a-b' suffix; amazon: selects the review files)")
    p.add_argument("--titles", metavar="FILE_OR_DIR", help="JSON lines with asin and title joined by ASIN: a "
                   "folder holding items_*.jsonl (e.g. an LLMCDSR folder) or one .jsonl file")
    p.add_argument("--history-split", choices=["context", "train"],
                   help="c2dsr only: split label of held-out users' history (default: context)")
    p.add_argument("--min-rating", type=float, help="movielens, amazon: keep ratings >= this")
    p.add_argument("--kcore", type=int, help="amazon only: iterated k-core, users and items with >= K "
                   "interactions (default 5; 0 = off)")
    p.add_argument("--overlap-only", action="store_true", default=None,
                   help="amazon only: keep only users with interactions in every domain (iterated with --kcore)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--json", action="store_true", help="print dataset.json instead of a summary")
    p.set_defaults(func=run_prepare)

    s = sub.add_parser("synth", help="generate a synthetic dataset (default: sized like abxi-food-kitchen)")
    s.add_argument("--output", "--out", dest="out", required=True, metavar="DIR", help="output dataset directory")
    s.add_argument("--like", help="prepared dataset whose sizes to copy (users, items, lengths, overlap); "
                   "explicit options below still win")
    # defaults (None here) come from SynthConfig: sized like abxi-food-kitchen
    s.add_argument("--users", type=int, help="default 7144")
    s.add_argument("--items-a", type=int, help="items of domain A (default 11837)")
    s.add_argument("--items-b", type=int, help="items of domain B (default 16258)")
    s.add_argument("--items", type=_ints, help="items per domain, comma-separated, for any number of domains "
                   "(instead of --items-a/--items-b)")
    s.add_argument("--domains", type=_names, help="domain names, comma-separated (default A,B)")
    s.add_argument("--min-length", type=int, help="default 10")
    s.add_argument("--max-length", type=int, help="default 50")
    s.add_argument("--mean-length", type=float, help="default 24.3")
    s.add_argument("--overlap", type=float, help="fraction of users present in every domain (default 1)")
    s.add_argument("--min-per-domain", type=int, help="an overlapped user's minimum per domain (default 5)")
    s.add_argument("--topics", type=int, help="default 32")
    s.add_argument("--concentration", type=float, help="Dirichlet concentration of user topics (default 0.1)")
    s.add_argument("--stickiness", type=float, help="P(next topic = previous topic) (default 0.6)")
    s.add_argument("--popularity", type=float, help="Zipf exponent within a topic (default 1)")
    s.add_argument("--seed", type=int, help="default 0")
    s.add_argument("--name", help="default 'synthetic' (or synthetic-like-NAME)")
    s.add_argument("--force", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_synth)

    i = sub.add_parser("info", help="print a prepared dataset's statistics")
    i.add_argument("dataset", help="prepared dataset directory")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=run_info)

    q = sub.add_parser("partition", help="split a dataset's users among clients and print the sizes")
    q.add_argument("dataset", nargs="?", help="prepared dataset directory (same as --data)")
    q.add_argument("--data", dest="data_dir", metavar="DIR", help="prepared dataset directory")
    q.add_argument("--clients", type=int, help="number of clients (omit for --scheme domain / user)")
    q.add_argument("--scheme", default="powerlaw", choices=["uniform", "dirichlet", "powerlaw", "domain", "user"])
    q.add_argument("--alpha", type=float, default=None,
                   help="powerlaw: size exponent (default 1); dirichlet: concentration, smaller = more skew "
                   "(default 0.5)")
    q.add_argument("--attribute", choices=["domain", "popularity", "both"], default=None,
                   help="dirichlet: the user attribute whose mix is skewed across clients (default both)")
    q.add_argument("--buckets", type=int, default=None,
                   help="dirichlet: item-popularity buckets of the popularity attribute (default 4)")
    q.add_argument("--min-users", type=int, default=1, help="powerlaw, dirichlet: smallest client's users")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", "--output", dest="out", help="write the partition (partition.arrow format) to this file")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=run_partition)


def _dataset_summary(path: str) -> dict[str, Any]:
    import numpy as np

    from fedscope_jax.data.canonical import load_dataset

    ds = load_dataset(path)
    lengths = np.diff(ds.user_offsets())
    out = dict(ds.meta)
    out["sequence_length"] = {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 3),
                              "max": int(lengths.max())} if lengths.size else {}
    return out


def _print_summary(meta: dict[str, Any], path: str) -> None:
    lines = [f"{meta['name']} ({meta['format']}) at {path}",
             f"  users {meta['users']:,}  interactions {meta['interactions']:,}  "
             f"overlapped users {meta['overlap_users']:,}  timestamps {meta.get('timestamps')}"]
    if meta.get("sequence_length"):
        sl = meta["sequence_length"]
        lines.append(f"  sequence length min {sl['min']} / mean {sl['mean']} / max {sl['max']}")
    titled = meta.get("titles", {}).get("items_with_title", {})
    for d in meta["domains"]:
        counts = "  ".join(f"{s} {meta['splits'][s][d['name']]:,}" for s in meta["splits"])
        lines.append(f"  domain {d['name']:<12} items {d['items']:,} (titled {titled.get(d['name'], 0):,})  "
                     f"users {d['users']:,}  interactions {d['interactions']:,}  | {counts}")
    if meta.get("titles"):
        lines.append(f"  interactions whose item has a title: {meta['titles']['interaction_fraction']:.1%}")
    if meta.get("missing_files"):
        lines.append(f"  INCOMPLETE source: missing {', '.join(meta['missing_files'])}")
    print("\n".join(lines))


def _one_path(positional: str | None, flag: str | None, name: str) -> str:
    """The folder given either positionally or with `name` (the issue's flag form); not both, not neither."""
    if positional and flag and positional != flag:
        raise FedscopeError(f"{name} {flag} and a positional folder {positional} both given; expected one")
    if not (positional or flag):
        raise FedscopeError(f"{name} DIR is required")
    return positional or flag  # type: ignore[return-value]


def run_prepare(args: argparse.Namespace) -> int:
    from fedscope_jax.data.formats import prepare

    src = _one_path(args.src, args.input_dir, "--input")
    prepare(src, args.out, fmt=args.format, name=args.name, domains=args.domains, titles=args.titles,
            force=args.force, history_split=args.history_split, min_rating=args.min_rating, kcore=args.kcore,
            overlap_only=args.overlap_only)
    return _show(args.out, args.json)


def run_synth(args: argparse.Namespace) -> int:
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.synth import SynthConfig, synthesize

    given = {f: getattr(args, f) for f in ("users", "items", "domains", "min_length", "max_length", "mean_length",
                                           "overlap", "min_per_domain", "topics", "concentration", "stickiness",
                                           "popularity", "seed", "name") if getattr(args, f) is not None}
    for f in ("items", "domains"):
        if f in given:
            given[f] = tuple(given[f])
    if args.items_a is not None or args.items_b is not None:
        if "items" in given:
            raise FedscopeError("--items and --items-a/--items-b both given; expected one form")
        base = SynthConfig.like(load_dataset(args.like)).items if args.like else SynthConfig().items
        if len(base) != 2:
            raise FedscopeError(f"--items-a/--items-b: the --like dataset has {len(base)} domains; use --items")
        given["items"] = (args.items_a if args.items_a is not None else base[0],
                          args.items_b if args.items_b is not None else base[1])
    cfg = SynthConfig.like(load_dataset(args.like), **given) if args.like else SynthConfig(**given)
    synthesize(cfg, args.out, force=args.force)
    return _show(args.out, args.json)


def run_info(args: argparse.Namespace) -> int:
    return _show(args.dataset, args.json)


def _show(path: str, as_json: bool) -> int:
    summary = _dataset_summary(path)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary, path)
    return 0


def run_partition(args: argparse.Namespace) -> int:
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.data.partition import partition, save_partition

    if args.out and not args.out.endswith(".arrow"):
        raise FedscopeError(f"--out {args.out}: expected a .arrow file name")
    options = {k: getattr(args, k) for k in ("alpha", "attribute", "buckets") if getattr(args, k) is not None}
    applies = {"alpha": ("powerlaw", "dirichlet"), "attribute": ("dirichlet",), "buckets": ("dirichlet",)}
    for k in options:
        if args.scheme not in applies[k]:
            raise FedscopeError(f"--{k} does not apply to --scheme {args.scheme} (only {', '.join(applies[k])})")
    ds = load_dataset(_one_path(args.dataset, args.data_dir, "--data"))
    part = partition(ds, args.clients, args.scheme, args.seed, min_users=args.min_users, **options)
    summary = part.summary(ds)
    if args.out:
        save_partition(part, args.out)
        summary["written_to"] = args.out
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        u, t = summary["users_per_client"], summary["train_interactions_per_client"]
        print(f"{summary['clients']} clients, scheme {summary['scheme']}, seed {summary['seed']}"
              + (f", alpha {summary['alpha']}" if summary["alpha"] is not None else ""))
        print(f"  users per client         min {u['min']:,} / median {u['p50']:,} / max {u['max']:,}")
        print(f"  train interactions       min {t['min']:,} / median {t['p50']:,} / max {t['max']:,}")
        print(f"  largest client's share   {summary['largest_client_share']:.1%}   "
              f"Gini {summary['gini_train_interactions']:.3f}")
        print(f"  clients with both domains {summary['clients_with_both_domains']}   "
              f"without train data {summary['clients_without_train_data']}")
        if "label_skew" in summary:
            print(f"  label skew ({summary['attribute']}, {summary['buckets']} popularity buckets)  "
                  f"{summary['label_skew']:.3f}  (0 = every client has the population's mix)")
        if args.out:
            print(f"  written to {args.out}")
    return 0
