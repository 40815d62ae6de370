"""Model selection of a federated run: the best validated round, and early stopping after `patience`
validations without gain (the rule centralized and local-only training follow, `train.patience` and
`train.select_metric`).

A non-private run tests the parameters of its best round. A private run tests its final model: choosing a
round by the clients' held-out data would be a release outside the privacy budget, so no private run
selects (every private method alike). The state is rebuilt from metrics.jsonl on resume (`replay`); the
best parameters travel in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

__all__ = ["Selection", "final_facts", "selection_for"]


@dataclasses.dataclass
class Selection:
    """Best validation score so far, its round and parameters (host arrays), validations waited since."""

    patience: int
    metric: str
    best_score: float = -math.inf
    best_round: int = 0          # 0: no validation yet
    best_params: Any = None
    waited: int = 0
    stopped: bool = False
    last_round: int = 0          # the last round this run trained (a stopped run: its stop round)
    rounds: int = 0              # the run's round budget (0: unknown); patience running out at it is no early stop

    def observe(self, round_: int, score: float, params: Callable[[], Any]) -> bool:
        """Records round `round_`'s validation score; `params()` (host copy) is taken on a gain. Returns
        whether the run stops here (patience validations without gain)."""
        self.last_round = round_
        if score > self.best_score:
            self.best_score, self.best_round, self.best_params, self.waited = score, round_, params(), 0
        else:
            self.waited += 1
        self.stopped = self.waited >= self.patience
        return self.stopped

    def replay(self, records: Iterable[Mapping[str, Any]]) -> None:
        """The state after `records` (metrics.jsonl lines of the rounds a checkpoint covers); the best
        parameters are the checkpoint's (set `best_params` after)."""
        for rec in records:
            self.last_round = int(rec["round"])
            if "valid" in rec:
                self.observe(int(rec["round"]), float(rec["valid"]["select"]), lambda: None)

    def facts(self) -> dict[str, Any]:
        """summary.json "training" facts of the selection."""
        return {"selection": "best_valid", "select_metric": self.metric, "patience": self.patience,
                "rounds_run": self.last_round, "best_round": self.best_round,
                "best_valid_select": self.best_score if self.best_round else None,
                "stopped_early": self.stopped and not 0 < self.rounds <= self.last_round}


def final_facts(rounds_run: int) -> dict[str, Any]:
    """summary.json "training" facts of a run that tests its final model (private runs)."""
    return {"selection": "final", "rounds_run": rounds_run, "best_round": None, "stopped_early": False}


def selection_for(cfg: Any) -> Selection | None:
    """The selection of a run's RunConfig: best validated round for a non-private run, None (final model)
    for a private one."""
    if cfg.privacy.mode != "off":
        return None
    return Selection(int(cfg.train.patience), str(cfg.train.select_metric), rounds=int(cfg.federated.rounds))
