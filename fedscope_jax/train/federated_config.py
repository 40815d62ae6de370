"""FederatedConfig, the `federated` section of a run config, in a module of its own: the `fedscope train` /
`sweep` parsers read its defaults without importing the model or JAX (train/config.py imports both)."""

from __future__ import annotations

import dataclasses
import math

from fedscope_jax.errors import FedscopeError


CLIENT_OPTIMIZERS = ("adam", "sgd", "momentum")
AGGREGATES = ("mean", "group_mean")   # federated.aggregate
WEIGHTINGS = ("uniform", "users", "inverse_noise")   # federated.weighting: each client's weight in the mean
SCHEME_COUNTS = ("user", "domain")   # schemes that fix the client count themselves (clients 0 = that count)
AUTO_CHECKPOINT_SECONDS = 60.0   # checkpoint_every 0: a checkpoint once this much time has passed since the last


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """Federated training options: the `federated` section (CLI flags of the same names, docs/engine.md).

    `seed` is not a key of its own: it is train.seed (load_config copies it)."""

    clients: int = 8                 # 0: the scheme's own count (user: one client a user; domain: one a domain)
    scheme: str = "powerlaw"         # data.partition scheme (uniform, dirichlet, powerlaw, domain, user)
    sampling: str = "fraction"       # fraction (fixed cohort size) or poisson (each client with prob. rate)
    fraction: float = 1.0            # the fraction / Poisson rate q
    rounds: int = 20
    local_epochs: int = 1
    local_steps: int = 0             # the user unit: Poisson DP-SGD steps a silo takes a round (0: local_epochs
    #                                  expected passes over its users, ceil(n_k / B) steps each)
    client_lr: float = 1e-2          # local Adam (1e-3 barely moves the model in 20 rounds; docs/privacy.md)
    client_opt: str = "adam"         # adam | sgd | momentum (SGD with momentum 0.9): the local optimizer
    user_microbatch: int = 8         # the user unit: users whose per-user gradients are computed at once (0: all)
    server_opt: str = "fedavg"       # fedavg | fedadam
    server_lr: float = 1.0
    aggregate: str = "mean"          # mean: every parameter over every client; group_mean: each domain's tower
    #                                  (and a shared encoder) over the clients that changed it (no noise only)
    weighting: str = "uniform"       # uniform: w_k = 1; users: w_k = n_k, the client's users (FedAvg's weights);
    #                                  inverse_noise: w_k = 1 / (z_k C_k)^2 (user unit, local noise, local_steps,
    #                                  SGD: the least noisy mean of the silos' noised steps; docs/privacy.md)
    chunk_size: int = 0              # clients per vmapped chunk per device; 0 = measure and pick
    clip: float = math.inf           # C_k for every client (inf = no clipping)
    noise_multiplier: float = 0.0    # z_k for every client (0 = no noise)
    noise_mode: str = "off"          # off | per_client | sum (secure-aggregation view)
    max_buckets: int = 4
    eval_every: int = 5
    checkpoint_every: int = 0        # rounds between checkpoints; 0: after the first round ending at least
    #                                  AUTO_CHECKPOINT_SECONDS after the last checkpoint (a save costs ~0.1-0.25 s
    #                                  a configuration, more than a small round), and after the last round
    seed: int = 0

    def __post_init__(self) -> None:
        if self.clients == 0 and self.scheme not in SCHEME_COUNTS:
            raise FedscopeError(f"--clients 0 (the scheme's own count): only with --scheme "
                                f"{' or '.join(SCHEME_COUNTS)}, got --scheme {self.scheme}; give a count >= 1")
        for flag, value in (("--clients", self.clients if self.clients else 1), ("--rounds", self.rounds),
                            ("--local-epochs", self.local_epochs)):
            if value < 1:
                raise FedscopeError(f"{flag} {value}: expected >= 1")
        if self.client_opt not in CLIENT_OPTIMIZERS:
            raise FedscopeError(f"--client-opt {self.client_opt}: expected one of {', '.join(CLIENT_OPTIMIZERS)}")
        if self.aggregate not in AGGREGATES:
            raise FedscopeError(f"--aggregate {self.aggregate}: expected one of {', '.join(AGGREGATES)}")
        if self.weighting not in WEIGHTINGS:
            raise FedscopeError(f"--weighting {self.weighting}: expected one of {', '.join(WEIGHTINGS)}")
        if self.weighting != "uniform" and self.noise_mode != "off":
            raise FedscopeError(f"--weighting {self.weighting} with the raw --noise-mode {self.noise_mode}: the raw "
                                "noise knobs are calibrated for weight 1; use --weighting uniform")
        if self.aggregate == "group_mean" and self.noise_mode != "off":
            raise FedscopeError(f"--aggregate group_mean divides each group by the weight of the clients that "
                                f"changed it, which depends on their data: only without noise, got --noise-mode "
                                f"{self.noise_mode}")
        if self.local_steps < 0:
            raise FedscopeError(f"federated.local_steps={self.local_steps}: expected >= 0 (0: --local-epochs passes)")
        if self.local_steps and self.local_epochs != 1:
            raise FedscopeError(f"federated.local_steps={self.local_steps} with --local-epochs {self.local_epochs}: "
                                "both set a silo's steps a round; give one of them")
        if self.user_microbatch < 0:
            raise FedscopeError(f"federated.user_microbatch={self.user_microbatch}: expected >= 0 (0: the whole batch)")
        if not 0.0 < self.fraction <= 1.0:
            raise FedscopeError(f"--fraction {self.fraction}: expected 0 < fraction <= 1")
        for flag, value, least in (("--chunk-size", self.chunk_size, 0), ("--eval-every", self.eval_every, 1),
                                   ("--checkpoint-every", self.checkpoint_every, 0)):
            if value < least:
                raise FedscopeError(f"{flag} {value}: expected >= {least}")
        if self.noise_multiplier > 0 and self.noise_mode == "off":
            raise FedscopeError("--noise-multiplier > 0 needs --noise-mode per_client or sum")
        if self.noise_multiplier > 0 and not math.isfinite(self.clip):
            raise FedscopeError("--noise-multiplier > 0 needs a finite --clip")
