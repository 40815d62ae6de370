"""`fedscope train --mode federated`: rounds of the vectorized engine, metrics, checkpoints, resume.

Each round: sample clients (seeded by (seed, round)), build their local mini-batches (seeded by (seed,
round, client)), stack them into size buckets, run ONE jitted round (vmap over clients, clip, noise,
aggregate, server optimizer), append a line to metrics.jsonl, checkpoint the server state with orbax.
`--resume RUN` restores the last checkpoint, drops metric lines of later rounds and continues: everything a
round uses derives from (seed, round), so the resumed run ends where an uninterrupted one would.

The run directory is written in place (checkpoints must survive a kill): config.json, metrics.jsonl,
checkpoints/, and at the end summary.json (atomically) and params.msgpack.
Heavy imports (jax, the model) happen inside functions so that `fedscope --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from fedscope_jax.errors import FedscopeError
from fedscope_jax.train.federated_config import FederatedConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The federated and privacy flags of `fedscope train` (and `fedscope sweep`).

    Every flag defaults to None: a flag that is given overrides the `federated` / `privacy` key of the
    --config file (train/config.py apply_flags); the defaults are those of FederatedConfig / PrivacyConfig."""
    d = FederatedConfig()
    g = p.add_argument_group("federated (--mode federated; config section `federated`; docs/engine.md)")
    g.add_argument("--clients", type=int, help=f"number of clients K (default {d.clients})")
    g.add_argument("--scheme", help="partition scheme: uniform, dirichlet, powerlaw, domain, user "
                   f"(default {d.scheme})")
    g.add_argument("--sampling", choices=["fraction", "poisson"],
                   help="client sampling per round: a fixed fraction, or Poisson with rate --fraction")
    g.add_argument("--fraction", type=float, help=f"sampled fraction / Poisson rate q (default {d.fraction:g})")
    g.add_argument("--rounds", type=int, help=f"(default {d.rounds})")
    g.add_argument("--local-epochs", type=int, help=f"(default {d.local_epochs})")
    g.add_argument("--client-lr", type=float, help=f"local Adam learning rate (default {d.client_lr:g})")
    g.add_argument("--server-opt", choices=["fedavg", "fedadam"], help=f"(default {d.server_opt})")
    g.add_argument("--server-lr", type=float, help=f"(default {d.server_lr:g})")
    g.add_argument("--chunk-size", type=int, help="clients per vmapped chunk per device (default 0: time "
                   "candidates and pick)")
    g.add_argument("--clip", type=float, help="raw per-client clipping bound (only with --privacy off; "
                   "default inf: off)")
    g.add_argument("--noise-multiplier", type=float, help="raw z (only with --privacy off; default 0: off)")
    g.add_argument("--noise-mode", choices=["off", "per_client", "sum"],
                   help="how the raw --noise-multiplier is drawn (only with --privacy off; default off)")
    g.add_argument("--max-buckets", type=int, help=f"client size buckets (default {d.max_buckets})")
    g.add_argument("--eval-every", type=int, help=f"validate every N rounds (default {d.eval_every})")
    g.add_argument("--checkpoint-every", type=int, help=f"(default {d.checkpoint_every})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    from fedscope_jax.privacy.config import add_privacy_arguments

    add_privacy_arguments(p)


def check_privacy_knobs(cfg: Any) -> None:
    """The raw engine knobs (federated.clip / noise_multiplier / noise_mode) are for `privacy.mode off` only."""
    from fedscope_jax.privacy.session import check_engine_flags

    f = cfg.federated
    check_engine_flags(cfg.privacy.mode, f.clip, f.noise_multiplier, None if f.noise_mode == "off" else f.noise_mode)


# ---- the generic round loop (any params / loss / client data source) -------------------------------------

ClientSource = Callable[[int, int], Any]   # (round, client) -> ClientShard


@dataclasses.dataclass
class Track:
    """One configuration's host side in the round loop: where it writes, its privacy session, its validation.

    privacy: a `privacy.session.PrivacySession` (client-level DP: the plan's C_k, z_k, budget stops, ledger),
    or None (the raw fcfg.clip / noise_multiplier / noise_mode knobs)."""

    run_dir: Path
    privacy: Any = None
    eval_fn: Callable[[Any], dict[str, Any]] | None = None


def _round_record(metrics: Any, pad: Any, ids: Any, seconds: float) -> dict[str, Any]:
    """metrics.jsonl facts of one config's round; `ids` are its participants (other cohort rows are padding,
    or clients taking part in other configs of a sweep only)."""
    import numpy as np

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
        "slot_steps": pad.slot_steps,   # the steps the round program computed, padding included
        "seconds": seconds,
    }


