"""Privacy accounting with dp-accounting 0.6.0: per-round events, epsilon of a run, noise calibration.

One client's privacy loss over a run is the composition of its per-round events:

- amplification off (default, conservative): every round client k participates is one full Gaussian
  mechanism with noise multiplier z_k (sensitivity C_k, noise std z_k C_k): `GaussianDpEvent(z_k)`,
  composed `rounds_participated` times. Rounds it sits out cost nothing (its data is not touched).
- amplification on: every round of the run is one `PoissonSampledDpEvent(q_k, GaussianDpEvent(z_k))`
  for every client still taking part, whether or not it was sampled. Valid only when each round includes
  client k independently with probability q_k (Poisson sampling done by the engine with fresh randomness)
  AND whether k took part stays hidden from the adversary (e.g. the server sees only the secure sum of a
  round with an unknown participant set). A server that learns who participated voids it.

Neighbouring relation: add/remove (zero-out) of one client's whole dataset, sensitivity 1 in units of C_k
(`NeighboringRelation.ADD_OR_REMOVE_ONE`, the dp-accounting default).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import ACCOUNTANTS

PLD_DISCRETIZATION = 1e-3  # value_discretization_interval of the PLD accountant (see shared notes)


class SkippedOrders(logging.Filter, contextlib.ContextDecorator):
    """While active, drops dp-accounting's "failed to converge ... Excluding this order" warnings.

    With Poisson subsampling (--amplification) the RDP accountant logs one such warning per fractional order
    whose series does not converge, on every composition: 1,343 lines for a 16-client run. Excluding an
    order removes one candidate from the minimum over orders, so epsilon can only grow and the bound stays
    valid (docs/privacy.md). Other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("failed to converge" in message and "Excluding this order" in message)

    def __enter__(self) -> "SkippedOrders":
        logging.getLogger("absl").addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("absl").removeFilter(self)


def make_accountant(kind: str) -> dp_accounting.PrivacyAccountant:
    """A fresh accountant of `kind` ("rdp" or "pld"), configured the same way everywhere in the project."""
    if kind == "rdp":
        return rdp.RdpAccountant()
    if kind == "pld":
        return pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    raise FedscopeError(f"privacy.accountant: expected one of {ACCOUNTANTS}, got {kind!r}")


def round_event(noise_multiplier: float, sampling_rate: float, amplification: bool) -> dp_accounting.DpEvent:
    """The DpEvent of one accounted round for one client (see the module docstring)."""
    gaussian = dp_accounting.GaussianDpEvent(float(noise_multiplier))
    if amplification:
        return dp_accounting.PoissonSampledDpEvent(float(sampling_rate), gaussian)
    return gaussian


def run_event(noise_multiplier: float, events: int, sampling_rate: float = 1.0,
              amplification: bool = False) -> dp_accounting.DpEvent:
    """`events` self-compositions of `round_event`: the whole run of one client."""
    return dp_accounting.SelfComposedDpEvent(round_event(noise_multiplier, sampling_rate, amplification),
                                             int(events))


@functools.lru_cache(maxsize=65536)
def epsilon_spent(kind: str, noise_multiplier: float, events: int, delta: float, sampling_rate: float = 1.0,
                  amplification: bool = False) -> float:
    """epsilon at `delta` after `events` accounted rounds at `noise_multiplier` (0 events -> 0, z=0 -> inf).

    This is THE formula of the ledger: a fresh accountant composes `run_event(...)` once. Cached, because
    the ledger asks for the same (z, count) many times.
    """
    if events < 0:
        raise ValueError(f"events must be >= 0, got {events}")
    if events == 0 or (amplification and sampling_rate == 0.0):
        return 0.0
    if not noise_multiplier > 0:
        return math.inf
    if kind == "rdp":
        # Identical arithmetic to composing run_event(...) in a fresh RdpAccountant (its RDP vector starts at 0
        # and grows by count * rdp(one event)), with the per-event RDP vector cached: O(orders) per call.
        orders, one = rdp_of_one_event(noise_multiplier, sampling_rate, amplification)
        return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, np.zeros_like(one) + events * one,
                                                                float(delta))[0])
    accountant = make_accountant(kind)
    accountant.compose(run_event(noise_multiplier, events, sampling_rate, amplification))
    return float(accountant.get_epsilon(float(delta)))


@functools.lru_cache(maxsize=65536)
@SkippedOrders()
def rdp_of_one_event(noise_multiplier: float, sampling_rate: float,
                      amplification: bool) -> tuple[np.ndarray, np.ndarray]:
    accountant = rdp.RdpAccountant()
    accountant.compose(round_event(noise_multiplier, sampling_rate, amplification))
    return np.array(accountant.orders), np.array(accountant.rdp)


