"""Measurement helpers: automatic chunk size, per-step FLOPs from XLA's cost analysis, matmul peak.

The chunk size (clients per vmapped chunk) trades vectorization against per-client memory (on CPU a wide
vmap can lose to a loop). `autotune_chunk_size` times one round per candidate on the actual cohorts and
keeps the fastest; chunk 1 (the sequential loop inside the jit) is always a candidate, so the choice
never loses to it by more than timing noise.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from fedscope_jax.engine import memory
from fedscope_jax.engine.client import ClientConfig, localize_params
from fedscope_jax.utils.progress import progress

PyTree = Any
TUNE_DESC = "choosing the client chunk (a fixed --chunk-size skips this)"


def block(tree: PyTree) -> PyTree:
    """Waits for every array of `tree`."""
    return jax.block_until_ready(tree)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds taken by fn() including waiting for its arrays."""
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def candidate_chunks(max_clients: int, devices: int = 1) -> list[int]:
    """1, 2, 4, 8, ... up to the largest per-device cohort."""
    per_device = max(1, -(-max_clients // devices))
    out, c = [], 1
    while c <= per_device:
        out.append(c)
        c *= 4 if c >= 4 else 2
    return out


def autotune_chunk_size(run_round: Callable[[int], Callable[[], Any]], candidates: Sequence[int],
                        repeats: int = 1, desc: str = TUNE_DESC) -> tuple[int, dict[int, float]]:
    """Chunk size with the fastest round. `run_round(chunk)` returns a thunk running one round (the first
    call compiles and is not timed). Candidates are tried in increasing order and the search stops once a
    round takes 1.5x the best so far, or once a candidate's program would not fit the device's memory
    (`engine.memory`: refused before it runs; the first candidate not fitting is an error). Returns (best chunk, {chunk: seconds tried}).

    Each candidate costs a compilation (seconds to minutes on a CPU), so a progress bar `desc` counts them
    and shows each one's round time."""
    times: dict[int, float] = {}
    with progress(total=len(candidates), desc=desc, unit="size", leave=False) as bar:
        for chunk in candidates:
            bar.set_postfix_str(f"compiling chunk {chunk}")
            try:
                thunk = run_round(chunk)
                block(thunk())  # compile + warm up
            except memory.ProgramTooLarge as exc:   # refused before it ran: larger chunks need more still
                if not times:
                    raise memory.ProgramTooLarge(exc.needed, exc.available,
                                                 f"the round program at chunk size {chunk}") from None
                break
            times[chunk] = min(timed(thunk) for _ in range(repeats))
            bar.update(1)
            bar.set_postfix_str(", ".join(f"{c}: {t:.3g} s" for c, t in times.items()))
            if times[chunk] > 1.5 * min(times.values()):
                break  # round time grows past here (memory-bound per-client work): stop compiling larger chunks
    best = min(times, key=times.get)
    return best, times


def step_flops(client_cfg: ClientConfig, params: PyTree, batch: PyTree, vocab: dict[str, Any]) -> float:
    """FLOPs of one local step (loss, gradient, optimizer update) for one client's batch, by XLA cost analysis.

    (XLA counts a scan body once whatever its trip count, so a round's FLOPs are steps x this.)"""
    def one_step(p, b, v, key):
        local = localize_params(p, v, client_cfg.sparse_tables)
        state = client_cfg.optimizer.init(local)
        (loss, _), grads = jax.value_and_grad(client_cfg.loss_fn, has_aux=True)(local, b, key)
        updates, _ = client_cfg.optimizer.update(grads, state, local)
        return optax.apply_updates(local, updates), loss

    compiled = jax.jit(one_step).lower(params, batch, vocab, jax.random.key(0)).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", 0.0))


def matmul_peak_flops(n: int = 2048, repeats: int = 5, dtype=jnp.float32) -> float:
    """Measured FLOP/s of a jitted n x n fp32 matmul on the default device (best of `repeats`)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    block(mm(a, b))
    best = min(timed(lambda: mm(a, b)) for _ in range(repeats))
    return 2.0 * n**3 / best
