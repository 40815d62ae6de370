"""PrivacySession: the privacy side of a federated training run (plan, ledger, adaptive clipping, resume).

The round loop (train/loop.py) calls, per round t (1-based, as in metrics.jsonl):

    eligible = session.begin_round(t)                  # bool [K] over all clients: budget left
    ids = sampled ids that are eligible and have data  # these clients take part
    clip, z = session.round_vectors(ids)               # the cohort's C_k, z_k vectors
    ... one jitted round (noise_mode = session.noise_mode) ...
    row = session.end_round(ids, norms)                # adaptive C_k step, ledger advance; metrics.jsonl keys
    session.save_state(run_dir, t)                     # when round t is checkpointed: before its orbax save

and at the end `session.finish(run_dir)` writes privacy_ledger.arrow and returns ledger.summary().
Everything derives from (config, sizes, sampling, rounds, seed), so a resumed run accounts exactly like an
uninterrupted one: the ledger's state is saved per checkpointed round in `privacy_state.json`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.privacy.ledger import PrivacyLedger
from fedscope_jax.privacy.plan import PrivacyPlan, UserSteps, distributed_secagg_bound, plan_privacy, secagg_bound

STATE_FILE = "privacy_state.json"
KEEP_STATES = 4


def sampling_rate(sampling: str, fraction: float, n_clients: int) -> float:
    """Per-round participation probability of one client under the engine's sampling scheme."""
    if sampling == "poisson":
        return float(fraction)
    return max(1, int(round(fraction * n_clients))) / n_clients


