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


def test_autotune_stops_at_the_first_chunk_that_would_not_fit(fake_rounds):
    """A candidate whose program is refused by the memory check (before it runs) ends the search; the first
    candidate refused is an error that names it."""
    from fedscope_jax.engine.memory import ProgramTooLarge

    run_round, compiled = fake_rounds

    def limited(chunk: int):
        if chunk >= 4:
            compiled.append(chunk)
            raise ProgramTooLarge(chunk * 2**30, 3 * 2**30)
        return run_round(chunk)

    best, times = tune.autotune_chunk_size(limited, [1, 2, 4, 16, 64])
    assert compiled == [1, 2, 4] and times == {1: 1.0, 2: 0.5} and best == 2
    with pytest.raises(ProgramTooLarge, match="at chunk size 4 needs 4.00 GiB .* but 3.00 GiB is available"):
        tune.autotune_chunk_size(limited, [4, 16])


def test_the_advice_for_a_chunk_that_does_not_fit():
    from fedscope_jax.engine.memory import ProgramTooLarge
    from fedscope_jax.train.loop import _chunk_that_fits

    # 30% of what chunk 16 needs is available: the largest smaller candidate within 16 x 0.3 = 4.8 is 4
    assert _chunk_that_fits(16, ProgramTooLarge(100, 30)).startswith("use --chunk-size 4 ")
    assert "a smaller chunk may not fit" in _chunk_that_fits(2, ProgramTooLarge(100, 10))
    # secure aggregation: a chunk of one client would reveal its update, so 1 is never advised
    assert _chunk_that_fits(4, ProgramTooLarge(100, 60), secure=True).startswith("use --chunk-size 2 ")
    assert _chunk_that_fits(4, ProgramTooLarge(100, 30)).startswith("use --chunk-size 1 ")
    assert "a smaller chunk may not fit" in _chunk_that_fits(4, ProgramTooLarge(100, 20), secure=True)
    assert "every silo in one chunk" in _chunk_that_fits(8, ProgramTooLarge(100, 30), distributed=True)
