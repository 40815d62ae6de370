"""A federated round as ONE jitted program, and the sequential reference it must agree with.

The sampled clients come as a tuple of `Cohort`s (buckets of clients padded to a common number of steps
and vocabulary size). For each cohort, the client axis is laid on the mesh axis "clients" (shard_map);
each device runs its clients in chunks: `lax.scan` over chunks of `vmap(client_update)` (a chunk of one
client: `client_update` itself, so data-dependent branches stay branches), folding every chunk's clipped
(and optionally noised) deltas into dense sums, so memory is bounded by one chunk. The
partial sums are `psum`-ed over devices, divided by the total weight (with group means: each parameter group's
by its clients' weight), and fed to the server optimizer.
Keys: round r uses fold_in(key, r); client k trains with fold_in(train_key, id_k) and noises with
fold_in(noise_key, id_k), so results do not depend on bucketing, chunking, sharding or padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedscope_jax.engine import memory
from fedscope_jax.engine.aggregate import (NOISE_MODES, Accumulator, ClientReport, accumulate_chunk,
                                           add_accumulators, finalize, zeros_accumulator)
from fedscope_jax.engine.client import ClientConfig, ClientData, UserNoise, client_update
from fedscope_jax.engine.cohort import Cohort
from fedscope_jax.engine.server import ServerState, server_step
from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import mechanism

PyTree = Any
AXIS = "clients"


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How a round is executed: clients per vmapped chunk (per device; 1: not vmapped) and the noise mode.

    secagg_bound > 0 sums each chunk with simulated secure aggregation (privacy.secagg) over the coordinate
    range [-secagg_bound, secagg_bound], with `secagg_neighbors` masking partners per client. group_mean:
    each top-level parameter group is averaged over the clients that changed it (engine/aggregate.py)."""

    chunk_size: int = 1
    noise_mode: str = "off"
    secagg_bound: float = 0.0
    secagg_neighbors: int | None = 16
    group_mean: bool = False
    sequential: bool = False   # a chunk's clients one after another (lax.map), each computing its own work only

    @property
    def secagg(self) -> tuple[float, int | None] | None:
        return (self.secagg_bound, self.secagg_neighbors) if self.secagg_bound > 0 else None

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise FedscopeError(f"chunk_size: expected >= 1, got {self.chunk_size}")
        if not self.secagg_bound >= 0:
            raise FedscopeError(f"secagg_bound: expected >= 0, got {self.secagg_bound}")
        if self.noise_mode not in NOISE_MODES:
            raise FedscopeError(f"noise_mode: expected one of {', '.join(NOISE_MODES)}, got {self.noise_mode!r}")
        if self.group_mean and (self.noise_mode != "off" or self.secagg_bound > 0):
            raise FedscopeError("group_mean: only without noise and secure aggregation (its denominators depend "
                                "on which clients changed a group, which no DP analysis here covers)")


class RoundMetrics(NamedTuple):
    """What a round reports: per-cohort client reports and aggregate facts."""

    reports: tuple[ClientReport, ...]
    update_norm: jax.Array   # L2 norm of the (noised) mean update
    weight_sum: jax.Array
    noise_std: jax.Array     # std of the noise in the mean update (per coordinate)
    secagg_error: jax.Array | None = None  # max |secure sum - plain sum| over coordinates (with secagg)


def _round_keys(key: jax.Array, round_index: jax.Array) -> tuple[jax.Array, jax.Array]:
    round_key = jax.random.fold_in(key, round_index)
    return jax.random.fold_in(round_key, 0), jax.random.fold_in(round_key, 1)


def _user_noise(c: Cohort, noise_key: jax.Array) -> UserNoise:
    """The user unit: each client's C_k, z_k and noise key (purpose 4 of the round's noise key) for its DP-SGD."""
    return UserNoise(c.clip, c.noise_multiplier,
                     mechanism.contributor_keys(jax.random.fold_in(noise_key, 4), c.client_id))


def _aggregation_inputs(c: Cohort, client_cfg: ClientConfig) -> tuple[jax.Array, jax.Array]:
    """(C_k, z_k) the aggregation applies: the cohort's for the client unit; none (inf, 0) for the user unit,
    whose updates were noised inside the local DP-SGD steps and are summed as they are."""
    if client_cfg.expected_batch:
        return jnp.full_like(c.clip, jnp.inf), jnp.zeros_like(c.noise_multiplier)
    return c.clip, c.noise_multiplier


