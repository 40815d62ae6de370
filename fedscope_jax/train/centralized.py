"""Centralized training (all clients' data pooled): the non-private upper bound of the federated runs.

One jitted Adam step per mini-batch of users, validation every `eval_every` epochs, early stopping on the
mean over domains of the sampled-protocol `select_metric`, test with the best parameters, and a run
directory with config.json, metrics.jsonl, summary.json and params.msgpack.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import serialization

from fedscope_jax.data.batching import make_batches, train_sequences
from fedscope_jax.data.canonical import CanonicalDataset
from fedscope_jax.engine.memory import ProgramTooLarge
from fedscope_jax.engine.round import CompiledFn
from fedscope_jax.errors import FedscopeError
from fedscope_jax.eval.protocol import EvalSet, model_ranks, summarize
from fedscope_jax.model import ModelConfig, Params, Semantic, init_params, loss_fn
from fedscope_jax.train.config import RunConfig, to_dict
from fedscope_jax.train.final_eval import eval_sets, final_metrics
from fedscope_jax.train.programs import PROGRAMS, Programs
from fedscope_jax.utils.io import atomic_output_dir, write_json
from fedscope_jax.utils.progress import progress


def make_optimizer(lr: float, weight_decay: float) -> optax.GradientTransformation:
    return optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)


def make_train_step(config: ModelConfig, lr: float, weight_decay: float, skip_absent: bool = False) -> Callable:
    """jit(params, opt_state, batch, key, semantic) -> (params, opt_state, loss, aux); params/state donated.
    skip_absent: skip the terms of a domain a batch names no item of (`loss_fn`; local training of one domain)."""
    opt = make_optimizer(lr, weight_decay)

    def step(params, opt_state, batch, key, semantic):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key, config, True, semantic,
                                                                       skip_absent=skip_absent)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    return jax.jit(step, donate_argnums=(0, 1))


def train_step(config: ModelConfig, lr: float, weight_decay: float, programs: Programs = PROGRAMS,
               skip_absent: bool = False) -> Callable:
    """`make_train_step` (skip_absent: see there), kept by `programs`: runs with the same settings in one process
    compile once. Compiled
    ahead of its first call and checked to fit the device's memory (`CompiledFn`: `ProgramTooLarge` before it
    runs)."""
    return programs.get(("train_step", config, lr, weight_decay, skip_absent),
                        lambda: CompiledFn(make_train_step(config, lr, weight_decay, skip_absent),
                                           "the training step"))


def batch_that_fits(cfg: RunConfig, exc: ProgramTooLarge, who: str = "") -> FedscopeError:
    """The one-line refusal of a step that does not fit: the batch size and the loss that size it, and the
    batch that fits if memory beyond the step's inputs (parameters, optimizer state, the batch) grows in
    proportion to the batch: b (available - inputs) / (needed - inputs); counting the batch as fixed errs small."""
    b = cfg.train.batch_size
    grows = exc.needed - exc.arguments
    fit = int(b * (exc.available - exc.arguments) / grows) if grows > 0 else 0
    hint = (f"train.batch_size={fit} should fit" if fit >= 1 else
            "even a batch of 1 does not fit: lower model.dim or model.max_len")
    loss = " (model.loss.rec=full: B x L x N logits; `sampled` needs far less)" if cfg.model.loss.rec == "full" else ""
    return FedscopeError(f"{who}train.batch_size={b}{loss}: {exc}; {hint}")


def evaluate(params: Params, config: ModelConfig, es: EvalSet, domains: tuple[str, ...], ks: tuple[int, ...],
             semantic: Semantic = None, batch_size: int = 512) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """({protocol: {domain: metrics}}, ranks) of the model on an evaluation set."""
    ranks = model_ranks(params, config, es, semantic, batch_size)
    return summarize(es, ranks, domains, ks), ranks


def selection_score(metrics: dict[str, Any], name: str) -> float:
    """Mean over domains (with targets) of the sampled-protocol metric `name`."""
    vals = [m[name] for m in metrics["sampled"].values() if m["targets"] > 0]
    if not vals or name not in next(iter(metrics["sampled"].values())):
        raise FedscopeError(f"train.select_metric={name!r} is not a reported metric")
    return float(np.mean(vals))


def train_centralized(ds: CanonicalDataset, cfg: RunConfig, out: str | Path, semantic: Semantic = None,
                      force: bool = False, extra_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains on the pooled data, writes the run directory `out` atomically, returns summary.json's content."""
    mc, tc, ec = cfg.model, cfg.train, cfg.eval
    t_start = time.time()
    seqs = train_sequences(ds, mc.max_len)
    if not len(seqs.user):
        raise FedscopeError(f"{ds.path}: no user has two training interactions in one domain; nothing to train")
    sets = eval_sets(ds, cfg)
    valid_set = sets["valid"]
    key_init, key_train = jax.random.split(jax.random.key(tc.seed))
    semantic = None if semantic is None else jax.device_put(semantic)   # once, not on every step
    params = init_params(key_init, mc, ds.n_items, semantic)
    opt_state = make_optimizer(tc.lr, tc.weight_decay).init(params)
    step = train_step(mc, tc.lr, tc.weight_decay)
    rng = np.random.default_rng(tc.seed)
    rows = np.arange(len(seqs.user))
    best = (-np.inf, -1, None)
    waited = 0
    global_step = 0
    with atomic_output_dir(out, force=force) as tmp:
        write_json({**to_dict(cfg), **(extra_config or {})}, tmp / "config.json")
        log = open(tmp / "metrics.jsonl", "w", encoding="utf-8")
        bar = progress(total=tc.epochs, desc="train (centralized)", unit="epoch")
        for epoch in range(1, tc.epochs + 1):
            t0 = time.time()
            batches = make_batches(seqs, rows, tc.batch_size, 1, rng)
            sums = np.zeros(5)
            for s in range(batches["seq"].shape[0]):
                batch = {"seq": batches["seq"][s], "target": batches["target"][s]}
                try:
                    params, opt_state, loss, aux = step(params, opt_state, batch,
                                                        jax.random.fold_in(key_train, global_step), semantic)
                except ProgramTooLarge as exc:   # raised by the ahead-of-time check, before anything ran
                    raise batch_that_fits(cfg, exc) from None
                global_step += 1
                sums += np.array([float(loss), *(float(aux[k]) for k in ("rec", "intra", "inter", "seqcl"))])
            n = batches["seq"].shape[0]
            record: dict[str, Any] = {"epoch": epoch, "step": global_step, "loss": sums[0] / n, "rec": sums[1] / n,
                                      "intra": sums[2] / n, "inter": sums[3] / n, "seqcl": sums[4] / n,
                                      "train_seconds": time.time() - t0}
            if not np.isfinite(sums[0]):
                log.write(json.dumps(record) + "\n")
                raise FedscopeError(f"training diverged at epoch {epoch} (loss {sums[0] / n}); lower train.lr")
            if epoch % tc.eval_every == 0 or epoch == tc.epochs:
                valid, _ = evaluate(params, mc, valid_set, ds.domains, ec.ks, semantic, ec.batch_size)
                score = selection_score(valid, tc.select_metric)
                record.update({"valid": valid, "select": score})
                if score > best[0]:
                    best = (score, epoch, jax.device_get(params))
                    waited = 0
                else:
                    waited += 1
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", valid=f"{best[0]:.4f}", best_epoch=best[1])
            if waited >= tc.patience:
                break
        bar.close()
        log.close()
        params = best[2]
        summary = {
            **final_metrics(params, ds, cfg, semantic, sets=sets),
            "training": {"mode": "centralized", "epochs_run": epoch, "best_epoch": best[1],
                         "best_valid_select": best[0], "select_metric": tc.select_metric, "steps": global_step,
                         "seconds": time.time() - t_start, "users_trained": int(len(seqs.user)),
                         "device": jax.devices()[0].device_kind},
            "dataset": {"path": str(ds.path), "name": ds.meta.get("name"), "domains": list(ds.domains),
                        "n_items": list(ds.n_items)},
        }
        (tmp / "params.msgpack").write_bytes(serialization.to_bytes(params))
        write_json(summary, tmp / "summary.json")
    return summary
