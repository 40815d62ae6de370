"""`fedscope train --mode federated` on the FedSCOPE model: the model wiring of the round loop (train/loop.py).

A seed's context (partition, the clients' batch source, the evaluation set, initial parameters, the client's
local training), the run directory (config.json, resume checks), the loop, and the final evaluation into
summary.json and params.msgpack. Each round's local batches are seeded by (seed, round, client), so a resumed
run ends where an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import serialization

from fedscope_jax.data.batching import (POISSON_TAG, make_batches, poisson_batches, poisson_cap, train_sequences,
                                        user_steps)
from fedscope_jax.data.partition import partition
from fedscope_jax.engine import hosts
from fedscope_jax.engine.client import USER_VOCAB, ClientConfig
from fedscope_jax.engine.cohort import ClientShard
from fedscope_jax.errors import FedscopeError, ResumeMismatch
from fedscope_jax.eval.protocol import eval_set
from fedscope_jax.model import init_params, loss_fn
from fedscope_jax.model.config import UNIFORM_NEGATIVES
from fedscope_jax.privacy.plan import UserSteps
from fedscope_jax.privacy.session import PrivacySession, check_engine_flags
from fedscope_jax.train.centralized import evaluate, selection_score
from fedscope_jax.train.config import check_user_norm, config_mismatch, to_dict
from fedscope_jax.train.final_eval import final_metrics
from fedscope_jax.train import vocab
from fedscope_jax.train.loop import ClientSource, Track, run_tracks
from fedscope_jax.train.programs import PROGRAMS, Programs
from fedscope_jax.train.selection import Selection, final_facts, selection_for
from fedscope_jax.utils.io import read_json, write_json

__all__ = ["SeedContext", "aggregation_weights", "check_distributed", "check_privacy_knobs", "check_resume_config",
           "check_weighting", "client_config", "client_optimizer", "finish_run", "prepare_run_dir", "seed_context",
           "train_federated"]


def check_privacy_knobs(cfg: Any) -> None:
    """The raw engine knobs (federated.clip / noise_multiplier / noise_mode) are for `privacy.mode off` only, and
    model.loss.user_norm other than "mean" for the user unit only. Checked on the resolved config (its --set
    values and flags together, so their order does not matter), before anything is written."""
    f = cfg.federated
    check_engine_flags(cfg.privacy.mode, f.clip, f.noise_multiplier, None if f.noise_mode == "off" else f.noise_mode)
    check_user_norm(cfg)
    if f.local_steps and cfg.privacy.unit != "user":
        raise FedscopeError(f"federated.local_steps={f.local_steps} sets the DP-SGD steps of --privacy-unit user, "
                            f"but privacy.unit is {cfg.privacy.unit!r}; use --local-epochs for a silo's passes "
                            "over its data, or --privacy-unit user")
    check_weighting(f, cfg.privacy)
    if f.local_steps and cfg.privacy.mode == "distributed":
        raise FedscopeError(f"federated.local_steps={f.local_steps} with --privacy distributed: a round is one "
                            "DP-SGD step over all silos' users; leave federated.local_steps at 0")


def check_weighting(fcfg: Any, pcfg: Any) -> None:
    """Weights other than 1 are for runs without DP and for the user unit with local noise, where each silo's
    update is already private and its weight a post-processing with public inputs (its users n_k, z_k, C_k).
    Refused where the mechanism assumes weight 1: the client unit (a weight scales the clipped update, so its
    noise and ledger would have to follow) and distributed noise (the silos' noise shares sum to the planned
    std only at weight 1)."""
    w = fcfg.weighting
    if w == "uniform" or pcfg.mode == "off":
        return
    if pcfg.mode == "distributed":
        raise FedscopeError(f"--weighting {w} with --privacy distributed: the silos' noise shares add up to the "
                            "planned noise only in an unweighted sum; use --weighting uniform")
    if pcfg.unit != "user":
        raise FedscopeError(f"--weighting {w} with --privacy-unit client: the mechanism clips and noises each "
                            "client's update at weight 1; use --weighting uniform, or --privacy-unit user")
    if w == "inverse_noise" and (not fcfg.local_steps or fcfg.client_opt == "adam"):
        raise FedscopeError(
            f"--weighting inverse_noise weighs silo k by 1 / (z_k C_k)^2, the inverse of its update's noise variance "
            f"only when every silo takes the same number of steps and its update is linear in its noised gradients; "
            f"got federated.local_steps={fcfg.local_steps} and --client-opt {fcfg.client_opt}: set "
            "federated.local_steps (e.g. 1) and --client-opt sgd or momentum, or use --weighting users")


def aggregation_weights(ctx: "SeedContext", pcfg: Any, session: Any) -> np.ndarray | None:
    """w_k of every client for the server's mean sum_k w_k delta_k / sum_k w_k (federated.weighting), from
    public inputs only: None (all 1) for uniform; the clients' users n_k for users; 1 / (z_k C_k)^2 for
    inverse_noise (scaled so the largest is 1), the inverse of the noise variance of each silo's update: the same
    S steps a round, linear in its noised gradients (z_k C_k / B per coordinate each; `check_weighting`), so the
    mean's noise the least of any weights. A configuration without noise (eps inf in a sweep) has equal noise
    everywhere, where inverse_noise is uniform. Clients without users or noise get weight 1: they take no
    part. The callers have refused the settings `check_weighting` refuses (`check_privacy_knobs`)."""
    fcfg = ctx.cfg.federated
    if fcfg.weighting == "uniform":
        return None
    if fcfg.weighting == "users":
        users = ctx.user_steps.users if ctx.user_steps is not None else ctx.part.sizes(ctx.ds)["users"]
        return np.where(users > 0, users, 1).astype(np.float64)
    if session is None:
        return None
    sigma = np.asarray(session.plan.update_noise_multipliers, np.float64) * session.ledger.clip_norms  # z_k C_k
    return np.where(sigma > 0, (np.min(sigma[sigma > 0], initial=np.inf) / np.maximum(sigma, 1e-30)) ** 2, 1.0)


RESULT_FREE = frozenset({"federated.chunk_size", "federated.checkpoint_every"})   # settings that change no result


def check_resume_config(path: Path, resolved: dict[str, Any]) -> None:
    """--resume must continue the same run: its resolved config must equal the stored config.json
    (the chunk size and checkpoint cadence excepted: they do not change the results). A setting the stored
    config lacks (added to fedscope after the run started, e.g. model.item_bias) matches at its default, which
    is what the older code did."""
    mismatch = config_mismatch(read_json(path), resolved, RESULT_FREE)
    if mismatch is not None:
        raise ResumeMismatch(f"--resume: {mismatch} ({path}); resume with the options of the interrupted run")


def prepare_run_dir(out: Path, resume: bool, force: bool) -> None:
    """Creates `out` (or, with `resume`, checks it holds checkpoints); an existing output needs `force`."""
    if resume:
        if not (hosts.primary_dir(out) / "checkpoints").is_dir():
            raise FedscopeError(f"{out}: no checkpoints/ to resume from")
        return
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FedscopeError(f"{out}: output exists; pass --force to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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
    user_steps: UserSteps | None = None   # the user unit: each silo's users, DP-SGD steps per round, batch
    user_batch_cap: int = 0               # the user unit: padded size of every Poisson-sampled batch

    def eval_fn(self, params: Any) -> dict[str, Any]:
        """Validation metrics of `params` (metrics.jsonl "valid")."""
        mc, ec = self.cfg.model, self.cfg.eval
        metrics, _ = evaluate(params, mc, self.valid_set, self.ds.domains, ec.ks, self.semantic, ec.batch_size)
        return {"select": selection_score(metrics, self.cfg.train.select_metric), **metrics["sampled"]}

    @property
    def pooled(self) -> bool:
        """The silos' users are drawn at one pooled rate (the distributed variant's batches, `UserSteps.pooled`),
        for every configuration of the seed, its eps-inf point included: `run_tracks(pooled=)`."""
        return self.user_steps is not None and self.user_steps.pooled

    def session(self, pcfg: Any) -> Any:
        """The PrivacySession of a privacy config (None for mode off)."""
        check_group_mean(self.cfg.federated, pcfg)
        if pcfg.mode == "off":
            return None
        f = self.cfg.federated
        if (pcfg.unit == "user") != (self.user_steps is not None):
            raise FedscopeError(f"privacy.unit {pcfg.unit!r} in a seed context made for unit "
                                f"{self.cfg.privacy.unit!r}: the configurations of one seed share their batches")
        return PrivacySession(pcfg, self.part.sizes(self.ds)["train_interactions"], f.sampling, f.fraction,
                              f.rounds, f.seed, user_steps=self.user_steps, client_lr=float(f.client_lr),
                              batch_cap=self.user_batch_cap)


def check_group_mean(fcfg: Any, pcfg: Any) -> None:
    """Group means divide each parameter group by the weight of the clients whose update changed it: a
    data-dependent denominator that no privacy analysis here covers, so they run without DP only."""
    if fcfg.aggregate == "group_mean" and pcfg.mode != "off":
        raise FedscopeError(f"--aggregate group_mean with --privacy {pcfg.mode}: its denominators depend on which "
                            "clients trained each group (their data), which no DP analysis here covers; use "
                            "--aggregate mean for private runs")


def check_distributed(cfg: Any) -> None:
    """Distributed noise is central DP-SGD only if a silo's update is linear in its noised gradient sum and
    every silo adds its share every round: one local step of SGD (momentum starts from zero each round, so one
    step of it is SGD), every silo in every round."""
    f = cfg.federated
    if f.client_opt == "adam":
        raise FedscopeError("--privacy distributed: a silo's update must be linear in its noised gradient (one "
                            "SGD step), got --client-opt adam; use --client-opt sgd (and --server-opt fedadam "
                            "for Adam on the private aggregate)")
    if f.local_epochs != 1:
        raise FedscopeError(f"--privacy distributed: a round is one DP-SGD step over all silos' users, got "
                            f"--local-epochs {f.local_epochs}; use 1 (more rounds give more steps)")
    if f.sampling != "fraction" or f.fraction != 1.0:
        raise FedscopeError(f"--privacy distributed: every silo adds its noise share every round, got "
                            f"--sampling {f.sampling} --fraction {f.fraction:g}; use --sampling fraction --fraction 1")
    if 0 < f.chunk_size < f.clients:
        raise FedscopeError(f"--chunk-size {f.chunk_size}: distributed noise needs the secure sum of all "
                            f"{f.clients} silos in one chunk; use --chunk-size 0 or {f.clients}")


def user_unit_steps(users: np.ndarray, cfg: Any) -> UserSteps:
    """What the user unit runs and accounts per silo, from its users n_k: distributed noise, one step a round
    over all silos' users (pooled rate); otherwise federated.local_steps steps a round, or (0) local_epochs
    expected passes of ceil(n_k / B) steps; a silo without users takes none. The one rule the engine's batches,
    the privacy plan and the reproduction's inventory share."""
    users = np.asarray(users, np.int64)
    f, batch = cfg.federated, int(cfg.train.batch_size)
    if cfg.privacy.mode == "distributed":
        return UserSteps(users, np.ones(len(users), np.int64), batch, pooled=True)
    per_round = [f.local_steps if f.local_steps and n else user_steps(int(n), batch, f.local_epochs) for n in users]
    return UserSteps(users, np.array(per_round, np.int64), batch)


