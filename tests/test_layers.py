"""Imports run one way: every import of the package (function-local ones too) goes down the layers

    cli -> experiments -> bench -> train -> engine -> privacy -> eval -> model -> losses -> data -> utils -> errors

(the issue's `{engine, privacy, model, data, eval}` middle layer, ordered so that none of them can reach
back into another), and no two modules import each other, directly or around a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fedscope_jax"
LAYERS = ("__main__", "cli", "experiments", "bench", "train", "engine", "privacy", "eval", "model", "losses", "data",
          "utils", "errors")


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path, me: str) -> list[tuple[int, str]]:
    """(line, imported fedscope_jax module) of every import statement in the file of module `me`, at any
    depth (inside functions too); relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("fedscope_jax")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("fedscope_jax"):
                # `from fedscope_jax.x import y` may import the module x.y
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.append((node.lineno, sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file()
                                or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else base))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"   # the root package imports nothing


def _rank(module: str) -> int:
    return LAYERS.index(_layer(module))


def _graph() -> dict[str, list[tuple[int, str]]]:
    return {_module_name(p): _imports(p, _module_name(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert packages | modules <= set(LAYERS), sorted((packages | modules) - set(LAYERS))


def test_imports_run_down_the_layers():
    upward = []
    for module, imports in _graph().items():
        for line, target in imports:
            if _layer(target) != _layer(module) and _rank(target) < _rank(module):
                upward.append(f"{module}:{line} imports {target} ({_layer(module)} -> {_layer(target)})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_no_import_cycles_between_modules():
    graph = {m: sorted({t for _, t in imps if t != m}) for m, imps in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in graph.get(m, []):
            if t not in graph:
                continue
            if state.get(t) == 1:
                cycles.append(" -> ".join(path[path.index(t):] + [t]) if t in path else f"{m} -> {t}")
            elif t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_function_local_and_upward_imports(tmp_path):
    """The walker finds imports inside functions, and an upward one is reported (the test above can fail)."""
    src = tmp_path / "probe.py"
    src.write_text("import numpy\n\n\ndef f():\n    from fedscope_jax.train import loop\n"
                   "    from ..privacy.mechanism import clip\n    return loop, clip\n")
    found = _imports(src, "fedscope_jax.engine.probe")
    assert found == [(5, "fedscope_jax.train.loop"), (6, "fedscope_jax.privacy.mechanism")]
    assert _rank("fedscope_jax.train.loop") < _rank("fedscope_jax.engine.probe")   # engine -> train runs up


def test_packages_name_their_public_api():
    """Each package's __init__ names its public API in __all__."""
    missing = [str(p.relative_to(PACKAGE.parent)) for p in sorted(PACKAGE.rglob("__init__.py"))
               if "__all__" not in p.read_text(encoding="utf-8")]
    assert not missing, "packages without __all__: " + ", ".join(missing)
