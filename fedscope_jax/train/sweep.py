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

Resuming (`resume=True`, `fedscope sweep --resume`): a seed whose trained configurations all have summary.json
is kept; a seed whose configurations all have checkpoints at the same round continues from them (run_tracks
resume: the same result as an uninterrupted sweep); any other seed is trained again from scratch. A stored
config.json that differs from the sweep's settings is an error (`check_resume_config`), never a silent retrain.
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

SWEEP_MODES = ("personalized", "uniform", "central", "distributed")


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

    @property
    def batching_cfg(self) -> Any:
        """The config its batches follow: its own, but the distributed variant's for a distributed sweep's eps-inf
        point (one pooled step a round, trained without clipping or noise)."""
        if self.mode == "distributed" and self.privacy_mode == "off":
            return dataclasses.replace(self.cfg, privacy=dataclasses.replace(self.cfg.privacy, mode="distributed"))
        return self.cfg

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
    if "distributed" in modes and len(modes) > 1:
        raise FedscopeError(f"{flag} {text!r}: distributed noise trains on batches of its own (one step a round "
                            f"over every silo's users); sweep it alone")
    return modes


def sweep_points(cfg: Any, modes: Sequence[str], epsilons: Sequence[float],
                 seeds: Sequence[int]) -> list[SweepPoint]:
    """Every configuration, in the order modes x epsilons x seeds, with the RunConfig of its single run."""
    from fedscope_jax.privacy.config import PrivacyConfig
    from fedscope_jax.train.federated import check_distributed, check_privacy_knobs

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
                if math.isinf(eps):   # no DP: no budgets to allocate
                    values.update(mode="off", distributed_budgets="uniform")
                else:
                    values.update(mode=mode, epsilon=float(eps))
                where = f"sweep {mode} eps {eps:g}: privacy"
                privacy = PrivacyConfig.from_mapping(values, where=where)
                run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed), privacy=privacy)
                run_cfg = dataclasses.replace(run_cfg, federated=dataclasses.replace(run_cfg.federated, seed=seed))
                point = SweepPoint(mode, float(eps), seed, run_cfg)
                check_privacy_knobs(run_cfg)
                if point.batching_cfg is not run_cfg:   # a distributed eps-inf point trains the variant's batches
                    check_privacy_knobs(point.batching_cfg)
                if mode == "distributed":
                    check_distributed(point.batching_cfg)
                points.append(point)
    if cfg.federated.weighting == "inverse_noise" and all(math.isinf(p.epsilon) for p in points):
        raise FedscopeError("--weighting inverse_noise weighs silos by their DP noise, but every epsilon is inf "
                            "(no noise); add a finite epsilon, or use --weighting users or uniform")
    return points


def _prepare_out(out: Path, force: bool, resume: bool = False) -> None:
    """Creates `out` (emptied with `force`); with `resume` it must be an existing sweep directory, kept as is."""
    if resume:
        if force:
            raise FedscopeError("--resume and --force: pick one (--resume continues the sweep in --out, "
                                "--force replaces it)")
        if not out.is_dir():
            raise FedscopeError(f"--resume: {out} is not a sweep directory to continue; run without --resume "
                                "to start the sweep")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FedscopeError(f"--out {out}: output exists; pass --force to replace it or --resume to continue it")
        if out.is_dir():
            shutil.rmtree(out)
        else:
            out.unlink()
    out.mkdir(parents=True, exist_ok=True)


def distinct_points(mine: Sequence[SweepPoint]) -> tuple[list[SweepPoint], dict[str, str]]:
    """(the configurations to train, {name: name it is trained as}): identical RunConfigs train once."""
    from fedscope_jax.train.config import to_dict

    unique: dict[str, SweepPoint] = {}
    trained_as = {}
    for p in mine:
        first = unique.setdefault(json.dumps(to_dict(p.cfg), sort_keys=True), p)
        trained_as[p.name] = first.name
    return list(unique.values()), trained_as


