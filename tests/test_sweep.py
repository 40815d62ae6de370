"""The sweep axis: every configuration of a vmapped sweep equals its single run; sweep directories; CLI errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError

from conftest import SETTINGS, linear_setup as _linear_setup

TESTS = Path(__file__).resolve().parent


def _max_diff(a, b) -> float:
    import jax

    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                     jax.tree.leaves(b)))


# Budget stops differ per configuration (a client out of budget in one config has weight 0 there only),
# the server optimizer has state (FedAdam: a config without participants must keep it), and central DP is a
# separate program.
LINEAR_CONFIGS = {
    "uniform": dict(mode="uniform", epsilon=2.0, participation_quantile=0.01),  # stops everyone early
    "personalized": dict(mode="personalized", epsilon=4.0, participation_quantile=0.5, clip_norm=0.5),
    "off": None,
    "central": dict(mode="central", epsilon=5.0, clip_norm=0.3),
    "uniform-adaptive": dict(mode="uniform", epsilon=6.0, clipping="adaptive", clip_norm=0.4),
}


def _tracks(root: Path, fcfg, sizes):
    from fedscope_jax.privacy.config import PrivacyConfig
    from fedscope_jax.privacy.session import PrivacySession
    from fedscope_jax.train.loop import Track

    tracks = []
    for name, kw in LINEAR_CONFIGS.items():
        (root / name).mkdir(parents=True)
        session = None if kw is None else PrivacySession(PrivacyConfig(**kw), sizes, fcfg.sampling, fcfg.fraction,
                                                         fcfg.rounds, fcfg.seed)
        tracks.append(Track(root / name, session))
    return tracks


def test_vmapped_configs_equal_their_single_runs(tmp_path: Path):
    from fedscope_jax.privacy.ledger import read_ledger
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import group_tracks, run_rounds, run_tracks

    source, params, ccfg, sizes = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, sampling="poisson", fraction=0.5, rounds=8, chunk_size=2, max_buckets=2,
                           seed=3, server_opt="fedadam", server_lr=0.1)
    tracks = _tracks(tmp_path / "sweep", fcfg, sizes)
    groups = group_tracks(tracks, fcfg)
    assert [(k[0], members) for k, members in groups] == [("sum", [0, 1, 2, 4]), ("central", [3])]
    # 4 configs vmapped 2 at a time: a lax.map over 2 chunks of 2 vmapped configs
    states, records, facts = run_tracks(tracks, source, 6, params, ccfg, fcfg, config_chunk=2)
    assert facts[0]["program"] == {"noise_mode": "sum", "configs": 4, "sweep": True, "config_chunk": 2,
                                  "sequential": False}
    assert facts[3]["program"] == {"noise_mode": "central", "configs": 1, "sweep": False, "config_chunk": 1,
                                  "sequential": False}
    clients = np.array([[r["clients"] for r in recs] for recs in records])
    # the configs really differ in who takes part: some round has a config without participants beside one with
    assert np.any((clients == 0).any(axis=0) & (clients > 0).any(axis=0)), clients
    singles = _tracks(tmp_path / "single", fcfg, sizes)
    for i, (name, track) in enumerate(zip(LINEAR_CONFIGS, singles)):
        state, recs, fct = run_rounds(track.run_dir, source, 6, params, ccfg, fcfg, privacy=track.privacy)
        assert _max_diff(states[i].params, state.params) < 1e-5, name
        assert _max_diff(states[i].opt_state, state.opt_state) < 1e-5, name
        assert int(states[i].round) == int(state.round) == fcfg.rounds
        for a, b in zip(records[i], recs):
            assert a["clients"] == b["clients"] and a.get("participant_ids") == b.get("participant_ids"), name
            assert a.get("loss", 0.0) == pytest.approx(b.get("loss", 0.0), rel=1e-5, abs=1e-7), name
            assert a.get("noise_std", 0.0) == pytest.approx(b.get("noise_std", 0.0), rel=1e-5), name
        lines = (track.run_dir / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == len((tmp_path / "sweep" / name / "metrics.jsonl").read_text().splitlines())
        if track.privacy is not None:
            ours = read_ledger(tmp_path / "sweep" / name / "privacy_ledger.arrow")
            theirs = read_ledger(track.run_dir / "privacy_ledger.arrow")
            for x, y in zip(ours, theirs):
                assert x["rounds_participated"] == y["rounds_participated"]
                assert x["eps_spent"] == pytest.approx(y["eps_spent"], rel=1e-9)
                assert x["clip_norm"] == pytest.approx(y["clip_norm"], rel=1e-5)  # adaptive C_k follows too
    stops = [len(f["privacy"]["stopped_clients"]) for f in facts if "privacy" in f]
    assert max(stops) > 0  # some budget stop happened (so a weight-0 client took part in the cohorts)


SHARDED = textwrap.dedent("""
    import sys
    from pathlib import Path
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    from test_sweep import _linear_setup, _max_diff
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import Track, run_rounds, run_tracks
    assert jax.device_count() == 2, jax.devices()
    root = Path({root!r})
    source, params, ccfg, sizes = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, fraction=1.0, rounds=3, chunk_size=1, max_buckets=1, seed=1,
                           server_opt="fedadam", server_lr=0.1, clip=0.5, noise_multiplier=0.3, noise_mode="sum")
    (root / "single").mkdir()
    state, _, _ = run_rounds(root / "single", source, 6, params, ccfg, fcfg)
    for cc in (1, 2):  # 3 configs on 2 devices: padded to 4 slots, 2 per device, vmapped 1 or 2 at a time
        names = [str(cc) + x for x in "abc"]
        for n in names:
            (root / n).mkdir(parents=True)
        states, _, facts = run_tracks([Track(root / n) for n in names], source, 6, params, ccfg, fcfg,
                                      config_chunk=cc)
        assert facts[0]["program"]["sweep"] and facts[0]["devices"] == 2
        assert facts[0]["program"]["config_chunk"] == cc
        for s in states:
            assert _max_diff(s.params, state.params) < 1e-5, _max_diff(s.params, state.params)
    print("SHARDED_SWEEP_OK")
