"""Run configuration: ONE frozen dataclass with sections model / train / eval / federated / privacy.

Loaded from a JSON file (`--config`), then `--set section.key=value` overrides, then the command-line flags
that were given (`cli.flags.apply_flags`). Every key is checked against the dataclass fields; an unknown key or a
value of the wrong type is a FedscopeError that names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from fedscope_jax.errors import FedscopeError
from fedscope_jax.eval.protocol import EvalConfig
from fedscope_jax.model.config import ModelConfig
from fedscope_jax.privacy.config import PrivacyConfig
from fedscope_jax.train.federated_config import SCHEME_COUNTS, FederatedConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Centralized training: Adam(lr), mini-batches of users, early stopping on validation.

    Validation runs every `eval_every` epochs; training stops after `patience` validations without an
    improvement of `select_metric` (sampled protocol, mean over domains) and keeps the best parameters.
    """

    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 200
    patience: int = 5
    eval_every: int = 1
    select_metric: str = "NDCG@10"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size < 1 or self.epochs < 1 or self.patience < 1 or self.eval_every < 1:
            raise FedscopeError("train.lr, batch_size, epochs, patience, eval_every must be positive")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; centralized runs read model/train/eval, federated runs all five sections."""

    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    federated: FederatedConfig = FederatedConfig()
    privacy: PrivacyConfig = PrivacyConfig()

    def __post_init__(self) -> None:
        if self.federated.seed != self.train.seed:  # one seed per run
            object.__setattr__(self, "federated", dataclasses.replace(self.federated, seed=self.train.seed))


# The settings that size one training step, each with its config key.
STEP_SHAPE = {"batch_size": "train.batch_size", "dim": "model.dim", "blocks": "model.blocks",
              "max_len": "model.max_len", "num_negatives": "model.loss.num_negatives", "rec": "model.loss.rec"}


def check_user_norm(cfg: RunConfig, mode: str = "federated") -> None:
    """model.loss.user_norm other than "mean" weighs the per-user loss of federated --privacy-unit user runs: a
    run of another `mode` (centralized, local) or unit refuses it. Called on the resolved config (its --set
    values and flags together, so their order does not matter), before anything is written."""
    norm = cfg.model.loss.user_norm
    if norm == "mean":
        return
    if mode != "federated":
        raise FedscopeError(f"model.loss.user_norm={norm!r} weighs the per-user loss of federated --privacy-unit "
                            f"user runs; --mode {mode} has no per-user loss (leave it at 'mean')")
    if cfg.privacy.unit != "user":
        raise FedscopeError(f"model.loss.user_norm={norm!r} weighs the per-user loss of --privacy-unit user, but "
                            f"privacy.unit is {cfg.privacy.unit!r}; use --privacy-unit user, or leave "
                            "model.loss.user_norm at 'mean'")


def step_shape(cfg: RunConfig) -> dict[str, Any]:
    """The values of `STEP_SHAPE` in `cfg`, read by their `--set` keys (`flatten`): a benchmark records them with
    its timings, so that pricing other runs with those timings (experiments.inventory) can check it prices the
    same step."""
    flat = flatten(to_dict(cfg))
    return {name: flat[key] for name, key in STEP_SHAPE.items()}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Converts a JSON value or a --set string to the field type `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key)
    try:
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise TypeError
            return from_dict(tp, value, key + ".")
        if origin is tuple:
            inner = typing.get_args(tp)[0]
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(_coerce(v, inner, key) for v in items if v != "")
        if tp is bool:
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool):
                return value
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    name = getattr(tp, "__name__", str(tp))
    raise FedscopeError(f"config key {key!r}: got {value!r}, expected {name}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Builds dataclass `cls` from a (possibly partial) nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if cls is FederatedConfig and "seed" in data:
        raise FedscopeError(f"config key {prefix}seed: the federated run uses train.seed; set that instead")
    if unknown:
        raise FedscopeError(f"unknown config key {prefix + unknown[0]!r}; expected one of {sorted(names)}")
    if cls is FederatedConfig and data.get("scheme") in SCHEME_COUNTS and "clients" not in data:
        data = {**data, "clients": 0}   # the scheme sets the count (not the default of the other schemes)
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in data.items()})


def _set_path(tree: dict[str, Any], dotted: str, value: str) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = tree.setdefault(p, {})
        if not isinstance(node, dict):
            raise FedscopeError(f"--set {dotted}: {p!r} is not a section")
        tree = node
    tree[parts[-1]] = value


# What a run's config.json records beside its RunConfig (cli/train.py, cli/sweep.py, the reproduction's cells)
RUN_RECORD_KEYS = ("data", "attributes", "semantic_coverage", "mode", "experiment")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """RunConfig from an optional JSON file plus `key=value` overrides (dotted keys, e.g. model.loss.alpha=0).
    The file may be a run's own config.json: its record keys (`RUN_RECORD_KEYS`) and the federated seed it
    resolved from train.seed are left out, so `--config RUN/config.json` trains that run's settings again."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FedscopeError(f"{p}: config file not found")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise FedscopeError(f"{p}: invalid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FedscopeError(f"{p}: expected a JSON object with sections model/train/eval/federated/privacy")
        if {"mode", "semantic_coverage"} <= set(data):   # a run's config.json (every writer records both)
            data = {k: v for k, v in data.items() if k not in RUN_RECORD_KEYS}
            if isinstance(data.get("federated"), dict):
                data["federated"] = {k: v for k, v in data["federated"].items() if k != "seed"}
    for item in overrides:
        if "=" not in item:
            raise FedscopeError(f"--set {item!r}: expected key=value, e.g. model.dim=32")
        key, value = item.split("=", 1)
        _set_path(data, key.strip(), value.strip())
    where = f"{path}: " if path is not None else ""
    try:
        return from_dict(RunConfig, data)
    except FedscopeError as exc:
        raise FedscopeError(where + str(exc)) from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as {dotted key: leaf} (the keys of `--set`), e.g. {"model.loss.alpha": 0.1}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# Settings whose default changed after runs stopped omitting them: a stored config without one ran at this value.
RECORDED_LATE = {"model.loss.rec": "sampled"}


def config_mismatch(old: dict[str, Any], new: dict[str, Any], free: frozenset[str] = frozenset()) -> str | None:
    """The first dotted key (outside `free`) whose value differs between a stored config and a resolved one,
    as "KEY is NEW here but OLD in the stored config", or None. A key the stored config lacks (added to fedscope
    after it was written) matches at its default, which the older code used, or at its RECORDED_LATE value."""
    old, new = {**RECORDED_LATE, **flatten(old)}, flatten(json.loads(json.dumps(new)))   # tuples -> lists
    defaults = flatten(to_dict(RunConfig()))
    for key in sorted(set(old) | set(new)):
        if key not in old and key in defaults and new.get(key) == defaults[key]:
            continue
        if key not in free and old.get(key) != new.get(key):
            return f"{key} is {new.get(key)!r} here but {old.get(key)!r} in the stored config"
    return None
