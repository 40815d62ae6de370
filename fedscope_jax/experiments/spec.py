"""Study specs: experiments/configs/<study>.json parsed into frozen dataclasses, every key checked.

A study file names its datasets, methods, DP settings, seeds and per-profile (`quick`, `full`) RunConfig
overrides and data limits. Three kinds:
- "cells": one run per dataset x method x DP setting x variant x seed (main, ablation, clients_sampling);
- "sweep": the privacy-utility grid, one `run_sweep` program per (dataset, method, seed);
- "derived": no runs of its own; reads the cells of the study named in `reads` (cold_start, convergence).
Errors name the file and the key at fault.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments.datasets import DATASETS
from fedscope_jax.experiments.methods import get_method

KINDS = ("cells", "sweep", "derived")
PROFILES = ("quick", "full", "cpu")
REQUIRED_PROFILES = ("quick", "full")   # every study has these; "cpu" (whole datasets on a 2-core CPU) is optional
PRIVACY_MODES = ("personalized", "uniform", "central")
# a sweep's user-unit modes: local noise in every silo (personalized, uniform) or the distributed variant (one
# DP-SGD step a round over all silos' users, noise shares under the secure sum; a program of its own per seed)
USER_SWEEP_MODES = ("personalized", "uniform", "distributed")
PRIVACY_UNITS = ("client", "user")     # privacy.unit: a silo's whole data, or one user's history (docs/privacy.md)


@dataclasses.dataclass(frozen=True)
class DPSetting:
    """A DP setting of a cell: mode off, or a privacy mode at a budget epsilon (and delta) for a privacy unit.

    The label names the unit of a user-level setting ("personalized-user-eps8"); a client-level one keeps its
    old label ("personalized-eps8"), so existing cell directories stay valid."""

    mode: str = "off"
    epsilon: float = math.inf
    delta: float = 1e-5
    unit: str = "client"

    @property
    def label(self) -> str:
        return dp_label(self.mode, self.epsilon, self.unit)

    def overrides(self) -> tuple[str, ...]:
        if self.mode == "off":
            return ("privacy.mode=off",)
        unit = (f"privacy.unit={self.unit}",) if self.unit != "client" else ()
        return (f"privacy.mode={self.mode}", f"privacy.epsilon={self.epsilon!r}", f"privacy.delta={self.delta!r}",
                *unit)


NO_DP_LABELS = ("off", "off-user", "off-distributed")   # dp_label's eps-inf labels: client, user, distributed


def dp_label(mode: str, epsilon: float | None, unit: str = "client", distributed: bool = False) -> str:
    """"off", "personalized-eps8" (client unit) or "personalized-user-eps8" (user unit): a cell's DP label.
    "off-user" is the user unit's training (per-user loss and gradients, Poisson batches) without clipping or
    noise: the eps-inf point of a user-unit sweep; "off-distributed" (`distributed`) the distributed variant's
    training (one step a round over all silos' users) without them: the eps-inf point of its sweep."""
    if mode == "off":
        return "off-distributed" if distributed else "off-user" if unit == "user" else "off"
    return f"{mode}-{'user-' if unit == 'user' else ''}eps{epsilon:g}"


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named set of extra overrides (e.g. clients=10); the empty variant is "base"."""

    name: str = "base"
    overrides: tuple[str, ...] = ()
    axis: str = ""          # the varied key, for plots (e.g. federated.clients)
    value: float | None = None
    per_profile: tuple[tuple[str, tuple[str, ...]], ...] = ()   # overrides added under one profile only

    def overrides_for(self, profile: str) -> tuple[str, ...]:
        """The variant's overrides under `profile` (its `set`, then its `profiles.<profile>.set`)."""
        return self.overrides + dict(self.per_profile).get(profile, ())


@dataclasses.dataclass(frozen=True)
class Profile:
    """Per-profile settings: seeds, data limits and RunConfig overrides.

    max_users: users kept per dataset (0 = all); `users` instead when the file gives one count per dataset;
    max_items: an item core, each domain's N most-trained items (0 = every item; experiments/datasets.py);
    dp: the DP settings of a cells study under this profile, instead of the study's (None: the study's);
    distributed: the overrides of a sweep's distributed program (one SGD step a round in the silos, the
    server's optimizer and its rounds: the mechanism is central DP-SGD only with one linear step a round)."""

    seeds: tuple[int, ...]
    max_users: int
    overrides: tuple[str, ...]
    datasets: tuple[str, ...] | None = None
    max_items: int = 0
    users: tuple[tuple[str, int], ...] = ()
    dp: tuple[DPSetting, ...] | None = None
    distributed: tuple[str, ...] = ()   # `distributed_set`: the distributed variant's training, on top of `set`

    def users_for(self, dataset: str) -> int:
        """Users kept of `dataset` (0 = all)."""
        return dict(self.users).get(dataset, self.max_users)


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    path: Path
    title: str
    kind: str
    description: str
    datasets: tuple[str, ...]
    methods: tuple[str, ...]
    dp: tuple[DPSetting, ...]
    variants: tuple[Variant, ...]
    privacy_modes: tuple[str, ...]          # a sweep's client-unit modes
    epsilons: tuple[float, ...]
    reads: str | None
    profiles: dict[str, Profile]
    user_privacy_modes: tuple[str, ...] = ()   # a sweep's user-unit modes (one more program per seed; distributed: two)

    def sweep_units(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(unit, modes) of each sweep program per seed: the client unit's, then the user unit's local-noise
        modes, then the user unit's distributed variant (which trains on batches of its own: a third program)."""
        local = tuple(m for m in self.user_privacy_modes if m != "distributed")
        dist = tuple(m for m in self.user_privacy_modes if m == "distributed")
        return tuple((u, m) for u, m in (("client", self.privacy_modes), ("user", local), ("user", dist)) if m)

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise FedscopeError(f"{self.path}: study {self.name!r} has no profile {name!r} (it has "
                                f"{', '.join(self.profiles)})")
        return self.profiles[name]

    def datasets_for(self, profile: str) -> tuple[str, ...]:
        return self.profile(profile).datasets or self.datasets

    def dp_for(self, profile: str) -> tuple[DPSetting, ...]:
        """The DP settings of the study's cells under `profile` (its own list, else the study's)."""
        own = self.profile(profile).dp
        return self.dp if own is None else own


STUDY_KEYS = {"study", "title", "kind", "description", "datasets", "methods", "dp", "variants", "privacy_modes",
              "epsilons", "reads", "seeds", "profiles", "notes"}
PROFILE_KEYS = {"seeds", "max_users", "max_items", "set", "datasets", "dp", "distributed_set"}


def _err(path: Path, key: str, msg: str) -> FedscopeError:
    return FedscopeError(f"{path}: key {key!r}: {msg}")


def _list(raw: dict[str, Any], key: str, path: Path, required: bool = True) -> list[Any]:
    value = raw.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise _err(path, key, "expected a non-empty list")
    return value


def _epsilon(value: Any, path: Path, key: str) -> float:
    if value in ("inf", "Infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise _err(path, key, f"expected a positive number or \"inf\", got {value!r}")
    return float(value)


def _dp(item: Any, path: Path, key: str) -> DPSetting:
    if not isinstance(item, dict) or set(item) - {"mode", "epsilon", "delta", "unit"}:
        raise _err(path, key, f"expected {{\"mode\": ..., \"epsilon\": ..., \"unit\": ...}}, got {item!r}")
    mode = item.get("mode", "off")
    unit = item.get("unit", "client")
    if unit not in PRIVACY_UNITS:
        raise _err(path, key + ".unit", f"expected one of {', '.join(PRIVACY_UNITS)}, got {unit!r}")
    if mode == "off":
        return DPSetting()
    if mode not in PRIVACY_MODES:
        raise _err(path, key + ".mode", f"expected off or one of {', '.join(PRIVACY_MODES)}, got {mode!r}")
    eps = _epsilon(item.get("epsilon"), path, key + ".epsilon")
    if not math.isfinite(eps):
        raise _err(path, key + ".epsilon", "a DP setting needs a finite epsilon (use mode off for no DP)")
    if unit == "user" and mode == "central":
        raise _err(path, key + ".unit", "mode central noises the aggregate of whole clients: it has no user unit")
    return DPSetting(mode, eps, float(item.get("delta", 1e-5)), unit)


def _privacy_modes(raw: dict[str, Any], path: Path, required: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A sweep's `privacy_modes`: a list (the client unit's modes) or {"client": [...], "user": [...]}; returns
    (client modes, user modes)."""
    value = raw.get("privacy_modes")
    if isinstance(value, dict):
        bad = sorted(set(value) - set(PRIVACY_UNITS))
        if bad or not value:
            raise _err(path, f"privacy_modes.{bad[0]}" if bad else "privacy_modes",
                       f"expected an object {{unit: [modes]}} with units among {', '.join(PRIVACY_UNITS)}")
        per_unit = {u: tuple(_list(value, u, path)) for u in value}
    else:
        per_unit = {"client": tuple(_list(raw, "privacy_modes", path, required))}
    for unit, modes in per_unit.items():
        key = "privacy_modes" if not isinstance(value, dict) else f"privacy_modes.{unit}"
        allowed = PRIVACY_MODES if unit == "client" else USER_SWEEP_MODES
        for i, m in enumerate(modes):
            if m not in allowed:
                raise _err(path, f"{key}[{i}]", f"expected one of {', '.join(allowed)} for the {unit} unit, "
                           f"got {m!r}")
        if len(set(modes)) != len(modes):
            raise _err(path, key, "a mode is repeated")
    return per_unit.get("client", ()), per_unit.get("user", ())


def _overrides(mapping: Any, path: Path, key: str) -> tuple[str, ...]:
    """{dotted key: value} -> ("k=v", ...), each checked against RunConfig (the error names file and key)."""
    from fedscope_jax.train.config import load_config

    if not isinstance(mapping, dict):
        raise _err(path, key, "expected an object of dotted RunConfig keys, e.g. {\"model.dim\": 32}")
    out = tuple(f"{k}={_text(v)}" for k, v in mapping.items())
    try:
        load_config(None, out)
    except FedscopeError as exc:
        raise _err(path, key, str(exc)) from None
    return out


def _text(value: Any) -> str:
    """A JSON value as a `--set` string (lists comma-separated, booleans lower-case)."""
    if isinstance(value, list):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return str(value)


def _variant(item: Any, path: Path, key: str) -> Variant:
    if not isinstance(item, dict) or set(item) - {"name", "set", "profiles"} or "set" not in item:
        raise _err(path, key, f"expected {{\"name\": ..., \"set\": {{...}}, \"profiles\": {{\"quick\": "
                   f"{{\"set\": {{...}}}}}} (optional)}}, got {item!r}")
    sets = item["set"]
    ov = _overrides(sets, path, key + ".set")
    per_profile = []
    extra = item.get("profiles", {})
    if not isinstance(extra, dict):
        raise _err(path, key + ".profiles", f"expected an object keyed by profile ({', '.join(PROFILES)})")
    for prof, body in extra.items():
        if prof not in PROFILES:
            raise _err(path, f"{key}.profiles.{prof}", f"unknown profile; expected one of {', '.join(PROFILES)}")
        if not isinstance(body, dict) or set(body) != {"set"}:
            raise _err(path, f"{key}.profiles.{prof}", "expected {\"set\": {dotted key: value}}")
        per_profile.append((prof, _overrides(body["set"], path, f"{key}.profiles.{prof}.set")))
    name = str(item.get("name") or ",".join(f"{k.split('.')[-1]}={v}" for k, v in sets.items()))
    axis, value = "", None
    if len(sets) == 1:
        (axis, raw), = sets.items()
        value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None
    return Variant(name, ov, axis, value, tuple(per_profile))


def load_study(path: str | Path) -> Study:
    """Parses and checks one study file; every error names the file and the key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedscopeError(f"{path}: study file not found") from None
    except json.JSONDecodeError as exc:
        raise FedscopeError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise FedscopeError(f"{path}: expected a JSON object")
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise _err(path, unknown[0], f"unknown key; expected one of {', '.join(sorted(STUDY_KEYS))}")
    name = raw.get("study")
    if not isinstance(name, str) or not name:
        raise _err(path, "study", "expected the study's name")
    kind = raw.get("kind", "cells")
    if kind not in KINDS:
        raise _err(path, "kind", f"expected one of {', '.join(KINDS)}, got {kind!r}")
    datasets = tuple(_list(raw, "datasets", path))
    for i, d in enumerate(datasets):
        if d not in DATASETS:
            raise _err(path, f"datasets[{i}]", f"unknown dataset {d!r}; expected one of {', '.join(DATASETS)}")
    methods = tuple(_list(raw, "methods", path))
    for i, m in enumerate(methods):
        get_method(m, f"{path}: key 'methods[{i}]'")
    dp = tuple(_dp(x, path, f"dp[{i}]") for i, x in enumerate(_list(raw, "dp", path, kind == "cells")))
    variants = tuple(_variant(x, path, f"variants[{i}]") for i, x in enumerate(_list(raw, "variants", path, False)))
    modes, user_modes = _privacy_modes(raw, path, kind == "sweep")
    epsilons = tuple(_epsilon(e, path, f"epsilons[{i}]")
                     for i, e in enumerate(_list(raw, "epsilons", path, kind == "sweep")))
    reads = raw.get("reads")
    if kind == "derived" and not isinstance(reads, str):
        raise _err(path, "reads", "a derived study names the study whose runs it reads")
    if kind == "sweep":
        for m in methods:
            if get_method(m).mode != "federated":
                raise _err(path, "methods", f"a sweep trains federated methods only; {m!r} is not one")
    seeds = _seeds(raw.get("seeds"), path, "seeds")
    profiles_raw = raw.get("profiles")
    if not isinstance(profiles_raw, dict):
        raise _err(path, "profiles", f"expected an object keyed by profile ({', '.join(PROFILES)})")
    for pname in profiles_raw:
        if pname not in PROFILES:
            raise _err(path, f"profiles.{pname}", f"unknown profile; expected one of {', '.join(PROFILES)}")
    missing = [p for p in REQUIRED_PROFILES if p not in profiles_raw]
    if missing:
        raise _err(path, "profiles", f"profile {missing[0]!r} is missing: every study has "
                   f"{' and '.join(REQUIRED_PROFILES)} (the others are optional)")
    profiles = {}
    for pname, praw in profiles_raw.items():
        key = f"profiles.{pname}"
        if not isinstance(praw, dict):
            raise _err(path, key, "expected an object")
        bad = sorted(set(praw) - PROFILE_KEYS)
        if bad:
            raise _err(path, f"{key}.{bad[0]}", f"unknown key; expected one of {', '.join(sorted(PROFILE_KEYS))}")
        max_users, users = praw.get("max_users", 0), ()
        if isinstance(max_users, dict):
            unknown = sorted(set(max_users) ^ set(datasets))
            if unknown:
                raise _err(path, f"{key}.max_users", f"expected one count per dataset of this study "
                           f"{list(datasets)}; {unknown[0]!r} " + ("is not one" if unknown[0] in max_users
                                                                  else "is missing"))
            for d, n in max_users.items():
                _count(n, path, f"{key}.max_users.{d}", "0 = every user")
            users, max_users = tuple(sorted(max_users.items())), 0
        else:
            _count(max_users, path, f"{key}.max_users", "0 = every user; or an object {dataset: users}")
        max_items = _count(praw.get("max_items", 0), path, f"{key}.max_items", "0 = every item")
        pds = praw.get("datasets")
        if pds is not None:
            if not isinstance(pds, list) or not pds or any(d not in datasets for d in pds):
                raise _err(path, f"{key}.datasets", f"expected a non-empty subset of {list(datasets)}")
            pds = tuple(pds)
        pdp = None
        if "dp" in praw:
            if kind != "cells":
                raise _err(path, f"{key}.dp", f"only a cells study has DP settings; this one is {kind!r}")
            if not isinstance(praw["dp"], list) or not praw["dp"]:
                raise _err(path, f"{key}.dp", "expected a non-empty list of DP settings")
            pdp = tuple(_dp(x, path, f"{key}.dp[{i}]") for i, x in enumerate(praw["dp"]))
        if "distributed_set" in praw and kind != "sweep":
            raise _err(path, f"{key}.distributed_set", f"only a sweep has a distributed program; this study is "
                       f"{kind!r}")
        # a sweep without "distributed" leaves it unused: dropping the mode alone skips the program
        dist = _overrides(praw.get("distributed_set", {}), path, f"{key}.distributed_set")
        if "distributed" in user_modes and "distributed_set" not in praw:
            raise _err(path, f"{key}.distributed_set", "privacy_modes.user has \"distributed\": give its training "
                       "here (one SGD step a round, e.g. {\"federated.client_opt\": \"sgd\", "
                       "\"federated.client_lr\": 1, \"federated.server_opt\": \"fedadam\", "
                       "\"federated.server_lr\": 0.01, \"federated.rounds\": 200})")
        profiles[pname] = Profile(_seeds(praw.get("seeds", seeds), path, f"{key}.seeds"), max_users,
                                  _overrides(praw.get("set", {}), path, f"{key}.set"), pds, max_items, users, pdp,
                                  dist)
    for i, v in enumerate(variants):
        for prof, _ in v.per_profile:
            if prof not in profiles:
                raise _err(path, f"variants[{i}].profiles.{prof}", f"the study has no profile {prof!r} (it has "
                           f"{', '.join(profiles)})")
    study = Study(name, path, str(raw.get("title", name)), kind, str(raw.get("description", "")), datasets,
                  methods, dp, variants, modes, epsilons, reads, profiles, user_modes)
    for m in methods:  # a method that needs DP must have a DP setting to run under
        if get_method(m).dp == "required" and kind == "cells" and not any(d.mode != "off" for d in dp):
            raise _err(path, "dp", f"method {m!r} needs a DP setting, but every entry is mode off")
    return study


def _count(value: Any, path: Path, key: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _err(path, key, f"expected an integer >= 0 ({what}), got {value!r}")
    return value


def _seeds(value: Any, path: Path, key: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or any(isinstance(s, bool) or not isinstance(s, int) for s in value):
        raise _err(path, key, f"expected a non-empty list of integer seeds, got {value!r}")
    return tuple(value)


def default_config_dir() -> Path:
    """experiments/configs of the source tree (the repository root is two levels above this package)."""
    return Path(__file__).resolve().parents[2] / "experiments" / "configs"


def studies_dir(given: str | Path | None = None) -> Path:
    """The study files' folder: `given` (a --configs value), else `default_config_dir()`."""
    return Path(given) if given else default_config_dir()


def load_studies(names: list[str] | None = None, config_dir: str | Path | None = None,
                 profile: str | None = None) -> list[Study]:
    """The studies in `config_dir` (default experiments/configs), all or the ones named (`choose_studies`)."""
    root = studies_dir(config_dir)
    return choose_studies(read_studies(root), names, profile, root)


def read_studies(config_dir: str | Path | None = None) -> list[Study]:
    """Every study file in `config_dir` (default experiments/configs), in file order, each `reads` resolved."""
    root = studies_dir(config_dir)
    files = sorted(root.glob("*.json"))
    if not files:
        raise FedscopeError(f"{root}: no study files (*.json)")
    studies = [load_study(f) for f in files]
    by_name = {s.name: s for s in studies}
    for s in studies:
        if s.reads is not None and s.reads not in by_name:
            raise FedscopeError(f"{s.path}: key 'reads': no study named {s.reads!r} in {root}")
        lacking = [p for p in s.profiles if s.reads is not None and p not in by_name[s.reads].profiles]
        if lacking:
            raise FedscopeError(f"{s.path}: key 'profiles.{lacking[0]}': the study it reads, {s.reads!r}, has no "
                                f"profile {lacking[0]!r}")
    return studies


def choose_studies(studies: Sequence[Study], names: list[str] | None, profile: str | None,
                   where: str | Path) -> list[Study]:
    """Of `studies` (read from `where`), all or the ones named, in the report's order; with `profile`, all
    means those that have the profile, and a named study without it is an error."""
    by_name = {s.name: s for s in studies}
    chosen = list(studies)
    if names:
        missing = [n for n in names if n not in by_name]
        if missing:
            raise FedscopeError(f"--studies: unknown study {missing[0]!r}; expected among {', '.join(by_name)}")
        chosen = [by_name[n] for n in names]
        lacking = [s for s in chosen if profile is not None and profile not in s.profiles]
        if lacking:
            having = [s.name for s in _in_order(by_name.values()) if profile in s.profiles]
            raise FedscopeError(f"--studies: study {lacking[0].name!r} has no profile {profile!r} ({lacking[0].path} "
                                f"has {', '.join(lacking[0].profiles)}); the studies with it: "
                                f"{', '.join(having) or 'none'}")
    elif profile is not None:
        chosen = [s for s in chosen if profile in s.profiles]
        if not chosen:
            raise FedscopeError(f"--profile {profile}: no study in {where} has that profile")
    return _in_order(chosen)


def _in_order(studies: Any) -> list[Study]:
    """The studies in the report's order (the paper's), any others after them."""
    order = ["main", "ablation", "privacy_utility", "cold_start", "clients_sampling", "convergence"]
    return sorted(studies, key=lambda s: order.index(s.name) if s.name in order else len(order))