def client_config(cfg: Any, semantic: Any = None, programs: Programs = PROGRAMS, *, n_domains: int) -> ClientConfig:
    """How a client trains the FedSCOPE model (loss, local Adam). Programs compiled for one ClientConfig
    object are reused by every run given that object, so `programs` keeps one object per (model settings,
    client lr and optimizer, unit, local vocabularies, domain scheme, semantic tables object or none): the
    seeds of a reproduction cell and a sweep's seeds share it; other tables, even equal ones, get another. The
    user unit of DP trains with DP-SGD over users: the loss taken one user at a time (`loss_fn(per_user=True)`),
    divided by the expected batch, each user's gradient of the item tables taken on that user's own rows where
    the loss allows (`train.vocab.uses_user_rows`). Under `--scheme domain` a client skips the domains it does
    not hold (`loss_fn(skip_absent=True)`). Where it can (`train.vocab.uses_local_vocab`), a client trains local
    item vocabularies of its `n_domains` domains (the item table and, with `model.item_bias`, the bias table of
    each)."""
    model_cfg, client_lr, opt = cfg.model, float(cfg.federated.client_lr), cfg.federated.client_opt
    user = cfg.privacy.unit == "user"
    expected = int(cfg.train.batch_size) if user else 0
    micro = int(cfg.federated.user_microbatch) if user else 0
    item_tables = vocab.sparse_tables(n_domains, item_bias=model_cfg.item_bias)
    tables = item_tables if vocab.uses_local_vocab(cfg) else ()         # a client's local vocabularies
    user_tables = item_tables if vocab.uses_user_rows(cfg) else ()      # the user unit: each user's own rows
    skip = cfg.federated.scheme == "domain"   # a client holds one domain: skip the others' terms at run time

    def build() -> ClientConfig:
        loss = functools.partial(loss_fn, config=model_cfg, train=True, semantic=semantic, per_user=user,
                                 skip_absent=skip)
        return ClientConfig(loss, client_optimizer(opt, client_lr), local_epochs=1,  # batches hold the epochs
                            expected_batch=expected, microbatch=micro, sparse_tables=tables, user_tables=user_tables)

    key = ("client_config", model_cfg, client_lr, opt, expected, micro, tables, user_tables, skip, id(semantic))
    return programs.get(key, build, keep=semantic)


