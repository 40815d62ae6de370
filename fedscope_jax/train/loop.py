"""The federated round loop: one or several configurations (tracks) that share their data, round by round.

One loop over rounds (big_vision's single train loop is the model) over an explicit `LoopState`, made of
named phases:

    state, records, start = restore(tracks, ...)              # fresh, or the last checkpoint (--resume)
    population = plan_population(source, n_clients, fcfg)      # round-0 data: size buckets and bucket slots
    groups = make_groups(tracks, fcfg, ...)                    # tracks that share one compiled round
    compile_groups(groups, ...)                                # chunk size (timed when 0), programs, states
    for r in range(start, fcfg.rounds):
        step = run_round(loop, r)                              # sample, cohorts, one compiled round per group
        write_round(loop, step)                                # metrics.jsonl, privacy ledger, eval, checkpoint
    facts = loop_facts(loop, ...)

Each round: sample clients (seeded by (seed, round)), ask each track's privacy session who is eligible, build
the cohorts of the union of participants once, then run one compiled round per group of tracks: a group of
one track runs the single-run program, a larger group the sweep program (engine/sweep.py: vmap over a leading
config axis; a client that does not take part in a config has weight 0 there). Everything a round uses derives
from (seed, round), so a resumed run ends where an uninterrupted one would. While the device runs round r (JAX
dispatches asynchronously), the host builds the client shards of round r + 1's sampled clients.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from fedscope_jax.engine import hosts
from fedscope_jax.engine.checkpoint import Checkpointer
from fedscope_jax.engine.cohort import ClientShard, PaddingStats
from fedscope_jax.engine.memory import ProgramTooLarge
from fedscope_jax.engine.population import Population, plan_population
from fedscope_jax.engine.round import CompiledFn, EngineConfig, client_mesh, computed_steps, shard_cohorts
from fedscope_jax.engine.server import ServerState, init_server_state, server_optimizer
from fedscope_jax.engine.sweep import (config_mesh, config_vectors, default_config_chunk, pad_configs,
                                       stack_states, unstack)
from fedscope_jax.engine.tune import autotune_chunk_size, block, candidate_chunks
from fedscope_jax.errors import FedscopeError
from fedscope_jax.train.federated_config import AUTO_CHECKPOINT_SECONDS, FederatedConfig
from fedscope_jax.train.programs import PROGRAMS, Programs
from fedscope_jax.train.selection import Selection
from fedscope_jax.utils.progress import progress

ClientSource = Callable[[int, int], ClientShard]   # (round, client) -> the client's data that round
Settings = tuple[str, float, "int | None"]          # (noise mode, secagg bound, secagg neighbours)

__all__ = ["ClientSource", "Group", "LoopState", "RoundStep", "Track", "compile_groups", "group_tracks",
           "loop_facts", "make_groups", "restore", "run_round", "run_rounds", "run_tracks", "write_round"]


@dataclasses.dataclass
class Track:
    """One configuration's host side in the round loop: where it writes, its privacy session, its validation.

    privacy: a `privacy.session.PrivacySession` (client-level DP: the plan's C_k, z_k, budget stops, ledger),
    or None (the raw fcfg.clip / noise_multiplier / noise_mode knobs)."""

    run_dir: Path
    privacy: Any = None
    eval_fn: Callable[[Any], dict[str, Any]] | None = None
    selection: Selection | None = None   # best validated round, early stopping (needs eval_fn); None: final
    weights: np.ndarray | None = None    # float [n_clients]: aggregation weight w_k of each client (None: all 1;
    #                                      train.federated.aggregation_weights), public inputs only

    @property
    def stopped(self) -> bool:
        return self.selection is not None and self.selection.stopped


# ---- groups: tracks that share one compiled round ----------------------------------------------------------

def engine_settings(track: Track, fcfg: FederatedConfig) -> Settings:
    """(noise mode, secagg bound, secagg neighbours) of a track: static parts of its round program."""
    if track.privacy is not None:
        bound = track.privacy.secagg_bound()
        return track.privacy.noise_mode, bound, track.privacy.config.secagg_neighbors if bound > 0 else None
    return fcfg.noise_mode, 0.0, None


def group_tracks(tracks: Sequence[Track], fcfg: FederatedConfig) -> list[tuple[Settings, list[int]]]:
    """Tracks that can share one compiled round, in first-appearance order: equal noise mode and secure
    aggregation. A track without noise (noise mode "off": z = 0 for every client) joins a "sum" group when
    there is one (its zero noise adds exactly 0); central DP and per-client noise are separate programs."""
    settings = [engine_settings(t, fcfg) for t in tracks]
    keys = []
    for s in settings:
        if s[0] == "off" and ("sum", 0.0, None) in settings:
            s = ("sum", 0.0, None)
        keys.append(s)
    groups: dict[Settings, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.items())


class Group:
    """Tracks sharing one compiled round: the single-run program (one track; the client axis on the
    "clients" mesh over several devices) or the sweep program (several; the config axis on the "configs"
    mesh, padded to a multiple of the devices with inactive slots). Holds the group's server state."""

    def __init__(self, settings: Settings, members: list[int], devices: int, config_chunk: int = 0,
                 group_mean: bool = False, sequential: bool = False):
        self.settings, self.members, self.group_mean = settings, members, group_mean
        self.sequential = sequential   # the chunk's clients one after another (EngineConfig.sequential)
        self.sweep = len(members) > 1
        per_device = -(-len(members) // devices)
        self.config_chunk = min(config_chunk or default_config_chunk(per_device), per_device)
        self.n_slots = pad_configs(len(members), devices * self.config_chunk) if self.sweep else 1
        self.devices = devices
        self.mesh = (config_mesh() if self.sweep else client_mesh()) if devices > 1 else None
        self.chunk: int = 1
        self.tuning: dict[int, float] = {}
        self.fn: CompiledFn | None = None
        self.state: ServerState | None = None

    def multiple(self, chunk: int) -> int:
        """Cohort client counts must be a multiple of this (chunks per device)."""
        return chunk if self.sweep else self.devices * chunk

    def engine_config(self, chunk: int) -> EngineConfig:
        mode, bound, neighbors = self.settings
        return EngineConfig(chunk, mode, bound, neighbors if neighbors is not None else 16, self.group_mean,
                            self.sequential)

    def program(self, programs: Programs, client_cfg: Any, server_opt: Any, chunk: int) -> CompiledFn:
        return programs.round_program(client_cfg, server_opt, self.engine_config(chunk), self.sweep, self.mesh,
                                      self.config_chunk if self.sweep else 0)

    def stacked(self, member_states: Sequence[ServerState]) -> ServerState:
        """The group's state from its members' states (a sweep: stacked, padded with copies of the last)."""
        if not self.sweep:
            return member_states[0]
        padded = list(member_states) + [member_states[-1]] * (self.n_slots - len(member_states))
        return stack_states([jax.tree.map(lambda x: jax.numpy.array(x, copy=True), s) for s in padded])

    def inputs(self, cohorts: Sequence[Any], n_clients: int,
               per_track: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[Any, ...]:
        """The cohorts with the members' (ids, C_k, z_k, w_k) vectors (a sweep: stacked over padded config slots)."""
        per = [per_track[i] for i in self.members]
        if not self.sweep:
            out = config_vectors(cohorts, n_clients, per, stacked=False)
            return shard_cohorts(out, self.mesh) if self.mesh is not None else out
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
        per = per + [empty] * (self.n_slots - len(per))  # inactive padding configs (config mesh)
        return config_vectors(cohorts, n_clients, per, stacked=True)

    def state_of(self, track: int) -> ServerState:
        """The server state of track `track` (a member)."""
        return unstack(self.state, self.members.index(track)) if self.sweep else self.state


def make_groups(tracks: Sequence[Track], fcfg: FederatedConfig, devices: int, config_chunk: int = 0,
                pooled: bool = False) -> list[Group]:
    """One `Group` per set of tracks that share a compiled round (`group_tracks`). Distributed noise runs its
    one chunk of every silo one silo after another: at the pooled rate a silo's batch grows with its users, and
    vmapped, every silo would compute the largest silo's padded batch (docs/privacy.md, "Where that time
    goes"). pooled: the batches are drawn at the pooled rate (`UserSteps.pooled`) for every track, e.g. a
    distributed sweep's eps-inf point, which trains on the variant's batches without its noise: the same."""
    return [Group(settings, members, devices, config_chunk, fcfg.aggregate == "group_mean",
                  pooled or all(_distributed(tracks[i]) for i in members))
            for settings, members in group_tracks(tracks, fcfg)]


# ---- the loop's state ------------------------------------------------------------------------------------

class CompileMeter:
    """Compile seconds this loop adds to the (process-wide, cached) programs it uses."""

    def __init__(self) -> None:
        self._used: dict[int, tuple[CompiledFn, float, int]] = {}

    def use(self, program: CompiledFn) -> CompiledFn:
        self._used.setdefault(id(program), (program, program.compile_seconds, program.compiles))
        return program

    def seconds(self) -> float:
        return sum(p.compile_seconds - before for p, before, _ in self._used.values())

    def compiles(self) -> int:
        return sum(p.compiles - n for p, _, n in self._used.values())


@dataclasses.dataclass
class LoopState:
    """Everything the round loop reads and advances; the phases below take and update it."""

    tracks: list[Track]
    fcfg: FederatedConfig
    source: ClientSource
    population: Population
    groups: list[Group]
    key: jax.Array                          # the run's key; round r's keys derive from it inside the program
    table_rows: Mapping[str, int]
    records: list[list[dict[str, Any]]]     # per track: every round's metrics.jsonl record
    checkpointers: list[Checkpointer]
    meter: CompileMeter
    multiple: int = 1                       # cohort client counts are a multiple of this (every group's chunks)
    ahead: tuple[int, dict[int, ClientShard]] = (-1, {})   # (round, its shards) built while the previous ran
    checkpointed: float = 0.0               # time.perf_counter() of the last checkpoint (or of the first round)

    def group_of(self, track: int) -> Group:
        return next(g for g in self.groups if track in g.members)


@dataclasses.dataclass(frozen=True)
class RoundStep:
    """What one round produced, before it is written: its participants and each track's round metrics."""

    round: int                   # 0-based
    ids: list[np.ndarray]        # per track: its participants
    pad: PaddingStats | None     # the round's padded steps (None when nobody took part)
    metrics: dict[int, Any]      # per track that trained: the round program's RoundMetrics (host arrays)
    seconds: float


# ---- phases ----------------------------------------------------------------------------------------------

def restore(tracks: Sequence[Track], params: Any, server_opt: Any, resume: bool
            ) -> tuple[list[ServerState], list[list[dict[str, Any]]], list[Checkpointer], int]:
    """Each track's starting server state and records: fresh, or (resume) its last checkpoint, with
    metrics.jsonl truncated to the rounds the checkpoint covers and the privacy ledger restored with it.
    Returns (states, records, checkpointers, start round)."""
    init = init_server_state(params, server_opt)
    ckpts = [Checkpointer(hosts.primary_dir(t.run_dir) / "checkpoints") for t in tracks]   # shared by hosts
    records: list[list[dict[str, Any]]] = [[] for _ in tracks]
    states = []
    for i, (t, ckpt) in enumerate(zip(tracks, ckpts)):
        metrics_path = t.run_dir / "metrics.jsonl"
        if resume:
            done = ckpt.latest_round() or 0
            if metrics_path.exists():
                for line in metrics_path.read_text(encoding="utf-8").splitlines():
                    rec = json.loads(line)
                    if rec["round"] <= done:
                        records[i].append(rec)
            sel = t.selection
            if sel is not None:   # the selection as of the checkpoint: its records, its best params
                sel.replay(records[i])
            state, best = ckpt.restore_with_best(init, with_best=bool(sel is not None and sel.best_round))
            if best is not None:
                sel.best_params = best
            # only once the checkpoint is read: a resume that fails (no checkpoint yet) keeps the log whole
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records[i]), encoding="utf-8")
        elif ckpt.latest_round() is not None:
            raise FedscopeError(f"{t.run_dir}: holds checkpoints of another run; use --resume or --force")
        else:
            state = init_server_state(params, server_opt)
        states.append(state)
    starts = {int(s.round) for s in states}
    if len(starts) > 1:
        raise FedscopeError(f"resume: the configurations' checkpoints are at different rounds {sorted(starts)}")
    start = starts.pop()
    for t in tracks:
        if t.privacy is not None:
            t.privacy.load_state(t.run_dir, start)
    return states, records, ckpts, start


def _vectors(track: Track, fcfg: FederatedConfig, ids: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, C_k, z_k, w_k) of a track's participants: its privacy plan's C_k, z_k (or the raw engine knobs) and
    its aggregation weights (1 without `track.weights`)."""
    k = len(ids)
    weight = np.ones(k, np.float32) if track.weights is None else np.asarray(track.weights, np.float32)[ids]
    if track.privacy is not None:
        return (ids, *track.privacy.round_vectors(ids), weight)
    return ids, np.full(k, fcfg.clip, np.float32), np.full(k, fcfg.noise_multiplier, np.float32), weight


def compile_groups(loop: LoopState, states: Sequence[ServerState], params: Any, client_cfg: Any, server_opt: Any,
                   programs: Programs, start: int, chunks: Sequence[int] | None = None) -> None:
    """Each group's client chunk (fcfg.chunk_size, or the fastest candidate timed on the first round's cohorts
    when it is 0; with `chunks`, one per track, the chunk its first track had in an earlier loop, e.g. a sweep's
    first seed, compiled without timing, or the smaller candidates timed where it no longer fits), its compiled
    program and its server state; then the loop's cohort multiple."""
    fcfg, pop = loop.fcfg, loop.population
    if chunks is not None and len(chunks) != len(loop.tracks):
        raise ValueError(f"compile_groups: {len(chunks)} chunk sizes for {len(loop.tracks)} tracks")
    probe = jax.tree.map(np.asarray, init_server_state(params, server_opt))
    first_ids, first_union = pop.participants(start, [None] * len(loop.tracks))
    largest = max(pop.capacity)  # the most client slots of any bucket bounds the chunk sizes worth timing
    for g in loop.groups:
        if g.settings[1] > 0 and fcfg.chunk_size == 1:
            raise FedscopeError("--secagg sums each chunk of clients securely: --chunk-size 1 would reveal every "
                                "client's update; use --chunk-size >= 2 (or 0 to pick one)")
        chunk, tuning = fcfg.chunk_size, {}
        if any(_distributed(loop.tracks[i]) for i in g.members):
            chunk = _whole_cohort_chunk(fcfg.chunk_size, pop.capacity, g.devices)

        def prepared(c: int, g: Group = g) -> tuple[CompiledFn, list[Any]]:
            """Group g's program at chunk c and the arguments of one round on the first round's cohorts."""
            program = loop.meter.use(g.program(programs, client_cfg, server_opt, c))
            cohorts, _ = pop.cohorts(loop.source, start, first_union, g.multiple(c), loop.table_rows)
            per = [_vectors(t, fcfg, first_ids[i]) for i, t in enumerate(loop.tracks)]
            state = g.stacked([init_server_state(probe.params, server_opt)] * len(g.members))
            return program, [state, g.inputs(cohorts, pop.n_clients, per), loop.key]

        def thunk_for(c: int, prepared: Callable[[int], tuple[CompiledFn, list[Any]]] = prepared
                      ) -> Callable[[], Any]:
            program, args = prepared(c)

            def thunk() -> Any:
                args[0], _ = program(*args)
                return args[0]
            return thunk
        ceiling = None
        if chunk == 0 and chunks is not None:   # chosen on these configurations before: timing compiles each try
            before = int(chunks[g.members[0]])
            try:   # compiled, not timed; refused before it runs where this loop's larger shapes do not fit
                program, args = prepared(before)
                program.compile(*args)
                chunk = before
            except ProgramTooLarge:
                ceiling = before   # time the smaller candidates instead
        if chunk == 0:
            candidates = candidate_chunks(largest, 1 if g.sweep else g.devices)
            if g.settings[1] > 0:  # a secure-aggregation group is one chunk: a chunk of one client hides nothing
                candidates = [c for c in candidates if c >= 2] or [2]
            if ceiling is not None:
                candidates = [c for c in candidates if c < ceiling] or candidates[:1]
            try:
                chunk, tuning = autotune_chunk_size(thunk_for, candidates)
            except ProgramTooLarge as exc:
                raise FedscopeError(f"{exc}; even the smallest chunk does not fit: lower train.batch_size, "
                                    "model.dim or model.max_len") from None
        g.chunk, g.tuning = chunk, tuning
        g.fn = loop.meter.use(g.program(programs, client_cfg, server_opt, chunk))
        g.state = g.stacked([states[i] for i in g.members])
    loop.multiple = math.lcm(*(g.multiple(g.chunk) for g in loop.groups))
    # every program compiled now, on the first round's shapes (the rounds reuse them), so a chunk that cannot
    # fit the device's memory is refused before anything trains, with a size that fits
    if not len(first_union):
        return
    cohorts, _ = pop.cohorts(loop.source, start, first_union, loop.multiple, loop.table_rows)
    per = [_vectors(t, fcfg, first_ids[i]) for i, t in enumerate(loop.tracks)]
    error = None
    for g in loop.groups:
        try:
            g.fn.compile(g.state, g.inputs(cohorts, pop.n_clients, per), loop.key)
        except ProgramTooLarge as exc:
            distributed = any(_distributed(loop.tracks[i]) for i in g.members)
            error = FedscopeError(f"--chunk-size {g.chunk}: {exc}; "
                                  f"{_chunk_that_fits(g.chunk, exc, g.settings[1] > 0, distributed)}")
            break
    hosts.all_ok(error)   # each host checks its own memory: one that refuses stops the others too


