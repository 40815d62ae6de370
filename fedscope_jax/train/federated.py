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
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from fedscope_jax.errors import FedscopeError
from fedscope_jax.train.config import FederatedConfig


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


def _round_record(metrics: Any, pad: Any, n_sampled: int, seconds: float) -> dict[str, Any]:
    import numpy as np

    cat = lambda field: np.concatenate([np.asarray(getattr(r, field)) for r in metrics.reports])  # noqa: E731
    ids, loss, steps, norm = cat("client_id"), cat("loss"), cat("steps"), cat("norm")
    factor, included = cat("clip_factor"), cat("included")
    real = ids >= 0
    inc = included & real
    w = steps * inc
    return {
        "clients": n_sampled,
        "included": int(inc.sum()),
        "excluded_nonfinite": [int(i) for i in ids[real & ~included & (steps > 0)]],
        "loss": float(np.sum(loss * w) / max(np.sum(w), 1)),
        "update_norm": float(metrics.update_norm),
        "client_update_norm_mean": float(np.mean(norm[inc])) if inc.any() else 0.0,
        "client_update_norm_max": float(np.max(norm[inc])) if inc.any() else 0.0,
        "clipped_fraction": float(np.mean(factor[inc] < 1.0)) if inc.any() else 0.0,
        "noise_std": float(metrics.noise_std),
        "padding_waste": pad.waste,
        "seconds": seconds,
    }