""")


def test_config_axis_sharded_over_devices(tmp_path: Path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    script = SHARDED.format(tests=str(TESTS), root=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert "SHARDED_SWEEP_OK" in result.stdout, result.stdout[-2000:] + result.stderr[-4000:]


def test_sweep_points_and_parsing():
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.sweep import parse_epsilons, parse_modes, sweep_points

    assert parse_epsilons("1, 2,inf") == (1.0, 2.0, math.inf)
    for bad in ("1,x", "0,1", "-1", "", "2,2", "nan"):
        with pytest.raises(FedscopeError, match="--epsilons"):
            parse_epsilons(bad)
    assert parse_modes("uniform,central") == ("uniform", "central")
    with pytest.raises(FedscopeError, match="epsilon inf"):
        parse_modes("off")
    with pytest.raises(FedscopeError, match="unknown privacy mode 'x'"):
        parse_modes("uniform,x")
    cfg = load_config(None, ["train.seed=5"])
    points = sweep_points(cfg, ["personalized", "uniform"], [2.0, math.inf], [5, 6])
    assert [p.name for p in points] == ["personalized-eps2-seed5", "personalized-eps2-seed6",
                                        "personalized-epsinf-seed5", "personalized-epsinf-seed6",
                                        "uniform-eps2-seed5", "uniform-eps2-seed6",
                                        "uniform-epsinf-seed5", "uniform-epsinf-seed6"]
    assert [p.privacy_mode for p in points[:4]] == ["personalized", "personalized", "off", "off"]
    assert points[1].cfg.train.seed == points[1].cfg.federated.seed == 6
    assert points[4].cfg.privacy.epsilon == 2.0 and points[4].cfg.privacy.mode == "uniform"
    assert points[2].cfg == points[6].cfg  # the same run under two names: trained once
    with pytest.raises(FedscopeError, match="--clip"):  # a DP configuration refuses the raw engine knobs
        sweep_points(load_config(None, ["federated.clip=1"]), ["uniform"], [1.0], [0])


def test_cli_errors_name_the_flag(tmp_path: Path, capsys):
    from fedscope_jax.cli import main
    from model_helpers import write_tiny

    ds = write_tiny(tmp_path / "ds", users=12)
    base = ["sweep", "--data", str(ds.path), "--rounds", "1", "--clients", "2"]
    cases = [(["--out", str(tmp_path / "a"), "--epsilons", "1,two"], "--epsilons"),
             (["--out", str(tmp_path / "b"), "--privacy", "personalized,laplace"], "--privacy"),
             (["--out", str(tmp_path / "c"), "--epsilon", "3"], "--epsilons"),
             (["--out", str(tmp_path / "d"), "--seeds", "0"], "--seeds"),
             (["--out", str(tmp_path / "e"), "--resume", "--force"], "--resume"),   # one or the other
             (["--out", str(tmp_path / "e"), "--resume"], "--resume")]   # nothing to continue
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "x").write_text("keep")
    cases.append((["--out", str(tmp_path / "exists")], "--out"))
    for extra, flag in cases:
        capsys.readouterr()
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert flag in err, (extra, err)
    assert (tmp_path / "exists" / "x").read_text() == "keep"
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_cli_sweep_equals_single_runs(tmp_path: Path):
    import jax
    from flax import serialization

    from fedscope_jax.cli import main
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.federated import train_federated
    from fedscope_jax.train.sweep import sweep_points
    from model_helpers import write_tiny

    from fedscope_jax.experiments.runner import release_programs

    release_programs()   # programs an earlier test compiled for the same shapes would make compile_seconds 0
    write_tiny(tmp_path / "ds", users=40)
    ds = load_dataset(tmp_path / "ds")
    fed = ["federated.clients=4", "federated.rounds=2", "federated.chunk_size=2", "federated.max_buckets=1",
           "federated.eval_every=2"]
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(tmp_path / "ds"), "--out", str(out), "--privacy", "personalized,uniform",
            "--epsilons", "2,inf"]
    assert main(args + [a for s in SETTINGS + fed for a in ("--set", s)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    names = ["personalized-eps2-seed0", "personalized-epsinf-seed0", "uniform-eps2-seed0", "uniform-epsinf-seed0"]
    assert [c["name"] for c in report["configs"]] == names
    assert report["configs"][3]["trained_as"] == "personalized-epsinf-seed0"
    # config_chunk 1, the CPU default: a loop over configs
    assert report["configs"][0]["program"] == {"noise_mode": "sum", "configs": 3, "sweep": True,
                                               "config_chunk": 1, "sequential": False}
    assert report["compile_seconds"] > 0 and report["train_seconds"] > 0
    for name in names:
        files = {p.name for p in (out / name).iterdir()}
        dp = "epsinf" not in name
        assert {"config.json", "metrics.jsonl", "summary.json", "params.msgpack", "checkpoints"} <= files
        assert ("privacy_ledger.arrow" in files) == dp
        stored = json.loads((out / name / "config.json").read_text())
        assert stored["privacy"]["mode"] == (name.split("-")[0] if dp else "off")
        assert stored["sweep"]["name"] == name
    cfg = load_config(None, SETTINGS + fed)
    points = sweep_points(cfg, ["personalized", "uniform"], [2.0, math.inf], [0])
    for p in points[:3]:
        single = train_federated(ds, p.cfg, tmp_path / ("single-" + p.name))
        ours = json.loads((out / p.name / "summary.json").read_text())
        for dom in ds.domains:
            for metric, value in single["test"][dom].items():
                assert ours["test"][dom][metric] == pytest.approx(value, abs=1e-6), (p.name, dom, metric)
        a = serialization.msgpack_restore((out / p.name / "params.msgpack").read_bytes())
        b = serialization.msgpack_restore((tmp_path / ("single-" + p.name) / "params.msgpack").read_bytes())
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
            where = jax.tree_util.keystr(path)
            tol = KEY_BIAS_ATOL if "['key']['bias']" in where else 1e-5
            assert np.max(np.abs(x - y)) < tol, (p.name, where, float(np.max(np.abs(x - y))))
        if p.privacy_mode != "off":
            assert ours["privacy"]["eps_spent_max"] == pytest.approx(single["privacy"]["eps_spent_max"], rel=1e-9)
        # without DP the best validated round is tested (the only validation: round 2), with DP the final one
        selection = ("final", None) if p.privacy_mode != "off" else ("best_valid", 2)
        for summary in (ours, single):
            assert (summary["training"]["selection"], summary["training"]["best_round"]) == selection


# The attention key bias has a gradient that is zero in exact arithmetic (it adds the same q.b to every logit
# of a query, and softmax ignores that); in floats it is ~1e-9 noise whose sign local Adam turns into steps of
# +-client_lr (m / sqrt(v) ~ sign(g)). Summation order differs between the vmapped and the single program, so
# that one leaf may differ by a few client_lr (1e-3); every other leaf agrees to 1e-5.
KEY_BIAS_ATOL = 0.02


def test_later_seeds_reuse_the_chunk_the_first_seed_timed(tmp_path: Path):
    """With federated.chunk_size 0 the first seed times the candidate chunks (each a compilation); the other
    seeds train at the chunk it chose, untimed, and equal a sweep given that chunk outright."""
    from fedscope_jax.data.canonical import load_dataset
    from fedscope_jax.train.config import load_config
    from fedscope_jax.train.sweep import run_sweep
    from model_helpers import write_tiny

    write_tiny(tmp_path / "ds", users=40)
    ds = load_dataset(tmp_path / "ds")
    fed = ["federated.clients=4", "federated.rounds=2", "federated.max_buckets=1", "federated.eval_every=2"]
    auto = run_sweep(ds, load_config(None, SETTINGS + fed + ["federated.chunk_size=0"]), ["personalized"], [2.0],
                     [0, 1], tmp_path / "auto")
    first, second = (s["federated"] for s in auto)
    assert first["chunk_tuning_seconds"], "the first seed times the candidates"
    assert second["chunk_tuning_seconds"] == {} and second["chunk_size"] == first["chunk_size"]
    given = run_sweep(ds, load_config(None, SETTINGS + fed + [f"federated.chunk_size={first['chunk_size']}"]),
                      ["personalized"], [2.0], [1], tmp_path / "given")
    for dom in ds.domains:
        assert auto[1]["test"][dom] == given[0]["test"][dom]


def test_a_chunk_chosen_before_is_compiled_untimed_or_the_smaller_ones_timed_where_it_no_longer_fits(
        tmp_path: Path, monkeypatch):
    from fedscope_jax.engine import memory
    from fedscope_jax.train import loop as loop_mod
    from fedscope_jax.train.federated_config import FederatedConfig
    from fedscope_jax.train.loop import Track, run_tracks
    from fedscope_jax.train.programs import Programs

    source, params, ccfg, _ = _linear_setup(n_clients=6)
    fcfg = FederatedConfig(clients=6, fraction=1.0, rounds=1, chunk_size=0, max_buckets=1, seed=1)

    def run(name: str, chunks: list[int]) -> dict:
        (tmp_path / name).mkdir()
        return run_tracks([Track(tmp_path / name)], source, 6, params, ccfg, fcfg, chunks=chunks,
                          programs=Programs())[2][0]

    reused = run("reused", [2])
    assert reused["chunk_size"] == 2 and reused["chunk_tuning_seconds"] == {}
    # programs of a chunk >= 2 no longer fit (as where a later seed's buckets are larger): the chunk chosen
    # before (4) is refused before it runs, and the candidates below it are timed instead (2 is refused too)
    building = []
    real_program = loop_mod.Group.program

    def program(self, programs, client_cfg, server_opt, chunk):
        building.append(chunk)
        return real_program(self, programs, client_cfg, server_opt, chunk)

    def check_fits(compiled, what="the program", available=None):
        if building[-1] >= 2:
            raise memory.ProgramTooLarge(2**30, 2**20, what)

    monkeypatch.setattr(loop_mod.Group, "program", program)
    monkeypatch.setattr(memory, "check_fits", check_fits)
    refitted = run("refitted", [4])
    assert building[0] == 4 and refitted["chunk_size"] == 1 and set(refitted["chunk_tuning_seconds"]) == {"1"}
