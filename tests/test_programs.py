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
    """Each XLA:CPU executable maps memory regions and LLVM crashes the process at vm.max_map_count: past
    `release_at` of it, `get` clears the kept programs before it builds; below, it keeps them; after a clear
    that left the count high (programs callers hold), the next waits for RELEASE_MARGIN more regions."""
    from fedscope_jax.train import programs as module

    programs = Programs(release_at=0.5)
    monkeypatch.setattr(module, "max_mapped_regions", lambda: 1000)
    regions = {"now": 500}
    monkeypatch.setattr(module, "mapped_regions", lambda: regions["now"])
    first = programs.get("x", object)
    assert not programs.release_near_map_limit()                       # at half: kept
    assert programs.get("y", object) is not None and len(programs) == 2 and programs.get("x", object) is first
    regions["now"] = 501                                               # past half: a build clears first
    z = programs.get("z", object)
    assert len(programs) == 1 and programs.get("z", object) is z       # a hit builds nothing: no clear
    regions["now"] = 600                                               # the clear left 501: wait for 100 more
    assert programs.get("x", object) is not first and len(programs) == 2
    regions["now"] = 602
    assert programs.release_near_map_limit() and len(programs) == 0
    assert programs.release_near_map_limit(share=0.25) is False        # nothing grew since
    regions["now"] = None                                              # no /proc: nothing to measure, kept
    programs.get("x", object)
    assert not programs.release_near_map_limit(share=0.0) and len(programs) == 1


def test_clear_unmaps_the_compiled_code():
    """What the guard relies on: clearing drops JAX's compiled executables and their memory regions (a
    program of 60 matmul / sort stages maps a few hundred), while the jitted function itself stays usable."""
    import jax
    import jax.numpy as jnp
    import pytest

    from fedscope_jax.train.programs import mapped_regions, max_mapped_regions

    if mapped_regions() is None:
        pytest.skip("no /proc/self/maps here (not Linux)")
    assert mapped_regions() < max_mapped_regions()

    def stages(x):
        for i in range(60):
            x = jnp.sort(jnp.tanh(x @ x.T) + i, axis=0)
        return x

    programs, f = Programs(), jax.jit(stages)
    programs.clear()
    before = mapped_regions()
    y = f(jnp.ones((8, 8)))
    compiled = mapped_regions()
    programs.clear()
    assert compiled - before > 100 and mapped_regions() < compiled - 100
    assert jnp.array_equal(f(jnp.ones((8, 8))), y)