def _chunk_that_fits(chunk: int, exc: ProgramTooLarge, secure: bool = False, distributed: bool = False) -> str:
    """The advice for a per-device chunk whose program does not fit: the largest smaller candidate within the
    measured share (memory grows with the chunk; part of it does not, so the scaled size errs small); a
    secure-aggregation group needs chunks of >= 2, distributed noise one chunk of every silo."""
    smaller = "lower train.batch_size, model.dim or model.max_len"
    if distributed:
        return f"distributed noise needs every silo in one chunk: {smaller}, or train fewer silos"
    scaled = chunk * exc.available / exc.needed
    fits = [c for c in candidate_chunks(chunk) if c < chunk and c <= scaled and (c >= 2 or not secure)]
    if not fits:
        return f"a smaller chunk may not fit either: {smaller}"
    return f"use --chunk-size {fits[-1]} (or 0: the fastest chunk that fits is chosen)"


def _distributed(track: Track) -> bool:
    return track.privacy is not None and track.privacy.plan.mode == "distributed"


def _whole_cohort_chunk(chunk_size: int, capacity: Sequence[int], devices: int) -> int:
    """Distributed noise is central only if one secure sum spans every silo: one cohort, one chunk, one
    device (each chunk, and each device's partial sum, is a secure-aggregation group of its own). A chunk
    size below the silo count was refused before the run (`train.federated.check_distributed`)."""
    if devices > 1 or len(capacity) > 1:
        raise FedscopeError(f"--privacy distributed: the secure sum must span every silo in one group, but the "
                            f"round runs on {devices} devices in {len(capacity)} cohorts; run on one device "
                            f"(e.g. CUDA_VISIBLE_DEVICES=0) with --max-buckets 1")
    return max(chunk_size, capacity[0])


