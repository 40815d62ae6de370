"""The federated and privacy flags of `fedscope train` / `sweep` (and the privacy dry run), and how they
override a run config. Light: reads the config dataclasses' defaults without importing JAX or the model."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from fedscope_jax.privacy.config import ACCOUNTANTS, CLIPPINGS, DISTRIBUTED_BUDGETS, MODES, UNITS, PrivacyConfig
from fedscope_jax.train.federated_config import AUTO_CHECKPOINT_SECONDS, SCHEME_COUNTS, WEIGHTINGS, FederatedConfig

__all__ = ["FEDERATED_FLAGS", "PRIVACY_FLAGS", "add_federated_arguments", "add_privacy_arguments", "apply_flags",
           "privacy_config_from_args"]

FEDERATED_FLAGS = ("clients", "scheme", "sampling", "fraction", "rounds", "local_epochs", "client_lr", "client_opt",
                   "server_opt", "aggregate", "weighting",
                   "server_lr", "chunk_size", "clip", "noise_multiplier", "noise_mode", "max_buckets", "eval_every",
                   "checkpoint_every")
# PrivacyConfig field -> argparse dest of its flag (--privacy sets `mode`)
PRIVACY_FLAGS = {"mode": "privacy", "unit": "privacy_unit", "epsilon": "epsilon", "delta": "delta",
                 "accountant": "accountant", "amplification": "amplification", "clipping": "clipping",
                 "clip_norm": "clip_norm", "secagg": "secagg", "distributed_budgets": "distributed_budgets"}


def add_federated_arguments(p: argparse.ArgumentParser) -> None:
    """The federated and privacy flags of `fedscope train` (and `fedscope sweep`).

    Every flag defaults to None: a flag that is given overrides the `federated` / `privacy` key of the
    --config file (`apply_flags`); the defaults are those of FederatedConfig / PrivacyConfig."""
    d = FederatedConfig()
    g = p.add_argument_group("federated (--mode federated; config section `federated`; docs/engine.md)")
    g.add_argument("--clients", type=int, help=f"number of clients K (default {d.clients}; with --scheme user or "
                   "domain, the scheme's own count: one client a user / a domain)")
    g.add_argument("--scheme", help="partition scheme: uniform, dirichlet, powerlaw, domain, user "
                   f"(default {d.scheme})")
    g.add_argument("--sampling", choices=["fraction", "poisson"],
                   help="client sampling per round: a fixed fraction, or Poisson with rate --fraction")
    g.add_argument("--fraction", type=float, help=f"sampled fraction / Poisson rate q (default {d.fraction:g})")
    g.add_argument("--rounds", type=int, help=f"(default {d.rounds})")
    g.add_argument("--local-epochs", type=int, help=f"(default {d.local_epochs})")
    g.add_argument("--client-lr", type=float, help=f"local learning rate (default {d.client_lr:g})")
    g.add_argument("--client-opt", choices=["adam", "sgd", "momentum"],
                   help=f"local optimizer: adam, sgd, or momentum (SGD, momentum 0.9) (default {d.client_opt})")
    g.add_argument("--server-opt", choices=["fedavg", "fedadam"], help=f"(default {d.server_opt})")
    g.add_argument("--server-lr", type=float, help=f"(default {d.server_lr:g})")
    g.add_argument("--aggregate", choices=["mean", "group_mean"],
                   help=f"mean: every parameter averaged over every client (FedAvg); group_mean: each domain's "
                   f"tower (and a shared encoder) over the clients whose update changed it, e.g. one client a "
                   f"domain (FedDCSR's layout); without DP only (default {d.aggregate})")
    g.add_argument("--weighting", choices=WEIGHTINGS,
                   help="each client's weight in the server's mean: uniform (w_k 1), users (w_k = its users n_k, "
                   "FedAvg's), inverse_noise (w_k = 1 / (z_k C_k)^2: --privacy-unit user with personalized or "
                   "uniform noise, federated.local_steps and --client-opt sgd or momentum; the least noisy mean of "
                   f"the silos' noised steps) (default {d.weighting})")
    g.add_argument("--chunk-size", type=int, help="clients per vmapped chunk per device (default 0: time "
                   "candidates and pick)")
    g.add_argument("--clip", type=float, help="raw per-client clipping bound (only with --privacy off; "
                   "default inf: off)")
    g.add_argument("--noise-multiplier", type=float, help="raw z (only with --privacy off; default 0: off)")
    g.add_argument("--noise-mode", choices=["off", "per_client", "sum"],
                   help="how the raw --noise-multiplier is drawn (only with --privacy off; default off)")
    g.add_argument("--max-buckets", type=int, help=f"client size buckets (default {d.max_buckets})")
    g.add_argument("--eval-every", type=int, help=f"validate every N rounds (default {d.eval_every})")
    g.add_argument("--checkpoint-every", type=int, help="rounds between checkpoints (default 0: a checkpoint once "
                   f"{AUTO_CHECKPOINT_SECONDS:g} s have passed since the last one, and after the last round)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    add_privacy_arguments(p)


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """The privacy flags; they override the --config file's `privacy` keys."""
    group = parser.add_argument_group("privacy (differential privacy; docs/privacy.md)")
    group.add_argument("--privacy", choices=MODES, help="DP mode (default: personalized; distributed: user unit "
                       "only, one DP-SGD step a round whose noise the silos split under a secure sum)")
    group.add_argument("--privacy-unit", choices=UNITS, help="the record DP protects: user (each silo runs DP-SGD "
                       "over its users) or client (a silo's whole data; default client)")
    group.add_argument("--epsilon", type=float, help="nominal epsilon of the whole run per client (default 8)")
    group.add_argument("--delta", type=float, help="delta of the whole run (default 1e-5)")
    group.add_argument("--accountant", choices=ACCOUNTANTS, help="dp-accounting accountant (default rdp)")
    group.add_argument("--amplification", action=argparse.BooleanOptionalAction, default=None,
                       help="count Poisson-subsampling amplification (default off; see docs for validity)")
    group.add_argument("--clipping", choices=CLIPPINGS, help="fixed or adaptive per-client clip norm")
    group.add_argument("--clip-norm", type=float, help="(initial) clip norm C_k (default 1.0)")
    group.add_argument("--distributed-budgets", choices=DISTRIBUTED_BUDGETS,
                       help="--privacy distributed: one eps for every user (uniform, the default) or silo k's "
                            "users at the personalized eps_k, by per-silo clip norms under the shared noise")
    group.add_argument("--secagg", action=argparse.BooleanOptionalAction, default=None,
                       help="simulated secure aggregation of the noised updates, per chunk (default off)")


def privacy_config_from_args(args: argparse.Namespace, base: PrivacyConfig | None = None) -> PrivacyConfig:
    """`base` (from the config file) with the privacy flags that were given applied on top; an error names the
    flag of a value that came from one."""
    base = base or PrivacyConfig()
    values, given = base.to_dict(), {}
    for field, attr in PRIVACY_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            values[field] = value
            given[field] = "--" + attr.replace("_", "-")
    return PrivacyConfig.from_mapping(values, flags=given)


def apply_flags(cfg: Any, args: argparse.Namespace) -> Any:
    """`cfg` (a train.config.RunConfig) with the federated and privacy flags that were given (not None)."""
    fed = {f: getattr(args, f) for f in FEDERATED_FLAGS if getattr(args, f, None) is not None}
    if fed.get("scheme") in SCHEME_COUNTS and "clients" not in fed:
        fed["clients"] = 0   # --scheme user / domain without --clients: the scheme sets the count
    federated = dataclasses.replace(cfg.federated, **fed) if fed else cfg.federated
    return dataclasses.replace(cfg, federated=federated, privacy=privacy_config_from_args(args, cfg.privacy))
