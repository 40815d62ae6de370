"""Tiny canonical datasets for the model/eval/train tests (written with the real DatasetWriter)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedscope_jax.data.canonical import CONTEXT, TEST, TRAIN, VALID, DatasetWriter, items_table, load_dataset


def write_tiny(path: Path, users: int = 40, n_items: tuple[int, ...] = (30, 40), seed: int = 0,
               min_len: int = 5, max_len: int = 14, single_domain_users: int = 0):
    """A random two-domain dataset with a leave-one-out split (last: test, second last: valid).

    Items of a user follow a shared latent taste (items near a per-user offset), so a model can learn something.
    The last `single_domain_users` users interact with domain 0 only. Returns the loaded CanonicalDataset.
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    domains = tuple(f"dom{chr(65 + d)}" for d in range(len(n_items)))
    w = DatasetWriter(path, "tiny", "test", domains, n_items)
    cols = {k: [] for k in ("user", "domain", "item", "position", "split", "ts")}
    for u in range(users):
        n = int(rng.integers(min_len, max_len + 1))
        only_a = u >= users - single_domain_users
        dom = np.zeros(n, np.int8) if only_a else rng.integers(0, len(n_items), n).astype(np.int8)
        taste = rng.random()
        item = np.array([int((taste * n_items[d] + rng.integers(0, 6)) % n_items[d]) for d in dom], np.int32)
        split = np.full(n, TRAIN, np.int8)
        split[-1], split[-2] = TEST, VALID
        cols["user"].append(np.full(n, u))
        cols["domain"].append(dom)
        cols["item"].append(item)
        cols["position"].append(np.arange(n))
        cols["split"].append(split)
        cols["ts"].append(1_600_000_000 + np.arange(n) * 86400)
    w.add(*(np.concatenate(cols[k]) for k in ("user", "domain", "item", "position", "split")),
          timestamp=np.concatenate(cols["ts"]))
    dom_ids = np.concatenate([np.full(n, d) for d, n in enumerate(n_items)])
    item_ids = np.concatenate([np.arange(n) for n in n_items])
    w.close(items_table(domains, dom_ids, item_ids, [f"S{d}-{i}" for d, i in zip(dom_ids, item_ids)],
                        [f"title {i}" for i in item_ids]))
    return load_dataset(path)


__all__ = ["write_tiny", "TRAIN", "VALID", "TEST", "CONTEXT"]
