"""Expanding studies into cells: one training run each (dataset x method x DP x variant x seed).

A cell's RunConfig is built from --set style overrides in this order: profile, dry-run budget, variant, DP
setting, method, seed; a sweep's distributed program: profile, its `distributed_set`, dry-run budget, method,
seed, then its mode and unit. Its directory is `runs/<dataset>/<method>/<dp>[-<variant>]-seed<s>-<hash>`, the hash
taken over everything that defines the run, so studies that need the same run share one directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.methods import METHODS
from fedscope_jax.experiments.spec import DPSetting, Study, Variant

# --dry-run: a tiny budget on top of the profile, so that plumbing errors show in seconds; never mixed
# with real results (own directory tree, marked in every cell.json and in the report).
DRY_RUN_USERS = 120
DRY_RUN_OVERRIDES = ("model.dim=8", "model.blocks=1", "model.heads=1", "model.max_len=8", "model.fusion_hidden=8",
                     "federated.rounds=1", "federated.eval_every=1", "federated.local_epochs=1",
                     "federated.max_buckets=1", "federated.chunk_size=1", "train.epochs=1", "train.eval_every=1",
                     "train.batch_size=32", "eval.num_negatives=49", "model.loss.num_negatives=8")
# the user unit Poisson-samples each silo's users at q = batch / users <= 1: the dry run's smallest silo
# (8 power-law clients over 120 users) has 4
DRY_RUN_USER_OVERRIDES = ("train.batch_size=4",)
# the distributed variant's noise shares add up only in the secure sum of all silos, so they train in one chunk
DRY_RUN_DISTRIBUTED_OVERRIDES = ("federated.chunk_size=0",)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a study (or, for a sweep study, one program: `dp` is None and sweep_* say what it covers)."""

    study: str
    dataset: str
    method: str
    dp: DPSetting | None
    variant: Variant
    seed: int
    overrides: tuple[str, ...]
    profile: str
    dry_run: bool
    sweep_modes: tuple[str, ...] = ()
    sweep_epsilons: tuple[float, ...] = ()
    sweep_unit: str = "client"     # a sweep cell's privacy unit (its modes share one program per seed)

    @property
    def mode(self) -> str:
        return "sweep" if self.dp is None else METHODS[self.method].mode

    @property
    def privacy_unit(self) -> str:
        """The program's privacy unit: "user" for a user-level DP cell or sweep, else "client"."""
        if self.dp is None:
            return self.sweep_unit
        return self.dp.unit if self.dp.mode != "off" else "client"

    @property
    def program(self) -> str:
        """What the cell trains: its privacy unit, or "distributed" for the user unit's distributed program."""
        return "distributed" if self.dp is None and self.sweep_modes == ("distributed",) else self.privacy_unit

    @property
    def label(self) -> str:
        """The cell in progress bars and errors: its DP label, or the sweep program ("sweep", "sweep-user",
        "sweep-distributed", as its directory is named)."""
        if self.dp is not None:
            return self.dp.label
        return "sweep" if self.program == "client" else f"sweep-{self.program}"

    def key(self, dataset_dir: str, attributes: str) -> str:
        ident = {"dataset_dir": Path(dataset_dir).name, "method": self.method, "mode": self.mode,
                 "overrides": sorted(self.overrides), "attributes": attributes, "dry_run": self.dry_run,
                 "sweep": [list(self.sweep_modes), [repr(e) for e in self.sweep_epsilons]]}
        if self.dp is None and self.sweep_unit != "client":   # client-unit sweeps keep their old key
            ident["sweep_unit"] = self.sweep_unit
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]

    def relative_dir(self, dataset_dir: str, attributes: str) -> str:
        if self.dp is None:
            return f"{self.dataset}/{self.method}/{self.label}-seed{self.seed}-{self.key(dataset_dir, attributes)}"
        variant = "" if self.variant.name == "base" else f"-{_slug(self.variant.name)}"
        return (f"{self.dataset}/{self.method}/{self.dp.label}{variant}-seed{self.seed}-"
                f"{self.key(dataset_dir, attributes)}")

    def identity(self) -> dict[str, Any]:
        """cell.json's description of the cell (what the report groups by)."""
        return {"dataset": self.dataset, "method": self.method, "label": METHODS[self.method].label,
                "mode": METHODS[self.method].mode,
                "dp": "n/a" if METHODS[self.method].dp == "none" else (self.dp.label if self.dp else None),
                "privacy_mode": self.dp.mode if self.dp else None,
                "epsilon": None if self.dp is None or self.dp.mode == "off" else self.dp.epsilon,
                "variant": self.variant.name, "variant_axis": self.variant.axis, "variant_value": self.variant.value,
                "seed": self.seed, "profile": self.profile, "dry_run": self.dry_run}


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in text)


