"""Seeded client sampling per round: a fixed fraction (without replacement) or Poisson with rate q.

The draw for round r depends only on (seed, r), so a resumed run samples exactly what an uninterrupted
one would. Poisson sampling (each client independently with probability q) is what privacy amplification
by subsampling assumes; a fixed fraction gives a constant cohort size.
"""

from __future__ import annotations

import numpy as np

from fedscope_jax.errors import FedscopeError

SCHEMES = ("fraction", "poisson")


def sample_clients(seed: int, round_index: int, n_clients: int, scheme: str, rate: float) -> np.ndarray:
    """Sorted ids of the clients that take part in round `round_index`."""
    if scheme not in SCHEMES:
        raise FedscopeError(f"sampling scheme: expected one of {', '.join(SCHEMES)}, got {scheme!r}")
    if not 0.0 < rate <= 1.0:
        raise FedscopeError(f"sampling rate: expected 0 < rate <= 1, got {rate}")
    if n_clients < 1:
        raise FedscopeError(f"clients: expected >= 1, got {n_clients}")
    rng = np.random.default_rng([seed, round_index, 0x5A4D])
    if scheme == "fraction":
        k = max(1, int(round(rate * n_clients)))
        return np.sort(rng.choice(n_clients, size=k, replace=False))
    return np.flatnonzero(rng.random(n_clients) < rate)