def run_round(loop: LoopState, r: int) -> RoundStep:
    """Round r (0-based) of every group: participants (sampled, eligible under each track's budget), their
    cohorts, one compiled round per group that has a participant (a group with none only advances its round
    counter, as a skipped round)."""
    t0 = time.perf_counter()
    fcfg, pop = loop.fcfg, loop.population
    eligible = [t.privacy.begin_round(r + 1) if t.privacy is not None else None for t in loop.tracks]
    ids, union = pop.participants(r, eligible)
    ready = loop.ahead[1] if loop.ahead[0] == r else None
    cohorts, pad = (pop.cohorts(loop.source, r, union, loop.multiple, loop.table_rows, ready) if len(union)
                    else ((), None))
    per = [_vectors(t, fcfg, ids[i]) for i, t in enumerate(loop.tracks)]
    dispatched: list[tuple[Group, Any]] = []
    for g in loop.groups:
        if not any(len(ids[i]) for i in g.members):  # nobody takes part: the round is skipped
            g.state = g.state._replace(round=g.state.round + 1)
            continue
        g.state, out = g.fn(g.state, g.inputs(cohorts, pop.n_clients, per), loop.key)
        dispatched.append((g, out))
    loop.ahead = prefetch(loop, r + 1)   # the device computes round r meanwhile (asynchronous dispatch)
    metrics: dict[int, Any] = {}
    for g, out in dispatched:
        out = hosts.fetch(out)
        for slot, i in enumerate(g.members):
            metrics[i] = unstack(out, slot) if g.sweep else out
    block([g.state for g in loop.groups])
    return RoundStep(r, ids, pad, metrics, time.perf_counter() - t0)


