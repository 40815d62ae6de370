"""A killed sweep continued with `run_sweep(resume=True)` / `fedscope sweep --resume` ends like an uninterrupted one."""

from __future__ import annotations

import json
import math
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.errors import FedscopeError

from conftest import SETTINGS

MODES = ["personalized", "uniform"]
EPSILONS = [2.0, math.inf]   # with two modes: 4 configurations, 3 trained (eps inf once, copied)
ROUNDS, CHECKPOINT_EVERY, KILL_AT = 4, 2, 4   # killed as round 4 begins: checkpoint at 2, metrics up to 3
FED = [f"federated.rounds={ROUNDS}", f"federated.checkpoint_every={CHECKPOINT_EVERY}", "federated.clients=4",
       "federated.chunk_size=2", "federated.max_buckets=1", f"federated.eval_every={ROUNDS}"]


class Killed(Exception):
    """Stands for a kill of the process (not a FedscopeError: nothing catches it)."""


def _config(*extra: str):
    from fedscope_jax.train.config import load_config

    return load_config(None, SETTINGS + FED + list(extra))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    from fedscope_jax.data.canonical import load_dataset
    from model_helpers import write_tiny

    root = tmp_path_factory.mktemp("data")
    write_tiny(root / "ds", users=40)
    return load_dataset(root / "ds")


@pytest.fixture(scope="module")
def full(ds, tmp_path_factory) -> Path:
    """An uninterrupted sweep of seeds 0 and 1."""
    from fedscope_jax.train.sweep import run_sweep

    out = tmp_path_factory.mktemp("full") / "sweep"
    run_sweep(ds, _config(), MODES, EPSILONS, [0, 1], out)
    return out


def _kill_seed_at(monkeypatch, seed: int, round_index: int) -> None:
    """The sweep dies as `round_index` begins in seed `seed` (every DP configuration asks its session first)."""
    from fedscope_jax.privacy.session import PrivacySession

    original = PrivacySession.begin_round

    def begin_round(self, r):
        if self.seed == seed and r == round_index:
            raise Killed(f"seed {seed} round {r}")
        return original(self, r)

    monkeypatch.setattr(PrivacySession, "begin_round", begin_round)


def _names(seeds) -> list[str]:
    from fedscope_jax.train.sweep import sweep_points

    return [p.name for p in sweep_points(_config(), MODES, EPSILONS, seeds)]


def _assert_same_runs(ours: Path, theirs: Path, names: list[str]) -> None:
    """Test metrics, final parameters, metrics.jsonl (wall seconds aside) and ledgers equal."""
    import jax
    from flax import serialization

    from fedscope_jax.privacy.ledger import read_ledger
    from fedscope_jax.train.config import flatten

    for name in names:
        a, b = (json.loads((d / name / "summary.json").read_text()) for d in (ours, theirs))
        for dom, metrics in b["test"].items():
            for metric, value in metrics.items():
                assert a["test"][dom][metric] == pytest.approx(value, abs=1e-6), (name, dom, metric)
        pa, pb = (serialization.msgpack_restore((d / name / "params.msgpack").read_bytes()) for d in (ours, theirs))
        for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7, err_msg=name)
        lines = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
                  for line in (d / name / "metrics.jsonl").read_text().splitlines()] for d in (ours, theirs)]
        assert [r["round"] for r in lines[0]] == list(range(1, ROUNDS + 1)), name
        assert len(lines[0]) == len(lines[1]), name
        for ra, rb in zip(*lines):
            fa, fb = flatten(ra), flatten(rb)
            assert fa.keys() == fb.keys(), name
            for k, v in fb.items():
                assert fa[k] == (pytest.approx(v, rel=1e-5, abs=1e-7) if isinstance(v, float) else v), (name, k)
        if (theirs / name / "privacy_ledger.arrow").exists():
            la, lb = (read_ledger(d / name / "privacy_ledger.arrow") for d in (ours, theirs))
            assert [x["eps_spent"] for x in la] == pytest.approx([y["eps_spent"] for y in lb], rel=1e-9), name
        assert a["privacy"].get("eps_spent_max") == pytest.approx(b["privacy"].get("eps_spent_max")), name


