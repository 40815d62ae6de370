"""Measures what simulated secure aggregation adds to a sum: quantization error vs the plain sum, and speed.

    fedscope privacy secagg-error --clients 16 64 --dim 100000 --bound 1 --dropout 0.1

For each client count it draws updates uniform in [-bound, bound] (inside the range, so only quantization
differs), runs the whole protocol (encode, mask, drop, reveal, server sum, unmask, decode) in one jit, and
prints the max and RMS error per coordinate against the plain float64 sum of the delivered updates, the
worst-case bound n * B / L, and the wall time of one jitted aggregation (after compilation).
"""

from __future__ import annotations

import time

import numpy as np


def measure(num_clients: int, dim: int, bound: float, levels: int | None, neighbors: int | None,
            dropout: float, seed: int = 0, repeats: int = 3) -> dict:
    """One measurement (see the module docstring); returns a dict of numbers."""
    import jax

    from fedscope_jax.privacy import secagg

    params = secagg.make_params(num_clients, bound, levels=levels, neighbors=neighbors)
    k_values, k_drop, k_sum = jax.random.split(jax.random.key(seed), 3)
    values = jax.random.uniform(k_values, (num_clients, dim), minval=-bound, maxval=bound)
    delivered = jax.random.uniform(k_drop, (num_clients,)) >= dropout
    fn = jax.jit(secagg.secure_sum, static_argnums=3)
    out = fn(values, delivered, k_sum, params).block_until_ready()  # compile + first run
    start = time.perf_counter()
    for r in range(repeats):
        out = fn(values, delivered, jax.random.fold_in(k_sum, r), params).block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    plain = np.asarray(values, np.float64)[np.asarray(delivered)].sum(0)
    err = np.asarray(out, np.float64) - plain
    n_del = int(np.asarray(delivered).sum())
    return {"clients": num_clients, "delivered": n_del, "dim": dim, "levels": params.levels,
            "pair_masks": 2 * len(params.offsets), "step": params.step, "max_abs_error": float(np.abs(err).max()),
            "rms_error": float(np.sqrt(np.mean(err**2))), "mean_error": float(err.mean()),
            "bound": secagg.error_bound(n_del, params, float(np.abs(plain).max())),
            "rms_plain": float(np.sqrt(np.mean(plain**2))), "seconds": seconds,
            "device": str(jax.devices()[0].platform)}


COLUMNS = ("clients", "delivered", "pair_masks", "levels", "step", "max_abs_error", "rms_error", "mean_error",
           "bound", "rms_plain", "seconds")
