"""Model selection of federated runs: the best validated round is tested, training stops after `patience`
validations without gain, a resumed run selects what an uninterrupted one does, and a stopped configuration of
a sweep leaves the others as they were."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedscope_jax.train.selection import Selection, final_facts

ROUNDS = 10
BEST = 3        # the round the scripted validation score peaks at
PATIENCE = 2    # so a selecting run stops at round BEST + PATIENCE


def test_selection_keeps_the_first_best_and_stops_after_patience():
    sel = Selection(patience=3, metric="NDCG@10")
    scores = [0.1, 0.3, 0.2, 0.3, 0.25, 0.1]   # a tie is no gain: the earliest best round is kept
    stops = [sel.observe(5 * (i + 1), s, lambda i=i: {"w": i}) for i, s in enumerate(scores)]
    assert stops == [False, False, False, False, True, True]
    assert (sel.best_round, sel.best_score, sel.best_params, sel.waited) == (10, 0.3, {"w": 1}, 4)
    assert sel.facts() == {"selection": "best_valid", "select_metric": "NDCG@10", "patience": 3, "rounds_run": 30,
                           "best_round": 10, "best_valid_select": 0.3, "stopped_early": True}
    again = Selection(patience=3, metric="NDCG@10")   # rebuilt from the records a checkpoint covers
    again.replay([{"round": r, **({"valid": {"select": s}} if r % 5 == 0 else {})}
                  for r, s in zip(range(1, 31), np.repeat(scores, 5))])
    assert (again.best_round, again.best_score, again.waited, again.stopped, again.last_round) == (10, 0.3, 4, True, 30)
    assert final_facts(7) == {"selection": "final", "rounds_run": 7, "best_round": None, "stopped_early": False}
    # patience running out at the last round of the budget is no early stop; before it, it is
    for budget, early in ((30, False), (40, True)):
        sel = Selection(patience=3, metric="NDCG@10", rounds=budget)
        for i, s in enumerate(scores):
            sel.observe(5 * (i + 1), s, lambda: None)
        assert sel.stopped and sel.facts()["stopped_early"] is early


def _linear():
    """A linear least-squares model on three clients: a tiny program, a deterministic trajectory."""
    import jax.numpy as jnp
    import optax

    from fedscope_jax.engine.client import ClientConfig
    from fedscope_jax.engine.cohort import ClientShard
    from fedscope_jax.train.federated_config import FederatedConfig

    def loss(params, batch, key):
        return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2), {}

    rng = np.random.default_rng(0)
    data = [ClientShard({"x": rng.normal(size=(2, 3, 2)).astype(np.float32),
                         "y": (rng.normal(size=(2, 3)) + 3.0).astype(np.float32)}) for _ in range(3)]
    fcfg = FederatedConfig(clients=3, rounds=ROUNDS, chunk_size=1, eval_every=1, checkpoint_every=1, server_lr=0.3)
    return (lambda r, c: data[c]), ClientConfig(loss, optax.sgd(0.1)), fcfg, {"w": jnp.zeros(2)}


def _run(run_dir: Path, eval_fn, selection: bool, rounds: int = ROUNDS, resume: bool = False, other=None):
    """run_tracks of the linear model; returns the tracks, final states and records."""
    import dataclasses

    from fedscope_jax.train.loop import Track, run_tracks

    source, ccfg, fcfg, params = _linear()
    fcfg = dataclasses.replace(fcfg, rounds=rounds)
    tracks = [Track(run_dir, None, eval_fn, Selection(PATIENCE, "NDCG@10") if selection else None)]
    if other is not None:
        tracks.append(other)
    states, records, _ = run_tracks(tracks, source, 3, params, ccfg, fcfg, resume=resume)
    return tracks, states, records


def _trajectory(tmp_path: Path):
    """w after every round of an uninterrupted run without selection, and the score that peaks at round BEST."""
    seen = []
    _, states, _ = _run(tmp_path / "plain", lambda p: seen.append(np.asarray(p["w"])) or {"select": 0.0}, False)
    target = seen[BEST - 1][0]
    assert len({round(float(w[0]), 6) for w in seen}) == ROUNDS   # w moves every round: the peak is one round
    return seen, states[0], (lambda p: {"select": -float((np.asarray(p["w"])[0] - target) ** 2)})


def test_a_run_tests_its_best_round_stops_after_patience_and_resumes_to_the_same_choice(tmp_path: Path):
    from fedscope_jax.errors import FedscopeError, ResumeMismatch

    seen, _, score = _trajectory(tmp_path)
    tracks, states, records = _run(tmp_path / "sel", score, True)
    sel = tracks[0].selection
    assert [r["round"] for r in records[0]] == list(range(1, BEST + PATIENCE + 1))
    assert records[0][-1]["stopped_early"] and "stopped_early" not in records[0][-2]
    assert (sel.best_round, sel.last_round, sel.stopped) == (BEST, BEST + PATIENCE, True)
    np.testing.assert_array_equal(sel.best_params["w"], seen[BEST - 1])
    assert int(states[0].round) == BEST + PATIENCE   # training ended at the stop, not at ROUNDS
    # killed before the best round, or after it (checkpoint and records of rounds 1..k): the same choice
    for k in (2, 4):
        cut = tmp_path / f"cut{k}"
        _run(cut, score, True, rounds=k)
        again, _, recs = _run(cut, score, True, resume=True)
        s = again[0].selection
        assert (s.best_round, s.last_round, s.stopped) == (BEST, BEST + PATIENCE, True)
        np.testing.assert_allclose(s.best_params["w"], seen[BEST - 1], rtol=1e-6)
        assert [r["round"] for r in recs[0]] == list(range(1, BEST + PATIENCE + 1))
    # a resume after the stop trains nothing more
    again, states, recs = _run(tmp_path / "sel", score, True, resume=True)
    assert int(states[0].round) == BEST + PATIENCE and len(recs[0]) == BEST + PATIENCE
    np.testing.assert_array_equal(again[0].selection.best_params["w"], seen[BEST - 1])
    # a resume that finds no checkpoint fails and keeps the log whole
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text('{"round": 1}\n')
    with pytest.raises(FedscopeError, match="no checkpoint"):
        _run(empty, score, True, resume=True)
    assert (empty / "metrics.jsonl").read_text() == '{"round": 1}\n'
    # a checkpoint written without best params (no selection) cannot resume a selecting run
    with pytest.raises(ResumeMismatch, match="best-round"):
        _run(tmp_path / "plain", score, True, resume=True)


def test_a_stopped_configuration_of_a_sweep_leaves_the_others_unchanged(tmp_path: Path):
    from fedscope_jax.train.loop import Track

    seen, plain_final, score = _trajectory(tmp_path)
    other = Track(tmp_path / "other", None, lambda p: {"select": 0.0})
    tracks, states, records = _run(tmp_path / "sel", score, True, other=other)
    sel = tracks[0].selection
    assert (sel.best_round, sel.last_round) == (BEST, BEST + PATIENCE)
    np.testing.assert_allclose(sel.best_params["w"], seen[BEST - 1], rtol=1e-6)
    assert [r["round"] for r in records[0]] == list(range(1, BEST + PATIENCE + 1))   # no record after the stop
    assert [r["round"] for r in records[1]] == list(range(1, ROUNDS + 1))
    np.testing.assert_allclose(np.asarray(states[1].params["w"]), np.asarray(plain_final.params["w"]), rtol=1e-6)
    on_disk = [json.loads(x) for x in (tmp_path / "sel" / "metrics.jsonl").read_text().splitlines()]
    assert len(on_disk) == BEST + PATIENCE
