"""Local-only training: every client of the partition trains its own model on its own users (no communication).

The lower bound of the federated study. The partition is the federated run's (federated.clients, .scheme,
train.seed); each client runs the centralized recipe (Adam, train.* settings, early stopping on the validation
targets of its own users) from the same initialization, and every valid/test target is ranked by the model of
the client that holds it. Metrics pool all targets, so the summary has the centralized summary's sections plus
"local" (per-client facts). All clients share one compiled train step and one compiled scorer (same shapes:
the last mini-batch of a client is padded with all-zero users), so the cost is one compile plus the work.
Per-client parameters are not saved (clients x model size); the run directory holds config.json,
metrics.jsonl (one line per client epoch) and summary.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from fedscope_jax.data.batching import TrainSequences, make_batches, train_sequences
from fedscope_jax.data.canonical import CanonicalDataset
from fedscope_jax.data.partition import Partition, partition
from fedscope_jax.engine.memory import ProgramTooLarge
from fedscope_jax.errors import FedscopeError
from fedscope_jax.eval.protocol import EvalSet, model_ranks, summarize
from fedscope_jax.model import Semantic, init_params
from fedscope_jax.train.centralized import batch_that_fits, evaluate, make_optimizer, selection_score, train_step
from fedscope_jax.train.config import RunConfig, to_dict
from fedscope_jax.train.final_eval import SPLITS, eval_sets, metrics_from_ranks
from fedscope_jax.utils.io import atomic_output_dir, write_json
from fedscope_jax.utils.progress import progress


def owner_of_targets(part: Partition, es: EvalSet) -> np.ndarray:
    """int32 [E]: the client that holds each target (its user's client; under `domain`, its domain's)."""
    if part.scheme == "domain":
        return es.domain.astype(np.int32)
    return part.client_of_user[es.user].astype(np.int32)


def _domain_only(batches: dict[str, np.ndarray], d: int) -> dict[str, np.ndarray]:
    """The `domain` scheme: client d sees only domain d of every user."""
    keep = np.zeros(batches["seq"].shape[2], bool)
    keep[d] = True
    return {k: v * keep[None, None, :, None] for k, v in batches.items() if k in ("seq", "target")}


def train_client(c: int, rows: np.ndarray, valid_set: EvalSet, init: Any, seqs: TrainSequences, ds: CanonicalDataset,
                 cfg: RunConfig, semantic: Semantic = None, domain: int | None = None,
                 log: TextIO | None = None) -> tuple[Any, dict[str, Any]]:
    """(best parameters, facts) of client c trained alone on its training `rows` of `seqs`, from `init`.

    Early stopping on `valid_set` (the client's own validation targets); without any, the last epoch is kept;
    without training rows, `init` is returned untrained. `domain`: train on that domain only (`domain` scheme).
    Randomness: batch order from (train.seed, c); dropout and negatives from the run's train key folded with c.
    """
    mc, tc = cfg.model, cfg.train
    step = train_step(mc, tc.lr, tc.weight_decay, skip_absent=domain is not None)   # one domain: skip the others
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), init)   # a fresh copy: the step donates it
    opt_state = make_optimizer(tc.lr, tc.weight_decay).init(params)
    rng = np.random.default_rng([tc.seed, c])
    key_c = jax.random.fold_in(jax.random.split(jax.random.key(tc.seed))[1], c)
    best: tuple[float, int, Any] = (-np.inf, 0, init)
    waited, epoch, steps = 0, 0, 0
    for epoch in range(1, (tc.epochs if len(rows) else 0) + 1):
        t0 = time.time()
        batches = make_batches(seqs, rows, tc.batch_size, 1, rng)
        if domain is not None:
            batches = _domain_only(batches, domain)
        sums = np.zeros(5)
        for s in range(batches["seq"].shape[0]):
            batch = {"seq": batches["seq"][s], "target": batches["target"][s]}
            try:
                params, opt_state, loss, aux = step(params, opt_state, batch, jax.random.fold_in(key_c, steps),
                                                    semantic)
            except ProgramTooLarge as exc:   # raised by the ahead-of-time check, before anything ran
                raise batch_that_fits(cfg, exc, f"client {c}: ") from None
            steps += 1
            sums += np.array([float(loss), *(float(aux[k]) for k in ("rec", "intra", "inter", "seqcl"))])
        n = batches["seq"].shape[0]
        record: dict[str, Any] = {"client": c, "epoch": epoch, "step": steps, "loss": sums[0] / n,
                                  "rec": sums[1] / n, "intra": sums[2] / n, "inter": sums[3] / n,
                                  "seqcl": sums[4] / n, "train_seconds": time.time() - t0}
        if not np.isfinite(sums[0]):
            if log is not None:
                log.write(json.dumps(record) + "\n")
            raise FedscopeError(f"client {c}: training diverged at epoch {epoch} (loss {sums[0] / n}); "
                                "lower train.lr")
        last = epoch == tc.epochs
        if len(valid_set) and (epoch % tc.eval_every == 0 or last):
            valid, _ = evaluate(params, mc, valid_set, ds.domains, cfg.eval.ks, semantic, cfg.eval.batch_size)
            score = selection_score(valid, tc.select_metric)
            record.update({"valid": valid, "select": score})
            if score > best[0]:
                best, waited = (score, epoch, jax.device_get(params)), 0
            else:
                waited += 1
        elif not len(valid_set) and last:                 # nothing to select on: keep the last epoch
            best = (float("nan"), epoch, jax.device_get(params))
        if log is not None:
            log.write(json.dumps(record) + "\n")
        if waited >= tc.patience:
            break
    facts = {"users_trained": int(len(rows)), "valid_targets": len(valid_set), "epochs_run": epoch,
             "best_epoch": best[1], "best_valid_select": float(best[0]) if np.isfinite(best[0]) else None,
             "steps": steps, "trained": bool(len(rows))}
    return best[2], facts


def train_local(ds: CanonicalDataset, cfg: RunConfig, out: str | Path, semantic: Semantic = None,
                force: bool = False, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains one model per client, writes the run directory `out` atomically, returns summary.json's content."""
    mc, tc, fc = cfg.model, cfg.train, cfg.federated
    t_start = time.time()
    seqs = train_sequences(ds, mc.max_len)
    if not len(seqs.user):
        raise FedscopeError(f"{ds.path}: no user has two training interactions in one domain; nothing to train")
    part = partition(ds, fc.clients or None, fc.scheme, tc.seed)
    n_clients = part.n_clients
    by_domain = part.scheme == "domain"
    rows_of = seqs.client_rows(part)
    sets = eval_sets(ds, cfg)
    owner = {split: owner_of_targets(part, sets[split]) for split in SPLITS}
    ranks = {split: {p: np.zeros(len(sets[split]), np.int64) for p in ("sampled", "full")} for split in SPLITS}
    semantic = None if semantic is None else jax.device_put(semantic)
    init = init_params(jax.random.split(jax.random.key(tc.seed))[0], mc, ds.n_items, semantic)  # centralized's
    per_client: list[dict[str, Any]] = []
    with atomic_output_dir(out, force=force) as tmp:
        write_json({**to_dict(cfg), **(extra_config or {})}, tmp / "config.json")
        log = open(tmp / "metrics.jsonl", "w", encoding="utf-8")
        bar = progress(total=n_clients, desc=f"train (local, {n_clients} clients)", unit="client")
        for c in range(n_clients):
            t_client = time.time()
            local = {split: np.flatnonzero(owner[split] == c) for split in SPLITS}
            params, facts = train_client(c, rows_of[c], sets["valid"].subset(local["valid"]), init, seqs, ds, cfg,
                                         semantic, domain=c if by_domain else None, log=log)
            log.flush()
            test_local = {}
            for split in SPLITS:
                if local[split].size:
                    es = sets[split].subset(local[split])
                    r = model_ranks(params, mc, es, semantic, cfg.eval.batch_size)
                    for p in r:
                        ranks[split][p][local[split]] = r[p]
                    if split == "test":
                        test_local = summarize(es, r, ds.domains, cfg.eval.ks)
            per_client.append({"client": c, "users": None if by_domain else int((part.client_of_user == c).sum()),
                               **facts, "test_targets": int(local["test"].size),
                               "test": test_local.get("sampled"), "test_full": test_local.get("full"),
                               "seconds": time.time() - t_client})
            bar.update(1)
            bar.set_postfix(client=c, epochs=facts["epochs_run"], best=f"{facts['best_valid_select'] or 0:.4f}")
        bar.close()
        log.close()
        summary = {
            **metrics_from_ranks(ds, cfg, sets, ranks),
            "training": {"mode": "local", "clients": n_clients, "select_metric": tc.select_metric,
                         "epochs_run_max": max(p["epochs_run"] for p in per_client),
                         "steps": int(sum(p["steps"] for p in per_client)), "seconds": time.time() - t_start,
                         "users_trained": int(sum(p["users_trained"] for p in per_client)),
                         "device": jax.devices()[0].device_kind},
            "dataset": {"path": str(ds.path), "name": ds.meta.get("name"), "domains": list(ds.domains),
                        "n_items": list(ds.n_items)},
            "local": {"scheme": part.scheme, "clients": n_clients, "seed": tc.seed,
                      "partition": part.summary(ds), "per_client": per_client,
                      "untrained_clients": [p["client"] for p in per_client if not p["trained"]],
                      "init": "every client starts from the centralized run's initialization (train.seed)",
                      "ranking": "each valid/test target is ranked by the model of the client that holds it",
                      "privacy": "none applied: nothing leaves a client, so the privacy section is not used"},
        }
        write_json(summary, tmp / "summary.json")
    return summary


__all__ = ["owner_of_targets", "train_client", "train_local"]