def planned_events(sampling_rate: float, rounds: int, amplification: bool, quantile: float = 0.95) -> int:
    """How many accounted events to calibrate client k's noise for, over a run of `rounds` rounds.

    With amplification every round is an event (= rounds). Without, it is the `quantile` of the client's
    number of participations Binomial(rounds, q): the budget then lasts the whole run with probability
    >= quantile; a client that is sampled more often than planned is stopped by the ledger. q = 1 gives
    exactly `rounds`. A client that can be sampled plans for at least one participation: where the quantile
    is 0 (a short run at a low rate) a plan of 0 would stop it at its first sampling, so it would never train.
    """
    if rounds < 0 or not 0.0 <= sampling_rate <= 1.0:
        raise FedscopeError(f"privacy: need rounds >= 0 and sampling rate in [0, 1], got {rounds}, {sampling_rate}")
    if amplification or sampling_rate >= 1.0:
        return int(rounds)
    if sampling_rate == 0.0 or rounds == 0:
        return 0
    if not 0.0 < quantile <= 1.0:
        raise FedscopeError(f"privacy.participation_quantile: expected in (0, 1], got {quantile!r}")
    n = np.arange(rounds + 1)
    log_pmf = (np.array([math.lgamma(rounds + 1) - math.lgamma(k + 1) - math.lgamma(rounds - k + 1) for k in n])
               + n * math.log(sampling_rate) + (rounds - n) * math.log1p(-sampling_rate))
    cdf = np.cumsum(np.exp(log_pmf))
    return int(min(rounds, max(1, np.searchsorted(cdf, quantile - 1e-12))))


@SkippedOrders()
def calibrate_noise_multiplier(epsilon: float, delta: float, events: int, kind: str = "rdp",
                               sampling_rate: float = 1.0, amplification: bool = False) -> float:
    """Smallest z (to 1e-6) whose run of `events` accounted rounds spends at most `epsilon` at `delta`.

    Uses `dp_accounting.calibrate_dp_mechanism`, bracketed around the exact Gaussian value
    (n Gaussians at z compose to one Gaussian at z/sqrt(n)), so few accountant evaluations are needed.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise FedscopeError(f"privacy: target epsilon must be positive and finite, got {epsilon!r}")
    if not 0.0 < delta < 1.0:
        raise FedscopeError(f"privacy.delta: expected in (0, 1), got {delta!r}")
    if events <= 0:
        return 0.0  # nothing to protect: no accounted event

    def gap(z: float) -> float:
        return epsilon_spent(kind, z, events, delta, sampling_rate, amplification) - epsilon

    exact = math.sqrt(events) * dp_accounting.get_sigma_gaussian(epsilon, delta)
    hi = max(exact, 1e-3) * 1.25
    while gap(hi) > 0:
        hi *= 2.0
        if hi > 1e6:
            raise FedscopeError(f"privacy.epsilon={epsilon:g}: no noise multiplier below 1e6 reaches it at "
                                f"delta={delta:g} over {events} accounted events (rounds; DP-SGD steps in the "
                                f"user unit); use a larger --epsilon or --delta, or fewer --rounds")
    lo = hi / 2.0
    while gap(lo) <= 0:
        hi, lo = lo, lo / 2.0
        if lo < 1e-6:
            return hi
    z = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(kind),
        lambda x: run_event(x, events, sampling_rate, amplification),
        epsilon, delta, bracket_interval=dp_accounting.ExplicitBracketInterval(lo, hi))
    return float(z)


def max_events(kind: str, noise_multiplier: float, delta: float, epsilon: float, sampling_rate: float = 1.0,
               amplification: bool = False, start: int = 0, limit: int = 1_000_000) -> int:
    """The largest event count n >= start with epsilon_spent(n) <= epsilon (eps is non-decreasing in n).

    Assumes epsilon_spent(start) <= epsilon; returns `limit` when it is never exceeded up to `limit`.
    """
    if not noise_multiplier > 0:
        return start
    lo = start
    step = 1
    while True:  # gallop to a count that exceeds, then bisect
        hi = lo + step
        if hi > limit:
            hi = limit
            if epsilon_spent(kind, noise_multiplier, hi, delta, sampling_rate, amplification) <= epsilon:
                return limit
            break
        if epsilon_spent(kind, noise_multiplier, hi, delta, sampling_rate, amplification) > epsilon:
            break
        lo, step = hi, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_spent(kind, noise_multiplier, mid, delta, sampling_rate, amplification) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def effective_noise_multiplier(update_noise_multiplier: float, bit_noise: float) -> float:
    """z_eff of one round that releases the noised update (z_update) AND the noised clipped-bit (bit_noise).

    Zero-out changes the update by <= C (noise z_update*C) and the bit 1[|u| <= C] by <= 1 (noise bit_noise):
    jointly one Gaussian mechanism with z_eff = (z_update^-2 + bit_noise^-2)^(-1/2) (Andrew et al. 2021,
    Thm. 1, with sensitivity 1 for the bit instead of 1/2 because a zeroed-out client still reports it).
    """
    if bit_noise == math.inf:  # no bit released: fixed clipping
        return float(update_noise_multiplier)
    if update_noise_multiplier <= 0 or bit_noise <= 0:
        return 0.0
    return float((update_noise_multiplier ** -2 + bit_noise ** -2) ** -0.5)


def split_noise_multiplier(effective: float, bit_fraction: float) -> tuple[float, float]:
    """(z_update, bit_noise) spending `bit_fraction` of the round's privacy (in 1/z^2) on the clipped-bit.

    1/z_eff^2 = 1/z_update^2 + 1/bit_noise^2 with 1/bit_noise^2 = bit_fraction / z_eff^2.
    bit_fraction = 0 means fixed clipping: (z_eff, inf).
    """
    if not 0.0 <= bit_fraction < 1.0:
        raise FedscopeError(f"privacy.clip_bit_fraction: expected in [0, 1), got {bit_fraction!r}")
    if bit_fraction == 0.0 or effective <= 0:
        return float(effective), math.inf
    return float(effective / math.sqrt(1.0 - bit_fraction)), float(effective / math.sqrt(bit_fraction))
