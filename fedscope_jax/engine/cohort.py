"""Host side: clients' local data, local vocabularies, size buckets and padded cohorts for a round.

Clients of very different sizes (a few large silos, many small ones) are grouped into at most a few
buckets by number of local steps (an exact dynamic program over the sorted sizes minimises padded steps);
each bucket is padded to its own step count, vocabulary size and batch shape (e.g. the users of a step: a
one-user client's step holds one user, not a silo's 256), fixed for the whole run from the client
population so that the jitted round compiles once per bucket capacity. Padding is zeros at the end of every
axis, which the client's loss must ignore (all-zero users, masked steps). Per round, a bucket's sampled
clients are padded to a "nice" multiple of (devices x chunk) with weight-0 clients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

from fedscope_jax.engine.client import ClientData
from fedscope_jax.errors import FedscopeError

PyTree = Any
PAD_ROW = int(np.iinfo(np.int32).max)   # a vocabulary's padding entry: a row id out of range for every table

__all__ = ["PAD_ROW", "BucketPlan", "ClientShard", "Cohort", "PaddingStats", "best_boundaries",
           "bucket_capacities", "bucket_layout", "build_cohorts", "fill_buckets", "localize_batch", "nice_ceil",
           "plan_buckets"]


class Cohort(NamedTuple):
    """A bucket of clients of one round; every leaf has a leading client axis [C] (the round program's input)."""

    data: ClientData
    client_id: Any               # int32[C], a client's stable id (keys derive from it); -1 for padding rows
    weight: Any                  # float32[C] aggregation weight (0 for padding clients)
    clip: Any                    # float32[C] C_k (inf = no clipping)
    noise_multiplier: Any        # float32[C] z_k (0 = no noise)


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
    """Step count of each bucket (ascending), its vocabulary size per table, and the shape of a step of each
    batch field (the largest of its clients'; empty: the shapes of the round's clients)."""

    steps: tuple[int, ...]
    vocab_sizes: tuple[Mapping[str, int], ...]
    shapes: tuple[Mapping[str, tuple[int, ...]], ...] = ()

    def bucket_of(self, n_steps: int) -> int:
        for b, s in enumerate(self.steps):
            if n_steps <= s:
                return b
        raise FedscopeError(f"client with {n_steps} steps is larger than the largest bucket ({self.steps[-1]})")


def best_boundaries(sizes: np.ndarray, max_buckets: int) -> list[int]:
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
    """Buckets for a client population (fixed for a run): steps by DP, vocab = bucket max rounded up, the
    shape of a step of each batch field = the bucket's largest (a client may move up to a bigger bucket, so
    both only grow from one bucket to the next)."""
    if not shards:
        raise FedscopeError("no clients to plan buckets for")
    if max_buckets < 1:
        raise FedscopeError(f"max_buckets: expected >= 1, got {max_buckets}")
    sizes = np.array([s.n_steps for s in shards])
    steps = best_boundaries(sizes, max_buckets)
    names = sorted(shards[0].vocab)
    vocab_sizes: list[dict[str, int]] = [{n: 1 for n in names} for _ in steps]
    shapes: list[dict[str, tuple[int, ...]]] = [{} for _ in steps]
    plan = BucketPlan(tuple(steps), ())
    for shard in shards:
        if sorted(shard.vocab) != names:
            raise FedscopeError(f"clients disagree on local vocabularies: {sorted(shard.vocab)} vs {names}")
        b = plan.bucket_of(shard.n_steps)
        for n in names:
            vocab_sizes[b][n] = max(vocab_sizes[b][n], len(shard.vocab[n]))
        shapes[b] = _largest(shapes[b], _step_shapes(shard.batch))
    for b in range(1, len(vocab_sizes)):   # a client may move up to a bigger bucket (bucket_capacities)
        for n in names:
            vocab_sizes[b][n] = max(vocab_sizes[b][n], vocab_sizes[b - 1][n])
        shapes[b] = _largest(shapes[b], shapes[b - 1])
    rounded = tuple({n: int(math.ceil(v / vocab_multiple) * vocab_multiple) for n, v in vs.items()}
                    for vs in vocab_sizes)
    return BucketPlan(tuple(steps), rounded, tuple(shapes))


def _step_shapes(batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of one step of each batch field (leaves are [S, ...])."""
    return {key: tuple(int(n) for n in np.shape(v)[1:]) for key, v in batch.items()}


def _largest(a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """Per field, the elementwise largest of two step shapes (a field missing from one takes the other's)."""
    out = dict(a)
    for key, shape in b.items():
        if key in out and len(out[key]) != len(shape):
            raise FedscopeError(f"batch field {key!r}: clients disagree on its rank ({out[key]} vs {shape})")
        out[key] = tuple(max(x, y) for x, y in zip(out[key], shape)) if key in out else tuple(shape)
    return out


def _quantile(log_pmf: np.ndarray, q: float) -> int:
    """Smallest k with P(X <= k) >= q, for a distribution on 0..len-1 given by its log pmf."""
    cdf = np.cumsum(np.exp(log_pmf - np.max(log_pmf)))
    return int(np.searchsorted(cdf / cdf[-1], q - 1e-12))


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return math.lgamma(n + 1) - np.array([math.lgamma(i + 1) + math.lgamma(n - i + 1) for i in k])


def bucket_capacities(plan: BucketPlan, client_steps: Sequence[int], n_clients: int, scheme: str, rate: float,
                      quantile: float = 0.95) -> tuple[int, ...]:
    """Client slots per bucket, fixed for a run, so that sampled rounds keep one program shape.

    With exact per-round counts, every round's mix of per-bucket counts under client sampling is a new
    input shape (a recompile per round in a short run). Here bucket b gets c_b slots, where
    c_b + ... + c_top = the `quantile` of the number of sampled clients in buckets >= b (hypergeometric for a
    fixed fraction of `n_clients`, binomial for Poisson sampling). A round's clients fill their own bucket
    and overflow into the next bigger one (a client fits in any bucket with at least its steps); only the
    top bucket grows when a round overflows it (about 1 - quantile of the rounds).
    client_steps: local steps of the trainable clients (the population sampled from).
    """
    if not 0.0 < quantile <= 1.0:
        raise FedscopeError(f"quantile: expected 0 < q <= 1, got {quantile}")
    if scheme not in ("fraction", "poisson"):
        raise FedscopeError(f"sampling scheme: expected fraction or poisson, got {scheme!r}")
    buckets = np.array([plan.bucket_of(int(s)) for s in client_steps], np.int64)
    n_b = np.bincount(buckets, minlength=len(plan.steps))
    upper = []
    for n in (int(v) for v in np.cumsum(n_b[::-1])[::-1]):   # trainable clients in buckets >= b
        k = np.arange(n + 1)
        if scheme == "fraction":
            m = min(max(1, int(round(rate * n_clients))), n_clients)
            k = k[(k <= m) & (m - k <= n_clients - n)]
            log_pmf = _log_comb(n, k) + _log_comb(n_clients - n, m - k)
        elif rate >= 1.0:
            k, log_pmf = k[-1:], np.zeros(1)
        else:
            log_pmf = _log_comb(n, k) + k * math.log(rate) + (n - k) * math.log1p(-rate)
        upper.append(int(k[_quantile(log_pmf, quantile)]))
    upper = np.maximum.accumulate(np.asarray(upper)[::-1])[::-1]   # non-increasing in b
    return tuple(int(u - v) for u, v in zip(upper, list(upper[1:]) + [0]))


def nice_ceil(n: int, unit: int) -> int:
    """Smallest m * unit >= n with m in {1, 2, 3, 4, 6, 8, 12, 16, ...} (limits distinct shapes, <= 50% pad)."""
    m = max(1, math.ceil(n / unit))
    nice = 1
    while nice < m:
        nice = nice * 3 // 2 if nice >= 2 and (nice & (nice - 1)) == 0 else (nice * 4 // 3 if nice >= 3 else nice + 1)
    return nice * unit


@dataclasses.dataclass(frozen=True)
class PaddingStats:
    """Step slots vs real steps in a round (padding waste = 1 - real / slots), per cohort (client rows, real
    steps, step slots), from which `engine.round.computed_steps` counts what a program computes."""

    cohorts: tuple[tuple[int, int, int], ...]

    @property
    def real_steps(self) -> int:
        return sum(real for _, real, _ in self.cohorts)

    @property
    def slot_steps(self) -> int:
        return sum(slots for _, _, slots in self.cohorts)

    @property
    def waste(self) -> float:
        return 1.0 - self.real_steps / self.slot_steps if self.slot_steps else 0.0


def _pad_steps(x: np.ndarray, steps: int) -> np.ndarray:
    pad = [(0, steps - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return np.pad(x, pad)


def _any_shard(shards: Sequence[ClientShard] | Mapping[int, ClientShard]) -> ClientShard:
    """A shard to copy array shapes from (for a bucket's all-padding cohort)."""
    return next(iter(shards.values())) if isinstance(shards, Mapping) else shards[0]


def fill_buckets(groups: Mapping[int, list], plan: BucketPlan, multiple: int = 1, nice: bool = True,
                 capacity: Sequence[int] | None = None) -> tuple[dict[int, list], dict[int, int]]:
    """(members, client slots) of each bucket that gives a cohort in a round, from the round's clients
    grouped by their own bucket (`build_cohorts`' layout; host only, so `experiments.inventory` counts the
    padded steps of a run without building its batches).

    Without `capacity`: each non-empty bucket gets its clients, padded to a multiple of `multiple` (a nice
    size when `nice`). With it: every bucket with slots gets that many (rounded up to `multiple`), clients
    beyond a bucket's slots move up to the next bucket, and the top bucket grows (to a nice size) only when it
    overflows; buckets with 0 slots give no cohort."""
    if capacity is None:
        out = {b: list(m) for b, m in groups.items() if len(m)}
        return out, {b: nice_ceil(len(m), multiple) if nice else math.ceil(len(m) / multiple) * multiple
                     for b, m in out.items()}
    if len(capacity) != len(plan.steps):
        raise FedscopeError(f"capacity: expected one slot count per bucket ({len(plan.steps)}), got "
                            f"{len(capacity)}")
    members: dict[int, list] = {}
    caps: dict[int, int] = {}
    carry: list = []
    top = len(plan.steps) - 1
    for b, slots_b in enumerate(capacity):
        pool = carry + list(groups.get(b, []))
        cap_b = math.ceil(slots_b / multiple) * multiple
        if b == top and len(pool) > cap_b:
            cap_b = nice_ceil(len(pool), multiple)
        members[b], carry = pool[:cap_b], pool[cap_b:]
        if cap_b:
            caps[b] = cap_b
    return {b: members[b] for b in caps}, caps


def bucket_layout(steps: Sequence[int], plan: BucketPlan, multiple: int = 1, nice: bool = True,
                  capacity: Sequence[int] | None = None) -> tuple[dict[int, list[int]], dict[int, int]]:
    """(members, client slots) of each bucket giving a cohort, for a round's clients of `steps` local steps
    each; members are positions into `steps`. Each client goes to its own bucket (`plan.bucket_of`), then
    `fill_buckets` pads (and, with `capacity`, moves overflow up). Host only: `build_cohorts` lays a round out
    with it, and `experiments.inventory` counts a run's padded steps with it."""
    groups: dict[int, list[int]] = {}
    for pos, n in enumerate(steps):
        groups.setdefault(plan.bucket_of(int(n)), []).append(pos)
    return fill_buckets(groups, plan, multiple, nice, capacity)


def build_cohorts(shards: Sequence[ClientShard], client_ids: Sequence[int], plan: BucketPlan,
                  table_rows: Mapping[str, int], weights: np.ndarray | None = None,
                  clip: np.ndarray | None = None, noise_multiplier: np.ndarray | None = None,
                  multiple: int = 1, nice: bool = True, capacity: Sequence[int] | None = None
                  ) -> tuple[tuple[Cohort, ...], PaddingStats]:
    """Stacks the clients `client_ids` (indices into `shards`) into one padded Cohort per non-empty bucket.

    table_rows: rows of each sparse table, the id padding vocabulary entries get (default PAD_ROW: any id
    >= the table's rows is padding). weights / clip / noise_multiplier are per selected client (defaults 1 /
    inf / 0). Client counts are
    padded to a multiple of `multiple` (devices x chunk size), rounded to a nice size when `nice`.
    capacity: fixed client slots per bucket (`bucket_capacities`) instead: every bucket with slots gives a
    cohort of that many rows (rounded up to `multiple`) whether or not a client landed there, clients
    beyond a bucket's slots move up to the next bucket, and the top bucket grows (to a nice size) only when
    it overflows; buckets with 0 slots give no cohort.
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
    groups, caps = bucket_layout([shards[cid].n_steps for cid in ids], plan, multiple, nice, capacity)
    cohorts, per = [], []
    for b in sorted(groups):
        members = groups[b]
        steps = plan.steps[b]
        cap = caps[b]
        template = shards[ids[members[0]]] if members else _any_shard(shards)
        # the plan's step shapes, grown if this round's data needs more (a client moved up from a smaller bucket
        # never does: the plan's shapes grow with the bucket)
        shapes = dict(plan.shapes[b]) if plan.shapes else {}
        for pos in members:
            shapes = _largest(shapes, _step_shapes(shards[ids[pos]].batch))
        batch = {key: np.zeros((cap, steps) + shapes.get(key, v.shape[1:]), v.dtype)
                 for key, v in template.batch.items()}
        mask = np.zeros((cap, steps), bool)
        # the plan's vocabulary size, grown (to a multiple of 8) if this round's data needs more rows
        need = {n: max((len(shards[ids[p]].vocab[n]) for p in members), default=0) for n in template.vocab}
        sizes = {n: max(plan.vocab_sizes[b][n], -(-need[n] // 8) * 8) for n in template.vocab}
        vocab = {n: np.full((cap, sizes[n]), table_rows.get(n, PAD_ROW), np.int32) for n in template.vocab}
        cohort_ids = np.full(cap, -1, np.int32)
        w = np.zeros(cap, np.float32)
        c = np.full(cap, np.inf, np.float32)
        z = np.zeros(cap, np.float32)
        for row, pos in enumerate(members):
            shard = shards[ids[pos]]
            for key, v in shard.batch.items():
                batch[key][(row,) + tuple(slice(0, n) for n in v.shape)] = v   # zeros pad every axis at its end
            mask[row, : shard.n_steps] = True if shard.step_mask is None else shard.step_mask
            for n, v in shard.vocab.items():
                vocab[n][row, : len(v)] = v
            cohort_ids[row], w[row], c[row], z[row] = ids[pos], weights[pos], clip[pos], noise_multiplier[pos]
        per.append((cap, sum(shards[ids[pos]].real_steps for pos in members), cap * steps))
        cohorts.append(Cohort(ClientData(batch, mask, vocab), cohort_ids, w, c, z))
    return tuple(cohorts), PaddingStats(tuple(per))
