"""train.programs.Programs: one object keeps a process's built programs, by key, least recently used dropped."""

from __future__ import annotations

from fedscope_jax.train.programs import Programs


def test_get_builds_once_per_key_and_keeps_the_named_object():
    programs = Programs(max_entries=3)
    built = []

    def build(name):
        built.append(name)
        return object()

    a = programs.get(("a", 1), lambda: build("a"), keep=[1, 2])
    assert programs.get(("a", 1), lambda: build("again")) is a and built == ["a"]
    assert programs.get(("a", 2), lambda: build("b")) is not a and len(programs) == 2


def test_least_recently_used_entries_are_dropped_and_clear_drops_all():
    programs = Programs(max_entries=2)
    first = programs.get("x", object)
    programs.get("y", object)
    assert programs.get("x", object) is first        # x used again: y is now the oldest
    programs.get("z", object)                        # over the bound: y dropped
    assert len(programs) == 2 and programs.get("x", object) is first
    y = programs.get("y", object)                    # rebuilt
    assert len(programs) == 2 and programs.get("y", object) is y
    programs.clear()
    assert len(programs) == 0 and programs.get("x", object) is not first


def test_a_build_past_half_the_map_limit_clears_first(monkeypatch):
    """Each XLA:CPU executable maps ~1,400 memory regions and LLVM crashes the process at vm.max_map_count: past
    `release_at` of it, `get` clears the kept programs before it builds; below, it keeps them."""
    from fedscope_jax.train import programs as module

    programs = Programs(release_at=0.5)
    first = programs.get("x", object)
    monkeypatch.setattr(module, "max_mapped_regions", lambda: 1000)
    monkeypatch.setattr(module, "mapped_regions", lambda: 500)          # at half: kept
    assert not programs.release_near_map_limit()
    assert programs.get("y", object) is not None and len(programs) == 2 and programs.get("x", object) is first
    monkeypatch.setattr(module, "mapped_regions", lambda: 501)          # past half: a build clears first
    z = programs.get("z", object)
    assert len(programs) == 1 and programs.get("z", object) is z         # a hit builds nothing: no clear
    monkeypatch.setattr(module, "mapped_regions", lambda: None)         # no /proc: nothing to measure, kept
    assert not programs.release_near_map_limit() and programs.get("x", object) is not first
    assert len(programs) == 2


def test_the_map_count_is_read_from_this_process():
    """mapped_regions counts /proc/self/maps (this process maps its interpreter and libraries: more than a few
    regions) and max_mapped_regions reads the kernel's limit; both skip where /proc is absent."""
    import pytest

    from fedscope_jax.train.programs import mapped_regions, max_mapped_regions

    regions = mapped_regions()
    if regions is None:
        pytest.skip("no /proc/self/maps here (not Linux)")
    assert 20 < regions < max_mapped_regions()
