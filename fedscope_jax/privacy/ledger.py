"""The privacy ledger: per-client accountant state over a run, budget enforcement, privacy_ledger.arrow.

Host-side and stateful on purpose (a few numpy vectors), so the jitted round stays pure. Per round:

    eligible = ledger.begin_round(t)          # bool [C]: clients whose next event stays within eps_k
    ... engine samples participants among `eligible`, trains, clips, noises, aggregates ...
    row = ledger.end_round(participated, clip_norms)   # advances the accountants; a dict for metrics.jsonl

Accountant state. z_k is fixed for the run, so client k's history is `events_k` identical events: client unit,
one per participated round (one per round of the run with amplification, see accounting.py); user unit, one
per local DP-SGD step, S_k per participated round (`PoissonSampledDpEvent(q_k, GaussianDpEvent(z_k))`). Its epsilon is
evaluated by composing those events in a fresh dp-accounting accountant: `accounting.epsilon_spent`, the
same function `recompute_eps` applies to a ledger row, so anyone can reproduce `eps_spent` from the file.

Budget. A client is refused (and stops for good, logged in the round row and in `summary()`) once one more
event would take it above eps_k. Calibration guarantees the planned number of events fits, so the check
costs an accountant evaluation only beyond the plan.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from fedscope_jax.errors import FedscopeError
from fedscope_jax.privacy import accounting
from fedscope_jax.privacy.plan import PrivacyPlan
from fedscope_jax.utils.io import read_arrow, write_arrow
from fedscope_jax.utils.progress import progress

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.arrow"
METADATA_KEY = b"fedscope.privacy"
LEDGER_SCHEMA = pa.schema([
    ("client_id", pa.int64()),
    ("n_examples", pa.int64()),
    ("eps_target", pa.float64()),
    ("eps_spent", pa.float64()),
    ("delta", pa.float64()),
    ("noise_multiplier", pa.float64()),
    ("clip_norm", pa.float64()),
    ("rounds_participated", pa.int64()),
    ("sampling_rate", pa.float64()),
    ("accountant", pa.string()),
    ("amplification", pa.bool_()),
    ("rounds_accounted", pa.int64()),
    ("unit", pa.string()),
    ("steps", pa.int64()),
    ("noise_multiplier_colluding", pa.float64()),
    ("eps_colluding", pa.float64()),
])
LEDGER_COLUMNS = tuple(LEDGER_SCHEMA.names)
# ledgers written before the user unit lack `unit` and `steps`, before distributed noise the last two
REQUIRED_COLUMNS = LEDGER_COLUMNS[:LEDGER_COLUMNS.index("unit")]


def accounted_events(row: Mapping[str, Any]) -> int:
    """How many events a ledger row's eps_spent composes (its `steps` column): client unit, rounds_participated,
    or (amplification) the rounds the client was in the sampled population; user unit, its local DP-SGD steps.
    A ledger from before the user unit has no `steps`: its `rounds_accounted` counts the events."""
    for column in ("steps", "rounds_accounted"):
        if row.get(column) is not None:
            return int(row[column])
    raise FedscopeError("privacy ledger row without `steps` or `rounds_accounted`: expected the number of "
                        "accounted events in one of them")


def recompute_eps(row: Mapping[str, Any], column: str = "noise_multiplier") -> float:
    """eps_spent of one ledger row, recomputed with dp-accounting from the row's own columns.

    Without amplification: `steps` compositions of GaussianDpEvent(noise_multiplier) under the row's accountant
    (RDP, or PLD with value_discretization_interval=1e-3), epsilon at `delta`. With amplification (always for
    the user unit): `steps` compositions of PoissonSampledDpEvent(sampling_rate, GaussianDpEvent(z)).
    column "noise_multiplier_colluding" gives eps_colluding the same way.
    """
    return accounting.epsilon_spent(str(row["accountant"]), float(row[column]), accounted_events(row),
                                    float(row["delta"]), float(row["sampling_rate"]), bool(row["amplification"]))


class PrivacyLedger:
    """Per-client privacy state of one run (see the module docstring for the protocol)."""

    def __init__(self, plan: PrivacyPlan, client_ids: np.ndarray, n_examples: np.ndarray) -> None:
        self.plan = plan
        self.client_ids = np.asarray(client_ids, dtype=np.int64)
        self.n_examples = np.asarray(n_examples, dtype=np.int64)
        c = plan.num_clients
        if self.client_ids.shape != (c,) or self.n_examples.shape != (c,):
            raise FedscopeError(f"privacy ledger: client_ids {self.client_ids.shape} and n_examples "
                                f"{self.n_examples.shape} must both have shape ({c},) like the plan")
        self.events = np.zeros(c, dtype=np.int64)
        self.participations = np.zeros(c, dtype=np.int64)
        self.clip_norms = np.asarray(plan.clip_norms, dtype=np.float64).copy()
        self.stopped = np.zeros(c, dtype=bool)
        self.stop_round = np.full(c, -1, dtype=np.int64)
        self.eps_spent = np.zeros(c, dtype=np.float64)
        self._round: int | None = None
        self._finalized: np.ndarray | None = None
        self._colluding: tuple[np.ndarray, np.ndarray] | None = None   # (events, eps_colluding) last computed
        self._active = np.zeros(c, dtype=bool)
        self.rounds_run = 0

    # --- accounting -------------------------------------------------------------------------------------
    def _epsilon(self, k: int, events: int, colluding: bool = False) -> float:
        p = self.plan
        z = (p.colluding_noise_multipliers if colluding else p.noise_multipliers)[k]
        return accounting.epsilon_spent(p.accountant_name, float(z), int(events), p.delta,
                                        float(p.sampling_rates[k]), p.amplification)

    def eps_colluding(self) -> np.ndarray:
        """Each client's epsilon if every other client colludes with the server: eps_spent, except in
        distributed mode (only the own silo's noise share is left then)."""
        eps = self.finalize_eps()
        if np.array_equal(self.plan.colluding_noise_multipliers, self.plan.noise_multipliers):
            return eps.copy()
        if self._colluding is None or not np.array_equal(self._colluding[0], self.events):
            self._colluding = (self.events.copy(), np.array(
                [self._epsilon(k, int(self.events[k]), colluding=True) for k in range(self.plan.num_clients)],
                dtype=np.float64))
        return self._colluding[1].copy()

    def _fits_one_more(self, k: int) -> bool:
        """Whether one more round (1 event, or S_k steps for the user unit) stays within eps_k."""
        if self.plan.mode == "off":
            return True
        nxt = int(self.events[k]) + int(self.plan.steps_per_round[k])
        if nxt <= int(self.plan.planned_events[k]):
            return True  # calibrated for this many events (eps is non-decreasing in the event count)
        return self._epsilon(k, nxt) <= float(self.plan.eps_targets[k])

    def begin_round(self, round_index: int) -> np.ndarray:
        """Eligibility mask for this round; clients whose next event would exceed eps_k stop for good."""
        if self._round is not None:
            raise RuntimeError(f"privacy ledger: round {self._round} was begun but not ended")
        newly = [k for k in np.flatnonzero(~self.stopped) if not self._fits_one_more(int(k))]
        for k in newly:
            self.stopped[k] = True
            self.stop_round[k] = round_index
            log.info("privacy: client %d stops at round %d: one more round would exceed eps_target=%.4g "
                     "(eps_spent=%.4g)", self.client_ids[k], round_index, self.plan.eps_targets[k], self.eps_spent[k])
        self._newly_stopped = [int(self.client_ids[k]) for k in newly]
        self._round = round_index
        self._active = ~self.stopped
        return self._active.copy()

    def end_round(self, participated: np.ndarray, clip_norms: np.ndarray | None = None,
                  track_eps: bool = True) -> dict[str, Any]:
        """Advances the accountants of this round; returns the round's privacy row for metrics.jsonl.

        participated: bool [C], who contributed an update (must be a subset of begin_round's mask).
        clip_norms: the clip norms in force after this round (adaptive clipping), or None.
        track_eps: recompute eps_spent of the clients whose state changed (costly with PLD and many clients).
        """
        if self._round is None:
            raise RuntimeError("privacy ledger: end_round without begin_round")
        participated = np.asarray(participated, dtype=bool)
        if participated.shape != self._active.shape:
            raise ValueError(f"participated has shape {participated.shape}, expected {self._active.shape}")
        if np.any(participated & ~self._active):
            bad = self.client_ids[np.flatnonzero(participated & ~self._active)].tolist()
            raise RuntimeError(f"privacy ledger: refused clients {bad} took part in round {self._round}")
        if self.plan.unit == "user":   # a silo's own DP-SGD steps: only a participating silo composes events
            advanced = participated
            self.events += participated * np.asarray(self.plan.steps_per_round, np.int64)
        else:
            advanced = self._active if self.plan.amplification else participated
            self.events += advanced
        self.participations += participated
        if clip_norms is not None:
            self.clip_norms = np.asarray(clip_norms, dtype=np.float64).copy()
        if track_eps:
            for k in np.flatnonzero(advanced):
                self.eps_spent[k] = self._epsilon(int(k), int(self.events[k]))
        row = {"round": self._round, "privacy/participants": int(participated.sum()),
               "privacy/active_clients": int(self._active.sum()),
               "privacy/stopped_clients": int(self.stopped.sum()),
               "privacy/newly_stopped": self._newly_stopped}
        if track_eps:
            row["privacy/eps_spent_max"] = float(self.eps_spent.max())
            row["privacy/eps_spent_mean"] = float(self.eps_spent.mean())
        if self.plan.adaptive_clipping:
            row["privacy/clip_norm_median"] = float(np.median(self.clip_norms))
        self.rounds_run += 1
        self._round = None
        return row

    def finalize_eps(self) -> np.ndarray:
        """eps_spent of every client, computed afresh from its state (the values the ledger file holds)."""
        if self._finalized is not None and np.array_equal(self._finalized, self.events):
            return self.eps_spent
        clients = progress(range(self.plan.num_clients), desc="privacy: eps_spent", unit="client")
        self.eps_spent = np.array([self._epsilon(k, int(self.events[k])) for k in clients], dtype=np.float64)
        self._finalized = self.events.copy()
        return self.eps_spent

    # --- checkpointing ----------------------------------------------------------------------------------
    _STATE = ("events", "participations", "clip_norms", "stopped", "stop_round", "eps_spent")

    def state(self) -> dict[str, Any]:
        """The ledger's mutable state (numpy arrays + rounds_run), to save with a checkpoint."""
        if self._round is not None:
            raise RuntimeError(f"privacy ledger: cannot checkpoint inside round {self._round}")
        return {**{name: getattr(self, name).copy() for name in self._STATE}, "rounds_run": self.rounds_run}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restores `state()` output (same plan and clients) so a resumed run accounts exactly as before."""
        for name in self._STATE:
            value = np.asarray(state[name], dtype=getattr(self, name).dtype)
            if value.shape != getattr(self, name).shape:
                raise FedscopeError(f"privacy ledger checkpoint: `{name}` has shape {value.shape}, expected "
                                    f"{getattr(self, name).shape} (a checkpoint of another run?)")
            setattr(self, name, value.copy())
        self.rounds_run = int(state["rounds_run"])
        self._finalized = None

    # --- reporting --------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Run-level privacy facts for summary.json (includes the clients stopped by their budget)."""
        eps = self.finalize_eps()
        finite = eps[np.isfinite(eps)]
        return {**self.plan.summary(), "rounds_run": self.rounds_run,
                "eps_spent_max": float(eps.max()), "eps_spent_mean": float(eps.mean()),
                "eps_spent_max_finite": float(finite.max()) if finite.size else None,
                "clients_over_target": int(np.sum(eps > self.plan.eps_targets * (1 + 1e-9))),
                "stopped_clients": [{"client_id": int(self.client_ids[k]), "round": int(self.stop_round[k])}
                                    for k in np.flatnonzero(self.stopped)]}

    def to_table(self) -> pa.Table:
        """The ledger as an Arrow table: exactly LEDGER_COLUMNS, one row per client."""
        p = self.plan
        eps = self.finalize_eps()
        c = p.num_clients
        table = pa.table({
            "client_id": self.client_ids, "n_examples": self.n_examples,
            "eps_target": np.asarray(p.eps_targets, dtype=np.float64), "eps_spent": eps,
            "delta": np.full(c, p.delta), "noise_multiplier": np.asarray(p.noise_multipliers, dtype=np.float64),
            "clip_norm": self.clip_norms, "rounds_participated": self.participations,
            "sampling_rate": np.asarray(p.sampling_rates, dtype=np.float64),
            "accountant": pa.array([p.accountant_name] * c, pa.string()),
            "amplification": np.full(c, p.amplification),
            "rounds_accounted": self.participations if p.unit == "user" else np.asarray(self.events, np.int64),
            "unit": pa.array([p.unit] * c, pa.string()),
            "steps": np.asarray(self.events, dtype=np.int64),
            "noise_multiplier_colluding": np.asarray(p.colluding_noise_multipliers, dtype=np.float64),
            "eps_colluding": self.eps_colluding()}, schema=LEDGER_SCHEMA)
        record = "one user's whole history" if p.unit == "user" else "one client's whole data"
        meta = {"mode": p.mode, "unit": p.unit, "rounds_run": self.rounds_run,
                "neighboring_relation": f"add_or_remove_one (zero-out of {record})",
                "pld_value_discretization_interval": accounting.PLD_DISCRETIZATION,
                "update_noise_multiplier": np.asarray(p.update_noise_multipliers).tolist(),
                "central_noise_multiplier": p.central_noise_multiplier,
                "colluding": "eps_colluding: every other client colludes with the server (in distributed mode "
                             "it subtracts its noise shares from the secure sum)",
                "stop_round": self.stop_round.tolist()}
        return table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})

    def write(self, run_dir: str | os.PathLike) -> str:
        """Writes `run_dir/privacy_ledger.arrow`; returns its path."""
        path = os.path.join(os.fspath(run_dir), LEDGER_FILE)
        write_arrow(self.to_table(), path)
        return path


def read_ledger(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a privacy_ledger.arrow as dicts."""
    table = read_arrow(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise FedscopeError(f"{path}: not a privacy ledger (missing columns {missing})")
    return table.to_pylist()


def check_ledger(path: str | os.PathLike, rtol: float = 1e-6) -> list[int]:
    """Recomputes every row's eps_spent (and eps_colluding where the ledger has it); returns the client ids
    whose stored value differs by > rtol."""
    bad = []
    pairs = (("eps_spent", "noise_multiplier"), ("eps_colluding", "noise_multiplier_colluding"))
    for row in read_ledger(path):
        for eps_column, z_column in pairs:
            if row.get(eps_column) is None:
                continue
            stored, again = float(row[eps_column]), recompute_eps(row, z_column)
            if not (stored == again
                    or (math.isfinite(again) and abs(stored - again) <= rtol * max(abs(again), 1e-12))):
                bad.append(int(row["client_id"]))
                break
    return bad
