"""Per-client privacy budgets eps_k: personalized (monotone in data size, bounded, normalised) or uniform.

Personalized allocation (documented in docs/privacy.md):

    eps_k = clip(s * eps * (n_k / g)^beta, eps_min, eps_max)

with n_k the client's data size (number of training examples, or any positive statistic), g the geometric
mean of the n_k (clients with n_k = 0 never train: they get eps_min and are left out of the mean),
beta >= 0 the allocation exponent, and s > 0 the normalising scale, found by bisection so that the chosen
mean of the eps_k equals the nominal eps:

- "geometric": the (unweighted) geometric mean over clients equals eps (the typical client gets eps);
- "weighted": the data-weighted arithmetic mean sum_k (n_k / N) eps_k equals eps (the typical example's
  client gets eps).

Without the bounds, s = 1 for "geometric". eps_k is non-decreasing in n_k (strictly where unclipped, for
beta > 0) and always within [eps_min, eps_max]. beta = 0 gives every client the nominal eps (= uniform).
Why increasing: under client-level DP the noise std z_k C_k is fixed per client update, so a large client,
whose update averages many users, tolerates a larger eps_k for the same protection of each of its users,
while a small client, whose update is dominated by a few users, gets the stronger guarantee.
"""

from __future__ import annotations

import numpy as np

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import NORMALIZATIONS


def uniform_epsilons(num_clients: int, epsilon: float) -> np.ndarray:
    """Every client gets the nominal epsilon (the uniform-DP baseline)."""
    _check_positive("epsilon", epsilon)
    return np.full(int(num_clients), float(epsilon), dtype=np.float64)


def _check_positive(name: str, value: float) -> None:
    if not np.isfinite(value) or value <= 0:
        raise FedscopeError(f"privacy.{name}: expected a positive finite number, got {value!r}")


def _mean(eps: np.ndarray, weights: np.ndarray, normalize: str) -> float:
    if normalize == "geometric":
        return float(np.exp(np.mean(np.log(eps))))
    return float(np.sum(weights * eps))


def personalized_epsilons(sizes: np.ndarray, epsilon: float, *, exponent: float = 0.5,
                          eps_min: float | None = None, eps_max: float | None = None,
                          normalize: str = "geometric", tol: float = 1e-12) -> np.ndarray:
    """eps_k for clients of data sizes `sizes` (see the module docstring for the formula).

    eps_min / eps_max default to eps/4 and 4*eps. Raises FedscopeError when the bounds cannot contain a
    normalised allocation (they must satisfy eps_min <= eps <= eps_max).
    """
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0:
        raise FedscopeError(f"privacy: client sizes must be a non-empty 1-D array, got shape {sizes.shape}")
    if not np.all(np.isfinite(sizes)) or np.any(sizes < 0):
        bad = int(np.flatnonzero(~(np.isfinite(sizes) & (sizes >= 0)))[0])
        raise FedscopeError(f"privacy: client {bad} has size {float(sizes[bad]):g}; expected a number >= 0")
    if not np.any(sizes > 0):
        raise FedscopeError("privacy: every client has size 0; nothing to allocate a budget from")
    _check_positive("epsilon", epsilon)
    if not np.isfinite(exponent) or exponent < 0:
        raise FedscopeError(f"privacy.allocation_exponent: expected >= 0, got {exponent!r}")
    if normalize not in NORMALIZATIONS:
        raise FedscopeError(f"privacy.normalize: expected one of {NORMALIZATIONS}, got {normalize!r}")
    lo = epsilon / 4.0 if eps_min is None else float(eps_min)
    hi = epsilon * 4.0 if eps_max is None else float(eps_max)
    _check_positive("eps_min", lo)
    _check_positive("eps_max", hi)
    if not lo <= epsilon <= hi:
        raise FedscopeError(f"privacy: need eps_min <= epsilon <= eps_max, got {lo} <= {epsilon} <= {hi}")

    empty = sizes == 0  # clients without training data never train: eps_min, left out of the normalisation
    full = sizes[~empty]
    weights = full / full.sum()
    shape = (full / np.exp(np.mean(np.log(full)))) ** exponent  # geometric mean 1

    def alloc(log_s: float) -> np.ndarray:
        return np.clip(np.exp(log_s) * epsilon * shape, lo, hi)

    # The mean of alloc(log_s) is continuous and non-decreasing in log_s, from lo to hi: bisect.
    span = float(np.log(hi / lo) + np.abs(np.log(shape)).max() + 1.0)
    a, b = -span, span
    target = float(epsilon)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if _mean(alloc(mid), weights, normalize) < target:
            a = mid
        else:
            b = mid
        if b - a < tol:
            break
    eps = np.full(sizes.shape, lo)
    eps[~empty] = alloc(0.5 * (a + b))
    return eps


def client_epsilons(mode: str, sizes: np.ndarray, epsilon: float, *, exponent: float = 0.5,
                    eps_min: float | None = None, eps_max: float | None = None,
                    normalize: str = "geometric") -> np.ndarray:
    """eps_k for a privacy mode: personalized allocation, or the nominal eps for uniform/central."""
    sizes = np.asarray(sizes)
    if mode == "personalized":
        return personalized_epsilons(sizes, epsilon, exponent=exponent, eps_min=eps_min, eps_max=eps_max,
                                     normalize=normalize)
    if mode in ("uniform", "central", "distributed"):
        return uniform_epsilons(sizes.shape[0], epsilon)
    if mode == "off":
        return np.full(sizes.shape[0], np.inf)
    raise FedscopeError(f"privacy.mode: expected personalized, uniform, central, distributed or off, got {mode!r}")
