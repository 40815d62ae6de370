"""One client's local training: a `lax.scan` over its local steps, pure, with padding masks.

A client's data is a `ClientData` pytree whose batch leaves carry a leading step axis [S, ...] and a
`step_mask` [S] (False for padding steps, which leave parameters and optimizer state untouched; a
client trained on its own, a chunk of one, skips them at run time: `client_update(skip_padding=True)`). With
local vocabularies (`SparseTable`), the client trains a small table of the rows it touches, gathered from
the global table by `vocab`; its delta for that table is the [V, d] row delta, scattered back by the
aggregator. This is exact as long as the loss only reads the rows its batch names and the local optimizer
leaves rows with zero gradients unchanged (SGD, momentum, Adam: yes; decoupled weight decay: no). With sparse
tables the loss sees the client's vocabularies (global row ids) as batch["vocab"], e.g. to read constant
per-row tables; a batch must then be a dict.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import mechanism

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SparseTable:
    """A parameter table trained through a per-client local vocabulary.

    path: keys leading to the [N, d] table inside the params pytree (nested dicts).
    name: key of the client's row ids in `ClientData.vocab` (int32[V]; ids >= N are padding); several tables
    may share one vocabulary (e.g. a domain's item embeddings and item biases).
    """

    path: tuple[str, ...]
    name: str


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """How a client trains locally: loss(params, batch, key) -> (loss, aux), optax optimizer, epochs.

    expected_batch: > 0 for DP-SGD over users (the user unit of DP): each step's gradient is the sum of the
    batch's per-user clipped gradients plus Gaussian noise, divided by this expected (never the realized)
    batch size; the batch must then carry a bool "user_mask" [B]. microbatch: users whose per-user gradients
    are computed at once (0: the whole batch). user_tables: with DP-SGD over users, tables whose per-user
    gradients are taken on each user's own rows (`user_rows_sum`; the batch carries each user's rows); without,
    every user's gradient is taken on the whole tables (`mechanism.clipped_user_sum`, jax_privacy)."""

    loss_fn: LossFn
    optimizer: optax.GradientTransformation
    local_epochs: int = 1
    sparse_tables: tuple[SparseTable, ...] = ()
    expected_batch: int = 0
    microbatch: int = 0
    user_tables: tuple[SparseTable, ...] = ()

    def __post_init__(self) -> None:
        if self.local_epochs < 1:
            raise FedscopeError(f"local_epochs: expected >= 1, got {self.local_epochs}")
        if self.expected_batch < 0:
            raise FedscopeError(f"expected_batch: expected >= 0, got {self.expected_batch}")
        if self.expected_batch and self.sparse_tables:
            raise FedscopeError("DP-SGD over users (expected_batch > 0) noises every step's whole gradient: its "
                                "tables must be dense (no sparse_tables), or rows outside a client's vocabulary "
                                "would carry no noise")
        if self.user_tables and not self.expected_batch:
            raise FedscopeError("user_tables (per-user gradients on each user's own rows) are for DP-SGD over users: "
                                "set expected_batch > 0")


class UserNoise(NamedTuple):
    """A client's DP-SGD inputs in the user unit: clip norm C, noise multiplier z, its own noise key."""

    clip: jax.Array
    noise_multiplier: jax.Array
    key: jax.Array


class ClientData(NamedTuple):
    """One client's local data (a leading client axis [C] when stacked)."""

    batch: PyTree                  # leaves [S, ...]: one mini-batch per local step
    step_mask: jax.Array           # bool[S]: False for padding steps
    vocab: Mapping[str, jax.Array]  # SparseTable.name -> int32[V] global row ids (empty without sparse tables)


class ClientStats(NamedTuple):
    """What a client reports besides its delta."""

    loss: jax.Array   # mean training loss over its real steps (0 when it has none)
    steps: jax.Array  # number of real local steps taken (epochs x unmasked steps)


def get_path(tree: PyTree, path: tuple[str, ...]) -> Any:
    """The leaf at `path` in a tree of nested mappings."""
    node = tree
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            raise FedscopeError(f"sparse table path {'/'.join(path)}: no key {key!r} at depth {i} of the params")
        node = node[key]
    return node


