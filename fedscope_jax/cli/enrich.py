"""`fedscope enrich`: runs the offline vLLM enrichment job (enrich/) in its own virtual environment.

vLLM pins its own torch, so the job lives in `.venv-enrich` (built by `make enrich-env`) and runs there as a
subprocess: `<venv>/bin/python -m enrich ...` with the repository root on PYTHONPATH. The options are defined
once, in enrich/options.py (stdlib only), and forwarded as they were given.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
from pathlib import Path
from types import ModuleType

from fedscope_jax.errors import FedscopeError

REPO = Path(__file__).resolve().parents[2]
ENRICH_DIR = REPO / "enrich"
STAMP = ".installed"


def enrich_venv() -> Path:
    """The enrichment environment: $FEDSCOPE_ENRICH_VENV, else <repo>/.venv-enrich."""
    return Path(os.environ.get("FEDSCOPE_ENRICH_VENV", REPO / ".venv-enrich")).expanduser()


def _options() -> ModuleType | None:
    path = ENRICH_DIR / "options.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("fedscope_enrich_options", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "enrich", help="LLM attributes + embeddings for items.arrow (offline vLLM batch job)",
        description="Offline LLM enrichment: items.arrow -> attributes.arrow + item_embeddings.arrow, "
                    "run with vLLM in the enrichment environment (make enrich-env). See docs/enrich.md.")
    options = _options()
    if options is not None:
        options.add_arguments(parser)
    parser.set_defaults(func=run, _enrich_options=options)


def job_command(args: argparse.Namespace) -> list[str]:
    """The command line of the job in the enrichment environment (checked to exist)."""
    options = args._enrich_options
    if options is None:
        raise FedscopeError(f"{ENRICH_DIR}: the enrichment job's sources are missing (run from a source checkout)")
    venv = enrich_venv()
    python = venv / "bin" / "python"
    if not python.is_file() or not (venv / STAMP).is_file():
        raise FedscopeError(f"{venv}: enrichment environment not found or incomplete; "
                            f"build it with `make -C {REPO} enrich-env` (or set FEDSCOPE_ENRICH_VENV)")
    return [str(python), "-m", "enrich", *options.to_argv(args)]


def run(args: argparse.Namespace) -> int:
    cmd = job_command(args)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.call(cmd, env=env)
