"""The documentation matches the code: every `fedscope` command line in README.md and docs/*.md names an
existing subcommand and flags that subcommand accepts, every `--set section.key=value` names a config key
(and a value of its type), and every `make` target the docs name exists."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from fedscope_jax.cli import build_parser
from fedscope_jax.train.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a command line: fedscope / .venv/bin/fedscope / $F (the README's alias) / python -m fedscope_jax
COMMAND = re.compile(r"^(?:\S*/)?(?:fedscope|\$F)\s|^\S*python3?\s+-m\s+fedscope_jax\s")


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def code_of(text: str) -> tuple[list[str], list[str]]:
    """(fenced code blocks, inline code spans outside them) of a Markdown text."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S), re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose)


def command_lines(text: str) -> list[str]:
    """Command lines of fenced code blocks (continuation lines joined) and of inline code spans."""
    blocks, spans = code_of(text)
    out = []
    for block in blocks:
        out += [ln.strip() for ln in re.sub(r"\s*\\\n\s*", " ", block).splitlines() if COMMAND.match(ln.strip())]
    out += [s.strip() for s in spans if COMMAND.match(s.strip() + " ")]
    return out


def check_command(parser: argparse.ArgumentParser, line: str) -> list[str]:
    """What is wrong with one documented command line (empty: nothing)."""
    text = re.sub(r"\s#.*$", "", line).replace("[", " ").replace("]", " ")   # comments; optional groups kept
    tokens = shlex.split(text)
    tokens = tokens[3:] if "python" in tokens[0] else tokens[1:]
    words: list[str] = []
    while tokens and _subcommands(parser) and not tokens[0].startswith("-") and tokens[0] not in ("...", "…"):
        name = tokens.pop(0)
        if name not in _subcommands(parser):
            return [f"unknown command {' '.join(['fedscope', *words, name])!r}"]
        words.append(name)
        parser = _subcommands(parser)[name]
    flags = {s for a in parser._actions for s in a.option_strings}
    problems = [f"fedscope {' '.join(words)}: no flag {t.split('=')[0]}" for t in tokens
                if t.startswith("--") and t.split("=")[0] not in flags]
    sets = [tokens[i + 1] for i, t in enumerate(tokens[:-1]) if t == "--set"]
    for override in sets:
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=.+", override) is None:
            continue   # a placeholder such as KEY=VALUE
        try:
            load_config(None, [override])
        except Exception as exc:   # noqa: BLE001 - reported as the failure
            problems.append(f"--set {override}: {exc}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_command_lines_parse(doc):
    parser = build_parser()
    lines = command_lines(doc.read_text(encoding="utf-8"))
    problems = [f"{doc.name}: {p}: {line}" for line in lines for p in check_command(parser, line)]
    assert not problems, "\n".join(problems)


def test_the_checker_finds_commands_and_catches_a_wrong_flag_key_and_command():
    text = ("```bash\n$F train --mode federated \\\n    --rounds 5 --set model.dim=32  # comment --nope\n```\n"
            "and `fedscope sweep --epsilons 1,2` inline")
    lines = command_lines(text)
    assert lines == ["$F train --mode federated --rounds 5 --set model.dim=32  # comment --nope",
                     "fedscope sweep --epsilons 1,2"]
    parser = build_parser()
    assert [check_command(parser, ln) for ln in lines] == [[], []]
    assert check_command(parser, "fedscope train --roundz 5") == ["fedscope train: no flag --roundz"]
    assert len(check_command(parser, "fedscope train --set model.dimm=32")) == 1
    assert check_command(parser, "fedscope data prepair --input x") == ["unknown command 'fedscope data prepair'"]
    assert check_command(parser, "fedscope data prepare [--titles DIR]") == []


def test_make_targets_named_in_the_docs_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
    named = set()
    for doc in DOCS:   # in code only (fenced blocks and inline spans), not in prose ("make one ...")
        blocks, spans = code_of(doc.read_text(encoding="utf-8"))
        named |= {t for c in blocks + spans for t in re.findall(r"(?<![\w/-])make ([a-z][a-z-]+)", c)}
    assert named, "no make target found in the docs"
    assert named <= targets, f"targets named in the docs but not in the Makefile: {sorted(named - targets)}"