def prefetch(loop: LoopState, r: int) -> tuple[int, dict[int, ClientShard]]:
    """(r, the shards of round r's sampled clients): every client a track may let take part (the budgets are
    asked at the round itself; a shard built for a client they then refuse is dropped). None past the last
    round or once every track has stopped. A shard that fails to build is left to round r, which builds it
    again and raises there, after round r - 1 is written (and checkpointed when due)."""
    if r >= loop.fcfg.rounds or all(t.stopped for t in loop.tracks):
        return -1, {}
    try:
        return r, {int(c): loop.source(r, int(c)) for c in loop.population.sampled(r)}
    except Exception:   # noqa: BLE001 - deterministic: round r raises it again, in its place
        return -1, {}


def round_record(metrics: Any, pad: PaddingStats, ids: np.ndarray, seconds: float,
                 computed: int) -> dict[str, Any]:
    """metrics.jsonl facts of one track's round; `ids` are its participants (other cohort rows are padding,
    or clients taking part in other configs of a sweep only); `computed`: the local steps its program
    computed (`engine.round.computed_steps`)."""
    cat = lambda field: np.concatenate([np.asarray(getattr(r, field)) for r in metrics.reports])  # noqa: E731
    cids, loss, steps, norm = cat("client_id"), cat("loss"), cat("steps"), cat("norm")
    factor, included = cat("clip_factor"), cat("included")
    real = np.isin(cids, np.asarray(ids)) & (cids >= 0)
    inc = included & real
    w = steps * inc
    return {
        "clients": int(len(ids)),
        "included": int(inc.sum()),
        "excluded_nonfinite": [int(i) for i in cids[real & ~included & (steps > 0)]],
        "loss": float(np.sum(loss * w) / max(np.sum(w), 1)),
        "update_norm": float(metrics.update_norm),
        "client_update_norm_mean": float(np.mean(norm[inc])) if inc.any() else 0.0,
        "client_update_norm_max": float(np.max(norm[inc])) if inc.any() else 0.0,
        "clipped_fraction": float(np.mean(factor[inc] < 1.0)) if inc.any() else 0.0,
        "noise_std": float(metrics.noise_std),
        "padding_waste": pad.waste,
        "real_steps": pad.real_steps,   # local steps of the round's cohorts (every config of a sweep)
        "slot_steps": pad.slot_steps,   # the cohorts' step slots, padding included
        "computed_steps": computed,     # the steps computed (a chunk of one client skips its padding steps)
        "seconds": seconds,
    }