def _local_round(params: PyTree, c: Cohort, train_key: jax.Array, noise_key: jax.Array, client_cfg: ClientConfig,
                 engine_cfg: EngineConfig, acc: Accumulator) -> tuple[Accumulator, ClientReport]:
    """A chunk of clients (leading axis [c]): vmapped local training, then clipping, noise and the sum.

    The client unit clips and noises each client's update here (`accumulate_chunk`); the user unit
    (client_cfg.expected_batch > 0) runs DP-SGD inside each client's steps with the cohort's C_k, z_k, and its
    updates are summed as they are (a post-processing of the user-level mechanism)."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(train_key, c.client_id)
    clip, z = _aggregation_inputs(c, client_cfg)
    noise = _user_noise(c, noise_key) if client_cfg.expected_batch else None
    deltas, stats = _clients_update(params, c.data, keys, client_cfg, noise, engine_cfg.sequential)
    return accumulate_chunk(acc, deltas, stats.loss, stats.steps, c.data.vocab, c.client_id, c.weight, clip, z,
                            noise_key, client_cfg.sparse_tables, engine_cfg.noise_mode, engine_cfg.secagg)


def _clients_update(params: PyTree, data: ClientData, keys: jax.Array, client_cfg: ClientConfig,
                    noise: UserNoise | None, sequential: bool = False) -> tuple[PyTree, Any]:
    """`client_update` of a chunk of clients (leading axis [c]): vmapped, or for a chunk of one called on the
    client itself, so that data-dependent branches stay branches (under vmap a `lax.cond` whose predicate
    differs across clients computes both sides: e.g. the loss's skip of a domain a client does not hold, or
    its padding steps, which a chunk of one skips). sequential: the chunk's clients one after another
    (`lax.map`), each on its own as a chunk of one is, so each computes its real steps and, in the user unit,
    the microbatches up to its own last real user only (a vmapped chunk runs every client up to the largest
    one's)."""
    if sequential and keys.shape[0] > 1:
        def one(xs: tuple[ClientData, jax.Array, UserNoise | None]) -> tuple[PyTree, Any]:
            return client_update(params, xs[0], xs[1], client_cfg, xs[2], skip_padding=True)
        return jax.lax.map(one, (data, keys, noise))
    if skips_padding(keys.shape[0]):
        first = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
        delta, stats = client_update(params, first(data), keys[0], client_cfg, first(noise), skip_padding=True)
        return jax.tree.map(lambda x: x[None], (delta, stats))
    return jax.vmap(client_update, in_axes=(None, 0, 0, None, 0))(params, data, keys, client_cfg, noise)


def skips_padding(clients_per_chunk: int) -> bool:
    """Whether a chunk of this many clients computes its real steps only: a chunk of one client is trained on
    its own, its padding steps skipped (`_clients_update`); a vmapped chunk computes every step slot. A sweep
    shares the cohorts' data over its configs, so the same holds there (tests/test_engine_core.py)."""
    return clients_per_chunk == 1


def cohort_computed_steps(pad: Any, chunk_size: int, devices: int = 1) -> tuple[int, ...]:
    """Local steps a round program computes for each cohort counted by `pad` (`cohort.PaddingStats`): each
    cohort's client chunk is `chunk_size` at most its clients per device (`_cohort_sums`; devices: 1 for a
    sweep, whose clients are not sharded); a chunk of one computes the real steps, any other every slot."""
    return tuple(real if skips_padding(min(chunk_size, rows // devices)) else slots
                 for rows, real, slots in pad.cohorts)


def computed_steps(pad: Any, chunk_size: int, devices: int = 1) -> int:
    """Local steps a round program computes for the cohorts counted by `pad` (`cohort_computed_steps`)."""
    return sum(cohort_computed_steps(pad, chunk_size, devices))


def _cohort_sums(params: PyTree, cohort: Cohort, train_key: jax.Array, noise_key: jax.Array,
                 client_cfg: ClientConfig, engine_cfg: EngineConfig,
                 axis_name: str | None) -> tuple[Accumulator, ClientReport]:
    """This device's clients of one cohort, in chunks; partial sums psum-ed over `axis_name`."""
    n_local = cohort.client_id.shape[0]
    chunk = min(engine_cfg.chunk_size, n_local)
    if n_local % chunk:
        raise FedscopeError(f"cohort of {n_local} clients per device is not a multiple of chunk_size {chunk}; "
                            "pad clients with build_cohorts(multiple=devices*chunk_size)")
    chunks = jax.tree.map(lambda x: x.reshape((n_local // chunk, chunk) + x.shape[1:]), cohort)

    def body(acc: Accumulator, c: Cohort):
        return _local_round(params, c, train_key, noise_key, client_cfg, engine_cfg, acc)

    acc, reports = jax.lax.scan(body, zeros_accumulator(params, engine_cfg.secagg is not None,
                                                        engine_cfg.group_mean), chunks)
    reports = jax.tree.map(lambda x: x.reshape((n_local,) + x.shape[2:]), reports)
    if axis_name is not None:
        acc = jax.lax.psum(acc, axis_name)
    return acc, reports


def round_step(state: ServerState, cohorts: Sequence[Cohort], key: jax.Array, client_cfg: ClientConfig,
               server_opt: optax.GradientTransformation, engine_cfg: EngineConfig,
               mesh: Mesh | None = None) -> tuple[ServerState, RoundMetrics]:
    """One round (traceable; `make_round_fn` jits it)."""
    train_key, noise_key = _round_keys(key, state.round)
    acc = zeros_accumulator(state.params, engine_cfg.secagg is not None, engine_cfg.group_mean)
    reports = []
    for cohort in cohorts:
        if mesh is None:
            part, report = _cohort_sums(state.params, cohort, train_key, noise_key, client_cfg, engine_cfg, None)
        else:
            fn = functools.partial(_cohort_sums, client_cfg=client_cfg, engine_cfg=engine_cfg, axis_name=AXIS)
            fn = jax.shard_map(fn, mesh=mesh, in_specs=(P(), P(AXIS), P(), P()), out_specs=(P(), P(AXIS)),
                               check_vma=False)
            part, report = fn(state.params, cohort, train_key, noise_key)
        acc = add_accumulators(acc, part)
        reports.append(report)
    mean_delta, std = finalize(acc, noise_key, engine_cfg.noise_mode, *central_inputs(cohorts))
    new_state = server_step(state, mean_delta, server_opt)
    metrics = RoundMetrics(tuple(reports), optax.tree.norm(mean_delta), acc.weight_sum, std,
                           _secagg_error(acc, engine_cfg))
    return new_state, metrics


def central_inputs(cohorts: Sequence[Cohort]) -> tuple[jax.Array, jax.Array]:
    """Central DP-FedAvg: the std z x sensitivity (z max_k w_k C_k) of the one noise draw on the sum, and the
    denominator sum_k w_k over the sampled clients; both from the cohorts' public inputs, never from the
    updates (`mechanism.sum_noise_std`: z times the clipping step's sensitivity)."""
    std = jnp.max(jnp.stack([mechanism.sum_noise_std(c.weight, c.clip, c.noise_multiplier) for c in cohorts]))
    return std, sum(jnp.sum(c.weight) for c in cohorts)


def _secagg_error(acc: Accumulator, engine_cfg: EngineConfig) -> jax.Array | None:
    if engine_cfg.secagg is None:
        return None
    return jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in jax.tree.leaves(acc.agg_error)]))


def make_round_fn(client_cfg: ClientConfig, server_opt: optax.GradientTransformation,
                  engine_cfg: EngineConfig, mesh: Mesh | None = None,
                  donate: bool = True) -> Callable[[ServerState, Sequence[Cohort], jax.Array],
                                                   tuple[ServerState, RoundMetrics]]:
    """The jitted round: (state, cohorts, key) -> (state, metrics); the state buffers are donated.
    (`train.programs.PROGRAMS` keeps the compiled rounds of a process, so runs with equal settings reuse them.)"""
    fn = functools.partial(round_step, client_cfg=client_cfg, server_opt=server_opt, engine_cfg=engine_cfg,
                           mesh=mesh)
    return jax.jit(fn, donate_argnums=(0,) if donate else ())


def client_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis "clients" over `devices` (all local devices by default)."""
    devices = list(devices if devices is not None else jax.devices())
    return Mesh(np.array(devices), (AXIS,))


def shard_cohorts(cohorts: Sequence[Cohort], mesh: Mesh) -> tuple[Cohort, ...]:
    """Places every cohort's client axis on the mesh axis "clients"."""
    sharding = NamedSharding(mesh, P(AXIS))
    n = mesh.shape[AXIS]
    for c in cohorts:
        if c.client_id.shape[0] % n:
            raise FedscopeError(f"cohort of {c.client_id.shape[0]} clients is not a multiple of {n} devices")
    return tuple(jax.device_put(c, sharding) for c in cohorts)


# ---- the sequential reference --------------------------------------------------------------------------

class SequentialRunner:
    """The same `client_update`, one client at a time from a Python loop; the engine's correctness oracle
    and the baseline of every benchmark. Jitted per client (compiled once per distinct client shape).

    With secure aggregation (`engine_cfg.secagg`), the secure sum runs over the engine's groups: each cohort's
    consecutive chunks of `engine_cfg.chunk_size` rows (padding rows included, as not delivered), their clients
    still trained one at a time; so a secure round has an oracle too."""

    def __init__(self, client_cfg: ClientConfig, server_opt: optax.GradientTransformation,
                 engine_cfg: EngineConfig):
        self.client_cfg, self.server_opt, self.engine_cfg = client_cfg, server_opt, engine_cfg
        self._keys = jax.jit(_round_keys)
        self._client = jax.jit(self._one_client)
        self._train = jax.jit(self._train_fn)
        self._secure_chunk = jax.jit(self._secure_chunk_fn)
        self._finish = jax.jit(self._finish_fn)

    def _train_fn(self, params: PyTree, cohort: Cohort, train_key: jax.Array,
                  noise_key: jax.Array) -> tuple[PyTree, Any]:
        noise = None
        if self.client_cfg.expected_batch:   # the user unit: this client's DP-SGD inputs (a cohort of one)
            one = jax.tree.map(lambda x: jnp.asarray(x)[None], cohort)
            noise = jax.tree.map(lambda x: x[0], _user_noise(one, noise_key))
        return client_update(params, cohort.data, jax.random.fold_in(train_key, cohort.client_id), self.client_cfg,
                             noise)

    def _one_client(self, acc: Accumulator, params: PyTree, cohort: Cohort, train_key: jax.Array,
                    noise_key: jax.Array) -> tuple[Accumulator, ClientReport]:
        if self.client_cfg.expected_batch:   # the user unit: one client as a chunk of one (secure: _secure_cohort)
            one = jax.tree.map(lambda x: jnp.asarray(x)[None], cohort)
            acc, rep = _local_round(params, one, train_key, noise_key, self.client_cfg,
                                    dataclasses.replace(self.engine_cfg, secagg_bound=0.0), acc)
            return acc, rep
        delta, stats = self._train_fn(params, cohort, train_key, noise_key)
        one = lambda x: jnp.asarray(x)[None]  # noqa: E731  (a chunk of one client)
        return accumulate_chunk(acc, jax.tree.map(one, delta), one(stats.loss), one(stats.steps),
                                jax.tree.map(one, cohort.data.vocab), one(cohort.client_id),
                                one(cohort.weight), one(cohort.clip), one(cohort.noise_multiplier), noise_key,
                                self.client_cfg.sparse_tables, self.engine_cfg.noise_mode)

    def _secure_chunk_fn(self, acc: Accumulator, deltas: PyTree, losses: jax.Array, steps: jax.Array,
                         chunk: Cohort, noise_key: jax.Array) -> tuple[Accumulator, ClientReport]:
        clip, z = _aggregation_inputs(chunk, self.client_cfg)
        return accumulate_chunk(acc, deltas, losses, steps, chunk.data.vocab, chunk.client_id, chunk.weight,
                                clip, z, noise_key, self.client_cfg.sparse_tables,
                                self.engine_cfg.noise_mode, self.engine_cfg.secagg)

    def _finish_fn(self, state: ServerState, acc: Accumulator, noise_key: jax.Array, cohorts):
        mean_delta, std = finalize(acc, noise_key, self.engine_cfg.noise_mode, *central_inputs(cohorts))
        return server_step(state, mean_delta, self.server_opt), (optax.tree.norm(mean_delta), std)

    def _secure_cohort(self, acc: Accumulator, params: PyTree, cohort: Cohort, train_key: jax.Array,
                       noise_key: jax.Array) -> tuple[Accumulator, ClientReport]:
        n = int(cohort.client_id.shape[0])
        size = min(self.engine_cfg.chunk_size, n)
        if n % size:
            raise FedscopeError(f"cohort of {n} clients is not a multiple of chunk_size {size}")
        reports = []
        for start in range(0, n, size):
            chunk = jax.tree.map(lambda x: x[start:start + size], cohort)
            deltas, losses, steps = [], [], []
            for i in range(size):
                client = jax.tree.map(lambda x: x[i], chunk)
                if float(client.weight) <= 0.0:  # a padding row: not trained, not delivered
                    deltas.append(jax.tree.map(jnp.zeros_like, params))
                    losses.append(jnp.float32(0))
                    steps.append(jnp.int32(0))
                    continue
                delta, stats = self._train(params, client, train_key, noise_key)
                deltas.append(delta)
                losses.append(stats.loss)
                steps.append(stats.steps)
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *deltas)
            acc, rep = self._secure_chunk(acc, stacked, jnp.stack(losses), jnp.stack(steps).astype(jnp.int32),
                                          chunk, noise_key)
            reports.append(rep)
        return acc, jax.tree.map(lambda *xs: jnp.concatenate(xs), *reports)

    def __call__(self, state: ServerState, cohorts: Sequence[Cohort],
                 key: jax.Array) -> tuple[ServerState, RoundMetrics]:
        train_key, noise_key = self._keys(key, state.round)
        secure = self.engine_cfg.secagg is not None
        acc = zeros_accumulator(state.params, secure, self.engine_cfg.group_mean)
        reports = []
        for cohort in cohorts:
            if secure:   # each cohort summed from zero, then added: the engine's order (quantization-exact)
                zero = zeros_accumulator(state.params, True, self.engine_cfg.group_mean)
                part, report = self._secure_cohort(zero, state.params, cohort, train_key, noise_key)
                acc = add_accumulators(acc, part)
                reports.append(report)
                continue
            rows = []
            for i in range(int(cohort.client_id.shape[0])):
                client = jax.tree.map(lambda x: x[i], cohort)
                if float(client.weight) <= 0.0:  # a padding client: skipped, reported as not included
                    rows.append(None)
                    continue
                acc, rep = self._client(acc, state.params, client, train_key, noise_key)
                rows.append(jax.tree.map(lambda x: x[0], rep))
            reports.append(_stack_reports(rows, cohort))
        state, (norm, std) = self._finish(state, acc, noise_key, tuple(cohorts))
        return state, RoundMetrics(tuple(reports), norm, acc.weight_sum, std, _secagg_error(acc, self.engine_cfg))


def _stack_reports(rows: list, cohort: Cohort) -> ClientReport:
    filler = ClientReport(jnp.int32(0), jnp.float32(0), jnp.int32(0), jnp.float32(0), jnp.float32(1),
                          jnp.bool_(False))
    filled = [r if r is not None else filler._replace(client_id=cohort.client_id[i]) for i, r in enumerate(rows)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *filled)


# ---- ahead-of-time compilation with the compile time counted apart ---------------------------------------

class CompiledFn:
    """A jitted function compiled ahead of time once per input signature (shapes, dtypes, shardings).

    The compile seconds are counted apart (`compile_seconds`, `compiles`), so training time can be reported
    without them; calls with an already seen signature reuse the executable (e.g. across runs or seeds)."""

    def __init__(self, jitted: Callable[..., Any], what: str = "the round program"):
        self._jitted = jitted
        self._what = what
        self._executables: dict[Any, Any] = {}
        self.compile_seconds = 0.0
        self.compiles = 0

    @staticmethod
    def signature(args: tuple) -> Any:
        leaves, treedef = jax.tree.flatten(args)
        return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                              for x in leaves)

    def compile(self, *args: Any) -> Any:
        """The executable for these arguments' signature, compiled once and checked to fit the device's memory
        (`engine.memory.check_fits`: raises `ProgramTooLarge` before it ever runs); nothing is executed."""
        sig = self.signature(args)
        exe = self._executables.get(sig)
        if exe is None:
            import time

            t0 = time.perf_counter()
            exe = self._jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - t0
            self.compiles += 1
            memory.check_fits(exe, self._what)
            self._executables[sig] = exe
        return exe

    def __call__(self, *args: Any) -> Any:
        return self.compile(*args)(*args)
