"""The sweep axis: one federated round for several configurations at once (vmap over a leading config axis).

A sweep trains configurations that share everything a round's *data* derives from (the seed: partition,
client sampling, local batches) and differ only in per-client privacy vectors (clip C_k, noise multiplier
z_k, aggregation weight w_k: 0 where a client is out of budget in that configuration). So the round is
`vmap(round_step)` over a leading config axis of (server state, the cohorts' weight / clip / noise vectors,
keys), with the cohorts' data shared (in_axes None: one copy, not one per config). The key derives from the
seed, so the configs of a seed share it (in_axes None too): random draws that do not depend on the
parameters (negatives, dropout masks, the aggregate's noise before scaling) are made once per round. Each config's clients
train from that config's parameters, so the per-client matmuls of all configs run as one batched program.

Configs with no participating client in a round keep their state (only the round counter advances), as a
single run skips such a round. A config's noise mode (and secure aggregation) is static: configs whose
`EngineConfig` differs form separate groups, i.e. separate programs (train/loop.py groups them).

Devices: the config axis is laid on a 1-D mesh axis "configs" (`jax.shard_map`), each device running its
configs' rounds with the clients unsharded; the config count is padded to a multiple of the devices with
inactive copies (weight 0) whose results are dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from fedscope_jax.engine.client import ClientConfig
from fedscope_jax.engine.cohort import Cohort
from fedscope_jax.engine.round import EngineConfig, RoundMetrics, round_step
from fedscope_jax.engine.server import ServerState
from fedscope_jax.errors import FedscopeError

CONFIG_AXIS = "configs"


def config_in_axes(cohorts: Sequence[Cohort]) -> tuple[Cohort, ...]:
    """vmap in_axes of sweep cohorts: data and client ids shared, privacy vectors per config."""
    return tuple(Cohort(None, None, 0, 0, 0) for _ in cohorts)


def sweep_round_step(states: ServerState, cohorts: Sequence[Cohort], keys: jax.Array, client_cfg: ClientConfig,
                     server_opt: optax.GradientTransformation, engine_cfg: EngineConfig,
                     config_chunk: int = 0) -> tuple[ServerState, RoundMetrics]:
    """One round of every config (traceable). states and the cohorts' weight, clip and noise_multiplier have
    a leading config axis [n]; the cohorts' data and client ids have none. `keys`: one key (shape ()) shared
    by every config (configs of one seed: the draws of negatives, dropout and noise are then made once, not
    once per config), or a key per config ([n]).
    config_chunk: configs vectorized at once (0 = all); the config axis is a `lax.map` over chunks of that
    many vmapped configs, so 1 is a loop over configs inside the one program (n must be a multiple)."""
    cohorts = tuple(cohorts)
    key_axis = 0 if keys.ndim == 1 else None

    def one(state: ServerState, config_cohorts: tuple[Cohort, ...], key: jax.Array):
        new, metrics = round_step(state, config_cohorts, key, client_cfg, server_opt, engine_cfg)
        active = sum(jnp.sum(c.weight) for c in config_cohorts) > 0
        skipped = state._replace(round=state.round + 1)
        new = jax.tree.map(lambda a, b: jnp.where(active, a, b), new, skipped)
        return new, metrics

    vmapped = jax.vmap(one, in_axes=(0, config_in_axes(cohorts), key_axis))
    n = int(states.round.shape[0])
    chunk = n if config_chunk <= 0 else min(config_chunk, n)
    if chunk == n:
        return vmapped(states, cohorts, keys)
    if n % chunk:
        raise FedscopeError(f"sweep: {n} configs per device are not a multiple of config_chunk {chunk}; "
                            "pad them (pad_configs)")
    per_config = (states, tuple((c.weight, c.clip, c.noise_multiplier) for c in cohorts),
                  keys if key_axis == 0 else None)
    if chunk == 1:  # a loop over configs running the unbatched round (no vmap of size 1)
        def body_one(xs):
            st, vectors, k = xs
            config_cohorts = tuple(c._replace(weight=w, clip=cl, noise_multiplier=z)
                                   for c, (w, cl, z) in zip(cohorts, vectors))
            return one(st, config_cohorts, keys if k is None else k)

        return jax.lax.map(body_one, per_config)
    split = lambda x: x.reshape((n // chunk, chunk) + x.shape[1:])  # noqa: E731

    def body(xs):
        st, vectors, k = xs
        chunk_cohorts = tuple(c._replace(weight=w, clip=cl, noise_multiplier=z)
                              for c, (w, cl, z) in zip(cohorts, vectors))
        return vmapped(st, chunk_cohorts, keys if k is None else k)

    out = jax.lax.map(body, jax.tree.map(split, per_config))
    return jax.tree.map(lambda x: x.reshape((n,) + x.shape[2:]), out)


def config_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "configs" over `devices` (all local devices by default)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), (CONFIG_AXIS,))


def make_sweep_round_fn(client_cfg: ClientConfig, server_opt: optax.GradientTransformation,
                        engine_cfg: EngineConfig, mesh: Mesh | None = None, donate: bool = True,
                        config_chunk: int = 0) -> Callable[[ServerState, Sequence[Cohort], jax.Array],
                                                           tuple[ServerState, RoundMetrics]]:
    """The jitted sweep round: (states, cohorts, keys) -> (states, metrics), all with a leading config axis.

    With `mesh` (axis "configs"), the config axis is sharded over its devices: the config count must be a
    multiple of devices x config_chunk (`pad_configs`)."""
    fn = functools.partial(sweep_round_step, client_cfg=client_cfg, server_opt=server_opt, engine_cfg=engine_cfg,
                           config_chunk=config_chunk)
    if mesh is not None:
        inner = fn

        def fn(states, cohorts, keys):  # noqa: F811  (the sharded form of the same step)
            specs = tuple(Cohort(P(), P(), P(CONFIG_AXIS), P(CONFIG_AXIS), P(CONFIG_AXIS)) for _ in cohorts)
            key_spec = P(CONFIG_AXIS) if keys.ndim == 1 else P()
            sharded = jax.shard_map(inner, mesh=mesh, in_specs=(P(CONFIG_AXIS), specs, key_spec),
                                    out_specs=P(CONFIG_AXIS), check_vma=False)
            return sharded(states, tuple(cohorts), keys)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def stack_states(states: Sequence[ServerState]) -> ServerState:
    """[n] leading axis over the configs' server states."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def unstack(tree: Any, index: int) -> Any:
    """Config `index` of a tree with a leading config axis."""
    return jax.tree.map(lambda x: x[index], tree)