def run_config_json(p: SweepPoint, extra: dict[str, Any] | None, same_as: str | None = None) -> dict[str, Any]:
    """The config.json of configuration `p` (`same_as`: the directory it is a copy of)."""
    from fedscope_jax.train.config import to_dict

    info = p.info() if same_as is None else {**p.info(), "same_as": same_as}
    return {**to_dict(p.cfg), **dict(extra or {}), "sweep": info}


def seed_status(out: Path, trained: Sequence[SweepPoint], extra: dict[str, Any] | None) -> str:
    """How a resumed sweep continues one seed: "kept" (every trained configuration has summary.json),
    "resumed" (all have checkpoints at one round) or "trained" (anything else: again from scratch).
    A stored config.json other than this sweep's is a FedscopeError naming the file and key."""
    from fedscope_jax.engine.checkpoint import latest_round
    from fedscope_jax.train.federated import check_resume_config

    dirs = [out / p.name for p in trained]
    for p, run_dir in zip(trained, dirs):
        if (run_dir / "config.json").is_file():
            check_resume_config(run_dir / "config.json", run_config_json(p, extra))
    if all((d / "summary.json").is_file() and (d / "config.json").is_file() for d in dirs):
        return "kept"
    if not all((d / "config.json").is_file() for d in dirs):
        return "trained"
    rounds = {latest_round(d / "checkpoints") for d in dirs}
    return "resumed" if len(rounds) == 1 and None not in rounds else "trained"


def _kept_timing(summaries: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[str], int]:
    """(timing, programs as JSON strings, start round) of a seed trained earlier, from its summaries (what
    finish_run stores under "federated")."""
    fed = summaries[0]["federated"]
    programs = sorted({json.dumps(s["federated"]["program"], sort_keys=True) for s in summaries})
    return dict(fed["timing"]), programs, int(fed["start_round"])


def _copy_run(src: Path, dst: Path, config: dict[str, Any]) -> None:
    """(Re)makes `dst` as a copy of the run directory `src` with its own config.json."""
    from fedscope_jax.utils.io import write_json

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    write_json(config, dst / "config.json")


def _new_run_dirs(out: Path, mine: Sequence[SweepPoint], trained: Sequence[SweepPoint],
                  extra: dict[str, Any] | None) -> None:
    """Removes whatever a seed's run directories hold and writes the config.json of each one to train."""
    from fedscope_jax.utils.io import write_json

    for p in mine:
        if (out / p.name).exists():
            shutil.rmtree(out / p.name)
    for p in trained:
        (out / p.name).mkdir(parents=True)
        write_json(run_config_json(p, extra), out / p.name / "config.json")


