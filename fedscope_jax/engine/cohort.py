"""Host side: clients' local data, local vocabularies, size buckets and padded cohorts for a round.

Clients of very different sizes (a few large silos, many small ones) are grouped into at most a few
buckets by number of local steps (an exact dynamic program over the sorted sizes minimises padded steps);
each bucket is padded to its own step count and vocabulary size, fixed for the whole run from the client
population so that the jitted round compiles once per bucket capacity. Per round, a bucket's sampled
clients are padded to a "nice" multiple of (devices x chunk) with weight-0 clients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from fedscope_jax.engine.client import ClientData
from fedscope_jax.engine.round import Cohort
from fedscope_jax.errors import FedscopeError

PyTree = Any


@dataclasses.dataclass(frozen=True)
class ClientShard:
    """One client's local data on the host: batch leaves [S_k, ...] (numpy), and its local vocabularies."""

    batch: Mapping[str, np.ndarray]
    vocab: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    step_mask: np.ndarray | None = None  # bool[S_k]; None = every step is real

    @property
    def n_steps(self) -> int:
        return int(next(iter(self.batch.values())).shape[0])

    @property
    def real_steps(self) -> int:
        return self.n_steps if self.step_mask is None else int(np.sum(self.step_mask))


def localize_batch(batch: Mapping[str, np.ndarray], fields: Mapping[str, Sequence[str]],
                   always: Sequence[int] = (0,)) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Rewrites global row ids of `fields` into local ids; returns (batch, vocab).

    fields: table name -> batch fields holding ids of that table's rows. `always` ids (the padding row 0)
    are in every vocabulary, so local id of row 0 stays 0. The vocab is sorted and unique.
    """
    out = dict(batch)
    vocab: dict[str, np.ndarray] = {}
    for name, keys in fields.items():
        for key in keys:
            if key not in batch:
                raise FedscopeError(f"local vocabulary {name!r}: batch has no field {key!r}")
        ids = np.unique(np.concatenate([np.asarray(always, np.int64)]
                                       + [np.asarray(batch[k]).ravel() for k in keys]))
        vocab[name] = ids.astype(np.int32)
        for key in keys:
            out[key] = np.searchsorted(ids, batch[key]).astype(np.int32)
    return out, vocab


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """Step count of each bucket (ascending) and its vocabulary size per table."""

    steps: tuple[int, ...]
    vocab_sizes: tuple[Mapping[str, int], ...]

    def bucket_of(self, n_steps: int) -> int:
        for b, s in enumerate(self.steps):
            if n_steps <= s:
                return b
        raise FedscopeError(f"client with {n_steps} steps is larger than the largest bucket ({self.steps[-1]})")


def _best_boundaries(sizes: np.ndarray, max_buckets: int) -> list[int]:
    """Bucket step counts minimising sum over clients of (bucket steps), for clients of `sizes` steps."""
    values, counts = np.unique(sizes, return_counts=True)
    n = len(values)
    k_max = min(max_buckets, n)
    prefix = np.concatenate([[0], np.cumsum(counts)])
    inf = float("inf")
    # cost[k][j]: best cost of the first j distinct sizes in k buckets; a bucket (i, j] costs count * values[j-1].
    cost = [[inf] * (n + 1) for _ in range(k_max + 1)]
    back = [[0] * (n + 1) for _ in range(k_max + 1)]
    cost[0][0] = 0.0
    for k in range(1, k_max + 1):
        for j in range(1, n + 1):
            for i in range(k - 1, j):
                c = cost[k - 1][i] + (prefix[j] - prefix[i]) * values[j - 1]
                if c < cost[k][j]:
                    cost[k][j], back[k][j] = c, i
    k = min(range(1, k_max + 1), key=lambda kk: cost[kk][n])
    bounds, j = [], n
    while k > 0:
        bounds.append(int(values[j - 1]))
        j = back[k][j]
        k -= 1
    return sorted(bounds)


def plan_buckets(shards: Sequence[ClientShard], max_buckets: int = 4, vocab_multiple: int = 8) -> BucketPlan:
    """Buckets for a client population (fixed for a run): steps by DP, vocab = bucket max rounded up."""
    if not shards:
        raise FedscopeError("no clients to plan buckets for")
    if max_buckets < 1:
        raise FedscopeError(f"max_buckets: expected >= 1, got {max_buckets}")
    sizes = np.array([s.n_steps for s in shards])
    steps = _best_boundaries(sizes, max_buckets)
    names = sorted(shards[0].vocab)
    vocab_sizes: list[dict[str, int]] = [{n: 1 for n in names} for _ in steps]
    plan = BucketPlan(tuple(steps), ())
    for shard in shards:
        if sorted(shard.vocab) != names:
            raise FedscopeError(f"clients disagree on local vocabularies: {sorted(shard.vocab)} vs {names}")
        b = plan.bucket_of(shard.n_steps)
        for n in names:
            vocab_sizes[b][n] = max(vocab_sizes[b][n], len(shard.vocab[n]))
    rounded = tuple({n: int(math.ceil(v / vocab_multiple) * vocab_multiple) for n, v in vs.items()}
                    for vs in vocab_sizes)
    return BucketPlan(tuple(steps), rounded)


def nice_ceil(n: int, unit: int) -> int:
    """Smallest m * unit >= n with m in {1, 2, 3, 4, 6, 8, 12, 16, ...} (limits distinct shapes, <= 50% pad)."""
    m = max(1, math.ceil(n / unit))
    nice = 1
    while nice < m:
        nice = nice * 3 // 2 if nice >= 2 and (nice & (nice - 1)) == 0 else (nice * 4 // 3 if nice >= 3 else nice + 1)
    return nice * unit


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Step slots computed vs real steps in a round (padding waste = 1 - real / slots)."""

    real_steps: int
    slot_steps: int

    @property
    def waste(self) -> float:
        return 1.0 - self.real_steps / self.slot_steps if self.slot_steps else 0.0