def run_rounds(run_dir: str | Path, source: ClientSource, n_clients: int, params: Any, client_cfg: Any,
               fcfg: FederatedConfig, table_rows: Mapping[str, int] | None = None,
               eval_fn: Callable[[Any], dict[str, Any]] | None = None, resume: bool = False,
               desc: str = "train (federated)",
               privacy: Any = None) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Runs rounds [start, fcfg.rounds) writing metrics.jsonl and checkpoints/ under `run_dir`.

    Returns (final server state, every round's record, engine facts). With `resume`, starts from the last
    checkpoint and truncates metrics.jsonl to the rounds it covers.
    privacy: a `privacy.session.PrivacySession` (client-level DP): it replaces fcfg's clip / noise knobs
    with the plan's per-client C_k, z_k, refuses clients out of budget, and writes privacy_ledger.arrow
    (facts["privacy"] = its summary).
    """
    import jax
    import numpy as np

    from fedscope_jax.engine.checkpoint import Checkpointer
    from fedscope_jax.engine.cohort import build_cohorts, plan_buckets
    from fedscope_jax.engine.round import EngineConfig, client_mesh, make_round_fn, shard_cohorts
    from fedscope_jax.engine.sampling import sample_clients
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.engine.tune import autotune_chunk_size, block, candidate_chunks
    from fedscope_jax.utils.progress import progress

    run_dir = Path(run_dir)
    table_rows = dict(table_rows or {})
    server_opt = server_optimizer(fcfg.server_opt, fcfg.server_lr)
    state = init_server_state(params, server_opt)
    ckpt = Checkpointer(run_dir / "checkpoints")
    metrics_path = run_dir / "metrics.jsonl"
    records: list[dict[str, Any]] = []
    if resume:
        state = ckpt.restore(state)
        done = int(state.round)
        if metrics_path.exists():
            for line in metrics_path.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                if rec["round"] <= done:
                    records.append(rec)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif ckpt.latest_round() is not None:
        raise FedscopeError(f"{run_dir}: holds checkpoints of another run; use --resume or --force")
    start = int(state.round)
    if privacy is not None:
        privacy.load_state(run_dir, start)
    noise_mode = privacy.noise_mode if privacy is not None else fcfg.noise_mode
    secagg_bound = privacy.secagg_bound() if privacy is not None else 0.0
    neighbors = privacy.config.secagg_neighbors if privacy is not None else None

    base = {c: source(0, c) for c in range(n_clients)}  # round-0 data fixes the buckets for the run
    steps_of = {c: s.n_steps for c, s in base.items()}
    trainable = [c for c in range(n_clients) if steps_of[c] > 0]
    if not trainable:
        raise FedscopeError("no client has training data")
    plan = plan_buckets([base[c] for c in trainable], fcfg.max_buckets)
    devices = jax.device_count()
    mesh = client_mesh() if devices > 1 else None
    key = jax.random.fold_in(jax.random.key(fcfg.seed), 0xE6)

    def cohorts_for(round_index: int, multiple: int, eligible: np.ndarray | None = None):
        ids = sample_clients(fcfg.seed, round_index, n_clients, fcfg.sampling, fcfg.fraction)
        ids = np.array([c for c in ids if steps_of[c] > 0 and (eligible is None or eligible[c])], np.int64)
        shards = base if round_index == 0 else {int(c): source(round_index, int(c)) for c in ids}
        if len(ids) == 0:
            return ids, (), None
        k = len(ids)
        if privacy is not None:
            clip, z = privacy.round_vectors(ids)
        else:
            clip, z = np.full(k, fcfg.clip, np.float32), np.full(k, fcfg.noise_multiplier, np.float32)
        cohorts, pad = build_cohorts(shards, ids, plan, table_rows, clip=clip, noise_multiplier=z,
                                     multiple=multiple)
        return ids, (shard_cohorts(cohorts, mesh) if mesh is not None else cohorts), pad

    def make_fn(chunk: int):
        return make_round_fn(client_cfg, server_opt, EngineConfig(chunk, noise_mode, secagg_bound, neighbors),
                             mesh=mesh)

    chunk = fcfg.chunk_size
    if secagg_bound > 0 and chunk == 1:
        raise FedscopeError("--secagg sums each chunk of clients securely: --chunk-size 1 would reveal every "
                            "client's update; use --chunk-size >= 2 (or 0 to pick one)")
    tuning: dict[int, float] = {}
    if chunk == 0:  # time candidate chunk sizes on the first round's cohorts (results do not depend on it)
        largest = int(np.bincount([plan.bucket_of(steps_of[c]) for c in trainable]).max())
        probe_state = jax.tree.map(np.asarray, state)

        def thunk_for(c: int):
            fn, (_, cohorts, _) = make_fn(c), cohorts_for(start, devices * c)
            holder = [init_server_state(probe_state.params, server_opt)]

            def thunk():
                holder[0], _ = fn(holder[0], cohorts, key)
                return holder[0]
            return thunk
        candidates = candidate_chunks(largest, devices)
        if secagg_bound > 0:  # a secure-aggregation group is one chunk: a chunk of one client hides nothing
            candidates = [c for c in candidates if c >= 2] or [2]
        chunk, tuning = autotune_chunk_size(thunk_for, candidates)
    round_fn = make_fn(chunk)

    bar = progress(total=fcfg.rounds, initial=start, desc=desc, unit="round")
    with open(metrics_path, "a", encoding="utf-8") as log:
        for r in range(start, fcfg.rounds):
            t0 = time.perf_counter()
            eligible = privacy.begin_round(r + 1) if privacy is not None else None
            ids, cohorts, pad = cohorts_for(r, devices * chunk, eligible)
            norms = np.zeros(0, np.float32)
            if len(ids) == 0:
                state = state._replace(round=state.round + 1)
                record: dict[str, Any] = {"clients": 0, "included": 0, "seconds": time.perf_counter() - t0}
            else:
                state, metrics = round_fn(state, cohorts, key)
                block(state)
                record = _round_record(metrics, pad, len(ids), time.perf_counter() - t0)
                if privacy is not None:
                    norms = _norms_of(metrics, ids)
                if metrics.secagg_error is not None:
                    record["secagg_max_abs_error"] = float(metrics.secagg_error)
            record = {"round": r + 1, **record}
            if privacy is not None:
                record["participant_ids"] = [int(c) for c in ids]
                record.update(privacy.end_round(r + 1, ids, norms))
            if not math.isfinite(record.get("loss", 0.0)):
                raise FedscopeError(f"round {r + 1}: training loss is not finite; lower --client-lr")
            if eval_fn is not None and ((r + 1) % fcfg.eval_every == 0 or r + 1 == fcfg.rounds):
                record["valid"] = eval_fn(state.params)
            log.write(json.dumps(record) + "\n")
            log.flush()
            records.append(record)
            if (r + 1) % fcfg.checkpoint_every == 0 or r + 1 == fcfg.rounds:
                if privacy is not None:  # first: a checkpoint on disk always has its ledger state
                    privacy.save_state(run_dir, r + 1)
                ckpt.save(state)
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}", clients=record["clients"])
    bar.close()
    ckpt.close()
    facts = {"chunk_size": chunk, "chunk_tuning_seconds": {str(k): v for k, v in tuning.items()},
             "buckets": [{"steps": s, "vocab": dict(v)} for s, v in zip(plan.steps, plan.vocab_sizes)],
             "devices": devices, "trainable_clients": len(trainable), "start_round": start}
    if privacy is not None:
        facts["privacy"] = privacy.finish(run_dir)
    return state, records, facts


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
    from fedscope_jax.utils.io import read_json

    stored = read_json(path)
    free = {"federated.chunk_size", "federated.checkpoint_every"}

    def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(tree, dict):
            return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}
    old, new = flat(json.loads(json.dumps(stored))), flat(json.loads(json.dumps(resolved)))
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


def train_federated(ds: Any, cfg: Any, out: str | Path, semantic: Any = None, extra: dict[str, Any] | None = None,
                    resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Federated training of the FedSCOPE model on a canonical dataset; writes the run directory `out`.

    cfg: a train.config.RunConfig (all five sections). Returns summary.json's content."""
    import functools

    import jax
    import numpy as np
    import optax
    from flax import serialization

    from fedscope_jax.data.batching import make_batches, train_sequences
    from fedscope_jax.data.partition import partition
    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import ClientShard
    from fedscope_jax.eval.protocol import eval_set
    from fedscope_jax.model import init_params, loss_fn
    from fedscope_jax.train.centralized import evaluate, selection_score
    from fedscope_jax.train.config import to_dict
    from fedscope_jax.utils.io import write_json

    mc, tc, ec, fcfg, pcfg = cfg.model, cfg.train, cfg.eval, cfg.federated, cfg.privacy
    check_privacy_knobs(cfg)
    extra = dict(extra or {})
    out = Path(out)
    _prepare_run_dir(out, resume, force)
    t_start = time.time()
    seqs = train_sequences(ds, mc.max_len)
    part = partition(ds, fcfg.clients, fcfg.scheme, fcfg.seed)
    n_clients = part.n_clients
    if fcfg.scheme == "domain":   # client d holds every user's domain-d data (FedDCSR setting)
        rows_of = [np.arange(len(seqs.user)) for _ in range(n_clients)]
    else:
        rows_of = [seqs.rows_of(part.users_of(c)) for c in range(n_clients)]

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

    valid_set = eval_set(ds, "valid", mc.max_len, ec)

    def eval_fn(params):
        metrics, _ = evaluate(params, mc, valid_set, ds.domains, ec.ks, semantic, ec.batch_size)
        return {"select": selection_score(metrics, tc.select_metric), **metrics["sampled"]}

    session = None
    if pcfg.mode != "off":
        from fedscope_jax.privacy.session import PrivacySession

        session = PrivacySession(pcfg, part.sizes(ds)["train_interactions"], fcfg.sampling, fcfg.fraction,
                                 fcfg.rounds, fcfg.seed)
    client_cfg = ClientConfig(functools.partial(loss_fn, config=mc, train=True, semantic=semantic),
                              optax.adam(fcfg.client_lr), local_epochs=1)  # the batches hold the local epochs
    params = init_params(jax.random.key(tc.seed), mc, ds.n_items, semantic)
    resolved = {**to_dict(cfg), **extra}
    if resume:
        check_resume_config(out / "config.json", resolved)
    else:
        write_json(resolved, out / "config.json")
    state, records, facts = run_rounds(out, source, n_clients, params, client_cfg, fcfg, eval_fn=eval_fn,
                                       resume=resume, privacy=session)
    privacy_facts = facts.pop("privacy", {"mode": "off"})
    params = jax.device_get(state.params)
    valid, _ = evaluate(params, mc, valid_set, ds.domains, ec.ks, semantic, ec.batch_size)
    test_set = eval_set(ds, "test", mc.max_len, ec)
    test, _ = evaluate(params, mc, test_set, ds.domains, ec.ks, semantic, ec.batch_size)
    trained = [r for r in records if r.get("clients", 0) > 0]
    summary = {
        "test": test["sampled"], "test_full": test["full"], "valid": valid["sampled"], "valid_full": valid["full"],
        "training": {"mode": "federated", "rounds": fcfg.rounds, "seconds_this_process": time.time() - t_start,
                     "device": jax.devices()[0].device_kind, "final_loss": trained[-1]["loss"] if trained else None},
        "federated": {**dataclasses.asdict(fcfg), **facts, "partition": part.summary(ds),
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
