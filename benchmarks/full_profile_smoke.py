"""Runs one cell of each kind of a reproduction profile at real size, cut to 1 round / 1 epoch.

    .venv/bin/python benchmarks/full_profile_smoke.py --out DIR [--profile full] [--studies main,privacy_utility]
        [--data-root ../shared/data]

The dry run (`fedscope reproduce --dry-run`) checks plumbing on 120 users and a tiny model; this checks that
every (dataset, method, DP mode) cell of the chosen studies, seed 0, runs on every user with the profile's
model and evaluation (memory, negatives, full ranking), with `federated.rounds=1 train.epochs=1` and client
chunk 1 (no chunk tuning) added to its settings. Prints one JSON line per cell (seconds, ok or the error) and
exits 1 if any failed. Results go to DIR/runs (never mixed with a reproduction: the cells' settings differ).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from fedscope_jax.cli.reproduce import default_data_root
from fedscope_jax.experiments.planning import CellData, Options, plan
from fedscope_jax.experiments.runner import release_programs, run_cell
from fedscope_jax.experiments.spec import load_studies

CUT = ("federated.rounds=1", "train.epochs=1", "federated.chunk_size=1", "federated.eval_every=1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--profile", default="full", choices=["quick", "full"])
    ap.add_argument("--studies", default="main,privacy_utility")
    ap.add_argument("--data-root", type=Path, default=None)
    ap.add_argument("--attributes-root", type=Path, default=None, help="LLM attribute vectors (as reproduce)")
    ap.add_argument("--title-root", type=Path, default=None, help="title-only vectors (as reproduce)")
    args = ap.parse_args()
    opts = Options(args.profile, args.out, args.data_root or default_data_root(),
                   attributes_root=args.attributes_root, title_root=args.title_root)
    studies = {s.name: s for s in load_studies(None, None)}
    cells_of = plan([studies[n] for n in args.studies.split(",")], studies, opts)
    data = CellData(opts)
    seen: set[tuple[str, str, str]] = set()
    failed = 0
    for name, cells in cells_of.items():
        for cell in cells:
            kind = (cell.dataset, cell.method, cell.dp.mode if cell.dp else "sweep")
            if kind in seen:   # the first cell of a kind is its first seed's
                continue
            seen.add(kind)
            cell = dataclasses.replace(cell, overrides=cell.overrides + CUT)
            (path, ds, semantic, coverage, label), why = data.for_cell(studies[name], cell)
            if why is not None:   # an arm without the item vectors it needs: not run, as in the reproduction
                print(json.dumps({"cell": "/".join(kind), "status": f"not run: {why}"}), flush=True)
                continue
            t0 = time.time()
            try:
                run_cell(cell, args.out / "runs" / cell.relative_dir(str(path), label), ds, semantic, coverage,
                         label, path, studies[name])
                status = "ok"
            except Exception as exc:  # noqa: BLE001 - reported per cell; the other cells still run
                status, failed = f"failed: {type(exc).__name__}: {exc}", failed + 1
            print(json.dumps({"cell": "/".join(kind), "seconds": round(time.time() - t0, 1), "status": status}),
                  flush=True)
            release_programs()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
