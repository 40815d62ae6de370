"""The enrichment job: items.arrow -> prompts -> vLLM (batched per shard) -> attributes + embeddings (Arrow).

Runs in the enrichment environment (`python -m enrich ...`, normally started by `fedscope enrich`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa

from enrich import models, prompts, retry, shards
from enrich import schema as schema_lib
from enrich.options import build_parser
from enrich.shards import JobError


def _metadata(items: shards.Items, row: int) -> dict[str, Any]:
    return {c: items.table[c][row].as_py() for c in items.metadata_columns}


TITLE_TEXT = "title"   # --text: embed the raw title alone, no LLM


def fingerprint(args: argparse.Namespace, items_path: Path, llm_dir: Path | None, embed_dir: Path,
                domains: Sequence[str]) -> dict[str, Any]:
    """Everything that shapes the output rows; a resumed run must match it exactly.

    `--text title` adds {"text": "title"} (no instruct model: `model_dir` None); the attribute runs keep the
    fingerprint they had before the option existed, so they still resume."""
    title = {"text": TITLE_TEXT} if args.text == TITLE_TEXT else {}
    return {**title,
        "items_sha256": models.file_sha256(items_path),
        "domains": list(domains),
        "limit": args.limit,
        "shard_size": args.shard_size,
        "model_dir": None if llm_dir is None else str(llm_dir),
        "embed_model_dir": str(embed_dir),
        "prompt_versions": {d: prompts.prompt_version(d) for d in domains},
        "schema_version": schema_lib.SCHEMA_VERSION,
        "attempts": [list(dataclasses.astuple(a)) for a in retry.attempt_plan(args.max_tokens, args.max_retries, args.seed)],
        "seed": args.seed,
        "dtype": args.dtype,
        "embed_dtype": args.embed_dtype,
        "vllm_args": sorted(args.vllm_arg),
    }


@dataclasses.dataclass(frozen=True)
class Generated:
    """A shard after generation, before embedding."""

    shard: shards.Shard
    domains: list[str]
    titles: list[str | None]
    metadata: list[dict[str, Any]]
    results: list[retry.ItemResult]


class Enricher:
    """Holds the two models and turns one shard of items into its two Arrow tables.

    `llm_dir` None (`--text title`): no instruct model; every titled item is embedded from its title alone."""

    def __init__(self, args: argparse.Namespace, llm_dir: Path | None, embed_dir: Path, domains: Sequence[str],
                 llm=None):
        """`llm`: an already started vllm.LLM to reuse (the benchmark shares one engine with its bare baseline)."""
        from enrich import generate
        from enrich.embed import SentenceEmbedder

        self.generate = generate
        self.domains = tuple(domains)
        self.title_only = llm_dir is None
        self.model_id = "none (title only)" if llm_dir is None else llm_dir.name
        self.engine_kwargs = None if llm_dir is None else generate.engine_kwargs(
            llm_dir, tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
            max_model_len=args.max_model_len, dtype=args.dtype, enforce_eager=args.enforce_eager, seed=args.seed,
            extra=generate.parse_vllm_args(args.vllm_arg))
        self._llm = llm     # started on the first prompt: a shard whose items all lack a title needs no engine
        self.embedder = SentenceEmbedder(embed_dir, batch_size=args.embed_batch_size, dtype=args.embed_dtype)
        self.plan = retry.attempt_plan(args.max_tokens, args.max_retries, args.seed)
        self._params = {a.index: generate.sampling_params(a) for a in self.plan}
        self.seconds = {"generate": 0.0, "embed": 0.0}   # cumulated over shards

    @property
    def llm(self):
        if self._llm is None:
            self._llm = self.generate.make_llm(self.engine_kwargs)
        return self._llm

    def results(self, conversations: list[list[dict[str, str]]]) -> list[retry.ItemResult]:
        """Attributes for every conversation: one batched chat call per attempt."""
        def gen(indices, attempt):
            return self.generate.chat(self.llm, [conversations[i] for i in indices], self._params[attempt.index])
        return retry.run_with_retries(len(conversations), gen, self.plan)

    def generate_shard(self, items: shards.Items, shard: shards.Shard) -> Generated:
        """Prompts, one batched vLLM chat call per attempt, validation, retries."""
        rows = shard.rows.tolist()
        doms = shard.domains(items)
        titles = [prompts.clean_text(items.table["title"][r].as_py(), prompts.MAX_TITLE_CHARS) for r in rows]
        metas = [_metadata(items, r) for r in rows]
        if self.title_only:
            results = [retry.title_only_result() if t is not None else retry.missing_title_result() for t in titles]
            return Generated(shard, doms, titles, metas, results)
        with_title = [k for k, t in enumerate(titles) if t is not None]
        conversations = [prompts.render_messages(doms[k], titles[k], metas[k]) for k in with_title]
        t0 = time.perf_counter()
        generated = self.results(conversations)
        self.seconds["generate"] += time.perf_counter() - t0
        results: list[retry.ItemResult] = [retry.missing_title_result() for _ in rows]
        for k, res in zip(with_title, generated):
            results[k] = res
        return Generated(shard, doms, titles, metas, results)

    def finish_shard(self, items: shards.Items, gen: Generated, out: Path | None = None) -> tuple[pa.Table, pa.Table, int]:
        """Embeddings, Arrow tables, and the atomic shard write when `out` is given."""
        t0 = time.perf_counter()
        texts = [prompts.embedding_text(d, t, r.attributes, m)
                 for d, t, r, m in zip(gen.domains, gen.titles, gen.results, gen.metadata)]
        vectors = self.embedder.embed(texts)
        self.seconds["embed"] += time.perf_counter() - t0
        if not np.all(np.isfinite(vectors)):
            raise RuntimeError(f"shard {gen.shard.name}: the embedding model returned non-finite values")
        attributes, embeddings = self._tables(items, gen.shard, gen.domains, gen.results, vectors)
        if out is not None:
            shards.write_shard(out, gen.shard, attributes, embeddings)
        return attributes, embeddings, sum(r.tokens for r in gen.results)

    def process(self, items: shards.Items, todo: Sequence[shards.Shard], out: Path,
                on_done: Callable[[shards.Shard, int], None] | None = None) -> int:
        """Generates, embeds and writes the shards one after the other; returns the generated tokens.

        Sequential on purpose: embedding shard k on a background thread while vLLM generates shard k+1 was
        measured slower on the 2-core CPU machines (both compete for the same cores), and on a GPU the
        embedding takes milliseconds.
        """
        tokens = 0
        for shard in todo:
            n_tok = self.finish_shard(items, self.generate_shard(items, shard), out)[2]
            tokens += n_tok
            if on_done is not None:
                on_done(shard, n_tok)
        return tokens

    def _tables(self, items: shards.Items, shard: shards.Shard, doms: list[str], results: list[retry.ItemResult],
                vectors: np.ndarray) -> tuple[pa.Table, pa.Table]:
        n = len(results)
        item_id = pa.array(items.item_id[shard.rows], pa.int32())
        domain = shards.domain_array(doms, self.domains)
        status = pa.array([r.status for r in results], pa.string())
        cols: dict[str, pa.Array] = {"item_id": item_id, "domain": domain}
        for field in schema_lib.arrow_fields():
            cols[field.name] = pa.array([(r.attributes or {}).get(field.name) for r in results], field.type)
        cols["raw_json"] = pa.array([r.raw for r in results], pa.string())
        cols["model"] = pa.array([self.model_id] * n, pa.string())
        versions = {d: prompts.prompt_version(d) for d in set(doms)}
        cols["prompt_version"] = pa.array([versions[d] for d in doms], pa.string())
        cols["status"] = status
        cols["attempts"] = pa.array([r.attempts for r in results], pa.int8())
        cols["generated_tokens"] = pa.array([r.tokens for r in results], pa.int32())
        cols["error"] = pa.array([r.error for r in results], pa.string())
        attributes = pa.Table.from_pydict(cols, schema=shards.attributes_schema())
        dim = vectors.shape[1]
        flat = pa.array(vectors.reshape(-1), pa.float32())
        vector = pa.FixedSizeListArray.from_arrays(flat, dim)
        # The vector's status: "ok" when it was made from the title and schema-valid attributes (first try or
        # retried), else the attribute status (missing_title: domain wording only; failed: title only).
        # A title_only vector is what `--text title` asks for, so it is "ok" too.
        vec_status = pa.array([retry.OK if r.attributes is not None or r.status == retry.TITLE_ONLY else r.status
                               for r in results], pa.string())
        embeddings = pa.Table.from_arrays([item_id, domain, vector, vec_status], schema=shards.embeddings_schema(dim))
        return attributes, embeddings


def _bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="enrich", unit="item", file=sys.stderr, dynamic_ncols=True,
                disable=os.environ.get("FEDSCOPE_NO_PROGRESS", "0") == "1")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs (or resumes) the job; returns the summary written to enrich.json."""
    data, out = Path(args.data), Path(args.out)
    items = shards.load_items(data)
    plan = shards.plan_shards(items, args.domains, args.limit, args.shard_size)
    domains = list(dict.fromkeys(d for s in plan for d in s.domains(items)))
    from enrich.generate import parse_vllm_args   # stdlib only at import time; checked before the engine starts

    try:
        parse_vllm_args(args.vllm_arg)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    title_only = args.text == TITLE_TEXT
    if title_only and args.model is not None:
        raise JobError("--model with --text title: the title-only arm runs no instruct model; drop --model")
    llm_dir = None if title_only else models.resolve_llm(args.model)
    embed_dir = models.resolve_embed(args.embed_model)
    fp = fingerprint(args, data / shards.ITEMS_FILE, llm_dir, embed_dir, domains)
    shards.check_run(out, fp, args.force)
    todo = [s for s in plan if not shards.shard_done(out, s)]
    total = sum(s.size for s in plan)
    print(f"enrich: {total} items in {len(plan)} shards ({len(plan) - len(todo)} already done) -> {out}",
          file=sys.stderr)
    timing = {"engine_start_s": 0.0, "generate_and_embed_s": 0.0, "generated_tokens": 0, "items_processed": 0}
    if todo:
        t0 = time.perf_counter()
        enricher = Enricher(args, llm_dir, embed_dir, items.domains)
        titles = items.table["title"]
        if not title_only and any(prompts.clean_text(titles[int(r)].as_py(), prompts.MAX_TITLE_CHARS)
                                  for s in todo for r in s.rows):
            enricher.llm                                   # start the engine now, so its time is reported apart
        timing["engine_start_s"] = time.perf_counter() - t0
        bar = _bar(total, total - sum(s.size for s in todo))
        t_run = time.perf_counter()

        def on_done(shard: shards.Shard, n_tok: int) -> None:
            timing["generated_tokens"] += n_tok
            timing["items_processed"] += shard.size
            bar.update(shard.size)
            bar.set_postfix_str(f"{timing['generated_tokens'] / (time.perf_counter() - t_run):.0f} tok/s", refresh=True)

        with bar:
            enricher.process(items, todo, out, on_done)
        timing["generate_and_embed_s"] = time.perf_counter() - t_run
        timing["generate_s"], timing["embed_s"] = enricher.seconds["generate"], enricher.seconds["embed"]
    attributes, embeddings = shards.assemble(out, plan, items)
    status = attributes["status"].to_pylist()
    summary = {
        "items": attributes.num_rows,
        "status_counts": {s: status.count(s) for s in retry.STATUSES},
        "domains": domains,
        "text": args.text,
        "model": None if llm_dir is None else llm_dir.name,
        "model_dir": None if llm_dir is None else str(llm_dir),
        "embed_model_dir": str(embed_dir),
        "embedding_dim": embeddings.schema.field("vector").type.list_size,
        "embedding_text": ("title (+ metadata) alone, no LLM: the title-only arm (see docs/enrich.md)" if title_only
                           else "title + attribute fields, one 'Field: value' line each (see docs/enrich.md)"),
        "prompt_versions": fp["prompt_versions"],
        "schema": schema_lib.ATTRIBUTE_SCHEMA,
        "this_invocation": {**timing,
                            "items_per_s": timing["items_processed"] / timing["generate_and_embed_s"]
                            if timing["generate_and_embed_s"] else None,
                            "tokens_per_s": timing["generated_tokens"] / timing["generate_and_embed_s"]
                            if timing["generate_and_embed_s"] else None},
    }
    shards.write_json(summary, out / shards.SUMMARY_FILE)
    counts = ", ".join(f"{k} {v}" for k, v in summary["status_counts"].items() if v)
    print(f"enrich: wrote {out / shards.ATTRIBUTES_FILE} and {out / shards.EMBEDDINGS_FILE} "
          f"({attributes.num_rows} items: {counts}; d={summary['embedding_dim']})", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (JobError, models.ModelError) as exc:
        print(f"enrich: error: {exc}", file=sys.stderr)
        return 2
    return 0