def test_killed_sweep_resumes_to_the_uninterrupted_result(ds, full, tmp_path, monkeypatch):
    from fedscope_jax.cli import main

    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(ds.path), "--out", str(out), "--privacy", ",".join(MODES), "--epsilons", "2,inf"]
    args += [a for s in SETTINGS + FED for a in ("--set", s)]
    _kill_seed_at(monkeypatch, 0, KILL_AT)
    with pytest.raises(Killed):
        main(args)
    monkeypatch.undo()
    names = _names([0])
    assert not any((out / n / "summary.json").exists() for n in names) and not (out / "sweep.json").exists()
    assert len((out / names[0] / "metrics.jsonl").read_text().splitlines()) == KILL_AT - 1  # beyond the checkpoint

    assert main(args + ["--resume"]) == 0
    report = json.loads((out / "sweep.json").read_text())
    assert [(s["seed"], s["status"], s["start_round"]) for s in report["per_seed"]] == [(0, "resumed", 2)]
    assert [c["name"] for c in report["configs"]] == names
    assert report["configs"][3]["trained_as"] == names[1]   # uniform-epsinf: a copy of personalized-epsinf
    assert json.loads((out / names[3] / "config.json").read_text())["sweep"]["same_as"] == names[1]
    _assert_same_runs(out, full, names)


def test_finished_seed_is_kept_and_only_the_killed_seed_trains(ds, full, tmp_path, monkeypatch):
    from fedscope_jax.train.config import flatten
    from fedscope_jax.train.sweep import run_sweep

    out = tmp_path / "sweep"
    _kill_seed_at(monkeypatch, 1, KILL_AT)
    with pytest.raises(Killed):
        run_sweep(ds, _config(), MODES, EPSILONS, [0, 1], out)
    monkeypatch.undo()
    seed0 = [n for n in _names([0, 1]) if n.endswith("seed0")]
    stamps = {n: (out / n / "summary.json").stat().st_mtime_ns for n in seed0}
    summaries = run_sweep(ds, _config(), MODES, EPSILONS, [0, 1], out, resume=True)
    assert {n: (out / n / "summary.json").stat().st_mtime_ns for n in seed0} == stamps   # seed 0 not retrained
    report = json.loads((out / "sweep.json").read_text())
    assert [(s["seed"], s["status"], s["start_round"]) for s in report["per_seed"]] == [(0, "kept", 0),
                                                                                       (1, "resumed", 2)]
    full_report = json.loads((full / "sweep.json").read_text())
    assert report["per_seed"][0]["programs"] == full_report["per_seed"][0]["programs"]
    ours, theirs = flatten(report["test_ndcg10"]), flatten(full_report["test_ndcg10"])
    assert ours == pytest.approx(theirs, abs=1e-6)
    assert len(summaries) == len(_names([0, 1]))
    _assert_same_runs(out, full, _names([0, 1]))


def test_a_resumed_sweep_times_the_chunk_again_rather_than_reuse_a_kept_seeds(ds, tmp_path, monkeypatch):
    """With chunk_size 0 a later seed reuses the chunk timed earlier in the same call only: a kept seed's stored
    chunk (fixed by hand, or timed on another device) is not reused by the seed that resumes."""
    from fedscope_jax.train.sweep import run_sweep

    out, auto = tmp_path / "sweep", _config("federated.chunk_size=0")
    _kill_seed_at(monkeypatch, 1, KILL_AT)
    with pytest.raises(Killed):
        run_sweep(ds, auto, ["personalized"], [2.0], [0, 1], out)
    monkeypatch.undo()
    summaries = run_sweep(ds, auto, ["personalized"], [2.0], [0, 1], out, resume=True)
    report = json.loads((out / "sweep.json").read_text())
    assert [s["status"] for s in report["per_seed"]] == ["kept", "resumed"]
    assert summaries[0]["federated"]["chunk_tuning_seconds"] and summaries[1]["federated"]["chunk_tuning_seconds"]


def test_seed_killed_before_its_first_checkpoint_is_trained_again(ds, full, tmp_path, monkeypatch):
    from fedscope_jax.train.sweep import run_sweep

    out = tmp_path / "sweep"
    _kill_seed_at(monkeypatch, 0, 1)
    with pytest.raises(Killed):
        run_sweep(ds, _config(), MODES, EPSILONS, [0], out)
    monkeypatch.undo()
    names = _names([0])
    assert (out / names[0] / "config.json").is_file() and not any((out / names[0] / "checkpoints").iterdir())
    run_sweep(ds, _config(), MODES, EPSILONS, [0], out, resume=True)
    report = json.loads((out / "sweep.json").read_text())
    assert [(s["seed"], s["status"], s["start_round"]) for s in report["per_seed"]] == [(0, "trained", 0)]
    _assert_same_runs(out, full, names)


def test_changed_config_is_refused_naming_the_key(ds, full, tmp_path):
    from fedscope_jax.train.sweep import run_sweep

    out = tmp_path / "sweep"
    shutil.copytree(full, out)
    with pytest.raises(FedscopeError, match=r"federated\.client_lr .*personalized-eps2-seed0"):
        run_sweep(ds, _config("federated.client_lr=0.5"), MODES, EPSILONS, [0, 1], out, resume=True)
    killed = out / "uniform-eps2-seed1"   # a seed that would be resumed or retrained: refused all the same
    (killed / "summary.json").unlink()
    with pytest.raises(FedscopeError, match=r"federated\.rounds .*-seed1/config.json"):
        run_sweep(ds, _config("federated.rounds=6"), MODES, EPSILONS, [1], out, resume=True)
    assert (killed / "checkpoints").is_dir() and (killed / "metrics.jsonl").is_file()   # nothing removed


