"""Times train steps of the FedDCSR peer's FedSASRec client with its own PyTorch code: the peer side of
`fedscope benchmark --peer feddcsr` (docs/engine.md, "The peer's workload").

    PYTHON benchmarks/feddcsr_peer_step.py --feddcsr CLONE [--items 11837,16258] [--steps 8] [--out FILE.json]

CLONE: a checkout of https://github.com/orion-orion/FedDCSR (its code is not part of this project); PYTHON:
an interpreter with PyTorch (e.g. the enrichment environment, .venv-enrich/bin/python, on CPU). For each
domain (--items: its item count, abxi-food-kitchen's by default) it builds the peer's client trainer
(`trainer.ModelTrainer`, method FedSASRec: hidden 256, 4 heads, 2 blocks, full softmax, Adam lr 1e-3) and
times `train_batch` on batches of the peer's shape (256 users, length 16) with random item ids (a step's cost
does not depend on which items), 2 warm-up steps, then --steps timed. Prints and writes the median seconds a
step of each domain. Uses as many threads as the machine has cores (torch's default), as the peer does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feddcsr", required=True, help="a checkout of the FedDCSR repository")
    ap.add_argument("--items", default="11837,16258", help="item count of each domain (comma-separated)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per domain (after 2 warm-up steps)")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    root = Path(args.feddcsr)
    if not (root / "trainer.py").is_file():
        sys.exit(f"--feddcsr {root}: no trainer.py there; expected a checkout of orion-orion/FedDCSR")
    if args.steps < 1:
        sys.exit(f"--steps {args.steps}: expected >= 1")
    try:
        items = [int(v) for v in args.items.split(",")]
    except ValueError:
        sys.exit(f"--items {args.items!r}: expected comma-separated item counts")
    try:
        import numpy as np
        import torch
    except ImportError as exc:
        sys.exit(f"{exc}: run this with an interpreter that has PyTorch (e.g. .venv-enrich/bin/python)")
    sys.path.insert(0, str(root))
    from trainer import ModelTrainer   # the peer's code

    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "batch_size": 256, "max_len": 16, "steps": args.steps, "domains": []}
    for n in items:
        peer_args = types.SimpleNamespace(method="FedSASRec", gpu=0, cuda=False, max_seq_len=16, optimizer="adam",
                                          lr=1e-3, temperature=1.0, mu=0)
        trainer = ModelTrainer(peer_args, n, 16)
        rng = np.random.default_rng(0)
        times = []
        for _ in range(args.steps + 2):
            batch = [rng.integers(0, n, size=(256, 16)), rng.integers(0, n, size=(256, 16)),
                     np.ones((256, 16), np.float32)]
            t0 = time.perf_counter()
            trainer.train_batch(batch, None, n, peer_args)
            times.append(time.perf_counter() - t0)
        median = statistics.median(times[2:])
        result["domains"].append({"items": n, "median_seconds": median, "min_seconds": min(times[2:])})
        print(f"{n} items: {median:.3f} s a step (median of {args.steps})", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