def set_path(tree: PyTree, path: tuple[str, ...], value: Any) -> PyTree:
    """A copy of `tree` (nested dicts) with the leaf at `path` replaced (the other leaves are shared)."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = set_path(tree[path[0]], path[1:], value)
    return new


def localize_params(params: PyTree, vocab: Mapping[str, jax.Array],
                    tables: tuple[SparseTable, ...]) -> PyTree:
    """Replaces each sparse table by the rows named in `vocab` (padding ids >= N give zero rows)."""
    for table in tables:
        full = get_path(params, table.path)
        rows = jnp.take(full, vocab[table.name], axis=0, mode="fill", fill_value=0)
        params = set_path(params, table.path, rows)
    return params


def mask_padding_rows(delta: PyTree, global_params: PyTree, vocab: Mapping[str, jax.Array],
                      tables: tuple[SparseTable, ...]) -> PyTree:
    """Zeroes the delta rows of padding vocabulary entries, so they never count in norms or sums."""
    for table in tables:
        n_rows = get_path(global_params, table.path).shape[0]
        rows = get_path(delta, table.path)
        valid = (vocab[table.name] < n_rows)[:, None]
        delta = set_path(delta, table.path, jnp.where(valid, rows, 0.0))
    return delta


USER_VOCAB = "user_vocab/"   # batch["user_vocab/<name>"] [B, V]: each user's own rows of the tables of that name


def user_rows_sum(loss_fn: LossFn, params: PyTree, batch: PyTree, key: jax.Array, clip: jax.Array,
                  tables: tuple[SparseTable, ...], microbatch: int = 0) -> tuple[PyTree, jax.Array]:
    """(sum over the real users of `batch` of each user's gradient clipped to L2 norm `clip`, each user's loss),
    with each user's gradient of `tables` taken on that user's own rows only.

    Every batch field has the user axis first. User u's rows are batch["user_vocab/<name>"][u]: unique global
    row ids (padding ids >= the table's rows), which its item ids (local, as `train.vocab.localize_users`
    writes them) index. The loss reads no other row, so the gradient of the whole table is the scatter of the
    rows' gradient and has the same norm: the clipped sum equals `mechanism.clipped_user_sum` (tested), but a
    user's gradient costs its V rows, not the catalogue's N. Clipping is `mechanism.clip` over the users of a
    microbatch (user_mask is the weight; a non-finite loss or gradient excludes the user); the clipped rows are
    scattered into the dense sum, so the noise the caller adds reaches every row. Per-user keys are
    `jax.random.split(key, B)`, as jax_privacy splits them. microbatch: users at once (the batch a multiple of
    it; 0: all); microbatches past the last one holding a real user are not computed (padding users come last
    in a Poisson batch)."""
    mask = batch["user_mask"]
    users = mask.shape[0]
    size = microbatch or users
    if users % size:
        raise FedscopeError(f"user_rows_sum: {users} users are not a multiple of the microbatch {size}")
    missing = sorted({USER_VOCAB + t.name for t in tables} - set(batch))
    if missing:
        raise FedscopeError(f"user_rows_sum: the batch has no field {', '.join(missing)} (each user's rows of that "
                            "table; train/vocab.py localize_users writes them)")
    keys = jax.random.split(key, users)
    vocab = {t.name: batch[USER_VOCAB + t.name] for t in tables}
    per_user = {k: v for k, v in batch.items() if not k.startswith(USER_VOCAB)}
    table_of = {t.path: t.name for t in tables}

    def one(user: PyTree, rows: Mapping[str, jax.Array], k: jax.Array) -> tuple[PyTree, jax.Array]:
        local = localize_params(params, rows, tables)
        b = {**jax.tree.map(lambda x: x[None], user), "vocab": rows}
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(local, b, k)
        return mask_padding_rows(g, params, rows, tables), loss

    def group(i: jax.Array, acc: tuple[PyTree, jax.Array]) -> tuple[PyTree, jax.Array]:
        take = lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size)  # noqa: E731
        user, rows, k, m = jax.tree.map(take, (per_user, vocab, keys, mask))
        grads, loss = jax.vmap(one)(user, rows, k)
        grads, clipped = mechanism.clip(grads, jnp.broadcast_to(clip, m.shape), m.astype(jnp.float32),
                                        jnp.isfinite(loss))

        def add(path: Any, total: jax.Array, g: jax.Array) -> jax.Array:
            name = table_of.get(tuple(p.key for p in path))
            if name is None:
                return total + jnp.tensordot(clipped.scale, g, axes=1)
            g = g * clipped.scale.reshape((-1,) + (1,) * (g.ndim - 1))   # the users' clipped rows, into the sum
            return total.at[rows[name].reshape(-1)].add(g.reshape((-1,) + g.shape[2:]), mode="drop")

        acc_grads, acc_loss = acc
        return (jax.tree_util.tree_map_with_path(add, acc_grads, grads),
                jax.lax.dynamic_update_slice_in_dim(acc_loss, loss.astype(acc_loss.dtype), i * size, 0))

    real_groups = jnp.any(mask.reshape(-1, size), axis=1)
    n_groups = jnp.max(jnp.where(real_groups, jnp.arange(users // size) + 1, 0))   # through the last real one
    init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((users,), jnp.float32))
    return jax.lax.fori_loop(0, n_groups, group, init)


def private_gradient(params: PyTree, batch: PyTree, key: jax.Array, config: ClientConfig,
                     noise: UserNoise, index: jax.Array) -> tuple[jax.Array, PyTree]:
    """One DP-SGD step's gradient (the user unit): (sum_u clip_C(g_u) + N(0, (z C)^2)) / expected batch, and
    the mean loss of the batch's real users. The noise of step `index` is drawn from fold_in(noise.key, index)."""
    if config.user_tables:
        grads, losses = user_rows_sum(config.loss_fn, params, batch, key, noise.clip, config.user_tables,
                                      config.microbatch)
    else:
        grads, losses = mechanism.clipped_user_sum(config.loss_fn, params, batch, key, batch["user_mask"],
                                                   noise.clip, config.microbatch)
    std = mechanism.noise_std(noise.clip, noise.noise_multiplier)
    grads = mechanism.add_noise(grads, std, jax.random.fold_in(noise.key, index))
    grads = jax.tree.map(lambda g: g / config.expected_batch, grads)
    real = batch["user_mask"].astype(losses.dtype)
    return jnp.sum(losses * real) / jnp.maximum(jnp.sum(real), 1.0), grads


