"""The automatic chunk size: which candidates are compiled, which one wins, and what the user sees meanwhile."""

from __future__ import annotations

import pytest

from fedscope_jax.engine import tune


def test_candidate_chunks_double_then_quadruple_up_to_the_per_device_cohort():
    assert tune.candidate_chunks(1) == [1]
    assert tune.candidate_chunks(5) == [1, 2, 4]
    assert tune.candidate_chunks(100) == [1, 2, 4, 16, 64]
    assert tune.candidate_chunks(100, devices=8) == [1, 2, 4]   # 13 clients per device


@pytest.fixture
def fake_rounds(monkeypatch):
    """Round seconds per chunk size, in place of the clock; records which chunk sizes were compiled."""
    seconds = {1: 1.0, 2: 0.5, 4: 0.6, 16: 0.8, 64: 0.1}
    compiled: list[int] = []

    def run_round(chunk: int):
        compiled.append(chunk)
        return lambda: chunk

    monkeypatch.setattr(tune, "block", lambda tree: tree)
    monkeypatch.setattr(tune, "timed", lambda thunk: seconds[thunk()])
    return run_round, compiled


def test_autotune_keeps_the_fastest_and_stops_once_a_round_takes_1_5x_the_best(fake_rounds):
    run_round, compiled = fake_rounds
    best, times = tune.autotune_chunk_size(run_round, [1, 2, 4, 16, 64])
    # 16 takes 0.8 s > 1.5 x 0.5 s: 64 is never compiled (its 0.1 s is not seen)
    assert compiled == [1, 2, 4, 16]
    assert times == {1: 1.0, 2: 0.5, 4: 0.6, 16: 0.8}
    assert best == 2


def test_autotune_shows_a_progress_bar_with_each_candidates_round_time(fake_rounds, monkeypatch, capsys):
    run_round, _ = fake_rounds
    monkeypatch.setenv("FEDSCOPE_NO_PROGRESS", "0")
    tune.autotune_chunk_size(run_round, [1, 2, 4, 16, 64], desc="tuning here")
    err = capsys.readouterr().err
    assert "tuning here" in err
    assert "compiling chunk 16" in err
    assert "1: 1 s, 2: 0.5 s, 4: 0.6 s, 16: 0.8 s" in err
    monkeypatch.setenv("FEDSCOPE_NO_PROGRESS", "1")
    tune.autotune_chunk_size(run_round, [1, 2])
    assert capsys.readouterr().err == ""