def client_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
    """The local optimizer: Adam, plain SGD, or SGD with momentum 0.9 (`federated.client_opt`)."""
    if name == "adam":
        return optax.adam(learning_rate)
    return optax.sgd(learning_rate, momentum=0.9 if name == "momentum" else None)


def seed_context(ds: Any, cfg: Any, semantic: Any = None, client_cfg: Any = None) -> SeedContext:
    """Partition, batches source, eval set and initial params of `cfg`'s seed (train.seed)."""
    mc, tc, fcfg = cfg.model, cfg.train, cfg.federated
    seqs = train_sequences(ds, mc.max_len)
    part = partition(ds, fcfg.clients or None, fcfg.scheme, fcfg.seed)
    n_clients = part.n_clients
    rows_of = seqs.client_rows(part)
    steps = cap = rates = None
    check_group_mean(fcfg, cfg.privacy)
    if client_cfg is None:
        client_cfg = client_config(cfg, semantic, n_domains=len(ds.domains))
    local_vocab = bool(client_cfg.sparse_tables)   # batches carry their negatives and local item ids
    user_rows = bool(client_cfg.user_tables)      # ... or each user's own negatives, rows and local item ids
    n_vocab = len({t.name for t in client_cfg.sparse_tables})
    if local_vocab and n_vocab != len(ds.domains):
        raise FedscopeError(f"client config: local vocabularies of {n_vocab} domains, "
                            f"but {ds.path} has {len(ds.domains)} domains; build it with "
                            f"client_config(..., n_domains={len(ds.domains)})")
    if cfg.privacy.unit == "user":   # DP-SGD over users: every step Poisson-samples the silo's users
        if mc.loss.seqcl_weight:
            raise FedscopeError(f"model.loss.seqcl_weight={mc.loss.seqcl_weight:g} with --privacy-unit user: each "
                                "user's loss sees that user alone, so the sequence contrastive term has no "
                                "negatives and is 0 (FedCL4SRec would train as FedSASRec); set "
                                "model.loss.seqcl_weight=0, or use --privacy-unit client")
        if fcfg.scheme == "domain":
            raise FedscopeError("--privacy-unit user with --scheme domain: a user's record is split over the "
                                "domain clients; use another scheme or --privacy-unit client")
        if cfg.privacy.mode == "distributed":
            check_distributed(cfg)
        steps = user_unit_steps(np.array([len(r) for r in rows_of], np.int64), cfg)
        users = steps.users
        rates = steps.rates()
        cap = poisson_cap(users, rates, steps.steps_per_round, fcfg.seed, fcfg.rounds,
                          multiple=math.lcm(8, fcfg.user_microbatch or 1))   # whole microbatches

    def source(round_index: int, client: int) -> ClientShard:
        rng = np.random.default_rng([fcfg.seed, round_index, client])
        if steps is not None:
            b = poisson_batches(seqs, rows_of[client], float(rates[client]), int(steps.steps_per_round[client]),
                                cap, np.random.default_rng([fcfg.seed, round_index, client, POISSON_TAG]))
        else:
            # a client with fewer users than a batch trains on steps of its own size (not padded to the batch
            # size: the cohort pads only to its bucket's largest client), the same users in the same order
            width = max(1, min(int(tc.batch_size), len(rows_of[client])))
            b = make_batches(seqs, rows_of[client], width, fcfg.local_epochs, rng)
        batch = {"seq": b["seq"], "target": b["target"], "user_mask": b["user_mask"]}
        if fcfg.scheme == "domain":
            keep = np.zeros(b["seq"].shape[2], bool)
            keep[client] = True
            batch["seq"] = batch["seq"] * keep[None, None, :, None]
            batch["target"] = batch["target"] * keep[None, None, :, None]
        if not (local_vocab or user_rows):
            return ClientShard(batch, step_mask=b["step_mask"])
        if mc.loss.rec in UNIFORM_NEGATIVES:   # drawn on the host, so the vocabularies can name them
            batch = vocab.add_negatives(batch, ds.n_items, mc.loss.num_negatives, np.random.default_rng(
                [fcfg.seed, round_index, client, vocab.NEGATIVES_TAG]), per_user=mc.loss.rec == "gbce")
        if user_rows:
            batch, rows = vocab.localize_users(batch, ds.n_items)
            batch.update({USER_VOCAB + name: ids for name, ids in rows.items()})
            return ClientShard(batch, step_mask=b["step_mask"])
        return ClientShard(*vocab.localize(batch, ds.n_items), step_mask=b["step_mask"])

    return SeedContext(ds, cfg, semantic, part, n_clients, source, eval_set(ds, "valid", mc.max_len, cfg.eval),
                       client_cfg,
                       init_params(jax.random.key(tc.seed), mc, ds.n_items, semantic), steps, cap or 0)


