"""Reads the enrichment job's item_embeddings.arrow into per-domain semantic tables for the fusion MLP.

Contract (docs/enrich.md): item_id int32 (0-based per domain), domain (the dataset's domain names), vector
fixed_size_list<float32>[d], status ("ok" or a failure status). Only rows with status "ok" and finite vectors
count; every other item of the domain gets mask 0 and a zero vector, so the model uses its ID embedding alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from fedscope_jax.errors import FedscopeError
from fedscope_jax.model.network import SemanticTable
from fedscope_jax.utils.io import read_arrow

EMBEDDINGS_FILE = "item_embeddings.arrow"


def load_semantic(path: str | os.PathLike, domains: Sequence[str],
                  n_items: Sequence[int]) -> tuple[list[SemanticTable], dict[str, dict[str, int]]]:
    """(per-domain {"vectors": [N+1, d], "mask": [N+1]} float32 tables, coverage counts per domain).

    `path` is the enrichment output directory (or the Arrow file itself). Rows are indexed by shifted id.
    """
    path = Path(path)
    file = path / EMBEDDINGS_FILE if path.is_dir() else path
    table = read_arrow(file)
    for col in ("item_id", "domain", "vector", "status"):
        if col not in table.column_names:
            raise FedscopeError(f"{file}: missing column {col!r} (expected item_id, domain, vector, status)")
    vtype = table.schema.field("vector").type
    if not pa.types.is_fixed_size_list(vtype):
        raise FedscopeError(f"{file}: column 'vector' is {vtype}; expected fixed_size_list<float32>[d]")
    dim = vtype.list_size
    item = table["item_id"].to_numpy().astype(np.int64)
    dom = np.asarray(table["domain"].cast(pa.string()).to_pylist(), dtype=object)
    status = np.asarray(table["status"].cast(pa.string()).to_pylist(), dtype=object)
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    vectors = np.asarray(flat, np.float32).reshape(len(table), dim)
    unknown = sorted(set(dom.tolist()) - set(domains))
    if unknown:
        raise FedscopeError(f"{file}: domain {unknown[0]!r} is not one of the dataset's {list(domains)}")
    out, coverage = [], {}
    for name, n in zip(domains, n_items):
        sel = np.flatnonzero(dom == name)
        ids = item[sel]
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise FedscopeError(f"{file}: item_id out of range [0, {n}) in domain {name!r}")
        if np.unique(ids).size != ids.size:
            raise FedscopeError(f"{file}: duplicate item_id rows in domain {name!r} (expected one row per item)")
        ok = (status[sel] == "ok") & np.all(np.isfinite(vectors[sel]), axis=1)
        vec = np.zeros((n + 1, dim), np.float32)
        mask = np.zeros(n + 1, np.float32)
        vec[ids[ok] + 1] = vectors[sel[ok]]
        mask[ids[ok] + 1] = 1.0
        out.append({"vectors": vec, "mask": mask})
        coverage[name] = {"items": int(n), "with_vector": int(ok.sum())}
    return out, coverage