def expand(study: Study, profile: str, dry_run: bool) -> list[Cell]:
    """The cells of one study (none for a derived study) under a profile; dry-run keeps the first seed."""
    prof = study.profile(profile)
    seeds = prof.seeds[:1] if dry_run else prof.seeds
    base = prof.overrides + (DRY_RUN_OVERRIDES if dry_run else ())
    cells: list[Cell] = []
    if study.kind == "derived":
        return cells
    for dataset in study.datasets_for(profile):
        for name in study.methods:
            method = METHODS[name]
            if study.kind == "sweep":
                for unit, modes in study.sweep_units():
                    if unit == "user" and method.dp == "no-user":   # its user-unit runs would be FedSCOPE's
                        continue
                    # the distributed program: its own training (profile distributed_set) under the dry run's
                    # budget, and mode distributed so that its options validate (as `fedscope sweep` does)
                    dist = modes == ("distributed",)
                    start = (prof.overrides + prof.distributed + (DRY_RUN_OVERRIDES + DRY_RUN_DISTRIBUTED_OVERRIDES
                                                                  if dry_run else ())) if dist else base
                    own = ("privacy.mode=distributed",) if dist else ()
                    for seed in seeds:
                        user = (f"privacy.unit={unit}",) + (DRY_RUN_USER_OVERRIDES if dry_run else ())
                        ov = (start + method.settings() + (f"train.seed={seed}",) + own
                              + (user if unit == "user" else ()))
                        cells.append(Cell(study.name, dataset, name, None, Variant(), seed, ov, profile, dry_run,
                                          modes, study.epsilons, unit))
                continue
            dps = [d for d in study.dp_for(profile) if _dp_applies(method.dp, d)]
            if method.dp == "none":
                dps = [DPSetting()]
            if method.dp_mode:
                dps = [d if d.mode == "off" else dataclasses.replace(d, mode=method.dp_mode) for d in dps]
            for dp in dps:
                for variant in study.variants or (Variant(),):
                    for seed in seeds:
                        user = DRY_RUN_USER_OVERRIDES if dry_run and dp.mode != "off" and dp.unit == "user" else ()
                        ov = (base + variant.overrides_for(profile) + dp.overrides() + user + method.settings()
                              + (f"train.seed={seed}",))
                        cells.append(Cell(study.name, dataset, name, dp, variant, seed, ov, profile, dry_run))
    return cells


def _dp_applies(rule: str, dp: DPSetting) -> bool:
    return (rule == "any" or (rule == "required" and dp.mode != "off")
            or (rule == "no-user" and (dp.mode == "off" or dp.unit != "user")))


def run_config(cell: Cell, where: str) -> Any:
    """The cell's RunConfig; a FedscopeError naming the study file, the cell and the key otherwise."""
    from fedscope_jax.train.config import check_user_norm, load_config
    from fedscope_jax.train.federated import check_distributed

    try:
        cfg = load_config(None, cell.overrides)
        check_user_norm(cfg, "federated" if cell.mode == "sweep" else cell.mode)
        if cell.program == "distributed":
            check_distributed(cfg)
        return cfg
    except FedscopeError as exc:
        hint = (f" (the distributed program's settings: profiles.{cell.profile}.distributed_set)"
                if cell.program == "distributed" else "")
        if "seqcl_weight" in str(exc):
            hint = (" (the FedCL4SRec baseline needs LossConfig model.loss.seqcl_weight, which this checkout "
                    "does not have yet)")
        raise FedscopeError(f"{where}: cell {cell.dataset}/{cell.method}/{cell.label}/{cell.variant.name}: "
                            f"{exc}{hint}") from None