def finish_run(ctx: SeedContext, cfg: Any, out: Path, state: Any, records: list[dict[str, Any]],
               facts: dict[str, Any], t_start: float, selection: Selection | None = None) -> dict[str, Any]:
    """Test / valid evaluation of the tested params (`selection`'s best round, else the final ones); writes
    them to params.msgpack and summary.json; returns the summary."""
    mc, ec, fcfg, ds, semantic = cfg.model, cfg.eval, cfg.federated, ctx.ds, ctx.semantic
    facts = dict(facts)
    privacy_facts = facts.pop("privacy", {"mode": "off"})
    if selection is not None and selection.best_round:
        params, chosen = selection.best_params, selection.facts()
    else:
        params = hosts.fetch(state.params)
        chosen = final_facts(records[-1]["round"] if records else 0)
    sets = {"valid": ctx.valid_set, "test": eval_set(ds, "test", mc.max_len, ec)}
    trained = [r for r in records if r.get("clients", 0) > 0]
    summary = {
        **final_metrics(params, ds, cfg, semantic, sets=sets),
        "training": {"mode": "federated", "rounds": fcfg.rounds, **chosen,
                     "seconds_this_process": time.time() - t_start,
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
                    resume: bool = False, force: bool = False, programs: Programs = PROGRAMS) -> dict[str, Any]:
    """Federated training of the FedSCOPE model on a canonical dataset; writes the run directory `out`.

    cfg: a train.config.RunConfig (all five sections). Returns summary.json's content."""
    check_privacy_knobs(cfg)
    if cfg.federated.weighting == "inverse_noise" and cfg.privacy.mode == "off":
        raise FedscopeError("--weighting inverse_noise weighs silos by their DP noise, but --privacy is off; use "
                            "--weighting users or uniform")
    extra = dict(extra or {})
    out = Path(out)
    t_start = time.time()
    ctx = seed_context(ds, cfg, semantic, client_config(cfg, semantic, programs, n_domains=len(ds.domains)))
    session = ctx.session(cfg.privacy)   # settings that cannot work fail here, before anything is written
    resolved = {**to_dict(cfg), **extra}
    error: FedscopeError | None = None
    try:   # several hosts: a check that fails on one process stops all of them (`hosts.all_ok`)
        prepare_run_dir(out, resume, force)
        if resume:
            check_resume_config(out / "config.json", resolved)
    except FedscopeError as exc:
        error = exc
    hosts.all_ok(error)   # and none reads RUN/checkpoints while process 0 replaces it
    if not resume:
        write_json(resolved, out / "config.json")
    track = Track(out, session, ctx.eval_fn, selection_for(cfg), aggregation_weights(ctx, cfg.privacy, session))
    states, records, facts = run_tracks([track], ctx.source, ctx.n_clients, ctx.params, ctx.client_cfg,
                                        cfg.federated, resume=resume, programs=programs)
    return finish_run(ctx, cfg, out, states[0], records[0], facts[0], t_start, track.selection)