def test_resume_with_force_or_without_a_sweep_is_an_error(ds, tmp_path):
    from fedscope_jax.train.sweep import run_sweep

    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "keep").write_text("x")
    with pytest.raises(FedscopeError, match="--resume and --force"):
        run_sweep(ds, _config(), MODES, EPSILONS, [0], tmp_path / "sweep", resume=True, force=True)
    assert (tmp_path / "sweep" / "keep").read_text() == "x"
    with pytest.raises(FedscopeError, match="--resume: .*missing"):
        run_sweep(ds, _config(), MODES, EPSILONS, [0], tmp_path / "missing", resume=True)
    assert not (tmp_path / "missing").exists()


def test_seed_status(tmp_path):
    """kept / resumed / trained, from what a seed's run directories hold (checkpoints written directly)."""
    import jax.numpy as jnp

    from fedscope_jax.engine.checkpoint import Checkpointer
    from fedscope_jax.engine.server import init_server_state, server_optimizer
    from fedscope_jax.train.sweep import distinct_points, run_config_json, seed_status, sweep_points
    from fedscope_jax.utils.io import write_json

    trained, _ = distinct_points(sweep_points(_config(), ["uniform"], [1.0, 2.0], [0]))
    state = init_server_state({"w": jnp.zeros(2)}, server_optimizer("fedavg", 1.0))

    def write(p, round_index=None, summary=False):
        (tmp_path / p.name).mkdir(exist_ok=True)
        write_json(run_config_json(p, None), tmp_path / p.name / "config.json")
        if round_index is not None:
            ckpt = Checkpointer(tmp_path / p.name / "checkpoints")
            ckpt.save(state._replace(round=jnp.asarray(round_index, state.round.dtype)))
            ckpt.close()
        if summary:
            write_json({}, tmp_path / p.name / "summary.json")

    assert seed_status(tmp_path, trained, None) == "trained"    # nothing there
    write(trained[0], 2)
    assert seed_status(tmp_path, trained, None) == "trained"    # a directory missing
    write(trained[1])
    assert seed_status(tmp_path, trained, None) == "trained"    # no checkpoint yet
    write(trained[1], 1)
    assert seed_status(tmp_path, trained, None) == "trained"    # killed between two configurations' saves
    write(trained[1], 2)
    assert seed_status(tmp_path, trained, None) == "resumed"
    write(trained[0], summary=True)
    write(trained[1], summary=True)
    assert seed_status(tmp_path, trained, None) == "kept"
    with pytest.raises(FedscopeError, match=r"--resume: data .*uniform-eps1-seed0"):
        seed_status(tmp_path, trained, {"data": "elsewhere"})


def test_reproduce_resumes_a_sweep_cell_and_restarts_a_changed_one(tmp_path, monkeypatch):
    """experiments/runner.run_sweep_cell: resume when the sweep directory exists; a config mismatch starts over."""
    from fedscope_jax.errors import ResumeMismatch
    from fedscope_jax.experiments import runner
    from fedscope_jax.train.config import load_config

    calls = []

    def fake_sweep(ds, cfg, modes, epsilons, seeds, out, semantic=None, extra=None, resume=False, force=False):
        calls.append((resume, force))
        if resume and mismatch:
            raise ResumeMismatch(f"--resume: federated.rounds is 3 here but 2 in {out}/x/config.json")
        (Path(out) / "uniform-eps2-seed0").mkdir(parents=True, exist_ok=True)
        (Path(out) / "uniform-eps2-seed0" / "summary.json").write_text("{}")

    monkeypatch.setattr(runner, "trainer", lambda mode: fake_sweep)
    cell = types.SimpleNamespace(sweep_modes=("uniform",), sweep_epsilons=(2.0,), seed=0, sweep_unit="client")
    ident = {"attributes": None, "semantic_coverage": None}
    for exists, mismatch, expected in [(False, False, [(False, False)]), (True, False, [(True, False)]),
                                       (True, True, [(True, False), (False, True)])]:
        sweep_dir = tmp_path / f"{exists}-{mismatch}"
        if exists:
            sweep_dir.mkdir()
        calls.clear()
        runner.run_sweep_cell(cell, sweep_dir, None, load_config(None, []), None, ident)
        assert calls == expected, (exists, mismatch)
        assert (sweep_dir / runner.SWEEP_DONE).is_file()
        assert json.loads((sweep_dir / "uniform-eps2-seed0" / runner.CELL_FILE).read_text())["dp"] == "uniform-eps2"