class PrivacySession:
    """Plan + ledger of one run, and the glue the engine loop needs (see the module docstring)."""

    def __init__(self, config: PrivacyConfig, n_examples: np.ndarray, sampling: str, fraction: float,
                 rounds: int, seed: int, client_ids: np.ndarray | None = None,
                 user_steps: UserSteps | None = None, client_lr: float = 0.0, batch_cap: int = 0) -> None:
        """n_examples: each client's size for the personalized allocation (train interactions); user_steps:
        the user unit's users, local steps per round and expected batch of each client. client_lr, batch_cap:
        distributed mode's one local SGD step (its rate, the padded Poisson batch) bound the secure sum."""
        if config.mode == "off":
            raise FedscopeError("privacy mode 'off' has no privacy session (the engine's raw knobs apply)")
        if config.amplification and sampling != "poisson":
            raise FedscopeError(f"--amplification: subsampling amplification needs Poisson sampling "
                                f"(--sampling poisson), got --sampling {sampling}")
        n_examples = np.asarray(n_examples, np.int64)
        self.config = config
        self.seed = int(seed)
        self.client_ids = np.arange(n_examples.size) if client_ids is None else np.asarray(client_ids, np.int64)
        self.rate = sampling_rate(sampling, fraction, int(n_examples.size))
        self.plan: PrivacyPlan = plan_privacy(config, np.maximum(n_examples, 0), self.rate, int(rounds), user_steps)
        self.ledger = PrivacyLedger(self.plan, self.client_ids, n_examples)
        self._distributed = (float(client_lr), int(batch_cap), user_steps.batch_size if user_steps else 0)
        if config.mode == "distributed" and not (client_lr > 0 and batch_cap > 0):
            raise FedscopeError("privacy.mode distributed: the session needs the client learning rate and the "
                                "padded batch to bound the secure sum")
        self._eligible = np.ones(n_examples.size, bool)

    # --- what the engine needs ---------------------------------------------------------------------------
    @property
    def noise_mode(self) -> str:
        """The engine noise mode: central DP-FedAvg, per-client noise (secure aggregation of noised
        updates) or "sum" (the fast path: one draw with the same variance as the clients' summed noises);
        "off" for the user unit, whose noise is added in each local DP-SGD step."""
        if self.plan.unit == "user":
            return "off"
        if self.plan.mode == "central":
            return "central"
        return "per_client" if self.config.secagg else "sum"

    def secagg_bound(self) -> float:
        """Coordinate range B of the secure sum (clipped + noised updates of weight 1), 0 when secagg is off.
        Distributed mode always sums securely."""
        if self.plan.mode == "distributed":
            return distributed_secagg_bound(self.plan, *self._distributed)
        if not self.config.secagg:
            return 0.0
        if self.plan.mode == "central":  # updates are clipped, not noised, before the secure sum
            clip = np.asarray(self.plan.clip_norms)
            return float(np.max(clip))
        return secagg_bound(self.plan)

    def begin_round(self, round_index: int) -> np.ndarray:
        """bool [K]: clients whose budget allows one more round (refused ones stop for good, logged)."""
        self._eligible = self.ledger.begin_round(round_index)
        return self._eligible

    def round_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(clip C_k, noise multiplier z_k) of the clients `ids`, float32, for the engine's cohorts."""
        ids = np.asarray(ids, np.int64)
        clip = self.ledger.clip_norms[ids].astype(np.float32)
        if self.plan.mode == "central":
            z = np.full(ids.size, self.plan.central_noise_multiplier, np.float32)
        else:
            z = np.asarray(self.plan.update_noise_multipliers, np.float32)[ids]
        return clip, z

    def end_round(self, round_index: int, ids: np.ndarray, norms: np.ndarray) -> dict[str, Any]:
        """Adaptive clipping step (from the participants' raw update norms) and ledger advance."""
        ids = np.asarray(ids, np.int64)
        participated = np.zeros(self.plan.num_clients, bool)
        participated[ids] = True
        clip = None
        if self.plan.adaptive_clipping:
            import jax

            from fedscope_jax.privacy import mechanism

            all_norms = np.zeros(self.plan.num_clients, np.float32)
            all_norms[ids] = np.asarray(norms, np.float32)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), 0xC11F), round_index)
            clip = np.asarray(mechanism.adaptive_clip_update(
                self.ledger.clip_norms, all_norms, participated, key,
                target_quantile=self.plan.clip_target_quantile, learning_rate=self.plan.clip_learning_rate,
                bit_noise=np.asarray(self.plan.bit_noise, np.float32), min_clip=self.plan.clip_min,
                max_clip=self.plan.clip_max), np.float64)
        row = self.ledger.end_round(participated, clip, track_eps=self.plan.accountant == "rdp")
        row.pop("round", None)
        return row

    # --- resume ------------------------------------------------------------------------------------------
    def save_state(self, run_dir: str | os.PathLike, round_index: int) -> None:
        """Adds the ledger state after round `round_index` to run_dir/privacy_state.json (atomically)."""
        path = Path(run_dir) / STATE_FILE
        states = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        states[str(int(round_index))] = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                                         for k, v in self.ledger.state().items()}
        keep = sorted(states, key=int)[-KEEP_STATES:]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({k: states[k] for k in keep}), encoding="utf-8")
        os.replace(tmp, path)

    def load_state(self, run_dir: str | os.PathLike, round_index: int) -> None:
        """Restores the ledger as it was after round `round_index` (the restored checkpoint's round)."""
        if round_index == 0:
            return
        path = Path(run_dir) / STATE_FILE
        states = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        if str(round_index) not in states:
            raise FedscopeError(f"{path}: no privacy ledger state for checkpointed round {round_index} "
                                f"(have {sorted(states, key=int)}); cannot resume a private run without it")
        self.ledger.load_state(states[str(round_index)])

    # --- end of run --------------------------------------------------------------------------------------
    def finish(self, run_dir: str | os.PathLike) -> dict[str, Any]:
        """Writes privacy_ledger.arrow; returns the summary.json "privacy" section."""
        self.ledger.write(run_dir)
        summary = self.ledger.summary()
        eps = self.ledger.eps_spent
        if self.plan.mode == "distributed":
            summary["eps_colluding_max"] = float(np.max(self.ledger.eps_colluding()))
            summary["silos"] = int(np.sum(np.asarray(self.plan.update_noise_multipliers) > 0))
        trained = self.ledger.n_examples > 0
        summary.update({"config": self.config.to_dict(), "sampling_rate": self.rate,
                        "noise_mode": self.noise_mode, "secagg_bound": self.secagg_bound(),
                        "eps_nominal": self.config.epsilon,
                        "eps_spent_min": float(eps[trained].min()) if trained.any() else 0.0,
                        "eps_spent_median": float(np.median(eps[trained])) if trained.any() else 0.0})
        return summary


def check_engine_flags(mode: str, clip: float, noise_multiplier: float, noise_mode: str | None) -> None:
    """Refuses the engine's raw --clip / --noise-multiplier / --noise-mode off when a DP mode sets them."""
    if mode == "off":
        return
    if math.isfinite(clip):
        raise FedscopeError(f"--clip {clip:g} conflicts with --privacy {mode}: the plan sets C_k "
                            f"(use --clip-norm, or --privacy off for the raw engine knobs)")
    if noise_multiplier > 0:
        raise FedscopeError(f"--noise-multiplier {noise_multiplier:g} conflicts with --privacy {mode}: z_k is "
                            f"calibrated from --epsilon/--delta (use --privacy off for a raw noise multiplier)")
    if noise_mode is not None:
        raise FedscopeError(f"--noise-mode {noise_mode} conflicts with --privacy {mode}: the privacy mode picks "
                            f"it (central: once on the sum; --secagg: per client; otherwise sum)")
