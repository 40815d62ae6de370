"""The vLLM side: engine construction and one batched, schema-constrained `LLM.chat` call per attempt.

Imports vLLM lazily, so the rest of the package (prompts, schema, retries, shards) loads without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from enrich import schema as schema_lib
from enrich.retry import Attempt


def parse_vllm_args(pairs: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> keyword arguments (VALUE parsed as JSON when it parses, else kept as text)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--vllm-arg {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def engine_kwargs(model_dir: Path, *, tensor_parallel_size: int = 1, gpu_memory_utilization: float | None = None,
                  max_model_len: int = 1024, dtype: str = "auto", enforce_eager: bool | None = None, seed: int = 0,
                  extra: dict[str, Any] | None = None, cpu: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM`, with the CPU defaults that work on these machines."""
    cpu = is_cpu_platform() if cpu is None else cpu
    kwargs: dict[str, Any] = dict(model=str(model_dir), tensor_parallel_size=tensor_parallel_size,
                                  max_model_len=max_model_len, dtype=dtype, seed=seed)
    if gpu_memory_utilization is None and cpu:
        gpu_memory_utilization = 0.2   # on CPU: fraction of host memory for the KV cache (0.92 does not fit)
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs["enforce_eager"] = cpu if enforce_eager is None else enforce_eager
    # Compact JSON (no free whitespace between tokens): small models otherwise spend much of the token budget
    # on newlines and get cut off; measured on CPU it also raised throughput (docs/enrich.md).
    kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    kwargs.update(extra or {})
    return kwargs


def make_llm(kwargs: dict[str, Any]):
    from vllm import LLM

    return LLM(**kwargs)


def sampling_params(attempt: Attempt, schema: dict[str, Any] = schema_lib.ATTRIBUTE_SCHEMA):
    """Temperature, token bound, seed and repetition penalty of `attempt`, constrained to `schema` by structured
    outputs (vLLM's JSON-schema grammar)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return SamplingParams(temperature=attempt.temperature, max_tokens=attempt.max_tokens, seed=attempt.seed,
                          repetition_penalty=attempt.repetition_penalty,
                          structured_outputs=StructuredOutputsParams(json=schema))


def chat(llm, conversations: Sequence[list[dict[str, str]]], params) -> list[tuple[str, int]]:
    """One batched `LLM.chat` call (the model's chat template is applied by vLLM): (text, generated tokens) each."""
    if not conversations:
        return []
    outputs = llm.chat(list(conversations), params, use_tqdm=False)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]
