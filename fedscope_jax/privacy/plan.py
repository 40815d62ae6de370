"""PrivacyPlan: the per-client vectors (eps_k, z_k, C_k, ...) a run is calibrated with, before round 1.

`plan_privacy(config, sizes, sampling_rates, rounds)` turns a PrivacyConfig and the clients' data sizes and
participation rates into numpy vectors over the client axis. The engine feeds `clip_norms` and
`update_noise_multipliers` into its jitted round (noise std = update_noise_multipliers * clip_norms per
client), or, in central mode, adds `central_noise_multiplier * clip_norm` once to the aggregate.

Units. Client unit: one accounted event per round a client takes part in (with amplification, per round of
the run). User unit (`UserSteps`: each silo's users, local steps per round and expected batch): one event per
local DP-SGD step, `PoissonSampledDpEvent(q_k, GaussianDpEvent(z_k))` with q_k = batch / users_k, and a silo
that takes part in a round composes its S_k steps of that round.

Distributed (user unit, `UserSteps.pooled`): central DP-SGD over the union of the K silos' users, one step a
round. Every user is sampled at the one rate q = K B / N; each silo adds N(0, z^2 C^2 / K) to its sum of
clipped per-user gradients, and only the secure sum of the K silos is released, which carries N(0, z^2 C^2):
one `PoissonSampledDpEvent(q, GaussianDpEvent(z))` per round for every user. If silos other than a user's own
collude with the server they can subtract their shares; with all K - 1 of them, z / sqrt(K) is left
(`colluding_noise_multipliers`, the ledger's second epsilon). With personalized budgets
(`distributed_budgets`), silo k clips its users to C_k = C z_min / z_k under the one noise z_min C, so its users
are protected by z_k, calibrated to their eps_k (`_distributed_plan`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import accounting, budgets
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.utils.progress import progress


@dataclasses.dataclass(frozen=True)
class UserSteps:
    """What the user unit accounts per silo: its users (n_k, the records), its local DP-SGD steps per round
    (S_k) and the expected batch B of a step (q_k = B / n_k)."""

    users: np.ndarray            # int [K]
    steps_per_round: np.ndarray  # int [K]
    batch_size: int
    pooled: bool = False         # distributed noise: one rate q = K B / N for every user of every silo

    def rates(self) -> np.ndarray:
        """q_k = B / n_k per silo (0 for a silo without users); a silo with fewer users than B is an error.
        Pooled: q = K B / N for every silo with users (K of them, N users in all), an expected B per silo."""
        users = np.asarray(self.users, np.int64)
        if self.pooled:
            k, n = int(np.sum(users > 0)), int(users.sum())
            if k * self.batch_size > n:
                raise FedscopeError(
                    f"--privacy distributed: {k} silos x train.batch_size={self.batch_size} expected users a "
                    f"step exceed the {n} users (q = K batch / users <= 1); use --set train.batch_size="
                    f"{max(1, n // max(k, 1))} or fewer")
            return np.where(users > 0, k * self.batch_size / max(n, 1), 0.0)
        small = np.flatnonzero((users > 0) & (users < self.batch_size))
        if small.size:
            k = int(small[0])
            raise FedscopeError(
                f"--privacy-unit user: client {k} has {int(users[k])} users, fewer than the expected batch "
                f"train.batch_size={self.batch_size} (Poisson sampling needs q = batch / users <= 1); use "
                f"--set train.batch_size={int(users[users > 0].min())} or fewer, or fewer --clients")
        return np.where(users > 0, self.batch_size / np.maximum(users, 1), 0.0)


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
    """Per-client privacy parameters of one run (all arrays have the client axis first).

    noise_multipliers: effective z_k the accountant uses (adaptive-clipping bit folded in).
    update_noise_multipliers: z the engine applies to the update (>= noise_multipliers; 0 in central/off).
    bit_noise: std of the noised clipped-bit (inf for fixed clipping).
    planned_events: accounted events z_k was calibrated for.
    sampling_rates: per client, the rate of its accounted subsampling: the round participation rate (client
      unit) or the Poisson user sampling rate q_k of a local step (user unit).
    steps_per_round: events a client composes per round it takes part in (1 for the client unit, S_k for
      the user unit).
    central_noise_multiplier: z of the one noise draw on the aggregate (central mode; 0 otherwise).
    colluding_noise_multipliers: the z that protects a client's records when every other client colludes with
      the server (the ledger's eps_colluding): noise_multipliers, except in distributed mode, where only the
      own silo's share z / sqrt(K) is left.
    clip_min, clip_max: the range adaptive clipping keeps C_k in (pass to mechanism.adaptive_clip_update).
    """

    mode: str
    accountant: str
    delta: float
    amplification: bool
    adaptive_clipping: bool
    clip_target_quantile: float
    clip_learning_rate: float
    clip_min: np.ndarray
    clip_max: np.ndarray
    eps_targets: np.ndarray
    noise_multipliers: np.ndarray
    update_noise_multipliers: np.ndarray
    bit_noise: np.ndarray
    clip_norms: np.ndarray
    sampling_rates: np.ndarray
    planned_events: np.ndarray
    central_noise_multiplier: float = 0.0
    unit: str = "client"
    steps_per_round: np.ndarray | None = None
    colluding_noise_multipliers: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.steps_per_round is None:
            object.__setattr__(self, "steps_per_round", np.ones(self.num_clients, np.int64))
        if self.colluding_noise_multipliers is None:
            object.__setattr__(self, "colluding_noise_multipliers", np.asarray(self.noise_multipliers))

    @property
    def num_clients(self) -> int:
        return int(self.eps_targets.shape[0])

    @property
    def accountant_name(self) -> str:
        """The ledger's `accountant` column: rdp, pld, or none (privacy off)."""
        return "none" if self.mode == "off" else self.accountant

    def summary(self) -> dict:
        """Short description for summary.json / logs."""
        return {"mode": self.mode, "unit": self.unit, "accountant": self.accountant_name, "delta": self.delta,
                "amplification": self.amplification, "adaptive_clipping": self.adaptive_clipping,
                "eps_target_min": float(np.min(self.eps_targets)), "eps_target_max": float(np.max(self.eps_targets)),
                "noise_multiplier_min": float(np.min(self.noise_multipliers)),
                "noise_multiplier_max": float(np.max(self.noise_multipliers)),
                "central_noise_multiplier": self.central_noise_multiplier}


def _rates(sampling_rates: np.ndarray | float, num_clients: int) -> np.ndarray:
    rates = np.broadcast_to(np.asarray(sampling_rates, dtype=np.float64), (num_clients,)).copy()
    if np.any(~np.isfinite(rates)) or np.any(rates < 0) or np.any(rates > 1):
        bad = int(np.flatnonzero(~((rates >= 0) & (rates <= 1)))[0])
        raise FedscopeError(f"privacy: client {bad} has sampling rate {float(rates[bad]):g}; "
                            f"expected a number in [0, 1]")
    return rates


def plan_privacy(config: PrivacyConfig, sizes: np.ndarray, sampling_rates: np.ndarray | float,
                 rounds: int, user_steps: UserSteps | None = None) -> PrivacyPlan:
    """Calibrates every client's noise so that its whole run stays within its eps_k at config.delta.

    sampling_rates: each client's round participation rate. user_steps: required for config.unit "user"."""
    sizes = np.asarray(sizes, dtype=np.float64)
    num_clients = int(sizes.shape[0])
    if num_clients == 0:
        raise FedscopeError("privacy: no clients to plan for")
    if not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise FedscopeError(f"privacy: rounds must be a positive integer, got {rounds!r}")
    rates = participation = _rates(sampling_rates, num_clients)
    allocation = config.mode
    if config.mode == "distributed" and config.distributed_budgets == "personalized":
        allocation = "personalized"
    eps = budgets.client_epsilons(allocation, sizes, config.epsilon, exponent=config.allocation_exponent,
                                  eps_min=config.eps_min, eps_max=config.eps_max, normalize=config.normalize)
    events = np.array([accounting.planned_events(q, int(rounds), config.amplification, config.participation_quantile)
                       for q in rates], dtype=np.int64)
    unit = dict(unit="client", steps_per_round=np.ones(num_clients, np.int64))
    amplification = config.amplification
    if config.unit == "user" and config.mode != "off":
        if user_steps is None:
            raise FedscopeError("privacy.unit user: the plan needs each silo's users and local steps per round")
        steps = np.asarray(user_steps.steps_per_round, np.int64)
        if np.asarray(user_steps.users).shape != (num_clients,) or steps.shape != (num_clients,):
            raise FedscopeError(f"privacy.unit user: expected users and steps per round for {num_clients} clients")
        events = events * steps            # every step of every planned participation is one event
        rates = user_steps.rates()
        amplification = True               # a step's Poisson sampling of users is always counted
        unit = dict(unit="user", steps_per_round=steps)
    common = dict(mode=config.mode, accountant=config.accountant, delta=float(config.delta),
                  amplification=amplification, clip_target_quantile=config.clip_target_quantile,
                  clip_learning_rate=config.clip_learning_rate, eps_targets=eps, sampling_rates=rates,
                  planned_events=events, clip_norms=np.full(num_clients, float(config.clip_norm)),
                  clip_min=np.full(num_clients, config.clip_norm / config.clip_adapt_range),
                  clip_max=np.full(num_clients, config.clip_norm * config.clip_adapt_range), **unit)
    zeros = np.zeros(num_clients)
    if config.mode == "off":
        return PrivacyPlan(adaptive_clipping=False, noise_multipliers=zeros, update_noise_multipliers=zeros,
                           bit_noise=np.full(num_clients, math.inf),
                           **{**common, "clip_norms": np.full(num_clients, math.inf)})
    if config.mode == "distributed":
        return _distributed_plan(config, participation, common, int(rounds), user_steps)
    if config.mode == "central":
        # One z for the aggregate, calibrated for the most exposed client (largest rate and event count).
        worst = int(np.lexsort((rates, events))[-1])
        z = accounting.calibrate_noise_multiplier(config.epsilon, config.delta, int(events.max()),
                                                  config.accountant, float(rates[worst]), config.amplification)
        return PrivacyPlan(adaptive_clipping=False, noise_multipliers=np.full(num_clients, z),
                           update_noise_multipliers=zeros, bit_noise=np.full(num_clients, math.inf),
                           central_noise_multiplier=z, **common)

    # Clients with the same (eps_k, events, rate) share one calibration (many small clients share a few).
    keys = [(float(eps[k]), int(events[k]), float(rates[k])) for k in range(num_clients)]
    cache = {key: accounting.calibrate_noise_multiplier(key[0], config.delta, key[1], config.accountant, key[2],
                                                        amplification)
             for key in progress(list(dict.fromkeys(keys)), desc="calibrating noise", unit="calibration")}
    effective = np.array([cache[key] for key in keys], dtype=np.float64)
    adaptive = config.clipping == "adaptive"
    if adaptive:
        split = [accounting.split_noise_multiplier(z, config.clip_bit_fraction) for z in effective]
        update = np.array([s[0] for s in split])
        bit = np.array([s[1] for s in split])
    else:
        update, bit = effective.copy(), np.full(num_clients, math.inf)
    return PrivacyPlan(adaptive_clipping=adaptive, noise_multipliers=effective, update_noise_multipliers=update,
                       bit_noise=bit, **common)


def _distributed_plan(config: PrivacyConfig, participation: np.ndarray, common: dict, rounds: int,
                      user_steps: UserSteps | None) -> PrivacyPlan:
    """One noise on the sum of the union of the silos' users (rate q, `rounds` steps), in K shares.

    Silo k's users get multiplier z_k, calibrated to their eps_k. With one eps (uniform) every z_k = z and
    C_k = C. With personalized eps_k (`distributed_budgets`), silo k clips its users to C_k = C z_min / z_k
    under the one noise std sigma = z_min C (z_min: the largest budget's z), so that a user of silo k, whose
    presence moves the sum by at most C_k, is protected by sigma / C_k = z_k (individualized DP-SGD's
    per-group clip norms, Boenisch et al. 2023). Each silo adds N(0, sigma^2 / K): multiplier z_k / sqrt(K)
    of its own C_k, which is also what protects its users when every other silo colludes."""
    if user_steps is None or not user_steps.pooled:
        raise FedscopeError("privacy.mode distributed: the plan needs the silos' users with one pooled rate")
    if np.any(np.asarray(user_steps.steps_per_round) != 1):
        raise FedscopeError("privacy.mode distributed: every silo takes exactly one DP-SGD step a round")
    users = np.asarray(user_steps.users, np.int64)
    if np.any(participation[users > 0] < 1.0):
        raise FedscopeError(f"--privacy distributed: every silo takes part in every round (the secure sum needs "
                            f"all K noise shares); got a participation rate of {float(participation.min()):g} "
                            f"(use --sampling fraction --fraction 1)")
    rate = float(np.max(common["sampling_rates"]))
    silos = int(np.sum(users > 0))
    eps = np.asarray(common["eps_targets"], np.float64)
    cache = {e: accounting.calibrate_noise_multiplier(e, config.delta, rounds, config.accountant, rate, True)
             for e in dict.fromkeys(float(x) for x in eps[users > 0])}
    z = np.array([cache.get(float(e), math.inf) for e in eps])     # a silo without users: never sampled
    z_min = float(np.min(z[users > 0]))
    clip = np.where(users > 0, config.clip_norm * z_min / z, config.clip_norm)
    share = np.where(users > 0, z / math.sqrt(silos), 0.0)
    common = {**common, "planned_events": np.full(users.size, rounds, np.int64), "clip_norms": clip}
    return PrivacyPlan(adaptive_clipping=False, noise_multipliers=np.where(users > 0, z, z_min),
                       update_noise_multipliers=share, bit_noise=np.full(users.size, math.inf),
                       colluding_noise_multipliers=share, **common)


def distributed_secagg_bound(plan: PrivacyPlan, learning_rate: float, batch_cap: int, expected_batch: int,
                             sigmas: float = 6.0) -> float:
    """Coordinate range B of the secure sum of distributed-noise silo updates
    -lr (sum_u clip_C(g_u) + noise) / expected_batch: a clipped gradient's coordinate is at most C (the largest
    C_k), a step holds at most `batch_cap` users and the share's std is sigma / sqrt(K) = z C / sqrt(K), so a
    coordinate is at most lr C (cap + sigmas z / sqrt(K)) / expected_batch but with probability < 2e-9 (6
    sigmas). The range used is lr C max(2 cap, cap + sigmas z / sqrt(K)) / expected_batch: the same for every
    epsilon whose share is below cap / sigmas, so the configurations of a sweep share one compiled round (a
    step of at most 2x coarser)."""
    c = float(np.max(plan.clip_norms))
    share = float(np.max(np.asarray(plan.clip_norms) * plan.update_noise_multipliers)) / c   # sigma / (sqrt(K) C)
    return float(learning_rate * c * max(2.0 * batch_cap, batch_cap + sigmas * share) / expected_batch)


def secagg_bound(plan: PrivacyPlan, sigmas: float = 6.0) -> float:
    """Coordinate range B for secure aggregation of locally noised updates: a clipped coordinate is at most C_k,
    its noise has std z_k C_k, so B = max_k C_k (1 + sigmas z_k) clips a coordinate with probability
    < 2e-9 at 6 sigmas (with adaptive clipping, C_k at its upper limit)."""
    clip = np.where(plan.adaptive_clipping, plan.clip_max, plan.clip_norms)
    bound = np.max(clip * (1.0 + sigmas * np.asarray(plan.update_noise_multipliers)))
    if not np.isfinite(bound):
        raise FedscopeError("privacy: secure aggregation needs finite clip norms (privacy mode 'off' has none)")
    return float(bound)