def norms_of(metrics: Any, ids: np.ndarray) -> np.ndarray:
    """Raw update norms of the clients `ids` (in that order) from a round's per-cohort reports."""
    by_id = {}
    for rep in metrics.reports:
        for cid, norm in zip(np.asarray(rep.client_id), np.asarray(rep.norm)):
            if cid >= 0:
                by_id[int(cid)] = float(norm)
    return np.array([by_id.get(int(c), np.nan) for c in ids], np.float32)


def write_round(loop: LoopState, step: RoundStep, logs: Sequence[Any]) -> bool:
    """Each track's record of the round (privacy ledger advanced with it), validation every eval_every rounds
    and at the end (a selecting track keeps its best round and stops after patience validations without
    gain), the checkpoint (ledger state first), and the metrics.jsonl line. A stopped track of a sweep is
    still computed (its config slot) but writes no record. Returns whether every track has stopped."""
    fcfg, r = loop.fcfg, step.round
    for i, t in enumerate(loop.tracks):
        if t.stopped:
            continue
        g = loop.group_of(i)
        ids = step.ids[i]
        record: dict[str, Any]
        if len(ids) == 0:
            record = {"clients": 0, "included": 0, "seconds": step.seconds}
        else:
            metrics = step.metrics[i]
            computed = computed_steps(step.pad, g.chunk, 1 if g.sweep else g.devices)
            record = round_record(metrics, step.pad, ids, step.seconds, computed)
            if metrics.secagg_error is not None:
                record["secagg_max_abs_error"] = float(metrics.secagg_error)
        record = {"round": r + 1, **record}
        if _distributed(t) and record.get("excluded_nonfinite"):
            raise FedscopeError(f"{t.run_dir}: round {r + 1}: silos {record['excluded_nonfinite']} sent a non-finite "
                                f"update, so the secure sum lacks their noise shares and the round is not "
                                f"accounted for; the run stops (lower --client-lr)")
        if t.privacy is not None:
            norms = norms_of(step.metrics[i], ids) if len(ids) else np.zeros(0, np.float32)
            record["participant_ids"] = [int(c) for c in ids]
            record.update(t.privacy.end_round(r + 1, ids, norms))
        if not math.isfinite(record.get("loss", 0.0)):
            raise FedscopeError(f"{t.run_dir}: round {r + 1}: training loss is not finite; lower --client-lr")
        last = r + 1 == fcfg.rounds
        if t.eval_fn is not None and ((r + 1) % fcfg.eval_every == 0 or last):
            state_i = g.state_of(i)
            record["valid"] = t.eval_fn(state_i.params)
            if t.selection is not None and t.selection.observe(r + 1, float(record["valid"]["select"]),
                                                               lambda: hosts.fetch(state_i.params)) and not last:
                record["stopped_early"] = True   # patience ran out before the round budget did
        elif t.selection is not None:
            t.selection.last_round = r + 1
        logs[i].write(json.dumps(record) + "\n")
        logs[i].flush()
        loop.records[i].append(record)
    stopped = all(t.stopped for t in loop.tracks)
    # checkpoint_due first: with the default cadence it is a collective (hosts.agree) every process calls each round
    if checkpoint_due(fcfg, r, loop.checkpointed) or r + 1 == fcfg.rounds or stopped:
        for i, t in enumerate(loop.tracks):   # every track at the same round (a stopped one too): resume
            if t.privacy is not None:  # first: a checkpoint on disk always has its ledger state
                t.privacy.save_state(t.run_dir, r + 1)
            best = t.selection.best_params if t.selection is not None else None
            loop.checkpointers[i].save(loop.group_of(i).state_of(i), best=best)
        loop.checkpointed = time.perf_counter()
    return stopped


