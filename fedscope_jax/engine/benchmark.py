"""`fedscope benchmark`: client-updates/s of the vectorized round vs the sequential reference, side by side.

Synthetic data sized like abxi-food-kitchen (7,144 users; 11,837 + 16,258 items; Zipf popularity), split
over C clients with power-law sizes, trained with the engine's reference model (two domain towers,
100 sampled negatives shared by each mini-batch, local vocabularies), clipping and noise on.
For each C: the chunk size is chosen by timing candidates; then vectorized and sequential rounds are timed
alternately (best of `repeats`), both from the same cohorts; FLOPs come from XLA's cost analysis of one
local step times the steps run; the matmul peak is measured in the same process.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedscope_jax.data.partition import powerlaw_sizes
from fedscope_jax.engine import reference_model as rm
from fedscope_jax.engine.client import ClientConfig, SparseTable
from fedscope_jax.engine.cohort import ClientShard, build_cohorts, localize_batch, plan_buckets
from fedscope_jax.engine.round import EngineConfig, SequentialRunner, make_round_fn
from fedscope_jax.engine.server import init_server_state, server_optimizer
from fedscope_jax.engine.tune import (autotune_chunk_size, block, candidate_chunks, matmul_peak_flops, step_flops,
                                      timed)
from fedscope_jax.utils.progress import progress

FIELDS = {"a": ["seq_a", "pos_a", "neg_a"], "b": ["seq_b", "pos_b", "neg_b"]}
TABLES = (SparseTable(("item_emb_a",), "a"), SparseTable(("item_emb_b",), "b"))


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Workload of the benchmark (defaults: abxi-food-kitchen sizes, a reduced model for a 2-core CPU)."""

    clients: tuple[int, ...] = (8, 32, 128, 512)
    users: int = 7144
    items_a: int = 11837
    items_b: int = 16258
    max_len: int = 32
    dim: int = 32
    batch_size: int = 32
    negatives: int = 100
    size_alpha: float = 0.5      # power-law exponent of client sizes (client r holds ~ (r+1)^-alpha)
    local_epochs: int = 1
    max_buckets: int = 4
    noise_mode: str = "sum"
    clip: float = 1.0
    noise_multiplier: float = 0.5
    repeats: int = 4
    seed: int = 0


def synthetic_clients(cfg: BenchmarkConfig, n_clients: int, model: rm.ReferenceConfig) -> list[ClientShard]:
    """Power-law sized clients with synthetic two-domain users, localized to their vocabularies."""
    rng = np.random.default_rng([cfg.seed, n_clients])
    sizes = powerlaw_sizes(cfg.users, n_clients, cfg.size_alpha, min_users=1)
    return [ClientShard(*localize_batch(rm.synthetic_user_batches(rng, int(n), model, cfg.batch_size,
                                                                  cfg.negatives), FIELDS)) for n in sizes]


def _memory(compiled) -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use"
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
    return int(total), "XLA memory_analysis (arguments + outputs + temporaries)"