def client_update(global_params: PyTree, data: ClientData, key: jax.Array, config: ClientConfig,
                  noise: UserNoise | None = None, skip_padding: bool = False) -> tuple[PyTree, ClientStats]:
    """Trains from `global_params` on the client's steps; returns (local - global, stats). Pure.

    The key of the s-th real step of epoch e is fold_in(key, e * S_real + s), so padding steps or
    clients never change a client's randomness. noise: the user unit's DP-SGD inputs (`private_gradient`
    replaces the plain gradient; config.expected_batch must be set). skip_padding: a padding step is a
    `lax.cond` that keeps the carry, so it is not computed: for a client trained on its own (not vmapped over
    clients; a vmapped cond with a per-client predicate runs both sides and broadcasts every operand, the
    tables the loss closes over included, to each client). Without it a padding step is computed and masked.
    """
    if (noise is not None) != (config.expected_batch > 0):
        raise FedscopeError("client_update: DP-SGD over users needs both UserNoise and ClientConfig.expected_batch")
    start = localize_params(global_params, data.vocab, config.sparse_tables)
    opt_state = config.optimizer.init(start)
    grad_fn = jax.value_and_grad(config.loss_fn, has_aux=True)

    def step(carry, xs):
        batch, real, index = xs
        if config.sparse_tables:   # the loss may read constant per-row tables through the global row ids
            batch = {**batch, "vocab": data.vocab}

        def take(carry):
            params, state, loss_sum = carry
            step_key = jax.random.fold_in(key, index)
            if noise is None:
                (loss, _), grads = grad_fn(params, batch, step_key)
            else:
                loss, grads = private_gradient(params, batch, step_key, config, noise, index)
            updates, new_state = config.optimizer.update(grads, state, params)
            return optax.apply_updates(params, updates), new_state, loss_sum + loss.astype(loss_sum.dtype)

        if skip_padding:   # a padding step keeps the carry and is not computed
            return jax.lax.cond(real, take, lambda c: c, carry), None
        return jax.tree.map(lambda new, old: jnp.where(real, new, old), take(carry), carry), None

    n_real = jnp.sum(data.step_mask.astype(jnp.int32))
    real_index = jnp.cumsum(data.step_mask.astype(jnp.int32)) - 1  # padding steps do not shift the keys

    def epoch(carry, e):
        index = e * n_real + real_index
        carry, _ = jax.lax.scan(step, carry, (data.batch, data.step_mask, index))
        return carry, None

    init = (start, opt_state, jnp.zeros((), jnp.float32))
    (final, _, loss_sum), _ = jax.lax.scan(epoch, init, jnp.arange(config.local_epochs))
    delta = jax.tree.map(jnp.subtract, final, start)
    delta = mask_padding_rows(delta, global_params, data.vocab, config.sparse_tables)
    steps = n_real * config.local_epochs
    loss = loss_sum / jnp.maximum(steps, 1).astype(jnp.float32)
    return delta, ClientStats(loss=loss, steps=steps)