def checkpoint_due(fcfg: FederatedConfig, r: int, checkpointed: float) -> bool:
    """Whether round r (0-based) ends with a checkpoint: every fcfg.checkpoint_every rounds, or (0) once
    AUTO_CHECKPOINT_SECONDS have passed since `checkpointed` on process 0's clock. Any round resumes exactly
    (everything else derives from (seed, round)), so the choice changes no result, only what a kill loses."""
    if fcfg.checkpoint_every:
        return (r + 1) % fcfg.checkpoint_every == 0
    return hosts.agree(time.perf_counter() - checkpointed >= AUTO_CHECKPOINT_SECONDS)


def loop_facts(loop: LoopState, timing: dict[str, Any], start: int, devices: int) -> list[dict[str, Any]]:
    """Per track: the engine facts of summary.json's "federated" section (the privacy summary included)."""
    pop, facts = loop.population, []
    for i, t in enumerate(loop.tracks):
        g = loop.group_of(i)
        f = {"chunk_size": g.chunk, "chunk_tuning_seconds": {str(k): v for k, v in g.tuning.items()},
             "buckets": [{"steps": s, "vocab": dict(v), "slots": c}
                         for s, v, c in zip(pop.plan.steps, pop.plan.vocab_sizes, pop.capacity)],
             "devices": devices, "trainable_clients": len(pop.trainable), "start_round": start,
             "program": {"noise_mode": g.settings[0], "configs": len(g.members), "sweep": g.sweep,
                         "config_chunk": g.config_chunk if g.sweep else 1, "sequential": g.sequential},
             "timing": timing,
             "aggregation_weights": None if t.weights is None else [float(w) for w in t.weights]}  # None: all 1
        if t.privacy is not None:
            f["privacy"] = t.privacy.finish(t.run_dir)
        facts.append(f)
    return facts


