"""Host side: a run's client population, fixed at round 0, and who takes part in each round.

The round loop (train/loop.py) and the reproduction's inventory (experiments/inventory.py, which counts a
run's padded steps without building batches) share this module, so the counted work cannot drift from the
trained one: both sample with `participants` and lay clients into size buckets with `cohort.bucket_layout`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fedscope_jax.engine.cohort import (BucketPlan, ClientShard, Cohort, PaddingStats, best_boundaries,
                                        bucket_capacities, bucket_layout, build_cohorts, plan_buckets)
from fedscope_jax.engine.sampling import sample_clients
from fedscope_jax.errors import FedscopeError

__all__ = ["Population", "plan_population", "population_of_steps"]


@dataclasses.dataclass(frozen=True)
class Population:
    """The clients of a run: their local steps, size buckets and fixed bucket slots (from round 0), and the
    sampling that picks each round's participants (seeded by (seed, round))."""

    n_clients: int
    steps_of: np.ndarray                        # int64 [n_clients]: local steps at round 0 (0: no data)
    plan: BucketPlan
    capacity: tuple[int, ...]                   # client slots per bucket (`cohort.bucket_capacities`)
    seed: int
    sampling: str
    fraction: float
    base: Mapping[int, ClientShard] | None = None   # round-0 data of every client (None: counting only)

    @property
    def trainable(self) -> np.ndarray:
        """Ids of the clients with training data."""
        return np.flatnonzero(self.steps_of > 0)

    def sampled(self, round_index: int) -> np.ndarray:
        """The round's sampled clients with data, before any track's budget is looked at."""
        sampled = sample_clients(self.seed, round_index, self.n_clients, self.sampling, self.fraction)
        return np.array([c for c in sampled if self.steps_of[c] > 0], np.int64)

    def participants(self, round_index: int, eligible: Sequence[np.ndarray | None]
                     ) -> tuple[list[np.ndarray], np.ndarray]:
        """(per track: its participants, their union): the round's sampled clients with data, each track
        keeping those its `eligible` mask (bool [n_clients], None = all) allows."""
        sampled = self.sampled(round_index)
        ids = [sampled if e is None else sampled[e[sampled]] for e in eligible]
        union = np.unique(np.concatenate(ids)) if ids else sampled
        return ids, union

    def layout(self, ids: np.ndarray, multiple: int) -> tuple[dict[int, list[int]], dict[int, int]]:
        """(members as positions into `ids`, client slots) of each bucket giving a cohort (`bucket_layout`)."""
        return bucket_layout([int(self.steps_of[c]) for c in ids], self.plan, multiple, capacity=self.capacity)

    def cohorts(self, source: Callable[[int, int], ClientShard], round_index: int, ids: np.ndarray, multiple: int,
                table_rows: Mapping[str, int], ready: Mapping[int, ClientShard] | None = None
                ) -> tuple[tuple[Cohort, ...], PaddingStats]:
        """The padded cohorts of the clients `ids` in round `round_index` (round 0 reuses the base data).
        ready: shards of this round already built while the previous round ran (`train/loop.py prefetch`);
        the others are built here. A shard is a pure function of (round, client), so where it was built changes nothing."""
        if round_index == 0 and self.base is not None:
            shards: Mapping[int, ClientShard] = self.base
        else:
            ready = ready or {}
            shards = {int(c): ready[int(c)] if int(c) in ready else source(round_index, int(c)) for c in ids}
        return build_cohorts(shards, ids, self.plan, table_rows, multiple=multiple, capacity=self.capacity)


def population_of_steps(steps_of: np.ndarray, seed: int, sampling: str, fraction: float, max_buckets: int,
                        base: Mapping[int, ClientShard] | None = None) -> Population:
    """The population of clients with `steps_of` local steps: buckets by steps (with `base`, each bucket's
    local vocabulary sizes too) and the fixed bucket slots for the sampling."""
    steps_of = np.asarray(steps_of, np.int64)
    trainable = np.flatnonzero(steps_of > 0)
    if not len(trainable):
        raise FedscopeError("no client has training data")
    if base is not None:
        plan = plan_buckets([base[int(c)] for c in trainable], max_buckets)
    else:
        plan = BucketPlan(tuple(best_boundaries(steps_of[trainable], max_buckets)), ())
    capacity = bucket_capacities(plan, [int(s) for s in steps_of[trainable]], len(steps_of), sampling, fraction)
    return Population(len(steps_of), steps_of, plan, capacity, seed, sampling, fraction, base)


def plan_population(source: Callable[[int, int], ClientShard], n_clients: int, fcfg: Any) -> Population:
    """The trainer's population: every client's round-0 data (which fixes the buckets for the run).
    fcfg: the `federated` config (seed, sampling, fraction, max_buckets)."""
    base = {c: source(0, c) for c in range(n_clients)}
    steps_of = np.array([base[c].n_steps for c in range(n_clients)], np.int64)
    return population_of_steps(steps_of, fcfg.seed, fcfg.sampling, fcfg.fraction, fcfg.max_buckets, base)
