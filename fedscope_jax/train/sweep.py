"""`fedscope sweep`: privacy modes x epsilons x seeds, every configuration of a seed in ONE compiled program.

A configuration is (privacy mode, epsilon, seed); epsilon inf means no DP (privacy mode "off" in its
config.json). All configurations of one seed share the partition, the client sampling and the local batches,
so they train together: the round is vmapped over a leading config axis (engine/sweep.py) with the cohort
data shared. Seeds are a loop (each has its own partition); the compiled programs are reused across seeds
when the shapes agree. Configurations whose noise mode differs (central DP: one draw on the aggregate;
--secagg: per-client noise) form separate groups, i.e. separate programs, run one after the other per round.
Configurations that are the same run (eps inf under several modes) are trained once and written to each
directory.

Output: out/<mode>-eps<eps:g>-seed<seed>/ holds exactly what `train_federated` writes (config.json,
metrics.jsonl, summary.json, privacy_ledger.arrow when DP, params.msgpack, checkpoints/), and out/sweep.json
the configurations, compile and training seconds and test NDCG@10 per configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from fedscope_jax.errors import FedscopeError

SWEEP_MODES = ("personalized", "uniform", "central")


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One configuration of a sweep and the RunConfig a single run of it uses."""

    mode: str      # the requested privacy mode
    epsilon: float  # inf = no DP
    seed: int
    cfg: Any       # train.config.RunConfig

    @property
    def name(self) -> str:
        return f"{self.mode}-eps{self.epsilon:g}-seed{self.seed}"

    @property
    def privacy_mode(self) -> str:
        return self.cfg.privacy.mode

    def info(self) -> dict[str, Any]:
        """JSON facts of the point (epsilon inf written as the string "inf")."""
        eps = self.epsilon if math.isfinite(self.epsilon) else "inf"
        return {"name": self.name, "mode": self.mode, "epsilon": eps, "seed": self.seed,
                "privacy_mode": self.privacy_mode}


def parse_epsilons(text: str, flag: str = "--epsilons") -> tuple[float, ...]:
    """"1,2,4,inf" -> (1.0, 2.0, 4.0, inf); each > 0, no repeats."""
    values = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise FedscopeError(f"{flag} {text!r}: {item!r} is not a number (expected e.g. 1,2,4,8,16,inf)") from None
        if not value > 0 or math.isnan(value):
            raise FedscopeError(f"{flag} {text!r}: {item!r} must be > 0 (inf for no DP)")
        values.append(value)
    if not values:
        raise FedscopeError(f"{flag}: expected a comma-separated list of epsilons, e.g. 1,2,4,8,16,inf")
    if len(set(values)) != len(values):
        raise FedscopeError(f"{flag} {text!r}: an epsilon is repeated")
    return tuple(values)


def parse_modes(text: str, flag: str = "--privacy") -> tuple[str, ...]:
    """"personalized,uniform" -> ("personalized", "uniform"); modes of SWEEP_MODES, no repeats."""
    modes = tuple(m.strip() for m in str(text).split(",") if m.strip())
    if not modes:
        raise FedscopeError(f"{flag}: expected a comma-separated list of {', '.join(SWEEP_MODES)}")
    for m in modes:
        if m not in SWEEP_MODES:
            hint = " (no DP is epsilon inf in --epsilons)" if m == "off" else ""
            raise FedscopeError(f"{flag} {text!r}: unknown privacy mode {m!r}; expected one of "
                                f"{', '.join(SWEEP_MODES)}{hint}")
    if len(set(modes)) != len(modes):
        raise FedscopeError(f"{flag} {text!r}: a mode is repeated")
    return modes


