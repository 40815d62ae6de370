"""Leave-one-out evaluation: ranking each valid/test target against sampled negatives and the full item set.

For every target (a `valid` or `test` interaction), the history is the user's earlier interactions in the
target's domain (any split), last max_len of them. Both protocols rank the target only against items the user
never interacted with in that domain (its past and future items are neither negatives nor competitors).
Protocol "sampled": against `num_negatives` of those drawn uniformly without replacement, seeded by
(seed, split) only, so every method sees the same candidates. Protocol "full": against all of them. A popularity
baseline (train-split counts) is ranked on exactly the same candidates, and metrics are also broken down by
in-domain history length (cold start). Ties count against the target.

`eval.protocol = "feddcsr"` evaluates as the FedDCSR code (SDM'24) does, so that numbers can be set beside that
peer's: the sampled negatives are drawn uniformly *with* replacement from the target's domain, only the target
excluded (the user's other items may be drawn), "full" ranks against every item but the target, and a target
ranks 1 + the candidates scoring strictly higher (ties count for it). The peer's other settings are run
settings: one client per domain (`--scheme domain`), histories of 16 (`model.max_len=16`), 999 negatives.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedscope_jax.data.batching import group_order
from fedscope_jax.data.canonical import SPLITS, TRAIN, CanonicalDataset
from fedscope_jax.errors import FedscopeError
from fedscope_jax.eval.metrics import pessimistic_rank, ranking_metrics, strict_rank
from fedscope_jax.model import ModelConfig, Params, Semantic, all_item_repr, encode, item_bias, n_domains

PROTOCOLS = ("sampled", "full")
EVAL_PROTOCOLS = ("fedscope", "feddcsr")   # eval.protocol: how candidates are drawn and ties counted


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """num_negatives: sampled-protocol negatives per target; seed: of those negatives; buckets: lower edges
    of the cold-start history-length buckets (e.g. (1, 3, 6, 11) -> 0, 1-2, 3-5, 6-10, >10); head_share: the
    share of each domain's items, most popular first by train interactions, that forms the long-tail study's
    head (0.2: the Pareto "short head"; every other item, unseen ones included, is the tail); protocol: "fedscope"
    (unseen distinct negatives, ties against the target) or "feddcsr" (the peer's: negatives with replacement,
    only the target excluded, ties for the target)."""

    num_negatives: int = 999
    seed: int = 0
    ks: tuple[int, ...] = (1, 5, 10)
    buckets: tuple[int, ...] = (1, 3, 6, 11)
    batch_size: int = 512
    head_share: float = 0.2
    protocol: str = "fedscope"

    def __post_init__(self) -> None:
        if self.protocol not in EVAL_PROTOCOLS:
            raise FedscopeError(f"eval.protocol={self.protocol!r}; expected one of {', '.join(EVAL_PROTOCOLS)}")
        if self.num_negatives < 1 or self.batch_size < 1 or not self.ks or min(self.ks) < 1:
            raise FedscopeError("eval.num_negatives, eval.batch_size and eval.ks must be >= 1")
        if not 0.0 < self.head_share < 1.0:
            raise FedscopeError(f"eval.head_share={self.head_share}; expected a share of the items in (0, 1)")
        if list(self.buckets) != sorted(set(self.buckets)) or (self.buckets and self.buckets[0] < 1):
            raise FedscopeError(f"eval.buckets={list(self.buckets)}; expected increasing lower edges >= 1")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """The targets of one split, grouped by nothing: row e is one (user, target) pair."""

    split: str
    user: np.ndarray        # int64 [E]
    domain: np.ndarray      # int8 [E]
    target: np.ndarray      # int32 [E] shifted id
    history: np.ndarray     # int32 [E, L] left-padded shifted ids (last L in-domain items before the target)
    hist_len: np.ndarray    # int32 [E] full in-domain history length (before truncation)
    negatives: np.ndarray   # int32 [E, M] shifted ids of the sampled protocol
    seen: np.ndarray        # int32 [E, S] shifted ids excluded from the full ranking besides the target (0 = pad)
    strict: bool = False    # ties count for the target (rank = candidates strictly higher): eval.protocol feddcsr

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def subset(self, rows: np.ndarray) -> "EvalSet":
        """The targets at `rows` (e.g. one client's users), every array sliced alike."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                                            if f.name not in ("split", "strict")})


def _sample_negatives(user: np.ndarray, n_items: int, seen_keys: np.ndarray, m: int,
                      rng: np.random.Generator) -> np.ndarray:
    """[E, m] 0-based item ids per row, distinct, none of them in the row's seen (user * n + item) keys."""
    out = np.zeros((len(user), m), np.int64)
    todo = np.arange(len(user))
    draw = m + m // 2 + 8
    while todo.size:
        cand = rng.integers(0, n_items, size=(todo.size, draw))
        cand.sort(axis=1)
        ok = ~np.isin(user[todo, None] * n_items + cand, seen_keys)
        ok[:, 1:] &= cand[:, 1:] != cand[:, :-1]
        done = ok.sum(1) >= m
        # keep a uniform random subset of size m of each row's distinct unseen draws
        keys = np.where(ok, rng.random(ok.shape), 2.0)
        pick = np.argsort(keys, axis=1)[:, :m]
        out[todo[done]] = np.take_along_axis(cand, pick, axis=1)[done]
        todo = todo[~done]
        draw *= 2
    return out


def eval_set(ds: CanonicalDataset, split: str, max_len: int, cfg: EvalConfig) -> EvalSet:
    """Builds the targets of `split` ("valid" or "test") with histories and sampled negatives."""
    if split not in ("valid", "test"):
        raise FedscopeError(f"eval split {split!r}; expected valid or test")
    code = SPLITS.index(split)
    rows, start = group_order(ds, np.arange(ds.n_interactions))
    at = np.flatnonzero(ds.split[rows] == code)
    hist_len = (at - start[at]).astype(np.int32)
    cols = at[:, None] - max_len + np.arange(max_len)[None, :]
    ok = cols >= start[at][:, None]
    history = np.where(ok, ds.item[rows[np.maximum(cols, 0)]] + 1, 0).astype(np.int32)
    t = rows[at]
    user, domain, target = ds.user[t], ds.domain[t], ds.item[t].astype(np.int32) + 1
    negatives = np.zeros((len(t), cfg.num_negatives), np.int32)
    rng = np.random.default_rng([cfg.seed, code])
    if cfg.protocol == "feddcsr":   # nothing but the target is excluded: no seen items to gather
        for d, n_items in enumerate(ds.n_items):
            sel = np.flatnonzero(domain == d)
            if sel.size and n_items < 2:
                raise FedscopeError(f"eval.protocol=feddcsr: domain {ds.domains[d]!r} has {n_items} item; "
                                    "negatives need at least one other")
            draw = rng.integers(0, n_items - 1, size=(sel.size, cfg.num_negatives))   # 0-based, target skipped
            negatives[sel] = draw + (draw >= target[sel, None] - 1) + 1
        return EvalSet(split=split, user=user, domain=domain, target=target, history=history, hist_len=hist_len,
                       negatives=negatives, seen=np.zeros((len(t), 1), np.int32), strict=True)
    # every item of the target's (user, domain) group except the target: excluded from the full ranking
    size = np.bincount(start, minlength=len(rows))[start[at]]
    width = int(size.max()) if size.size else 1
    cols = start[at][:, None] + np.arange(width)[None, :]
    in_group = np.arange(width)[None, :] < size[:, None]
    seen_items = np.where(in_group, ds.item[rows[np.minimum(cols, len(rows) - 1)]] + 1, 0)
    seen_items = np.where(seen_items == target[:, None], 0, seen_items).astype(np.int32)
    for d, n_items in enumerate(ds.n_items):
        sel = np.flatnonzero(domain == d)
        if not sel.size:
            continue
        in_d = ds.domain == d
        seen = np.unique(ds.user[in_d] * n_items + ds.item[in_d])
        unseen = n_items - np.bincount(seen // n_items, minlength=ds.n_users)[user[sel]]
        if unseen.min() < cfg.num_negatives:
            raise FedscopeError(f"eval.num_negatives={cfg.num_negatives} but a user of domain {ds.domains[d]!r} has "
                                f"only {int(unseen.min())} unseen items; lower eval.num_negatives")
        negatives[sel] = _sample_negatives(user[sel], n_items, seen, cfg.num_negatives, rng) + 1
    return EvalSet(split=split, user=user, domain=domain, target=target, history=history, hist_len=hist_len,
                   negatives=negatives, seen=seen_items)


def popularity_scores(ds: CanonicalDataset) -> list[np.ndarray]:
    """Per domain float [N+1]: train-split interaction counts by shifted id (row 0 = padding, -inf)."""
    out = []
    for d, n in enumerate(ds.n_items):
        sel = (ds.domain == d) & (ds.split == TRAIN)
        counts = np.bincount(ds.item[sel] + 1, minlength=n + 1).astype(np.float64)
        counts[0] = -np.inf
        out.append(counts)
    return out


def _drop_seen(scores: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Copy of row-wise scores [E, N+1] with the seen items' (and padding's) columns set to -inf."""
    out = scores.copy()
    np.put_along_axis(out, seen, -np.inf, axis=1)
    out[:, 0] = -np.inf
    return out


def popularity_ranks(es: EvalSet, pop: Sequence[np.ndarray], chunk: int = 512) -> dict[str, np.ndarray]:
    """Ranks of the popularity baseline under both protocols (same candidates and ties as the model)."""
    sampled = np.zeros(len(es), np.int64)
    full = np.zeros(len(es), np.int64)
    rank = strict_rank if es.strict else pessimistic_rank
    itself = 0 if es.strict else 1   # a pessimistic rank counts the target's own column
    for d, scores in enumerate(pop):
        sel = np.flatnonzero(es.domain == d)
        t = scores[es.target[sel]]
        sampled[sel] = rank(t, scores[es.negatives[sel]])
        for lo in range(0, sel.size, chunk):
            idx = sel[lo:lo + chunk]
            rows = _drop_seen(np.broadcast_to(scores, (idx.size, scores.size)), es.seen[idx])
            full[idx] = rank(scores[es.target[idx]], rows[:, 1:]) - itself
    return {"sampled": sampled, "full": full}


@functools.partial(jax.jit, static_argnames=("config", "d", "strict"))
def _model_ranks(params: Params, semantic: Semantic, history: jnp.ndarray, target: jnp.ndarray,
                 negatives: jnp.ndarray, seen: jnp.ndarray, config: ModelConfig,
                 d: int, strict: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sampled rank, full rank) of a batch of targets of domain d, NaN counted against; ties against the
    target, or (`strict`) for it."""
    h = encode(params, config, d, history, semantic)[:, -1]                       # [E, dim]
    scores = h @ all_item_repr(params, config, d, semantic).T                     # [E, N+1], column 0 = padding
    bias = item_bias(params, d, jnp.arange(scores.shape[1]))
    if bias is not None:
        scores = scores + bias[None, :]
    t_score = jnp.take_along_axis(scores, target[:, None], axis=1)                # [E, 1]
    n_score = jnp.take_along_axis(scores, negatives, axis=1)                      # [E, M]
    above = (lambda x: ~(x <= t_score)) if strict else (lambda x: ~(x < t_score))
    sampled = jnp.sum(above(n_score), axis=1)
    competitors = scores.at[jnp.arange(scores.shape[0])[:, None], seen].set(-jnp.inf)   # seen items (and col 0)
    full = jnp.sum(above(competitors[:, 1:]), axis=1) - (0 if strict else 1)      # minus the target itself
    return sampled, full


def model_ranks(params: Params, config: ModelConfig, es: EvalSet, semantic: Semantic = None,
                batch_size: int = 512) -> dict[str, np.ndarray]:
    """Ranks of the model under both protocols, scored in fixed-size jitted batches per domain."""
    sampled = np.zeros(len(es), np.int64)
    full = np.zeros(len(es), np.int64)
    for d in range(n_domains(params)):
        sel = np.flatnonzero(es.domain == d)
        for lo in range(0, sel.size, batch_size):
            idx = sel[lo:lo + batch_size]
            pad = batch_size - idx.size
            take = np.concatenate([idx, np.full(pad, idx[0])])
            s, f = _model_ranks(params, semantic, es.history[take], es.target[take], es.negatives[take],
                                es.seen[take], config=config, d=d, strict=es.strict)
            sampled[idx] = np.asarray(s)[:idx.size]
            full[idx] = np.asarray(f)[:idx.size]
    return {"sampled": sampled, "full": full}


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """Labels of the history-length buckets: (1, 3, 6, 11) -> ["0", "1-2", "3-5", "6-10", ">10"]."""
    lows = [0, *edges]
    labels = []
    for i, lo in enumerate(lows):
        if i + 1 < len(lows):
            hi = lows[i + 1] - 1
            labels.append(str(lo) if hi == lo else f"{lo}-{hi}")
        else:
            labels.append(f">{lo - 1}" if lo > 0 else f">={lo}")
    return labels


def summarize(es: EvalSet, ranks: dict[str, np.ndarray], domains: Sequence[str],
              ks: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """{protocol: {domain: metrics + "targets"}} from ranks."""
    out: dict[str, Any] = {}
    for proto, r in ranks.items():
        out[proto] = {}
        for d, name in enumerate(domains):
            sel = es.domain == d
            out[proto][name] = {**ranking_metrics(r[sel], ks), "targets": int(sel.sum())}
    return out


def cold_start(es: EvalSet, ranks_by_method: dict[str, dict[str, np.ndarray]], domains: Sequence[str],
               cfg: EvalConfig) -> dict[str, Any]:
    """{protocol: {domain: {bucket: {"targets": n, method: metrics}}}} by in-domain history length."""
    labels = bucket_labels(cfg.buckets)
    bucket = np.searchsorted(np.asarray(cfg.buckets), es.hist_len, side="right")
    out: dict[str, Any] = {}
    for proto in PROTOCOLS:
        out[proto] = {}
        for d, name in enumerate(domains):
            out[proto][name] = {}
            for b, label in enumerate(labels):
                sel = (es.domain == d) & (bucket == b)
                cell: dict[str, Any] = {"targets": int(sel.sum())}
                for method, ranks in ranks_by_method.items():
                    cell[method] = ranking_metrics(ranks[proto][sel], cfg.ks)
                out[proto][name][label] = cell
    return out


def head_items(ds: CanonicalDataset, share: float) -> list[np.ndarray]:
    """Per domain bool [N+1] by shifted id: the ceil(share * N) items with the most train interactions.

    Ties in the count are broken by the smaller item id, so the head has exactly that many items; row 0
    (padding) is False. Items never seen in train are always tail (unless the head needs them to be full).
    """
    out = []
    for d, n in enumerate(ds.n_items):
        sel = (ds.domain == d) & (ds.split == TRAIN)
        counts = np.bincount(ds.item[sel], minlength=n)
        order = np.lexsort((np.arange(n), -counts))          # most popular first, then smaller id
        head = np.zeros(n + 1, bool)
        head[order[:int(np.ceil(share * n))] + 1] = True
        out.append(head)
    return out


def long_tail(es: EvalSet, ranks: dict[str, np.ndarray], ds: CanonicalDataset,
              cfg: EvalConfig) -> dict[str, Any]:
    """{protocol: {domain: {"head": metrics, "tail": metrics, "targets": {...}, "items": {...}, "head_train_share"}}}.

    Targets are split by whether the target item is in its domain's head (`head_items`, eval.head_share);
    `head_train_share` is the share of the domain's train interactions that fall on head items.
    """
    heads = head_items(ds, cfg.head_share)
    out: dict[str, Any] = {}
    for proto in PROTOCOLS:
        out[proto] = {}
        for d, name in enumerate(ds.domains):
            in_d = es.domain == d
            head_target = heads[d][np.where(in_d, es.target, 0)]     # other domains' ids may be out of range
            is_head, is_tail = head_target & in_d, ~head_target & in_d
            sel = (ds.domain == d) & (ds.split == TRAIN)
            train_head = int(heads[d][ds.item[sel] + 1].sum())
            out[proto][name] = {
                "head": ranking_metrics(ranks[proto][is_head], cfg.ks),
                "tail": ranking_metrics(ranks[proto][is_tail], cfg.ks),
                "targets": {"head": int(is_head.sum()), "tail": int(is_tail.sum())},
                "items": {"head": int(heads[d].sum()), "tail": int(ds.n_items[d] - heads[d].sum())},
                "head_train_share": train_head / max(int(sel.sum()), 1),
            }
    return out