def bench_clients(cfg: BenchmarkConfig, n_clients: int, peak: float) -> dict[str, Any]:
    """One row of the benchmark: C = n_clients, all clients in the round."""
    model = rm.ReferenceConfig(n_items_a=cfg.items_a, n_items_b=cfg.items_b, dim=cfg.dim, max_len=cfg.max_len)
    shards = synthetic_clients(cfg, n_clients, model)
    plan = plan_buckets(shards, cfg.max_buckets)
    rows = {"a": cfg.items_a + 1, "b": cfg.items_b + 1}
    ccfg = ClientConfig(functools.partial(rm.loss_fn, config=model), optax.adam(1e-3), cfg.local_epochs, TABLES)
    sopt = server_optimizer("fedavg")
    params = rm.init_params(jax.random.key(cfg.seed), model)
    key = jax.random.key(cfg.seed + 1)
    privacy = dict(clip=np.full(n_clients, cfg.clip, np.float32),
                   noise_multiplier=np.full(n_clients, cfg.noise_multiplier, np.float32))
    ids = np.arange(n_clients)
    cache: dict[int, Any] = {}

    def vmapped(chunk: int):
        # every client takes part: pad client counts only to a multiple of the chunk (no "nice" sizes)
        cohorts, pad = build_cohorts(shards, ids, plan, rows, multiple=chunk, nice=False, **privacy)
        cohorts = jax.device_put(cohorts)
        holder = [init_server_state(params, sopt)]
        fn = make_round_fn(ccfg, sopt, EngineConfig(chunk, cfg.noise_mode))
        compiled = fn.lower(holder[0], cohorts, key).compile()  # ahead of time: compiled once, reused below

        def thunk():
            holder[0], _ = compiled(holder[0], cohorts, key)
            return holder[0]
        cache[chunk] = (compiled, cohorts, pad, thunk)
        return thunk

    largest = max(int(np.sum([plan.bucket_of(s.n_steps) == b for s in shards])) for b in range(len(plan.steps)))
    best, tune_times = autotune_chunk_size(vmapped, candidate_chunks(largest))
    compiled, cohorts, pad, vm_thunk = cache[best]

    seq_cohorts, _ = build_cohorts(shards, ids, plan, rows, multiple=1, nice=False, **privacy)
    runner = SequentialRunner(ccfg, sopt, EngineConfig(1, cfg.noise_mode))
    seq_holder = [init_server_state(params, sopt)]

    def seq_thunk():
        seq_holder[0], _ = runner(seq_holder[0], seq_cohorts, key)
        return seq_holder[0]

    # Agreement of one round from the same state (vectorized vs sequential).
    vm_state, _ = compiled(init_server_state(params, sopt), cohorts, key)  # (donates its own copy)
    seq_state, _ = runner(init_server_state(params, sopt), seq_cohorts, key)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(vm_state.params),
                                                              jax.tree.leaves(seq_state.params)))
    block(seq_thunk())  # warm (compiled per bucket shape by the agreement check already)
    t_vm, t_seq = [], []
    for _ in range(cfg.repeats):
        t_vm.append(timed(vm_thunk))
        t_seq.append(timed(seq_thunk))
    t_vm_best, t_seq_best = min(t_vm), min(t_seq)

    flops_useful = flops_executed = 0.0
    for b, cohort in enumerate(cohorts):
        one_batch = jax.tree.map(lambda x: x[0, 0], cohort.data.batch)
        one_vocab = jax.tree.map(lambda x: x[0], cohort.data.vocab)
        f = step_flops(ccfg, params, one_batch, one_vocab)
        real = int(np.sum(np.asarray(cohort.data.step_mask))) * cfg.local_epochs
        flops_useful += f * real
        flops_executed += f * cohort.data.step_mask.size * cfg.local_epochs
    mem, mem_source = _memory(compiled)
    return {
        "clients": n_clients,
        "vmap_updates_per_s": n_clients / t_vm_best,
        "sequential_updates_per_s": n_clients / t_seq_best,
        "speedup": t_seq_best / t_vm_best,
        "vmap_rounds_per_s": 1.0 / t_vm_best,
        "sequential_rounds_per_s": 1.0 / t_seq_best,
        "vmap_round_seconds": t_vm, "sequential_round_seconds": t_seq,
        "chunk_size": best, "chunk_tuning_seconds": {str(k): v for k, v in tune_times.items()},
        "buckets": [{"steps": int(c.data.step_mask.shape[1]), "clients": int(c.client_id.shape[0]),
                     "vocab": {k: int(v.shape[1]) for k, v in c.data.vocab.items()}} for c in cohorts],
        "flops_per_round": flops_useful,
        "flops_per_round_executed": flops_executed,
        "flops_utilization": flops_useful / t_vm_best / peak,
        "padding_waste": pad.waste,
        "peak_memory_bytes": mem, "peak_memory_source": mem_source,
        "max_abs_diff_vs_sequential": diff,
    }


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The whole benchmark: matmul peak, then one row per client count."""
    device = jax.devices()[0]
    peak = matmul_peak_flops()
    results = []
    for c in progress(cfg.clients, desc="benchmark", unit="C"):
        results.append(bench_clients(cfg, c, peak))
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "peak_flops": peak,
        "peak_flops_source": "best of 5 jitted 2048x2048 fp32 matmuls, same process",
        "workload": dataclasses.asdict(cfg),
        "results": results,
    }


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the benchmark rows."""
    head = (f"{'C':>5} {'vmap upd/s':>11} {'seq upd/s':>10} {'speedup':>8} {'rounds/s':>9} {'chunk':>6} "
            f"{'waste':>6} {'GFLOP/rnd':>10} {'util':>6} {'mem MiB':>8} {'maxdiff':>8}")
    lines = [f"device {report['device']} x{report['device_count']}, matmul peak "
             f"{report['peak_flops'] / 1e9:.1f} GFLOP/s", head]
    for r in report["results"]:
        lines.append(f"{r['clients']:>5} {r['vmap_updates_per_s']:>11.1f} {r['sequential_updates_per_s']:>10.1f} "
                     f"{r['speedup']:>8.2f} {r['vmap_rounds_per_s']:>9.3f} {r['chunk_size']:>6} "
                     f"{r['padding_waste']:>6.1%} {r['flops_per_round'] / 1e9:>10.2f} "
                     f"{r['flops_utilization']:>6.1%} {r['peak_memory_bytes'] / 2**20:>8.1f} "
                     f"{r['max_abs_diff_vs_sequential']:>8.1e}")
    return "\n".join(lines)


