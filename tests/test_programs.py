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