def _pad_steps(x: np.ndarray, steps: int) -> np.ndarray:
    pad = [(0, steps - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad)


def build_cohorts(shards: Sequence[ClientShard], client_ids: Sequence[int], plan: BucketPlan,
                  table_rows: Mapping[str, int], weights: np.ndarray | None = None,
                  clip: np.ndarray | None = None, noise_multiplier: np.ndarray | None = None,
                  multiple: int = 1, nice: bool = True) -> tuple[tuple[Cohort, ...], PaddingStats]:
    """Stacks the clients `client_ids` (indices into `shards`) into one padded Cohort per non-empty bucket.

    weights / clip / noise_multiplier are per selected client (defaults 1 / inf / 0). Client counts are
    padded to a multiple of `multiple` (devices x chunk size), rounded to a nice size when `nice`.
    """
    ids = np.asarray(client_ids, np.int64)
    k = len(ids)
    weights = np.ones(k, np.float32) if weights is None else np.asarray(weights, np.float32)
    clip = np.full(k, np.inf, np.float32) if clip is None else np.asarray(clip, np.float32)
    noise_multiplier = np.zeros(k, np.float32) if noise_multiplier is None else np.asarray(noise_multiplier,
                                                                                           np.float32)
    for name, arr in (("weights", weights), ("clip", clip), ("noise_multiplier", noise_multiplier)):
        if arr.shape != (k,):
            raise FedscopeError(f"{name}: expected one value per selected client ({k}), got shape {arr.shape}")
    if np.any(clip <= 0) or np.any(np.isnan(clip)):
        raise FedscopeError("clip: expected C_k > 0 (inf = no clipping)")
    if np.any(noise_multiplier < 0) or np.any((noise_multiplier > 0) & ~np.isfinite(clip)):
        raise FedscopeError("noise_multiplier: expected z_k >= 0, and a finite clip C_k wherever z_k > 0")
    groups: dict[int, list[int]] = {}
    for pos, cid in enumerate(ids):
        groups.setdefault(plan.bucket_of(shards[cid].n_steps), []).append(pos)
    cohorts, real, slots = [], 0, 0
    for b in sorted(groups):
        members = groups[b]
        steps = plan.steps[b]
        cap = nice_ceil(len(members), multiple) if nice else math.ceil(len(members) / multiple) * multiple
        template = shards[ids[members[0]]]
        batch = {key: np.zeros((cap, steps) + v.shape[1:], v.dtype) for key, v in template.batch.items()}
        mask = np.zeros((cap, steps), bool)
        # the plan's vocabulary size, grown (to a multiple of 8) if this round's data needs more rows
        sizes = {n: max(plan.vocab_sizes[b][n], -(-max(len(shards[ids[p]].vocab[n]) for p in members) // 8) * 8)
                 for n in template.vocab}
        vocab = {n: np.full((cap, sizes[n]), table_rows[n], np.int32) for n in template.vocab}
        cohort_ids = np.full(cap, -1, np.int32)
        w = np.zeros(cap, np.float32)
        c = np.full(cap, np.inf, np.float32)
        z = np.zeros(cap, np.float32)
        for row, pos in enumerate(members):
            shard = shards[ids[pos]]
            for key, v in shard.batch.items():
                batch[key][row, : v.shape[0]] = v
            mask[row, : shard.n_steps] = True if shard.step_mask is None else shard.step_mask
            for n, v in shard.vocab.items():
                vocab[n][row, : len(v)] = v
            cohort_ids[row], w[row], c[row], z[row] = ids[pos], weights[pos], clip[pos], noise_multiplier[pos]
            real += shard.real_steps
        slots += cap * steps
        cohorts.append(Cohort(ClientData(batch, mask, vocab), cohort_ids, w, c, z))
    return tuple(cohorts), PaddingStats(real, slots)