def sweep_points(cfg: Any, modes: Sequence[str], epsilons: Sequence[float],
                 seeds: Sequence[int]) -> list[SweepPoint]:
    """Every configuration, in the order modes x epsilons x seeds, with the RunConfig of its single run."""
    from fedscope_jax.privacy.config import PrivacyConfig
    from fedscope_jax.train.federated import check_privacy_knobs

    modes = parse_modes(",".join(modes), "modes")
    eps_text = ",".join("inf" if math.isinf(e) else repr(float(e)) for e in epsilons)
    epsilons = parse_epsilons(eps_text, "epsilons")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise FedscopeError(f"seeds: expected distinct integers, got {list(seeds)}")
    points = []
    for mode in modes:
        for eps in epsilons:
            for seed in seeds:
                values = cfg.privacy.to_dict()
                if math.isinf(eps):
                    values["mode"] = "off"
                else:
                    values.update(mode=mode, epsilon=float(eps))
                where = f"sweep {mode} eps {eps:g}: privacy"
                privacy = PrivacyConfig.from_mapping(values, where=where)
                run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed), privacy=privacy)
                run_cfg = dataclasses.replace(run_cfg, federated=dataclasses.replace(run_cfg.federated, seed=seed))
                check_privacy_knobs(run_cfg)
                points.append(SweepPoint(mode, float(eps), seed, run_cfg))
    return points


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FedscopeError(f"--out {out}: output exists; pass --force to replace it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_sweep(ds: Any, cfg: Any, modes: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
              out: str | Path, semantic: Any = None, force: bool = False,
              extra: dict[str, Any] | None = None, config_chunk: int = 0) -> list[dict[str, Any]]:
    """Trains every configuration (modes x epsilons x seeds) of `cfg`; returns their summaries in that order.

    cfg: a train.config.RunConfig; each configuration is `cfg` with privacy.mode / privacy.epsilon
    (mode "off" for epsilon inf) and train.seed replaced (`sweep_points`). extra: keys added to each
    config.json (like `train_federated`'s extra). config_chunk: configurations vectorized at once in a sweep
    program (0: all on an accelerator, 1 on CPU; `engine.sweep.default_config_chunk`)."""
    from fedscope_jax.train.config import to_dict
    from fedscope_jax.train.federated import Track, client_config, finish_run, run_tracks, seed_context
    from fedscope_jax.utils.io import write_json

    points = sweep_points(cfg, modes, epsilons, seeds)
    out = Path(out)
    _prepare_out(out, force)
    t_start = time.time()
    client_cfg = client_config(cfg, semantic)  # one object: the compiled programs are reused across seeds
    summaries: dict[str, dict[str, Any]] = {}
    trained_as: dict[str, str] = {}
    per_seed = []
    for seed in dict.fromkeys(p.seed for p in points):
        mine = [p for p in points if p.seed == seed]
        unique: dict[str, SweepPoint] = {}
        for p in mine:
            key = json.dumps(to_dict(p.cfg), sort_keys=True)
            first = unique.setdefault(key, p)
            trained_as[p.name] = first.name
        trained = list(unique.values())
        ctx = seed_context(ds, trained[0].cfg, semantic, client_cfg)
        tracks = []
        for p in trained:
            run_dir = out / p.name
            run_dir.mkdir(parents=True)
            write_json({**to_dict(p.cfg), **dict(extra or {}), "sweep": p.info()}, run_dir / "config.json")
            tracks.append(Track(run_dir, ctx.session(p.cfg.privacy), ctx.eval_fn))
        states, records, facts = run_tracks(tracks, ctx.source, ctx.n_clients, ctx.params, ctx.client_cfg,
                                            trained[0].cfg.federated,
                                            desc=f"sweep seed {seed} ({len(trained)} configs)",
                                            config_chunk=config_chunk)
        for p, state, recs, fct in zip(trained, states, records, facts):
            summaries[p.name] = finish_run(ctx, p.cfg, out / p.name, state, recs, fct, t_start)
        for p in mine:
            if trained_as[p.name] != p.name:  # the same run under another name: copy its directory
                shutil.copytree(out / trained_as[p.name], out / p.name)
                write_json({**to_dict(p.cfg), **dict(extra or {}), "sweep": {**p.info(),
                            "same_as": trained_as[p.name]}}, out / p.name / "config.json")
                summaries[p.name] = summaries[trained_as[p.name]]
        timing = facts[0]["timing"]
        per_seed.append({"seed": seed, "configs_trained": len(trained),
                         "programs": sorted({json.dumps(f["program"], sort_keys=True) for f in facts}), **timing})
    for entry in per_seed:
        entry["programs"] = [json.loads(x) for x in entry["programs"]]
    result = [summaries[p.name] for p in points]
    report = {
        "configs": [{**p.info(), "dir": p.name, "trained_as": trained_as[p.name],
                     "program": summaries[p.name]["federated"]["program"]} for p in points],
        "compile_seconds": sum(s["compile_seconds"] for s in per_seed),
        "train_seconds": sum(s["train_seconds"] for s in per_seed),
        "seconds_total": time.time() - t_start,
        "per_seed": per_seed,
        "test_ndcg10": {p.name: _ndcg10(summaries[p.name]) for p in points},
        "device": _device(),
    }
    write_json(report, out / "sweep.json")
    return result


def _ndcg10(summary: dict[str, Any]) -> dict[str, float]:
    """Test NDCG@10 (sampled protocol) per domain and their mean."""
    by_domain = {d: float(m["NDCG@10"]) for d, m in summary["test"].items() if "NDCG@10" in m}
    if by_domain:
        by_domain["mean"] = sum(by_domain.values()) / len(by_domain)
    return by_domain


def _device() -> str:
    import jax

    d = jax.devices()[0]
    return f"{d.platform}:{d.device_kind} x{jax.device_count()}"
