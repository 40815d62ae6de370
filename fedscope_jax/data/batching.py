"""Dense padded arrays for training: per-user, per-domain sequences and per-client mini-batches with masks.

Item ids are shifted by one (0 = padding). A user's training sequence in a domain is its `train`-split items
of that domain in position order, last max_len + 1 of them; the model reads seq = items[:-1] (left-padded) and
predicts target = items[1:] at every position. Mini-batches carry a leading step axis [S, B, D, L] so one
client's local epochs are a single array that lax.scan can walk; padded steps/users are all zero and masked.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from fedscope_jax.data.canonical import TRAIN, CanonicalDataset
from fedscope_jax.errors import FedscopeError


@dataclasses.dataclass(frozen=True)
class TrainSequences:
    """Training arrays of the users that have at least one next-item target (rows sorted by user id)."""

    user: np.ndarray      # int64 [U]
    seq: np.ndarray       # int32 [U, D, L] left-padded shifted ids
    target: np.ndarray    # int32 [U, D, L] next item at each position (0 = none)

    def rows_of(self, users: np.ndarray) -> np.ndarray:
        """Row indices of the given user ids; users without training targets are dropped."""
        users = np.asarray(users, np.int64)
        return np.searchsorted(self.user, users[np.isin(users, self.user)])

    def client_rows(self, part: Any) -> list[np.ndarray]:
        """Row indices of each client of a data.partition Partition. Under the `domain` scheme (client d
        holds every user's domain-d data, the FedDCSR setting) every client gets every row; the trainer masks
        the other domains."""
        if part.scheme == "domain":
            return [np.arange(len(self.user)) for _ in range(part.n_clients)]
        return [self.rows_of(part.users_of(c)) for c in range(part.n_clients)]


def group_order(ds: CanonicalDataset, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorts `rows` by (user, domain, position); returns (sorted rows, index of each one's group start)."""
    order = rows[np.lexsort((ds.position[rows], ds.domain[rows], ds.user[rows]))]
    key = ds.user[order] * 256 + ds.domain[order]
    new = np.ones(len(order), bool)
    new[1:] = key[1:] != key[:-1]
    start = np.maximum.accumulate(np.where(new, np.arange(len(order)), 0))
    return order, start


def train_sequences(ds: CanonicalDataset, max_len: int) -> TrainSequences:
    """Builds every user's per-domain training input/target arrays (vectorized over interactions)."""
    if max_len < 1:
        raise FedscopeError(f"model.max_len={max_len}; expected >= 1")
    rows, _ = group_order(ds, np.flatnonzero(ds.split == TRAIN))
    key = ds.user[rows] * 256 + ds.domain[rows]
    last = np.ones(len(rows), bool)
    last[:-1] = key[:-1] != key[1:]
    end = np.minimum.accumulate(np.where(last, np.arange(len(rows)), len(rows))[::-1])[::-1]
    from_end = end - np.arange(len(rows))            # 0 for the last item of its (user, domain) group
    n_dom = len(ds.domains)
    users = np.unique(ds.user[rows[from_end >= 1]])   # users with at least one (input, target) pair
    seq = np.zeros((len(users), n_dom, max_len), np.int32)
    target = np.zeros_like(seq)
    u = np.searchsorted(users, ds.user[rows])
    ok = np.isin(ds.user[rows], users)
    item = ds.item[rows] + 1
    dom = ds.domain[rows]
    sel = ok & (from_end >= 1) & (from_end <= max_len)          # inputs: column L - from_end
    seq[u[sel], dom[sel], max_len - from_end[sel]] = item[sel]
    sel = ok & (from_end <= max_len - 1)                         # targets: column L - 1 - from_end
    # a target needs an input before it: the group's first item is never a target
    first = np.ones(len(rows), bool)
    first[1:] = key[1:] != key[:-1]
    sel &= ~first
    target[u[sel], dom[sel], max_len - 1 - from_end[sel]] = item[sel]
    return TrainSequences(user=users, seq=seq, target=target)


def make_batches(seqs: TrainSequences, rows: np.ndarray, batch_size: int, epochs: int,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One client's local mini-batches: {"seq", "target": [S, B, D, L], "user_mask": [S, B], "step_mask": [S]}.

    Each epoch is a fresh permutation of `rows` cut into ceil(n / B) batches; the last batch of an epoch is
    padded with all-zero users (user_mask False). S = epochs * ceil(n / B).
    """
    if batch_size < 1 or epochs < 1:
        raise FedscopeError(f"batch_size={batch_size}, epochs={epochs}; expected both >= 1")
    rows = np.asarray(rows, np.int64)
    per_epoch = -(-len(rows) // batch_size)
    idx = np.full((epochs, per_epoch * batch_size), -1, np.int64)
    for e in range(epochs):
        idx[e, :len(rows)] = rng.permutation(rows)
    idx = idx.reshape(epochs * per_epoch, batch_size)
    user_mask = idx >= 0
    safe = np.where(user_mask, idx, 0)
    seq = np.where(user_mask[..., None, None], seqs.seq[safe], 0).astype(np.int32)
    target = np.where(user_mask[..., None, None], seqs.target[safe], 0).astype(np.int32)
    return {"seq": seq, "target": target, "user_mask": user_mask, "step_mask": np.ones(len(idx), bool)}


POISSON_TAG = 0x05E8   # seeds a client's Poisson user sampling apart from its batch permutations


def user_steps(n_users: int, batch_size: int, epochs: int) -> int:
    """Local steps per round of a client with `n_users` users: `epochs` passes of ceil(n / B) steps (as
    `make_batches`; under Poisson sampling a pass is n / B expected steps)."""
    return int(epochs) * -(-int(n_users) // int(batch_size))


def poisson_masks(n_users: int, rate: float, steps: int, rng: np.random.Generator) -> np.ndarray:
    """bool [steps, n_users]: each step takes every user independently with probability `rate`."""
    return rng.random((int(steps), int(n_users))) < rate


def poisson_cap(n_users: np.ndarray, rates: np.ndarray, steps: np.ndarray, seed: int, rounds: int,
                multiple: int = 8) -> int:
    """The largest Poisson batch any client draws in any round of a run (rounded up to `multiple`): the padded
    batch size of every step, so no sampled user is ever dropped. The draws depend only on (seed, round,
    client) and public sizes, never on data, so the size leaks nothing."""
    cap = 1
    for r in range(int(rounds)):
        for c, (n, q, s) in enumerate(zip(n_users, rates, steps)):
            if n > 0 and s > 0:
                rng = np.random.default_rng([seed, r, c, POISSON_TAG])
                cap = max(cap, int(poisson_masks(int(n), float(q), int(s), rng).sum(axis=1).max()))
    return -(-cap // multiple) * multiple


def poisson_batches(seqs: TrainSequences, rows: np.ndarray, rate: float, steps: int, cap: int,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One client's Poisson-sampled local steps (DP-SGD's sampling): {"seq", "target": [S, cap, D, L],
    "user_mask": [S, cap], "step_mask": [S]}. Step s holds the users of `poisson_masks` row s first, padding
    (all-zero users, user_mask False) after; `cap` must hold every draw (`poisson_cap`)."""
    rows = np.asarray(rows, np.int64)
    masks = poisson_masks(len(rows), rate, steps, rng)
    counts = masks.sum(axis=1)
    if counts.size and counts.max() > cap:
        raise FedscopeError(f"Poisson batch of {int(counts.max())} users does not fit the padded batch {cap}")
    idx = np.full((int(steps), int(cap)), -1, np.int64)
    for s in range(int(steps)):
        chosen = rows[masks[s]]
        idx[s, :len(chosen)] = chosen
    user_mask = idx >= 0
    safe = np.where(user_mask, idx, 0)
    seq = np.where(user_mask[..., None, None], seqs.seq[safe], 0).astype(np.int32)
    target = np.where(user_mask[..., None, None], seqs.target[safe], 0).astype(np.int32)
    return {"seq": seq, "target": target, "user_mask": user_mask, "step_mask": np.ones(int(steps), bool)}


def pad_steps(batches: dict[str, np.ndarray], steps: int) -> dict[str, np.ndarray]:
    """Appends all-zero steps (step_mask False) up to `steps`, so clients of one bucket share a shape."""
    have = batches["step_mask"].shape[0]
    if steps < have:
        raise ValueError(f"pad_steps: {have} steps do not fit in {steps}")
    return {k: np.concatenate([v, np.zeros((steps - have,) + v.shape[1:], v.dtype)]) for k, v in batches.items()}