# ---- the sweep benchmark: one vmapped program for all configurations vs one run after another ------------

def run_sweep_benchmark(ds: Any, cfg: Any, modes: tuple[str, ...] = ("personalized", "uniform"),
                        epsilons: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, float("inf")),
                        workdir: Any = None, config_chunks: tuple[int, ...] = (0,),
                        repeats: int = 2) -> dict[str, Any]:
    """Trains the configurations modes x epsilons (one seed: cfg.train.seed) of the FedSCOPE model on `ds`
    as one sweep (`run_tracks` with every configuration: the sweep program) and one by one (`run_tracks` per
    configuration: the single-run program, compiled once and reused for each), side by side in this process.

    Both sides are run `repeats` times, alternating (sweep first in even repeats, one-by-one first in odd
    ones) so that a load change on a shared machine hits both; the best repeat of each side is reported.
    Compiles happen in the first repeat and are reported apart from the training seconds (the round loops:
    sampling, batches, cohorts, privacy bookkeeping, rounds; no validation during the rounds, one checkpoint
    at the end). Configurations that are the same run (eps inf under each mode) are trained once on both
    sides. config_chunks: the sweep is timed per value (configs vectorized at once; 0 = the default for the
    device); the first is the reported `sweep_seconds`, all are in `sweep_by_config_chunk`."""
    import json
    import tempfile
    import time
    from pathlib import Path

    from fedscope_jax.train.config import to_dict
    from fedscope_jax.train.federated import Track, run_tracks, seed_context
    from fedscope_jax.train.sweep import sweep_points

    fcfg = dataclasses.replace(cfg.federated, checkpoint_every=cfg.federated.rounds,
                               eval_every=cfg.federated.rounds)
    cfg = dataclasses.replace(cfg, federated=fcfg)
    points = sweep_points(cfg, modes, epsilons, [cfg.train.seed])
    unique: dict[str, Any] = {}
    for p in points:
        unique.setdefault(json.dumps(to_dict(p.cfg), sort_keys=True), p)
    trained = list(unique.values())
    ctx = seed_context(ds, cfg, None)
    sweeps: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(config_chunks))}
    singles: list[dict[str, Any]] = []
    sweep_states = single_states = sweep_facts = single_facts = None
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = Path(tmp)

        def tracks(prefix: str, pts: list[Any]) -> list[Any]:
            out = []
            for p in pts:
                (root / prefix / p.name).mkdir(parents=True)
                out.append(Track(root / prefix / p.name, ctx.session(p.cfg.privacy)))
            return out

        def sweep_side(rep: int) -> None:
            nonlocal sweep_states, sweep_facts
            for i, cc in enumerate(config_chunks):
                t0 = time.perf_counter()
                states, recs, facts = run_tracks(tracks(f"sweep{i}-{rep}", trained), ctx.source, ctx.n_clients,
                                                 ctx.params, ctx.client_cfg, fcfg, config_chunk=cc,
                                                 desc=f"sweep c={cc} ({len(trained)} configs)")
                sweeps[i].append({"config_chunk": facts[0]["program"]["config_chunk"],
                                  "wall_seconds": time.perf_counter() - t0, **facts[0]["timing"],
                                  "round_seconds": [r["seconds"] for r in recs[0]]})
                if i == 0:
                    sweep_states, sweep_facts = states, facts

        def single_side(rep: int) -> None:
            nonlocal single_states, single_facts
            t0 = time.perf_counter()
            states, facts = [], []
            for p in progress(trained, desc="one by one", unit="config"):
                s, _, f = run_tracks(tracks(f"single-{rep}", [p]), ctx.source, ctx.n_clients, ctx.params,
                                     ctx.client_cfg, fcfg, desc=p.name)
                states.append(s[0])
                facts.append(f[0])
            singles.append({"wall_seconds": time.perf_counter() - t0,
                            **{k: sum(f["timing"][k] for f in facts) for k in facts[0]["timing"]}})
            single_states, single_facts = states, facts

        for rep in range(max(1, repeats)):
            for side in ((sweep_side, single_side) if rep % 2 == 0 else (single_side, sweep_side)):
                side(rep)
    diffs = {p.name: max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(s.params),
                                                                       jax.tree.leaves(o.params)))
             for p, s, o in zip(trained, sweep_states, single_states)}
    one_by_one_seconds = min(s["train_seconds"] for s in singles)
    by_chunk = [{"config_chunk": runs[0]["config_chunk"], "train_seconds": min(r["train_seconds"] for r in runs),
                 "compile_seconds": sum(r["compile_seconds"] for r in runs),
                 "train_seconds_per_repeat": [r["train_seconds"] for r in runs],
                 "round_seconds_per_repeat": [r["round_seconds"] for r in runs]} for runs in sweeps.values()]
    for b in by_chunk:
        b["speedup"] = one_by_one_seconds / b["train_seconds"]
    device = jax.devices()[0]
    mc = cfg.model
    return {
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "configs": [p.name for p in points],
        "configs_trained": [p.name for p in trained],
        "sweep_seconds": by_chunk[0]["train_seconds"],
        "one_by_one_seconds": one_by_one_seconds,
        "sweep_speedup": one_by_one_seconds / by_chunk[0]["train_seconds"],
        "sweep_compile_seconds": by_chunk[0]["compile_seconds"],
        "one_by_one_compile_seconds": sum(s["compile_seconds"] for s in singles),
        "sweep_config_chunk": by_chunk[0]["config_chunk"],
        "sweep_by_config_chunk": by_chunk,
        "one_by_one_train_seconds_per_repeat": [s["train_seconds"] for s in singles],
        "repeats": max(1, repeats),
        "sweep_programs": sorted({json.dumps(f["program"], sort_keys=True) for f in sweep_facts}),
        "sweep_chunk_sizes": sorted({f["chunk_size"] for f in sweep_facts}),
        "one_by_one_chunk_sizes": sorted({f["chunk_size"] for f in single_facts}),
        "max_abs_param_diff_vs_one_by_one": diffs,
        "workload": {"dataset": str(ds.path), "users": int(ds.n_users), "n_items": list(ds.n_items),
                     "rounds": fcfg.rounds, "clients": fcfg.clients, "fraction": fcfg.fraction,
                     "sampling": fcfg.sampling, "scheme": fcfg.scheme, "local_epochs": fcfg.local_epochs,
                     "batch_size": cfg.train.batch_size,
                     "model": {"dim": mc.dim, "blocks": mc.blocks, "max_len": mc.max_len,
                               "num_negatives": mc.loss.num_negatives},
                     "seed": cfg.train.seed},
        "timing_note": "train seconds: the round loops (sampling, batches, cohorts, privacy bookkeeping, the "
                       "compiled rounds, one final checkpoint per configuration), compiles apart; best of "
                       "`repeats` alternating repeats per side, in this process",
    }


def format_sweep_table(report: dict[str, Any]) -> str:
    """A plain-text summary of the sweep benchmark."""
    n, k = len(report["configs"]), len(report["configs_trained"])
    return "\n".join([
        f"device {report['device']} x{report['device_count']}; {n} configurations ({k} distinct runs), "
        f"{report['workload']['rounds']} rounds, {report['workload']['clients']} clients",
        f"{'':<12} {'train s':>9} {'compile s':>10}",
        *[f"{'sweep c=' + str(b['config_chunk']):<12} {b['train_seconds']:>9.2f} {b['compile_seconds']:>10.2f}"
          for b in report["sweep_by_config_chunk"]],
        f"{'one by one':<12} {report['one_by_one_seconds']:>9.2f} {report['one_by_one_compile_seconds']:>10.2f}",
        f"sweep_speedup {report['sweep_speedup']:.2f}x (one-by-one train s / sweep c={report['sweep_config_chunk']} "
        f"train s); max |param diff| "
        f"{max(report['max_abs_param_diff_vs_one_by_one'].values()):.1e}",
    ])