def _train_seed(ds: Any, out: Path, trained: Sequence[SweepPoint], semantic: Any, client_cfg: Any, resume: bool,
                config_chunk: int, t_start: float, summaries: dict[str, dict[str, Any]],
                chunks: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Trains (or, with `resume`, continues from their checkpoints) one seed's distinct configurations in one
    run_tracks loop; puts each summary into `summaries`, returns the loop's facts per configuration. chunks: the
    client chunk of each configuration chosen by an earlier seed (`run_tracks`)."""
    from fedscope_jax.train.federated import aggregation_weights, finish_run, seed_context
    from fedscope_jax.train.loop import Track, run_tracks
    from fedscope_jax.train.selection import selection_for
    from fedscope_jax.utils.progress import progress

    private = [p for p in trained if p.cfg.privacy.mode != "off"]   # a private point decides the batching
    ctx = seed_context(ds, (private or trained)[0].batching_cfg, semantic, client_cfg)
    sessions = [ctx.session(p.cfg.privacy) for p in trained]
    tracks = [Track(out / p.name, s, ctx.eval_fn, selection_for(p.cfg), aggregation_weights(ctx, p.cfg.privacy, s))
              for p, s in zip(trained, sessions)]
    states, records, facts = run_tracks(tracks, ctx.source, ctx.n_clients, ctx.params, ctx.client_cfg,
                                        trained[0].cfg.federated, resume=resume,
                                        desc=f"sweep seed {trained[0].seed} ({len(trained)} configs)",
                                        config_chunk=config_chunk, chunks=chunks,
                                        pooled=ctx.pooled)
    for p, track, state, recs, fct in zip(progress(trained, desc="final evaluation (valid + test)", unit="config",
                                                   leave=False), tracks, states, records, facts):
        summaries[p.name] = finish_run(ctx, p.cfg, out / p.name, state, recs, fct, t_start, track.selection)
    return facts


def run_sweep(ds: Any, cfg: Any, modes: Sequence[str], epsilons: Sequence[float], seeds: Sequence[int],
              out: str | Path, semantic: Any = None, force: bool = False,
              extra: dict[str, Any] | None = None, config_chunk: int = 0,
              resume: bool = False) -> list[dict[str, Any]]:
    """Trains every configuration (modes x epsilons x seeds) of `cfg`; returns their summaries in that order.

    cfg: a train.config.RunConfig; each configuration is `cfg` with privacy.mode / privacy.epsilon
    (mode "off" for epsilon inf) and train.seed replaced (`sweep_points`). extra: keys added to each
    config.json (like `train_federated`'s extra). config_chunk: configurations vectorized at once in a sweep
    program (0: all on an accelerator, 1 on CPU; `engine.sweep.default_config_chunk`).
    resume: continue the sweep in `out` (`seed_status`: finished seeds kept, checkpoints resumed, the rest
    retrained); every seed is checked before anything trains or is removed."""
    from fedscope_jax.train.federated import client_config
    from fedscope_jax.utils.io import read_json, write_json

    points = sweep_points(cfg, modes, epsilons, seeds)
    out = Path(out)
    _prepare_out(out, force, resume)
    t_start = time.time()
    summaries: dict[str, dict[str, Any]] = {}
    trained_as: dict[str, str] = {}
    plans = []
    for seed in dict.fromkeys(p.seed for p in points):
        mine = [p for p in points if p.seed == seed]
        trained, names = distinct_points(mine)
        trained_as.update(names)
        plans.append((seed, mine, trained, seed_status(out, trained, extra) if resume else "trained"))
    client_cfg = client_config(cfg, semantic, n_domains=len(ds.domains))  # one object for every seed's programs
    per_seed = []
    chosen: dict[tuple[str, float], int] = {}   # (mode, epsilon) -> the client chunk an earlier seed timed
    for seed, mine, trained, status in plans:
        if status == "kept":
            for p in trained:
                summaries[p.name] = read_json(out / p.name / "summary.json")
            timing, programs, start = _kept_timing([summaries[p.name] for p in trained])
        else:
            if status == "trained":
                _new_run_dirs(out, mine, trained, extra)
            known = [chosen.get((p.mode, p.epsilon)) for p in trained]
            facts = _train_seed(ds, out, trained, semantic, client_cfg, status == "resumed", config_chunk,
                                t_start, summaries, None if None in known else known)
            timing, start = facts[0]["timing"], facts[0]["start_round"]
            programs = sorted({json.dumps(f["program"], sort_keys=True) for f in facts})
            for p, f in zip(trained, facts):   # with --chunk-size 0: the chunk last timed here, for later seeds
                if f["chunk_tuning_seconds"]:
                    chosen[(p.mode, p.epsilon)] = int(f["chunk_size"])
        for p in mine:
            if trained_as[p.name] != p.name:  # the same run under another name: copy its directory
                _copy_run(out / trained_as[p.name], out / p.name, run_config_json(p, extra, trained_as[p.name]))
                summaries[p.name] = summaries[trained_as[p.name]]
        per_seed.append({"seed": seed, "status": status, "start_round": start, "configs_trained": len(trained),
                         "programs": [json.loads(x) for x in programs], **timing})
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