def default_config_chunk(n: int, platform: str | None = None) -> int:
    """Configs vectorized at once when not given: all of them on an accelerator; one at a time (a loop over
    configs inside the program) on CPU, where the vmapped dense per-config tables lost to the loop
    (docs/sweep.md, measured)."""
    platform = platform or jax.devices()[0].platform
    return 1 if platform == "cpu" else n


def pad_configs(n: int, devices: int) -> int:
    """Config count padded up to a multiple of `devices` (devices x config chunk)."""
    if n < 1 or devices < 1:
        raise FedscopeError(f"sweep: expected >= 1 configs and devices, got {n} configs, {devices} devices")
    return -(-n // devices) * devices


def config_vectors(cohorts: Sequence[Cohort], n_clients: int,
                   per_config: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                   stacked: bool) -> tuple[Cohort, ...]:
    """The cohorts with per-config privacy vectors.

    per_config: for each config, (ids, clip, z, weight) of its participating clients: their C_k, z_k and
    aggregation weights w_k (scalars or one per id; the mean update is sum_k w_k delta_k / sum_k w_k). Other
    cohort rows get weight 0, clip inf, z 0: they take no part in that config. stacked: give the vectors a
    leading config axis [n] (a sweep program); otherwise there must be one config and the vectors stay [C] (a
    single-run program)."""
    if not stacked and len(per_config) != 1:
        raise FedscopeError(f"a single-run program takes one config's vectors, got {len(per_config)}")
    lookups = []
    for ids, clip, z, weight in per_config:
        ids = np.asarray(ids, np.int64)
        if np.any(~np.isfinite(weight)) or np.any(np.asarray(weight) <= 0):
            raise FedscopeError("config_vectors: aggregation weights must be finite and > 0 for participants")
        w_all = np.zeros(n_clients, np.float32)
        c_all = np.full(n_clients, np.inf, np.float32)
        z_all = np.zeros(n_clients, np.float32)
        w_all[ids], c_all[ids], z_all[ids] = weight, clip, z
        lookups.append((w_all, c_all, z_all))
    out = []
    for cohort in cohorts:
        rows = np.asarray(cohort.client_id)
        real = rows >= 0
        idx = np.where(real, rows, 0)
        vecs = [tuple(np.where(real, v[idx], fill).astype(np.float32) for v, fill in zip(lk, (0.0, np.inf, 0.0)))
                for lk in lookups]
        if stacked:
            w, c, z = (np.stack([v[i] for v in vecs]) for i in range(3))
        else:
            w, c, z = vecs[0]
        out.append(cohort._replace(weight=w, clip=c, noise_multiplier=z))
    return tuple(out)


def round_program(client_cfg: ClientConfig, server_opt: optax.GradientTransformation, engine_cfg: EngineConfig,
                  sweep: bool, mesh: Mesh | None = None, config_chunk: int = 0) -> Any:
    """The ahead-of-time compiled round (`round.CompiledFn`): a sweep program (leading config axis, vmapped
    `config_chunk` configs at a time, 0 = all) or the single-run program. `train.programs.PROGRAMS` keeps them,
    so runs and seeds with equal settings and shapes reuse the executables."""
    from fedscope_jax.engine.round import CompiledFn, make_round_fn

    if sweep:
        return CompiledFn(make_sweep_round_fn(client_cfg, server_opt, engine_cfg, mesh, config_chunk=config_chunk))
    return CompiledFn(make_round_fn(client_cfg, server_opt, engine_cfg, mesh))
