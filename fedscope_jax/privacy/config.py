"""PrivacyConfig: the `privacy` section of a run config and its validation (its flags: cli/flags.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from fedscope_jax.errors import FedscopeError

MODES = ("personalized", "uniform", "central", "distributed", "off")
UNITS = ("user", "client")
ACCOUNTANTS = ("rdp", "pld")
CLIPPINGS = ("fixed", "adaptive")
NORMALIZATIONS = ("geometric", "weighted")
DISTRIBUTED_BUDGETS = ("uniform", "personalized")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
    """How a run is made differentially private (see docs/privacy.md).

    mode: personalized (eps_k from data size), uniform (eps for all), central (DP-FedAvg: one noise draw
      on the aggregate), distributed (user unit only: central DP-SGD over the union of the silos' users, its
      noise split over the K silos, N(0, z^2 C^2 / K) each, under the secure sum; always with secure
      aggregation), off (no DP).
    unit: what one record is. "client": a silo's whole data (its clipped update is noised once per round).
      "user": one user's whole history in every domain; each silo runs DP-SGD over its users (per local step:
      Poisson-sampled users, each user's gradient clipped to C_k, N(0, (z_k C_k)^2) added to the sum, divided
      by the expected batch), so what leaves the silo is a post-processing of a user-level DP mechanism.
    epsilon, delta: nominal budget of the whole run, per client.
    accountant: rdp (fast) or pld (tighter) dp-accounting accountant.
    amplification: count Poisson subsampling amplification (valid only under its assumptions; default off).
    allocation_exponent, eps_min, eps_max, normalize: the personalized allocation (budgets.py).
    distributed_budgets: mode distributed only. "uniform": one eps for every user; "personalized": the users
      of silo k get the personalized eps_k (as mode personalized allocates it), through per-silo clip norms
      under the one shared noise (individualized DP-SGD, Boenisch et al. 2023; privacy/plan.py).
    participation_quantile: without amplification, calibrate for this quantile of a client's participations.
    clipping, clip_norm: fixed C_k = clip_norm, or adaptive starting from clip_norm.
    clip_target_quantile, clip_learning_rate, clip_bit_fraction: adaptive clipping (Andrew et al. 2021);
      clip_bit_fraction is the share of each round's privacy (in 1/z^2) spent on the noised clipped-bit;
      clip_adapt_range keeps an adaptive C_k within [clip_norm / range, clip_norm * range].
    secagg: sum updates with simulated secure aggregation; secagg_neighbors: masking partners per client
      (default 16, a log-degree masking graph as in Bell et al. 2020; None: every other client).
    """

    mode: str = "personalized"
    unit: str = "client"
    epsilon: float = 8.0
    delta: float = 1e-5
    accountant: str = "rdp"
    amplification: bool = False
    allocation_exponent: float = 0.5
    eps_min: float | None = None
    eps_max: float | None = None
    normalize: str = "geometric"
    distributed_budgets: str = "uniform"
    participation_quantile: float = 0.95
    clipping: str = "fixed"
    clip_norm: float = 1.0
    clip_target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clip_bit_fraction: float = 0.1
    clip_adapt_range: float = 10.0
    secagg: bool = False
    secagg_neighbors: int | None = 16

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "privacy", flags: Mapping[str, str] | None = None) -> None:
        """Raises FedscopeError naming the first field that is out of range: as `where.field`, or as its
        command-line flag when `flags` ({field: flag}) says the value came from one."""
        flags = flags or {}

        def name(field: str) -> str:
            return flags.get(field, f"{where}.{field}")

        def bad(field: str, expected: str) -> FedscopeError:
            return FedscopeError(f"{name(field)}: expected {expected}, got {getattr(self, field)!r}")

        choices = {"mode": MODES, "unit": UNITS, "accountant": ACCOUNTANTS, "clipping": CLIPPINGS,
                   "normalize": NORMALIZATIONS, "distributed_budgets": DISTRIBUTED_BUDGETS}
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise bad(field, "one of " + ", ".join(allowed))
        positive = ("epsilon", "clip_norm", "clip_learning_rate")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (0 < value < math.inf):
                raise bad(field, "a positive finite number")
        if not isinstance(self.delta, (int, float)) or not 0 < self.delta < 1:
            raise bad("delta", "a number in (0, 1)")
        for field in ("eps_min", "eps_max"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, (int, float)) or not 0 < value < math.inf):
                raise bad(field, "a positive finite number or null")
        lo = self.eps_min if self.eps_min is not None else self.epsilon / 4
        hi = self.eps_max if self.eps_max is not None else self.epsilon * 4
        if not lo <= self.epsilon <= hi:
            raise FedscopeError(f"{where}: need eps_min <= epsilon <= eps_max, got {lo} <= {self.epsilon} <= {hi}")
        if not isinstance(self.allocation_exponent, (int, float)) or not 0 <= self.allocation_exponent < math.inf:
            raise bad("allocation_exponent", "a number >= 0")
        if not 0 < self.participation_quantile <= 1:
            raise bad("participation_quantile", "a number in (0, 1]")
        if not 0 < self.clip_target_quantile < 1:
            raise bad("clip_target_quantile", "a number in (0, 1)")
        if not 0 < self.clip_bit_fraction < 1:
            raise bad("clip_bit_fraction", "a number in (0, 1)")
        if not isinstance(self.clip_adapt_range, (int, float)) or not 1 <= self.clip_adapt_range <= math.inf:
            raise bad("clip_adapt_range", "a number >= 1")
        for field in ("amplification", "secagg"):
            if not isinstance(getattr(self, field), bool):
                raise bad(field, "true or false")
        if self.secagg_neighbors is not None and (not isinstance(self.secagg_neighbors, int)
                                                  or self.secagg_neighbors < 1):
            raise bad("secagg_neighbors", "a positive integer or null")
        if self.unit == "user" and self.mode == "central":
            raise FedscopeError(f"{name('unit')}: the central DP-FedAvg baseline noises the aggregate of whole "
                                f"clients; got unit 'user' (use mode personalized or uniform, or unit client)")
        if self.unit == "user" and self.clipping == "adaptive":
            raise FedscopeError(f"{name('clipping')}: adaptive clipping is per client; the user unit clips each "
                                f"user's gradient to a fixed C (use clipping fixed)")
        if self.unit == "user" and self.amplification:
            raise FedscopeError(f"{name('amplification')}: counts the sampling of clients, which the user unit "
                                f"does not rely on (its Poisson sampling of users is always counted); drop it")
        if self.mode == "distributed" and self.unit != "user":
            raise FedscopeError(f"{name('mode')}: distributed noise splits one user-level DP-SGD step's noise "
                                f"over the silos; got unit {self.unit!r} (use --privacy-unit user)")
        if self.distributed_budgets != "uniform" and self.mode != "distributed":
            raise FedscopeError(f"{name('distributed_budgets')}: {self.distributed_budgets!r} allocates the "
                                f"budgets of mode distributed; got mode {self.mode!r} (use --privacy distributed, "
                                f"or --privacy personalized for personalized budgets with local noise)")
        if self.unit == "user" and self.secagg and self.mode != "distributed":
            raise FedscopeError(f"{name('secagg')}: secure aggregation of user-level private updates is built "
                                f"for mode distributed only (the others' updates after local steps have no "
                                f"coordinate bound to quantize in); drop it, or use --privacy distributed")
        if self.mode == "central" and self.clipping == "adaptive":
            raise FedscopeError(f"{name('clipping')}: the central DP-FedAvg baseline uses fixed clipping; "
                                f"got 'adaptive' (use mode personalized or uniform)")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], where: str = "privacy",
                     flags: Mapping[str, str] | None = None) -> "PrivacyConfig":
        """Builds a config from a mapping (the `privacy` section of a config file); unknown keys are errors.
        flags: {field: command-line flag} for the values that came from flags (errors name the flag)."""
        if not isinstance(mapping, Mapping):
            raise FedscopeError(f"{where}: expected a mapping of privacy options, got {type(mapping).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(mapping) - names)
        if unknown:
            raise FedscopeError(f"{where}.{unknown[0]}: unknown privacy option (known: {', '.join(sorted(names))})")
        values = dict(mapping)
        for field in ("epsilon", "delta", "clip_norm", "eps_min", "eps_max", "allocation_exponent",
                      "participation_quantile", "clip_target_quantile", "clip_learning_rate", "clip_bit_fraction",
                      "clip_adapt_range"):
            if isinstance(values.get(field), int) and not isinstance(values.get(field), bool):
                values[field] = float(values[field])
        obj = cls.__new__(cls)
        defaults = cls()
        for name in names:
            object.__setattr__(obj, name, values.get(name, getattr(defaults, name)))
        obj.validate(where, flags)
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
