"""Bounded retries of invalid generations and the per-item status (pure logic; no vLLM import).

Statuses written to attributes.arrow (item_embeddings.arrow writes "ok" for both ok and invalid_json_retried,
whose vectors are made from valid attributes, and the same status otherwise):
- ok: the first generation was a schema-valid JSON object;
- invalid_json_retried: the first one was not, a bounded retry was;
- missing_title: the item has no title, so no prompt is sent (documented fallback: null attributes, the
  embedding is made from the domain wording and any metadata);
- failed: every attempt was invalid; attributes are null, raw_json keeps the last text, the embedding is made
  from title and metadata alone. Never dropped.
- title_only: `--text title` (the ablation's title-only arm): no generation was asked for; the embedding is
  made from title and metadata alone, and item_embeddings.arrow writes "ok" (the vector is what was asked for).

Greedy decoding is deterministic, so a retry must change something. The schema bounds every string, so a
complete object fits the first budget unless the model loops ("café-café-café-..." in multi-token
characters) and is cut off at max_tokens: retries add a repetition penalty that breaks the loop and double the
token bound; the first retry stays greedy, later ones sample (temperature > 0, a fixed seed per attempt, so
reruns are reproducible).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from enrich import schema as schema_lib

OK = "ok"
RETRIED = "invalid_json_retried"
MISSING_TITLE = "missing_title"
FAILED = "failed"
TITLE_ONLY = "title_only"
STATUSES = (OK, RETRIED, MISSING_TITLE, FAILED, TITLE_ONLY)


@dataclasses.dataclass(frozen=True)
class Attempt:
    """Sampling settings of one generation attempt."""

    index: int
    temperature: float
    max_tokens: int
    seed: int | None
    repetition_penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class ItemResult:
    """Outcome of one item after all its attempts."""

    status: str
    attributes: dict[str, Any] | None
    raw: str | None          # last generated text (None when nothing was generated)
    attempts: int            # generations made for this item
    tokens: int              # generated tokens over all attempts
    error: str | None        # why the last invalid attempt was rejected (kept for invalid_json_retried too)


def attempt_plan(max_tokens: int, max_retries: int, seed: int = 0, retry_temperature: float = 0.7,
                 retry_repetition_penalty: float = 1.3) -> tuple[Attempt, ...]:
    """The first attempt (greedy, `max_tokens`) followed by `max_retries` bounded retries."""
    if max_tokens < 1 or max_retries < 0:
        raise ValueError("attempt_plan: max_tokens must be >= 1 and max_retries >= 0")
    plan = [Attempt(0, 0.0, max_tokens, None)]
    for k in range(1, max_retries + 1):
        temperature, k_seed = (0.0, None) if k == 1 else (retry_temperature, seed + k)
        plan.append(Attempt(k, temperature, 2 * max_tokens, k_seed, retry_repetition_penalty))
    return tuple(plan)


# generate(indices, attempt) -> one (text, generated_token_count) per index, in order.
Generate = Callable[[Sequence[int], Attempt], Sequence[tuple[str, int]]]


def run_with_retries(n: int, generate: Generate, plan: Sequence[Attempt],
                     schema: dict[str, Any] = schema_lib.ATTRIBUTE_SCHEMA) -> list[ItemResult]:
    """Generates for items 0..n-1 (one batched `generate` call per attempt over the still-invalid items)."""
    raw: list[str | None] = [None] * n
    attrs: list[dict[str, Any] | None] = [None] * n
    errors: list[str | None] = [None] * n
    attempts = [0] * n
    tokens = [0] * n
    first_ok = [False] * n
    pending = list(range(n))
    for attempt in plan:
        if not pending:
            break
        outputs = list(generate(pending, attempt))
        if len(outputs) != len(pending):
            raise RuntimeError(f"generate returned {len(outputs)} outputs for {len(pending)} prompts")
        still = []
        for i, (text, n_tok) in zip(pending, outputs):
            raw[i], attempts[i], tokens[i] = text, attempts[i] + 1, tokens[i] + int(n_tok)
            obj, err = schema_lib.parse(text, schema)
            if obj is None:
                errors[i] = err
                still.append(i)
            else:
                attrs[i] = obj
                first_ok[i] = attempt.index == 0
        pending = still
    results = []
    for i in range(n):
        if attrs[i] is not None:
            status = OK if first_ok[i] else RETRIED
        else:
            status = FAILED
        results.append(ItemResult(status, attrs[i], raw[i], attempts[i], tokens[i], errors[i]))
    return results


def missing_title_result() -> ItemResult:
    """The result of an item without a title: nothing generated."""
    return ItemResult(MISSING_TITLE, None, None, 0, 0, None)


def title_only_result() -> ItemResult:
    """The result of a titled item under `--text title`: nothing generated, by request."""
    return ItemResult(TITLE_ONLY, None, None, 0, 0, None)
