"""`fedscope benchmark`: client-updates/s of the vectorized round vs the sequential reference, side by side.

Synthetic data sized like abxi-food-kitchen (7,144 users; 11,837 + 16,258 items; Zipf popularity), or the
real users of a prepared two-domain dataset (`BenchmarkConfig.data`), split over C clients with power-law
sizes, trained with the FedSCOPE model that `fedscope train` builds (`BenchmarkConfig.model`, the default:
its loss, local optimizer and local vocabularies at the run config's defaults, width, length and batch size
from the benchmark's) or with the engine's reference model (two domain towers, one attention layer, 100
sampled negatives shared by each mini-batch, local vocabularies); clipping and noise on.
For each C: the chunk size is chosen by timing candidates; then vectorized and sequential rounds are timed
alternately (best of `repeats`), both from the same cohorts; FLOPs come from XLA's cost analysis of one
local step times the steps run; the matmul peak is measured in the same process.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedscope_jax.data.batching import TrainSequences, make_batches, pad_steps, train_sequences
from fedscope_jax.data.canonical import DATASET_FILE, TRAIN, CanonicalDataset, load_dataset
from fedscope_jax.data.partition import partition, powerlaw_sizes
from fedscope_jax.engine import reference_model as rm
from fedscope_jax.engine.client import ClientConfig
from fedscope_jax.engine.cohort import ClientShard, build_cohorts, localize_batch, plan_buckets
from fedscope_jax.engine.memory import program_bytes
from fedscope_jax.engine.round import EngineConfig, SequentialRunner, cohort_computed_steps, make_round_fn
from fedscope_jax.engine.server import init_server_state, server_optimizer
from fedscope_jax.engine.tune import (autotune_chunk_size, block, candidate_chunks, matmul_peak_flops, step_flops,
                                      timed)
from fedscope_jax.errors import FedscopeError
from fedscope_jax.utils.progress import progress

__all__ = ["BenchmarkConfig", "describe_data", "format_table", "load_benchmark_data", "real_clients",
           "real_user_batches", "run_benchmark", "synthetic_clients", "time_engines"]

FIELDS, TABLES = rm.FIELDS, rm.TABLES


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """Workload of the benchmark (defaults: abxi-food-kitchen sizes, the paper's width and sequence length).

    data: a prepared two-domain dataset directory whose real users are benchmarked; None = synthetic users
    (`users`, `items_a`, `items_b` size them and are ignored when `data` is set)."""

    clients: tuple[int, ...] = (8, 32, 128, 512)
    users: int = 7144
    items_a: int = 11837
    items_b: int = 16258
    data: str | None = None
    max_len: int = 50
    dim: int = 64
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
    model: str = "fedscope"      # fedscope (the model users train) | reference (the engine's test model)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise FedscopeError(f"--model {self.model!r}: expected one of {', '.join(MODELS)}")


MODELS = ("fedscope", "reference")


def fedscope_run_config(cfg: BenchmarkConfig, n_clients: int) -> Any:
    """The run config of the FedSCOPE model's benchmark: the defaults with the benchmark's settings."""
    from fedscope_jax.train.config import load_config

    return load_config(None, [f"model.dim={cfg.dim}", f"model.max_len={cfg.max_len}",
                              f"train.batch_size={cfg.batch_size}", f"train.seed={cfg.seed}",
                              "federated.scheme=powerlaw", f"federated.clients={n_clients}",
                              f"federated.local_epochs={cfg.local_epochs}", "privacy.mode=off",
                              "eval.num_negatives=1"])   # nothing is evaluated: any catalogue will do


def fedscope_clients(ds: CanonicalDataset, cfg: BenchmarkConfig, n_clients: int
                     ) -> tuple[list[ClientShard], ClientConfig, Any]:
    """(shards, client config, initial params) of the FedSCOPE model's federated run of `ds` over `n_clients`
    power-law silos (`fedscope train --scheme powerlaw`'s partition), as `train.federated.seed_context` builds
    them: the run config's defaults with the benchmark's width, length, batch size, local epochs and seed;
    round 0's batches. Privacy is left to the benchmark's own clipping and noise (cfg.clip, noise_multiplier)."""
    from fedscope_jax.train.federated import seed_context

    ctx = seed_context(ds, fedscope_run_config(cfg, n_clients), None)
    return [ctx.source(0, c) for c in range(ctx.n_clients)], ctx.client_cfg, ctx.params


def synthetic_dataset(cfg: BenchmarkConfig, where: str | Path) -> CanonicalDataset:
    """A synthetic two-domain dataset of cfg.users users and cfg.items_a / items_b items (`data.synth`, seeded
    by cfg.seed; lengths up to cfg.max_len + 1), written under `where` and loaded: the FedSCOPE model's
    synthetic users."""
    from fedscope_jax.data.synth import SynthConfig, synthesize

    length = max(10, cfg.max_len + 1)
    synth = SynthConfig(users=cfg.users, items=(cfg.items_a, cfg.items_b), max_length=length,
                        mean_length=min(SynthConfig.mean_length, length), min_length=min(10, length),
                        seed=cfg.seed, name="synthetic-benchmark")
    synthesize(synth, Path(where) / "synthetic")
    return load_dataset(Path(where) / "synthetic")


def synthetic_clients(cfg: BenchmarkConfig, n_clients: int, model: rm.ReferenceConfig) -> list[ClientShard]:
    """Power-law sized clients with synthetic two-domain users, localized to their vocabularies."""
    rng = np.random.default_rng([cfg.seed, n_clients])
    sizes = powerlaw_sizes(cfg.users, n_clients, cfg.size_alpha, min_users=1)
    return [rm.synthetic_client(rng, int(n), model, cfg.batch_size, cfg.negatives) for n in sizes]


def load_benchmark_data(path: str) -> CanonicalDataset:
    """The prepared dataset of `--data`, checked to be one the two-tower reference model can train."""
    if not (Path(path) / DATASET_FILE).is_file():
        raise FedscopeError(f"--data {path}: no {DATASET_FILE} there; expected a prepared dataset directory "
                            "(make one with `fedscope data prepare`)")
    ds = load_dataset(path)
    if len(ds.domains) != 2:
        raise FedscopeError(f"--data {path}: the benchmark's reference model has two domain towers; this dataset "
                            f"has {len(ds.domains)} domain(s) {list(ds.domains)}")
    return ds


def left_align(seq: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Moves the padding of left-padded rows (batching's layout) to the end (the reference model's layout).

    seq and target are padded at the same positions (a target exists exactly where an input does), so one
    stable order per row serves both."""
    order = np.argsort(seq == 0, axis=-1, kind="stable")
    return np.take_along_axis(seq, order, -1), np.take_along_axis(target, order, -1)


def real_user_batches(seqs: TrainSequences, rows: np.ndarray, n_items: tuple[int, int], batch_size: int,
                      n_neg: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One client's real users as `rm.synthetic_user_batches` lays them out (domain 0 -> a, 1 -> b), plus its
    step mask: users shuffled into mini-batches by `make_batches` (one epoch), sequences left-aligned, negatives
    uniform over each domain's items. A client without training rows gets one padding step (step_mask False)."""
    b = make_batches(seqs, rows, batch_size, 1, rng)
    b = pad_steps(b, max(1, b["step_mask"].shape[0]))
    steps = b["step_mask"].shape[0]
    out: dict[str, np.ndarray] = {}
    for d, (name, n) in enumerate(zip("ab", n_items)):
        out[f"seq_{name}"], out[f"pos_{name}"] = left_align(b["seq"][:, :, d], b["target"][:, :, d])
        out[f"neg_{name}"] = rng.integers(1, n + 1, size=(steps, n_neg), dtype=np.int32)
    out["user_mask"] = b["user_mask"].astype(np.float32)
    return out, b["step_mask"]


def real_clients(ds: CanonicalDataset, cfg: BenchmarkConfig, n_clients: int,
                 model: rm.ReferenceConfig) -> list[ClientShard]:
    """The dataset's users split over power-law sized clients (data.partition, exponent cfg.size_alpha, seeded
    by cfg.seed), each client's train sequences batched and localized like `synthetic_clients`. Users without
    a training target (fewer than 2 train items in every domain) carry no data and are left out."""
    part = partition(ds, n_clients, "powerlaw", cfg.seed, alpha=cfg.size_alpha)
    seqs = train_sequences(ds, model.max_len)
    rng = np.random.default_rng([cfg.seed, n_clients])
    shards = []
    for rows in seqs.client_rows(part):
        batch, step_mask = real_user_batches(seqs, rows, (model.n_items_a, model.n_items_b), cfg.batch_size,
                                             cfg.negatives, rng)
        shards.append(ClientShard(*localize_batch(batch, FIELDS), step_mask=step_mask))
    return shards


def data_facts(cfg: BenchmarkConfig, ds: CanonicalDataset | None) -> dict[str, Any]:
    """What was measured, for the report: the dataset (path, name, sizes) or the synthetic sizes."""
    if ds is None:
        return {"source": "synthetic", "users": cfg.users, "items": [cfg.items_a, cfg.items_b]}
    return {"source": "dataset", "path": str(ds.path), "name": ds.meta.get("name", ds.path.name),
            "users": int(ds.n_users), "items": [int(n) for n in ds.n_items],
            "train_interactions": int(np.sum(ds.split == TRAIN))}


def _memory(compiled) -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device memory_stats peak_bytes_in_use"
    return int(program_bytes(compiled)), "XLA memory_analysis (arguments + outputs + temporaries)"


def bench_clients(cfg: BenchmarkConfig, n_clients: int, peak: float, ds: CanonicalDataset | None = None,
                  note: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """One row of the benchmark: C = n_clients, all clients in the round; the real users of `ds` (loaded from
    cfg.data when not given) or, without data, synthetic ones. note(phase) is told each phase as it starts
    (for a progress bar)."""
    if ds is None and cfg.data is not None:
        ds = load_benchmark_data(cfg.data)
    n_a, n_b = (cfg.items_a, cfg.items_b) if ds is None else ds.n_items
    if cfg.model == "fedscope":
        if ds is None:
            raise FedscopeError("the FedSCOPE model's benchmark needs a dataset (run_benchmark synthesizes one)")
        shards, ccfg, params = fedscope_clients(ds, cfg, n_clients)
        rows: dict[str, int] = {}   # padding vocabulary entries: PAD_ROW
    else:
        model = rm.ReferenceConfig(n_items_a=n_a, n_items_b=n_b, dim=cfg.dim, max_len=cfg.max_len)
        shards = (synthetic_clients(cfg, n_clients, model) if ds is None
                  else real_clients(ds, cfg, n_clients, model))
        rows = {"a": n_a + 1, "b": n_b + 1}
        ccfg = ClientConfig(functools.partial(rm.loss_fn, config=model), optax.adam(1e-3), cfg.local_epochs, TABLES)
        params = rm.init_params(jax.random.key(cfg.seed), model)
    plan = plan_buckets(shards, cfg.max_buckets)
    privacy = dict(clip=np.full(n_clients, cfg.clip, np.float32),
                   noise_multiplier=np.full(n_clients, cfg.noise_multiplier, np.float32))
    timing = time_engines(shards, np.arange(n_clients), plan, rows, ccfg, params, cfg.noise_mode, cfg.repeats,
                          cfg.seed + 1, privacy, note, desc=f"C={n_clients}: chunk sizes")
    compiled, cohorts, pad, best = timing.pop("compiled"), timing.pop("cohorts"), timing.pop("pad"), timing["chunk"]
    t_vm, t_seq, diff = timing["vmap_seconds"], timing["sequential_seconds"], timing["max_abs_diff"]
    t_vm_best, t_seq_best = min(t_vm), min(t_seq)

    flops_useful = flops_executed = 0.0
    note("FLOPs (XLA cost analysis)")
    # executed: the steps the timed program computes (at the chosen chunk; a chunk of one skips padding steps)
    # (local_epochs: 1 in fedscope, whose batches hold every epoch)
    for cohort, (_, real, _), computed in zip(cohorts, pad.cohorts, cohort_computed_steps(pad, best)):
        one_batch = jax.tree.map(lambda x: x[0, 0], cohort.data.batch)
        one_vocab = jax.tree.map(lambda x: x[0], cohort.data.vocab)
        f = step_flops(ccfg, params, one_batch, one_vocab)
        flops_useful += f * real * ccfg.local_epochs
        flops_executed += f * computed * ccfg.local_epochs
    mem, mem_source = _memory(compiled)
    return {
        "clients": n_clients,
        "vmap_updates_per_s": n_clients / t_vm_best,
        "sequential_updates_per_s": n_clients / t_seq_best,
        "speedup": t_seq_best / t_vm_best,
        "vmap_rounds_per_s": 1.0 / t_vm_best,
        "sequential_rounds_per_s": 1.0 / t_seq_best,
        "vmap_round_seconds": t_vm, "sequential_round_seconds": t_seq,
        "chunk_size": best, "chunk_tuning_seconds": timing["chunk_tuning_seconds"],
        "buckets": [{"steps": int(c.data.step_mask.shape[1]), "clients": int(c.client_id.shape[0]),
                     "vocab": {k: int(v.shape[1]) for k, v in c.data.vocab.items()}} for c in cohorts],
        "flops_per_round": flops_useful,
        "flops_per_round_executed": flops_executed,
        "flops_utilization": flops_useful / t_vm_best / peak,
        "padding_waste": pad.waste,
        "peak_memory_bytes": mem, "peak_memory_source": mem_source,
        "max_abs_diff_vs_sequential": diff,
    }


def time_engines(shards: Any, ids: np.ndarray, plan: Any, rows: dict[str, int], ccfg: ClientConfig, params: Any,
                 noise_mode: str, repeats: int, seed: int, privacy: dict[str, np.ndarray] | None = None,
                 note: Callable[[str], None] = lambda _: None, desc: str = "chunk sizes") -> dict[str, Any]:
    """One round of the clients `ids` (indices into `shards`), vectorized (chunk size chosen by timing) and
    sequential, from the same cohorts and state: their agreement, then `repeats` alternating timed rounds.
    Returns {"chunk", "chunk_tuning_seconds", "vmap_seconds", "sequential_seconds", "max_abs_diff"} and, for
    the caller's own analysis, the compiled round, its cohorts and their padding ("compiled", "cohorts",
    "pad"). privacy: {"clip", "noise_multiplier"} per client (default: none)."""
    privacy = privacy or {}
    sopt = server_optimizer("fedavg")
    key = jax.random.key(seed)
    cache: dict[int, Any] = {}

    def vmapped(chunk: int):
        # every client takes part: pad client counts only to a multiple of the chunk (no "nice" sizes)
        cohorts, pad = build_cohorts(shards, ids, plan, rows, multiple=chunk, nice=False, **privacy)
        cohorts = jax.device_put(cohorts)
        holder = [init_server_state(params, sopt)]
        fn = make_round_fn(ccfg, sopt, EngineConfig(chunk, noise_mode))
        compiled = fn.lower(holder[0], cohorts, key).compile()  # ahead of time: compiled once, reused below

        def thunk():
            holder[0], _ = compiled(holder[0], cohorts, key)
            return holder[0]
        cache[chunk] = (compiled, cohorts, pad, thunk)
        return thunk

    buckets = [plan.bucket_of(shards[int(c)].n_steps) for c in ids]
    largest = max(buckets.count(b) for b in set(buckets))
    note("choosing the chunk")
    best, tune_times = autotune_chunk_size(vmapped, candidate_chunks(largest), desc=desc)
    compiled, cohorts, pad, vm_thunk = cache[best]

    seq_cohorts, _ = build_cohorts(shards, ids, plan, rows, multiple=1, nice=False, **privacy)
    runner = SequentialRunner(ccfg, sopt, EngineConfig(1, noise_mode))
    seq_holder = [init_server_state(params, sopt)]

    def seq_thunk():
        seq_holder[0], _ = runner(seq_holder[0], seq_cohorts, key)
        return seq_holder[0]

    # Agreement of one round from the same state (vectorized vs sequential).
    note("sequential reference: compiling, agreement")
    vm_state, _ = compiled(init_server_state(params, sopt), cohorts, key)  # (donates its own copy)
    seq_state, _ = runner(init_server_state(params, sopt), seq_cohorts, key)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(vm_state.params),
                                                              jax.tree.leaves(seq_state.params)))
    block(seq_thunk())  # warm (compiled per bucket shape by the agreement check already)
    t_vm, t_seq = [], []
    note(f"timing {repeats} x (vectorized, sequential)")
    for _ in range(repeats):
        t_vm.append(timed(vm_thunk))
        t_seq.append(timed(seq_thunk))
    return {"chunk": best, "chunk_tuning_seconds": {str(k): v for k, v in tune_times.items()},
            "vmap_seconds": t_vm, "sequential_seconds": t_seq, "max_abs_diff": diff,
            "compiled": compiled, "cohorts": cohorts, "pad": pad}


def run_benchmark(cfg: BenchmarkConfig,
                  on_report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The whole benchmark: the data (cfg.data, checked first), matmul peak, then one row per client count.
    on_report: called with the report so far after each client count (`complete` false until the last), so
    a caller can save the finished rows of a benchmark that is stopped early."""
    ds = load_benchmark_data(cfg.data) if cfg.data is not None else None
    if ds is not None:  # the workload record then states the dataset's sizes, not the synthetic defaults
        cfg = dataclasses.replace(cfg, users=int(ds.n_users), items_a=ds.n_items[0], items_b=ds.n_items[1])
    with tempfile.TemporaryDirectory(prefix="fedscope-benchmark-") as tmp:
        if ds is None and cfg.model == "fedscope":   # the FedSCOPE model trains a dataset: synthesize one
            ds = synthetic_dataset(cfg, tmp)
        return _run(cfg, ds, synthetic=cfg.data is None, on_report=on_report)


def _run(cfg: BenchmarkConfig, ds: CanonicalDataset | None, synthetic: bool,
         on_report: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    device = jax.devices()[0]
    peak = matmul_peak_flops()
    report: dict[str, Any] = {
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "host": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "peak_flops": peak,
        "peak_flops_source": "best of 5 jitted 2048x2048 fp32 matmuls, same process",
        "workload": _workload(cfg),
        "data": data_facts(cfg, None if synthetic else ds),
        "results": [],
        "complete": False,
    }
    with progress(total=len(cfg.clients), desc="benchmark", unit="C") as bar:
        for i, c in enumerate(cfg.clients):
            report["results"].append(bench_clients(cfg, c, peak, ds,
                                                   note=lambda phase, c=c: bar.set_postfix_str(f"C={c}: {phase}")))
            report["complete"] = i == len(cfg.clients) - 1
            bar.update(1)
            if on_report is not None:
                on_report(report)
    return report


def _workload(cfg: BenchmarkConfig) -> dict[str, Any]:
    """The report's workload record: the benchmark's config, and for the FedSCOPE model the step shape of the
    run config it trains (loss, negatives: not the reference model's `negatives` and partition exponent)."""
    out = dataclasses.asdict(cfg)
    if cfg.model == "fedscope":
        from fedscope_jax.train.config import step_shape

        for key in ("negatives", "size_alpha"):
            out.pop(key)
        out.update(step_shape(fedscope_run_config(cfg, max(cfg.clients))), partition="powerlaw, exponent 1")
    return out


def describe_data(data: dict[str, Any] | None) -> str:
    """One line naming the data a report measured."""
    if not data or data.get("source") != "dataset":
        sizes = f": {data['users']} users, {data['items'][0]} + {data['items'][1]} items" if data else ""
        return f"data: synthetic{sizes}"
    return (f"data: {data['name']} ({data['path']}): {data['users']} users, {data['items'][0]} + "
            f"{data['items'][1]} items, {data['train_interactions']} train interactions")


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table of the benchmark rows."""
    head = (f"{'C':>5} {'vmap upd/s':>11} {'seq upd/s':>10} {'speedup':>8} {'rounds/s':>9} {'chunk':>6} "
            f"{'waste':>6} {'GFLOP/rnd':>10} {'util':>6} {'mem MiB':>8} {'maxdiff':>8}")
    model = report.get("workload", {}).get("model", "reference")
    lines = [f"device {report['device']} x{report['device_count']}, matmul peak "
             f"{report['peak_flops'] / 1e9:.1f} GFLOP/s; model: {model}", describe_data(report.get("data")), head]
    for r in report["results"]:
        lines.append(f"{r['clients']:>5} {r['vmap_updates_per_s']:>11.1f} {r['sequential_updates_per_s']:>10.1f} "
                     f"{r['speedup']:>8.2f} {r['vmap_rounds_per_s']:>9.3f} {r['chunk_size']:>6} "
                     f"{r['padding_waste']:>6.1%} {r['flops_per_round'] / 1e9:>10.2f} "
                     f"{r['flops_utilization']:>6.1%} {r['peak_memory_bytes'] / 2**20:>8.1f} "
                     f"{r['max_abs_diff_vs_sequential']:>8.1e}")
    return "\n".join(lines)


# ---- the sweep benchmark: one vmapped program for all configurations vs one run after another ------------