# ---- the loop ----------------------------------------------------------------------------------------------

def run_tracks(tracks: Sequence[Track], source: ClientSource, n_clients: int, params: Any, client_cfg: Any,
               fcfg: FederatedConfig, table_rows: Mapping[str, int] | None = None, resume: bool = False,
               desc: str = "train (federated)", config_chunk: int = 0, programs: Programs | None = None,
               chunks: Sequence[int] | None = None, pooled: bool = False
               ) -> tuple[list[ServerState], list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The round loop of one or several configurations that share their data (same fcfg, seed, source); each
    track writes its own metrics.jsonl, checkpoints/ and ledger.

    config_chunk: configurations a sweep program vectorizes at once (0: `engine.sweep.default_config_chunk`).
    programs: the compiled-program cache (default: the process's `train.programs.PROGRAMS`).
    chunks: with fcfg.chunk_size 0, each track's client chunk chosen before (`facts[i]["chunk_size"]` of a
    loop over the same configurations, e.g. a sweep's first seed), used instead of timing the candidates again
    (each candidate is a compilation). pooled: `source` draws every silo's users at the pooled rate
    (`UserSteps.pooled`), so every group runs its chunk one silo after another (`make_groups`).
    Returns per track: (final server state, records, facts); facts["timing"] holds the loop's compile and
    training seconds (the same for every track of the call)."""
    t_loop = time.perf_counter()
    tracks = list(tracks)
    if not tracks:
        raise FedscopeError("run_tracks: no configuration to train")
    programs = programs if programs is not None else PROGRAMS
    server_opt = server_optimizer(fcfg.server_opt, fcfg.server_lr)
    states, records, ckpts, start = restore(tracks, params, server_opt, resume)
    devices = jax.device_count()
    loop = LoopState(tracks, fcfg, source, plan_population(source, n_clients, fcfg),
                     make_groups(tracks, fcfg, devices, config_chunk, pooled),
                     jax.random.fold_in(jax.random.key(fcfg.seed), 0xE6), dict(table_rows or {}), records, ckpts,
                     CompileMeter())
    compile_groups(loop, states, params, client_cfg, server_opt, programs, start, chunks)
    compile_before = loop.meter.seconds()
    t_rounds = time.perf_counter()
    logs = [open(t.run_dir / "metrics.jsonl", "a", encoding="utf-8") for t in tracks]
    bar = progress(total=fcfg.rounds, initial=start, desc=desc, unit="round")
    loop.checkpointed = time.perf_counter()
    try:
        for r in range(start, fcfg.rounds):
            if all(t.stopped for t in tracks):   # resumed after every track stopped early
                break
            stopped = write_round(loop, run_round(loop, r), logs)
            bar.update(1)
            rec0 = loop.records[0][-1]
            bar.set_postfix(loss=f"{rec0.get('loss', float('nan')):.3f}", clients=rec0["clients"])
            if stopped:
                break
    finally:
        bar.close()
        for log in logs:
            log.close()
        for ckpt in ckpts:
            ckpt.close()
    compile_seconds = loop.meter.seconds() - compile_before
    loop_seconds = time.perf_counter() - t_rounds
    timing = {"compile_seconds": compile_seconds + compile_before, "train_seconds": loop_seconds - compile_seconds,
              "setup_seconds": t_rounds - t_loop, "chunk_tuning_compile_seconds": compile_before,
              "round_programs_compiled": loop.meter.compiles()}
    finals = [loop.group_of(i).state_of(i) for i in range(len(tracks))]
    return finals, loop.records, loop_facts(loop, timing, start, devices)


def run_rounds(run_dir: str | Path, source: ClientSource, n_clients: int, params: Any, client_cfg: Any,
               fcfg: FederatedConfig, table_rows: Mapping[str, int] | None = None,
               eval_fn: Callable[[Any], dict[str, Any]] | None = None, resume: bool = False,
               desc: str = "train (federated)", privacy: Any = None, programs: Programs | None = None
               ) -> tuple[ServerState, list[dict[str, Any]], dict[str, Any]]:
    """`run_tracks` with one track: rounds [start, fcfg.rounds) of one configuration under `run_dir`.

    privacy: a `privacy.session.PrivacySession` (client-level DP): it replaces fcfg's clip / noise knobs
    with the plan's per-client C_k, z_k, refuses clients out of budget, and writes privacy_ledger.arrow
    (facts["privacy"] = its summary)."""
    states, records, facts = run_tracks([Track(Path(run_dir), privacy, eval_fn)], source, n_clients, params,
                                        client_cfg, fcfg, table_rows, resume, desc, programs=programs)
    return states[0], records[0], facts[0]
