"""Synthetic cross-domain sequences with a known, learnable structure (for tests, benchmarks, scaling runs).

Generative story (defaults sized like abxi-food-kitchen: 7,144 users, 11,837 / 16,258 items, lengths 10-50,
mean 24.3):
- every item belongs to one of `topics` topics (per domain, dealt evenly at random); within a topic item
  popularity follows a Zipf law with exponent `popularity`;
- every user has one topic mixture theta_u ~ Dirichlet(concentration), SHARED by both domains: that is the
  cross-domain signal a model can transfer;
- a sequence is a sticky topic chain: the next topic repeats the previous one with probability `stickiness`,
  else is drawn from theta_u (the sequential signal); each item is drawn by popularity within its topic;
- a fraction `overlap` of users have interactions in every domain (at least `min_per_domain` each, the share
  of domain B drawn per user from Beta(2, 2)); the others live in one domain only;
- lengths are min_length + a geometric count clipped at max_length, its rate solved so the mean is
  `mean_length`; timestamps advance by whole days. Split: leave-one-out (last test, second-last valid).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from fedscope_jax.data.formats.common import RawDataset, leave_one_out, offsets_of, write_raw
from fedscope_jax.errors import FedscopeError
from fedscope_jax.utils.io import atomic_output_dir
from fedscope_jax.utils.progress import progress

FORMAT = "synthetic"
if TYPE_CHECKING:
    from fedscope_jax.data.canonical import CanonicalDataset

_DAY = 86_400
_USERS_PER_CHUNK = 65_536


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Size and structure of a synthetic dataset; the defaults mimic abxi-food-kitchen."""

    users: int = 7144
    items: tuple[int, ...] = (11837, 16258)
    domains: tuple[str, ...] = ("A", "B")
    min_length: int = 10
    max_length: int = 50
    mean_length: float = 24.3
    overlap: float = 1.0          # fraction of users present in every domain
    min_per_domain: int = 5       # an overlapped user's minimum interactions in each domain
    topics: int = 32
    concentration: float = 0.1    # Dirichlet concentration of a user's topic mixture (small: focused users)
    stickiness: float = 0.6       # P(next topic = previous topic)
    popularity: float = 1.0       # Zipf exponent of item popularity inside a topic
    seed: int = 0
    name: str = "synthetic"

    @classmethod
    def like(cls, dataset: "CanonicalDataset", **overrides: Any) -> "SynthConfig":
        """A config sized like a prepared dataset: users, items and names per domain, length range and mean,
        overlap fraction and the smallest per-domain count of its overlapped users; `overrides` win."""
        lengths = np.diff(dataset.user_offsets())
        lengths = lengths[lengths > 0]
        n_dom = len(dataset.domains)
        per = np.zeros((dataset.n_users, n_dom), np.int64)
        np.add.at(per, (dataset.user, dataset.domain), 1)
        both = (per > 0).all(1) if n_dom > 1 else np.zeros(dataset.n_users, bool)
        min_len = int(lengths.min())
        min_per = int(per[both].min()) if both.any() else 1
        fields = dict(users=int(dataset.n_users), items=tuple(int(n) for n in dataset.n_items),
                      domains=tuple(dataset.domains), min_length=min_len, max_length=int(lengths.max()),
                      mean_length=round(float(lengths.mean()), 3), overlap=round(float(both.mean()), 6),
                      min_per_domain=max(1, min(min_per, min_len // n_dom)),
                      topics=min(cls.topics, *dataset.n_items), name=f"synthetic-like-{dataset.meta.get('name')}")
        fields.update(overrides)
        return cls(**fields)

    def validate(self) -> None:
        """Raises FedscopeError naming the first inconsistent field."""
        n_dom = len(self.domains)
        checks = [
            (self.users >= 1, "users", "an integer >= 1"),
            (len(self.items) == n_dom and n_dom >= 1, "items", f"one count per domain ({n_dom})"),
            (len(set(self.domains)) == n_dom and all(self.domains), "domains", "distinct non-empty names"),
            (all(n >= self.topics for n in self.items), "items", f"at least `topics` ({self.topics}) per domain"),
            (self.topics >= 1, "topics", ">= 1"),
            (1 <= self.min_length <= self.max_length, "min_length", "1 <= min_length <= max_length"),
            (self.min_length <= self.mean_length <= self.max_length, "mean_length",
             "between min_length and max_length"),
            (0.0 <= self.overlap <= 1.0, "overlap", "a fraction in [0, 1]"),
            (self.overlap == 0 or n_dom * self.min_per_domain <= self.min_length, "min_per_domain",
             f"domains x min_per_domain <= min_length ({self.min_length})"),
            (self.concentration > 0, "concentration", "> 0"),
            (0.0 <= self.stickiness < 1.0, "stickiness", "in [0, 1)"),
            (self.popularity >= 0, "popularity", ">= 0"),
        ]
        for ok, field, expected in checks:
            if not ok:
                raise FedscopeError(f"synthetic config: field {field!r} = {getattr(self, field)!r}; "
                                    f"expected {expected}")


def _geometric_q(extra_mean: float, cap: int) -> float:
    """q such that E[min(G, cap)] = extra_mean for G geometric on {0, 1, ...} with P(G >= k) = q^k."""
    if extra_mean <= 0 or cap == 0:
        return 0.0
    if extra_mean >= cap:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(100):  # E[min(G, cap)] = sum_{k=1..cap} q^k is increasing in q
        q = (lo + hi) / 2
        mean = q * (1 - q ** cap) / (1 - q)
        lo, hi = (q, hi) if mean < extra_mean else (lo, q)
    return (lo + hi) / 2


def _lengths(rng: np.random.Generator, n: int, cfg: SynthConfig) -> np.ndarray:
    cap = cfg.max_length - cfg.min_length
    q = _geometric_q(cfg.mean_length - cfg.min_length, cap)
    if q <= 0.0:
        extra = np.zeros(n, np.int64)
    elif q >= 1.0:
        extra = np.full(n, cap, np.int64)
    else:
        extra = rng.geometric(1 - q, n) - 1
    return cfg.min_length + np.minimum(extra, cap)


def _catalogue(rng: np.random.Generator, n_items: int, topics: int, popularity: float):
    """Per domain: item topic, and a sampler mapping (topic, u in (0,1]) -> item id by in-topic popularity."""
    topic_of_item = rng.permutation(np.arange(n_items) % topics)
    order = np.argsort(topic_of_item, kind="stable")          # slots grouped by topic
    counts = np.bincount(topic_of_item, minlength=topics)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_topic = np.arange(n_items) - np.repeat(starts, counts)
    weight = (rank_in_topic + 1.0) ** -popularity
    # cumulative weight normalised per topic, offset by the topic index: topic t spans (t, t+1]
    cum = np.cumsum(weight) - np.repeat(np.concatenate([[0.0], np.cumsum(weight)[starts[1:] - 1]]), counts)
    totals = np.repeat(cum[np.cumsum(counts) - 1], counts)
    edges = np.repeat(np.arange(topics, dtype=np.float64), counts) + cum / totals
    edges[np.cumsum(counts) - 1] = np.arange(1, topics + 1)   # exact upper ends

    def draw(topic: np.ndarray, u: np.ndarray) -> np.ndarray:
        slot = np.searchsorted(edges, topic + u, side="left")
        return order[np.minimum(slot, n_items - 1)]

    return topic_of_item, draw


def categorical_rows(rng: np.random.Generator, probs: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """One draw per row r from the distribution probs[owner[r]] ([U, K] rows summing to 1), vectorised.

    Row u's cumulative distribution is shifted by u, so one searchsorted over the flattened [U*K] array
    serves every row.
    """
    n, k = probs.shape
    cum = np.cumsum(probs, 1)
    cum /= cum[:, -1:]
    flat = (cum + np.arange(n)[:, None]).reshape(-1)
    u = owner + rng.random(owner.size)
    slot = np.searchsorted(flat, u, side="right") - owner * k
    return np.clip(slot, 0, k - 1)


def _chunk(rng: np.random.Generator, n: int, cfg: SynthConfig, samplers) -> dict[str, np.ndarray]:
    """Generates `n` users' sequences (flat arrays, grouped by local user index)."""
    n_dom = len(cfg.domains)
    lengths = _lengths(rng, n, cfg)
    user = np.repeat(np.arange(n), lengths)
    total = int(lengths.sum())
    # domains: overlapped users get >= min_per_domain in each, others one domain
    overlapped = rng.random(n) < cfg.overlap
    if n_dom == 1:
        domain = np.zeros(total, np.int8)
    else:
        share = rng.beta(2.0, 2.0, size=(n, n_dom))
        share /= share.sum(1, keepdims=True)
        counts = np.zeros((n, n_dom), np.int64)
        # a multinomial per user as a chain of binomials (numpy's multinomial takes one count at a time)
        left = np.where(overlapped, lengths - cfg.min_per_domain * n_dom, 0)
        rest = np.ones(n)
        for d in range(n_dom - 1):
            counts[:, d] = rng.binomial(left, np.clip(share[:, d] / rest, 0.0, 1.0))
            left -= counts[:, d]
            rest -= share[:, d]
        counts[:, -1] = left
        counts[overlapped] += cfg.min_per_domain
        single = np.flatnonzero(~overlapped)
        counts[single, rng.integers(0, n_dom, single.size)] = lengths[single]
        domain = np.repeat(np.tile(np.arange(n_dom, dtype=np.int8), n), counts.reshape(-1))
        domain = domain[np.argsort(user + rng.random(total), kind="stable")]  # shuffle within each user
    # sticky topic chain over each user's sequence, with one topic mixture shared by all domains:
    # draw a fresh topic for every row, then each row keeps its predecessor's topic with prob. stickiness,
    # i.e. takes the fresh topic of the latest non-kept row at or before it (a forward fill).
    theta = rng.dirichlet(np.full(cfg.topics, cfg.concentration), size=n)
    offsets = offsets_of(user, n)
    fresh = categorical_rows(rng, theta, user)
    keep = rng.random(total) < cfg.stickiness
    keep[offsets[:-1][lengths > 0]] = False                            # a sequence starts fresh
    topic = fresh[np.maximum.accumulate(np.where(keep, 0, np.arange(total)))]
    item = np.empty(total, np.int32)
    u01 = 1.0 - rng.random(total)                                      # in (0, 1]
    for d, (_, draw) in enumerate(samplers):
        rows = domain == d
        item[rows] = draw(topic[rows], u01[rows])
    start = rng.integers(1_262_304_000 // _DAY, 1_388_534_400 // _DAY, n)  # 2010-01-01 .. 2014-01-01
    steps = rng.geometric(0.3, total) - 1
    steps[offsets[:-1][lengths > 0]] = 0
    day = np.repeat(start, lengths) + (np.cumsum(steps) - np.repeat(np.cumsum(steps)[offsets[:-1]], lengths))
    return {"user": user, "domain": domain, "item": item, "timestamp": day.astype(np.int64) * _DAY,
            "lengths": lengths}


def generate(cfg: SynthConfig) -> RawDataset:
    """Builds the synthetic dataset in memory (deterministic in cfg.seed)."""
    cfg.validate()
    root = np.random.default_rng(cfg.seed)
    cat_rng, seq_seed = np.random.default_rng(root.integers(2**63)), root.integers(2**63)
    samplers = [_catalogue(cat_rng, n, cfg.topics, cfg.popularity) for n in cfg.items]
    parts = []
    starts = list(range(0, cfg.users, _USERS_PER_CHUNK))
    for i, u0 in enumerate(progress(starts, desc="synthesize", unit="chunk")):
        rng = np.random.default_rng([int(seq_seed), i])                  # one stream per chunk
        part = _chunk(rng, min(_USERS_PER_CHUNK, cfg.users - u0), cfg, samplers)
        part["user"] = part["user"] + u0
        parts.append(part)
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    offsets = np.concatenate([[0], np.cumsum(cat["lengths"])]).astype(np.int64)
    names = tuple(cfg.domains)
    source_ids = tuple(tuple(f"{name}-{i}" for i in range(n)) for name, n in zip(names, cfg.items))
    titles = tuple(tuple(f"synthetic {name} item {i} (topic {t})" for i, t in enumerate(s[0]))
                   for name, s in zip(names, samplers))
    meta: dict[str, Any] = {"synthetic": dataclasses.asdict(cfg),
                            "split_rule": "leave-one-out on the mixed sequence (last: test, second-last: valid)"}
    return RawDataset(domains=names, source_ids=source_ids, titles=titles, user=cat["user"].astype(np.int64),
                      domain=cat["domain"].astype(np.int8), item=cat["item"], split=leave_one_out(offsets),
                      timestamp=cat["timestamp"],
                      item_extra={"topic": tuple(s[0].astype(np.int32).tolist() for s in samplers)}, meta=meta)


def synthesize(cfg: SynthConfig, out: str | os.PathLike, force: bool = False) -> dict[str, Any]:
    """Generates and writes a canonical dataset directory `out` atomically; returns its dataset.json."""
    raw = generate(cfg)
    with atomic_output_dir(out, force=force) as tmp:
        return write_raw(raw, tmp, name=cfg.name, fmt=FORMAT)


__all__ = ["FORMAT", "SynthConfig", "generate", "synthesize"]