def _engine_settings(track: Track, fcfg: FederatedConfig) -> tuple[str, float, int | None]:
    """(noise mode, secagg bound, secagg neighbours) of a track: static parts of its round program."""
    if track.privacy is not None:
        bound = track.privacy.secagg_bound()
        return track.privacy.noise_mode, bound, track.privacy.config.secagg_neighbors if bound > 0 else None
    return fcfg.noise_mode, 0.0, None


def group_tracks(tracks: Sequence[Track], fcfg: FederatedConfig) -> list[tuple[tuple[str, float, int | None],
                                                                              list[int]]]:
    """Tracks that can share one compiled round, in first-appearance order: equal noise mode and secure
    aggregation. A track without noise (noise mode "off": z = 0 for every client) joins a "sum" group when
    there is one (its zero noise adds exactly 0); central DP and per-client noise are separate programs."""
    settings = [_engine_settings(t, fcfg) for t in tracks]
    keys = []
    for s in settings:
        if s[0] == "off" and ("sum", 0.0, None) in settings:
            s = ("sum", 0.0, None)
        keys.append(s)
    groups: dict[tuple[str, float, int | None], list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    return list(groups.items())


def run_rounds(run_dir: str | Path, source: ClientSource, n_clients: int, params: Any, client_cfg: Any,
               fcfg: FederatedConfig, table_rows: Mapping[str, int] | None = None,
               eval_fn: Callable[[Any], dict[str, Any]] | None = None, resume: bool = False,
               desc: str = "train (federated)",
               privacy: Any = None) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Runs rounds [start, fcfg.rounds) of one configuration, writing metrics.jsonl and checkpoints/ under
    `run_dir` (`run_tracks` with one track).

    Returns (final server state, every round's record, engine facts). With `resume`, starts from the last
    checkpoint and truncates metrics.jsonl to the rounds it covers.
    privacy: a `privacy.session.PrivacySession` (client-level DP): it replaces fcfg's clip / noise knobs
    with the plan's per-client C_k, z_k, refuses clients out of budget, and writes privacy_ledger.arrow
    (facts["privacy"] = its summary).
    """
    states, records, facts = run_tracks([Track(Path(run_dir), privacy, eval_fn)], source, n_clients, params,
                                        client_cfg, fcfg, table_rows, resume, desc)
    return states[0], records[0], facts[0]


def run_tracks(tracks: Sequence[Track], source: ClientSource, n_clients: int, params: Any, client_cfg: Any,
               fcfg: FederatedConfig, table_rows: Mapping[str, int] | None = None, resume: bool = False,
               desc: str = "train (federated)", config_chunk: int = 0
               ) -> tuple[list[Any], list[list[dict[str, Any]]], list[dict[str, Any]]]:
    """The round loop of one or several configurations that share their data (same fcfg, seed, source).

    Per round: sample clients (seeded by (seed, round)), ask each track's privacy session who is eligible,
    build the cohorts of the union of participants ONCE, then run one compiled round per group of tracks
    (`group_tracks`): a group of one track runs the single-run program, a larger group the sweep program
    (engine/sweep.py: vmap over a leading config axis; a client that does not take part in a config has
    weight 0 there). Each track writes its own metrics.jsonl, checkpoints/, ledger.
    config_chunk: configurations a sweep program vectorizes at once (0: `engine.sweep.default_config_chunk`).
    Returns per track: (final server state, records, facts); facts["timing"] holds the loop's compile and
    training seconds (the same for every track of the call).
    """
    import jax
    import numpy as np

    from fedscope_jax.engine.checkpoint import Checkpointer
    from fedscope_jax.engine.cohort import bucket_capacities, build_cohorts, plan_buckets
    from fedscope_jax.engine.round import shard_cohorts
    from fedscope_jax.engine.sampling import sample_clients
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.engine.sweep import config_vectors, stack_states, unstack
    from fedscope_jax.engine.tune import autotune_chunk_size, block, candidate_chunks
    from fedscope_jax.utils.progress import progress

    t_loop = time.perf_counter()
    tracks = list(tracks)
    if not tracks:
        raise FedscopeError("run_tracks: no configuration to train")
    table_rows = dict(table_rows or {})
    server_opt = server_optimizer(fcfg.server_opt, fcfg.server_lr)
    init = init_server_state(params, server_opt)
    ckpts = [Checkpointer(t.run_dir / "checkpoints") for t in tracks]
    records: list[list[dict[str, Any]]] = [[] for _ in tracks]
    states = []
    for i, (t, ckpt) in enumerate(zip(tracks, ckpts)):
        metrics_path = t.run_dir / "metrics.jsonl"
        if resume:
            state = ckpt.restore(init)
            done = int(state.round)
            if metrics_path.exists():
                for line in metrics_path.read_text(encoding="utf-8").splitlines():
                    rec = json.loads(line)
                    if rec["round"] <= done:
                        records[i].append(rec)
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

    base = {c: source(0, c) for c in range(n_clients)}  # round-0 data fixes the buckets for the run
    steps_of = {c: s.n_steps for c, s in base.items()}
    trainable = [c for c in range(n_clients) if steps_of[c] > 0]
    if not trainable:
        raise FedscopeError("no client has training data")
    plan = plan_buckets([base[c] for c in trainable], fcfg.max_buckets)
    # fixed slots per bucket: sampled rounds (and clients leaving at their budget) keep one program shape
    capacity = bucket_capacities(plan, [steps_of[c] for c in trainable], n_clients, fcfg.sampling, fcfg.fraction)
    devices = jax.device_count()
    key = jax.random.fold_in(jax.random.key(fcfg.seed), 0xE6)
    largest = max(capacity)  # the most client slots of any bucket bounds the chunk sizes worth timing
    groups = [_Group(settings, members, devices, config_chunk) for settings, members in group_tracks(tracks, fcfg)]

    def participants(round_index: int, eligible: Sequence[Any]) -> tuple[list[Any], Any]:
        sampled = sample_clients(fcfg.seed, round_index, n_clients, fcfg.sampling, fcfg.fraction)
        sampled = np.array([c for c in sampled if steps_of[c] > 0], np.int64)
        ids = [sampled if e is None else sampled[e[sampled]] for e in eligible]
        union = np.unique(np.concatenate(ids)) if ids else sampled
        return ids, union

    def cohorts_for(round_index: int, union: Any, multiple: int):
        shards = base if round_index == 0 else {int(c): source(round_index, int(c)) for c in union}
        return build_cohorts(shards, union, plan, table_rows, multiple=multiple, capacity=capacity)

    def vectors(i: int, ids: Any) -> tuple[Any, Any, Any]:
        priv = tracks[i].privacy
        if priv is not None:
            return (ids, *priv.round_vectors(ids))
        k = len(ids)
        return ids, np.full(k, fcfg.clip, np.float32), np.full(k, fcfg.noise_multiplier, np.float32)

    def group_inputs(g: "_Group", cohorts: Any, ids: Sequence[Any]):
        per = [vectors(i, ids[i]) for i in g.members]
        if not g.sweep:
            out = config_vectors(cohorts, n_clients, per, stacked=False)
            return shard_cohorts(out, g.mesh) if g.mesh is not None else out, key
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32))
        per = per + [empty] * (g.n_slots - len(per))  # inactive padding configs (config mesh)
        return config_vectors(cohorts, n_clients, per, stacked=True), key  # one key: every config has the seed's

    def init_group_state(g: "_Group", member_states: Sequence[Any]) -> Any:
        if not g.sweep:
            return member_states[0]
        padded = list(member_states) + [member_states[-1]] * (g.n_slots - len(member_states))
        return stack_states([jax.tree.map(lambda x: jax.numpy.array(x, copy=True), s) for s in padded])

    # Programs and chunk sizes (time candidates on the first round's cohorts when fcfg.chunk_size is 0).
    # Programs are cached across runs: count the compile seconds this call adds to each program it uses.
    used: dict[int, tuple[Any, float, int]] = {}

    def use(program: Any) -> Any:
        used.setdefault(id(program), (program, program.compile_seconds, program.compiles))
        return program

    def compiled_here() -> float:
        return sum(p.compile_seconds - before for p, before, _ in used.values())

    probe = jax.tree.map(np.asarray, init)
    first_ids, first_union = participants(start, [None] * len(tracks))
    for g in groups:
        if g.settings[1] > 0 and fcfg.chunk_size == 1:
            raise FedscopeError("--secagg sums each chunk of clients securely: --chunk-size 1 would reveal every "
                                "client's update; use --chunk-size >= 2 (or 0 to pick one)")
        chunk, tuning = fcfg.chunk_size, {}
        if chunk == 0:
            def thunk_for(c: int, g=g):
                program = use(g.program(client_cfg, server_opt, c))
                cohorts, _ = cohorts_for(start, first_union, g.multiple(c))
                inputs, k = group_inputs(g, cohorts, first_ids)
                holder = [init_group_state(g, [init_server_state(probe.params, server_opt)] * len(g.members))]

                def thunk():
                    holder[0], _ = program(holder[0], inputs, k)
                    return holder[0]
                return thunk
            candidates = candidate_chunks(largest, 1 if g.sweep else devices)
            if g.settings[1] > 0:  # a secure-aggregation group is one chunk: a chunk of one client hides nothing
                candidates = [c for c in candidates if c >= 2] or [2]
            chunk, tuning = autotune_chunk_size(thunk_for, candidates)
        g.chunk, g.tuning = chunk, tuning
        g.fn = use(g.program(client_cfg, server_opt, chunk))
        g.state = init_group_state(g, [states[i] for i in g.members])
    multiple = math.lcm(*(g.multiple(g.chunk) for g in groups))
    compile_before = compiled_here()
    t_rounds = time.perf_counter()

    logs = [open(t.run_dir / "metrics.jsonl", "a", encoding="utf-8") for t in tracks]
    bar = progress(total=fcfg.rounds, initial=start, desc=desc, unit="round")
    try:
        for r in range(start, fcfg.rounds):
            t0 = time.perf_counter()
            eligible = [t.privacy.begin_round(r + 1) if t.privacy is not None else None for t in tracks]
            ids, union = participants(r, eligible)
            cohorts, pad = cohorts_for(r, union, multiple) if len(union) else ((), None)
            round_metrics: dict[int, Any] = {}
            for g in groups:
                if not any(len(ids[i]) for i in g.members):  # nobody takes part: the round is skipped
                    g.state = g.state._replace(round=g.state.round + 1)
                    continue
                inputs, k = group_inputs(g, cohorts, ids)
                g.state, metrics = g.fn(g.state, inputs, k)
                metrics = jax.device_get(metrics)
                for slot, i in enumerate(g.members):
                    round_metrics[i] = unstack(metrics, slot) if g.sweep else metrics
            block([g.state for g in groups])
            seconds = time.perf_counter() - t0
            for i, t in enumerate(tracks):
                g = next(g for g in groups if i in g.members)
                record: dict[str, Any]
                if len(ids[i]) == 0:
                    record = {"clients": 0, "included": 0, "seconds": seconds}
                else:
                    metrics = round_metrics[i]
                    record = _round_record(metrics, pad, ids[i], seconds)
                    if metrics.secagg_error is not None:
                        record["secagg_max_abs_error"] = float(metrics.secagg_error)
                record = {"round": r + 1, **record}
                if t.privacy is not None:
                    norms = _norms_of(round_metrics[i], ids[i]) if len(ids[i]) else np.zeros(0, np.float32)
                    record["participant_ids"] = [int(c) for c in ids[i]]
                    record.update(t.privacy.end_round(r + 1, ids[i], norms))
                if not math.isfinite(record.get("loss", 0.0)):
                    raise FedscopeError(f"{t.run_dir}: round {r + 1}: training loss is not finite; "
                                        "lower --client-lr")
                last = r + 1 == fcfg.rounds
                need_eval = t.eval_fn is not None and ((r + 1) % fcfg.eval_every == 0 or last)
                need_ckpt = (r + 1) % fcfg.checkpoint_every == 0 or last
                state_i = g.state_of(i) if need_eval or need_ckpt else None
                if need_eval:
                    record["valid"] = t.eval_fn(state_i.params)
                logs[i].write(json.dumps(record) + "\n")
                logs[i].flush()
                records[i].append(record)
                if need_ckpt:
                    if t.privacy is not None:  # first: a checkpoint on disk always has its ledger state
                        t.privacy.save_state(t.run_dir, r + 1)
                    ckpts[i].save(state_i)
            bar.update(1)
            rec0 = records[0][-1]
            bar.set_postfix(loss=f"{rec0.get('loss', float('nan')):.3f}", clients=rec0["clients"])
    finally:
        bar.close()
        for log in logs:
            log.close()
        for ckpt in ckpts:
            ckpt.close()
    compile_seconds = compiled_here() - compile_before
    loop_seconds = time.perf_counter() - t_rounds
    timing = {"compile_seconds": compile_seconds + compile_before, "train_seconds": loop_seconds - compile_seconds,
              "setup_seconds": t_rounds - t_loop, "chunk_tuning_compile_seconds": compile_before,
              "round_programs_compiled": sum(p.compiles - n for p, _, n in used.values())}
    finals, facts = [], []
    for i, t in enumerate(tracks):
        g = next(g for g in groups if i in g.members)
        finals.append(g.state_of(i))
        f = {"chunk_size": g.chunk, "chunk_tuning_seconds": {str(k): v for k, v in g.tuning.items()},
             "buckets": [{"steps": s, "vocab": dict(v), "slots": c}
                         for s, v, c in zip(plan.steps, plan.vocab_sizes, capacity)],
             "devices": devices, "trainable_clients": len(trainable), "start_round": start,
             "program": {"noise_mode": g.settings[0], "configs": len(g.members), "sweep": g.sweep,
                         "config_chunk": g.config_chunk if g.sweep else 1},
             "timing": timing}
        if t.privacy is not None:
            f["privacy"] = t.privacy.finish(t.run_dir)
        facts.append(f)
    return finals, records, facts


class _Group:
    """Tracks sharing one compiled round: the single-run program (one track; the client axis on the
    "clients" mesh over several devices) or the sweep program (several; the config axis on the "configs"
    mesh, padded to a multiple of the devices with inactive slots)."""

    def __init__(self, settings: tuple[str, float, int | None], members: list[int], devices: int,
                 config_chunk: int = 0):
        from fedscope_jax.engine.round import client_mesh
        from fedscope_jax.engine.sweep import config_mesh, default_config_chunk, pad_configs

        self.settings, self.members = settings, members
        self.sweep = len(members) > 1
        per_device = -(-len(members) // devices)
        self.config_chunk = min(config_chunk or default_config_chunk(per_device), per_device)
        self.n_slots = pad_configs(len(members), devices * self.config_chunk) if self.sweep else 1
        self.devices = devices
        if devices > 1:
            self.mesh = config_mesh() if self.sweep else client_mesh()
        else:
            self.mesh = None
        self.chunk, self.tuning, self.fn, self.state = 1, {}, None, None

    def multiple(self, chunk: int) -> int:
        """Cohort client counts must be a multiple of this (chunks per device)."""
        return chunk if self.sweep else self.devices * chunk

    def program(self, client_cfg: Any, server_opt: Any, chunk: int) -> Any:
        from fedscope_jax.engine.round import EngineConfig
        from fedscope_jax.engine.sweep import round_program

        mode, bound, neighbors = self.settings
        ecfg = EngineConfig(chunk, mode, bound, neighbors if neighbors is not None else 16)
        return round_program(client_cfg, server_opt, ecfg, self.sweep, self.mesh,
                             self.config_chunk if self.sweep else 0)

    def state_of(self, track: int) -> Any:
        """The server state of track `track` (a member)."""
        from fedscope_jax.engine.sweep import unstack

        return unstack(self.state, self.members.index(track)) if self.sweep else self.state


def _norms_of(metrics: Any, ids: Any) -> Any:
    """Raw update norms of the clients `ids` (in that order) from a round's per-cohort reports."""
    import numpy as np

    by_id = {}
    for rep in metrics.reports:
        for cid, norm in zip(np.asarray(rep.client_id), np.asarray(rep.norm)):
            if cid >= 0:
                by_id[int(cid)] = float(norm)
    return np.array([by_id.get(int(c), np.nan) for c in ids], np.float32)


# ---- the FedSCOPE model on a canonical dataset (`fedscope train --mode federated`) ---------------------

def check_resume_config(path: Path, resolved: dict[str, Any]) -> None:
    """--resume must continue the same run: its resolved config must equal the stored config.json
    (the chunk size and checkpoint cadence excepted: they do not change the results)."""
    from fedscope_jax.train.config import flatten
    from fedscope_jax.utils.io import read_json

    free = {"federated.chunk_size", "federated.checkpoint_every"}
    old, new = flatten(read_json(path)), flatten(json.loads(json.dumps(resolved)))   # tuples -> lists
    for key in sorted(set(old) | set(new)):
        if key not in free and old.get(key) != new.get(key):
            raise FedscopeError(f"--resume: {key} is {new.get(key)!r} here but {old.get(key)!r} in {path}; "
                                "resume with the options of the interrupted run")


def _prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    if resume:
        if not (out / "checkpoints").is_dir():
            raise FedscopeError(f"{out}: no checkpoints/ to resume from")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FedscopeError(f"{out}: output exists; pass --force to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def run(args: argparse.Namespace, cfg: Any, ds: Any, semantic: Any, extra: dict[str, Any]) -> int:
    """Entry point of `fedscope train --mode federated` (called by cli/train.py)."""
    summary = train_federated(ds, cfg, args.out, semantic, extra, resume=getattr(args, "resume", False),
                              force=args.force)
    privacy_facts, pcfg = summary["privacy"], cfg.privacy
    if pcfg.mode != "off":
        print(f"privacy ({pcfg.mode}): eps_spent min {privacy_facts['eps_spent_min']:.3g} / median "
              f"{privacy_facts['eps_spent_median']:.3g} / max {privacy_facts['eps_spent_max']:.3g} "
              f"(nominal {pcfg.epsilon:g}, delta {pcfg.delta:g}); "
              f"{len(privacy_facts['stopped_clients'])} clients stopped by their budget")
    print(f"run written to {args.out} ({cfg.federated.rounds} rounds, chunk {summary['federated']['chunk_size']}, "
          "test " + ", ".join(f"{d} NDCG@10 {m.get('NDCG@10', float('nan')):.4f}"
                              for d, m in summary["test"].items()) + ")")
    return 0


@dataclasses.dataclass
class SeedContext:
    """What every configuration of one seed shares: partition, client data source, evaluation sets, initial
    parameters and the client's local training (the loss, hence the compiled programs)."""

    ds: Any
    cfg: Any
    semantic: Any
    part: Any
    n_clients: int
    source: ClientSource
    valid_set: Any
    client_cfg: Any
    params: Any

    def eval_fn(self, params: Any) -> dict[str, Any]:
        """Validation metrics of `params` (metrics.jsonl "valid")."""
        from fedscope_jax.train.centralized import evaluate, selection_score

        mc, ec = self.cfg.model, self.cfg.eval
        metrics, _ = evaluate(params, mc, self.valid_set, self.ds.domains, ec.ks, self.semantic, ec.batch_size)
        return {"select": selection_score(metrics, self.cfg.train.select_metric), **metrics["sampled"]}

    def session(self, pcfg: Any) -> Any:
        """The PrivacySession of a privacy config (None for mode off)."""
        if pcfg.mode == "off":
            return None
        from fedscope_jax.privacy.session import PrivacySession

        f = self.cfg.federated
        return PrivacySession(pcfg, self.part.sizes(self.ds)["train_interactions"], f.sampling, f.fraction,
                              f.rounds, f.seed)


class _Same:
    """Hashes and compares by identity: a cache key for an unhashable object (the semantic tables)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def client_config(cfg: Any, semantic: Any = None) -> Any:
    """How a client trains the FedSCOPE model (loss, local Adam). Programs compiled for one ClientConfig
    object are reused by every run given that object, so the object is shared by all runs of equal model
    settings and client lr given the same semantic tables object (or none) in this process: the seeds of a
    reproduction cell, a sweep's seeds."""
    return _client_config(cfg.model, float(cfg.federated.client_lr), _Same(semantic))


def _make_client_config(model_cfg: Any, client_lr: float, semantic: Any) -> Any:
    import functools

    import optax

    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.model import loss_fn

    return ClientConfig(functools.partial(loss_fn, config=model_cfg, train=True, semantic=semantic),
                        optax.adam(client_lr), local_epochs=1)  # the batches hold the local epochs


@functools.lru_cache(maxsize=8)
def _client_config(model_cfg: Any, client_lr: float, semantic: _Same) -> Any:
    return _make_client_config(model_cfg, client_lr, semantic.obj)


def seed_context(ds: Any, cfg: Any, semantic: Any = None, client_cfg: Any = None) -> SeedContext:
    """Partition, batches source, eval set and initial params of `cfg`'s seed (train.seed)."""
    import jax
    import numpy as np

    from fedscope_jax.data.batching import make_batches, train_sequences
    from fedscope_jax.data.partition import partition
    from fedscope_jax.engine.cohort import ClientShard
    from fedscope_jax.eval.protocol import eval_set
    from fedscope_jax.model import init_params

    mc, tc, fcfg = cfg.model, cfg.train, cfg.federated
    seqs = train_sequences(ds, mc.max_len)
    part = partition(ds, fcfg.clients, fcfg.scheme, fcfg.seed)
    n_clients = part.n_clients
    rows_of = seqs.client_rows(part)

    def source(round_index: int, client: int) -> ClientShard:
        rng = np.random.default_rng([fcfg.seed, round_index, client])
        b = make_batches(seqs, rows_of[client], tc.batch_size, fcfg.local_epochs, rng)
        batch = {"seq": b["seq"], "target": b["target"], "user_mask": b["user_mask"]}
        if fcfg.scheme == "domain":
            keep = np.zeros(b["seq"].shape[2], bool)
            keep[client] = True
            batch["seq"] = batch["seq"] * keep[None, None, :, None]
            batch["target"] = batch["target"] * keep[None, None, :, None]
        return ClientShard(batch, step_mask=b["step_mask"])

    return SeedContext(ds, cfg, semantic, part, n_clients, source, eval_set(ds, "valid", mc.max_len, cfg.eval),
                       client_cfg if client_cfg is not None else client_config(cfg, semantic),
                       init_params(jax.random.key(tc.seed), mc, ds.n_items, semantic))


def finish_run(ctx: SeedContext, cfg: Any, out: Path, state: Any, records: list[dict[str, Any]],
               facts: dict[str, Any], t_start: float) -> dict[str, Any]:
    """Test / valid evaluation of the final params; writes params.msgpack and summary.json; returns the summary."""
    import jax
    import numpy as np
    from flax import serialization

    from fedscope_jax.eval.protocol import eval_set
    from fedscope_jax.train.final_eval import final_metrics
    from fedscope_jax.utils.io import write_json

    mc, ec, fcfg, ds, semantic = cfg.model, cfg.eval, cfg.federated, ctx.ds, ctx.semantic
    facts = dict(facts)
    privacy_facts = facts.pop("privacy", {"mode": "off"})
    params = jax.device_get(state.params)
    sets = {"valid": ctx.valid_set, "test": eval_set(ds, "test", mc.max_len, ec)}
    trained = [r for r in records if r.get("clients", 0) > 0]
    summary = {
        **final_metrics(params, ds, cfg, semantic, sets=sets),
        "training": {"mode": "federated", "rounds": fcfg.rounds, "seconds_this_process": time.time() - t_start,
                     "device": jax.devices()[0].device_kind, "final_loss": trained[-1]["loss"] if trained else None},
        "federated": {**dataclasses.asdict(fcfg), **facts, "partition": ctx.part.summary(ds),
                      "mean_padding_waste": float(np.mean([r["padding_waste"] for r in trained])) if trained else 0.0,
                      "mean_clients_per_round": float(np.mean([r["clients"] for r in records])),
                      "excluded_nonfinite": sorted({i for r in trained for i in r["excluded_nonfinite"]})},
        "dataset": {"path": str(ds.path), "name": ds.meta.get("name"), "domains": list(ds.domains),
                    "n_items": list(ds.n_items)},
        "privacy": privacy_facts,
    }
    (out / "params.msgpack").write_bytes(serialization.to_bytes(params))
    write_json(summary, out / "summary.json")
    return summary


def train_federated(ds: Any, cfg: Any, out: str | Path, semantic: Any = None, extra: dict[str, Any] | None = None,
                    resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Federated training of the FedSCOPE model on a canonical dataset; writes the run directory `out`.

    cfg: a train.config.RunConfig (all five sections). Returns summary.json's content."""
    from fedscope_jax.train.config import to_dict
    from fedscope_jax.utils.io import write_json

    check_privacy_knobs(cfg)
    extra = dict(extra or {})
    out = Path(out)
    _prepare_run_dir(out, resume, force)
    t_start = time.time()
    ctx = seed_context(ds, cfg, semantic)
    session = ctx.session(cfg.privacy)
    resolved = {**to_dict(cfg), **extra}
    if resume:
        check_resume_config(out / "config.json", resolved)
    else:
        write_json(resolved, out / "config.json")
    states, records, facts = run_tracks([Track(out, session, ctx.eval_fn)], ctx.source, ctx.n_clients, ctx.params,
                                        ctx.client_cfg, cfg.federated, resume=resume)
    return finish_run(ctx, cfg, out, states[0], records[0], facts[0], t_start)
