"""Benchmark: the enrichment job vs a bare `LLM.chat` call, same engine, same prompts, same sampling.

Run inside the enrichment environment (from the repository root):

    .venv/bin/fedscope data prepare --format abxi ../shared/data/abxi-food-kitchen \\
        --titles ../shared/data/llmcdsr-food-kitchen --out /tmp/afk
    PYTHONPATH=. .venv-enrich/bin/python benchmarks/enrich_bench.py --data /tmp/afk --out enrich_bench.json

Both sides use one vllm.LLM started once (its start time is reported apart). Each timed run starts from an empty
prefix cache (`LLM.reset_prefix_cache()`), so within a run the shared few-shot prefix is cached exactly as in a
real job, but no run profits from the prompts of an earlier one. Runs alternate (bare, job, bare, job, ...) and
the medians are compared.

- bare: `LLM.chat(batch, SamplingParams(temperature=0, max_tokens, structured_outputs=json schema))`, one call per
        batch of --shard-size prompts (the same batches the job makes: vLLM's throughput on CPU depends strongly on
        the batch size, so both sides must use the same).
- job:  what `python -m enrich` does with the same prompts (Enricher.process, --shard-size per batched call):
        schema validation, bounded retries of invalid outputs, the sentence embeddings, the atomic shard writes
        and the final assembly of the two Arrow tables.

Overhead = bare items/s / job items/s - 1 (the issue asks for < 15%).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="prepared dataset directory holding items.arrow")
    parser.add_argument("--items", type=int, default=256, help="titled items, split evenly over the domains")
    parser.add_argument("--shard-size", type=int, default=256,
                        help="prompts per batched call, on both sides (the job's --shard-size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side")
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--model", default=None, help="instruct model directory (default: the embedded SmolLM2)")
    parser.add_argument("--out", default="enrich_bench.json", help="JSON result file")
    cli = parser.parse_args()

    import numpy as np

    from enrich import generate, models, prompts, retry, shards
    from enrich.job import Enricher
    from enrich.options import build_parser

    items = shards.load_items(Path(cli.data))
    titles = items.table["title"].to_pylist()
    per_domain = max(1, cli.items // len(items.domains))
    rows = []
    for dom in items.domains:     # the first titled items of each domain, by item_id
        cand = [r for r in np.argsort(items.item_id, kind="stable") if items.domain_names[r] == dom
                and prompts.clean_text(titles[r], prompts.MAX_TITLE_CHARS)]
        rows.append(np.array(cand[:per_domain], np.int64))
    selected = np.concatenate(rows)
    bench_shards = [shards.Shard(f"shard-{k:05d}", selected[i:i + cli.shard_size])
                    for k, i in enumerate(range(0, selected.size, cli.shard_size))]
    conversations = [prompts.render_messages(items.domain_names[r], titles[r],
                                             {c: items.table[c][int(r)].as_py() for c in items.metadata_columns})
                     for r in selected.tolist()]
    n = len(conversations)

    llm_dir, embed_dir = models.resolve_llm(cli.model), models.resolve_embed(None)
    job_args = build_parser().parse_args(["--data", cli.data, "--out", "-", "--max-tokens", str(cli.max_tokens),
                                          "--shard-size", str(cli.shard_size)])
    t0 = time.perf_counter()
    kwargs = generate.engine_kwargs(llm_dir, max_model_len=job_args.max_model_len, seed=job_args.seed)
    llm = generate.make_llm(kwargs)
    engine_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    enricher = Enricher(job_args, llm_dir, embed_dir, items.domains, llm=llm)
    embed_load = time.perf_counter() - t0
    first = generate.sampling_params(retry.attempt_plan(cli.max_tokens, 0)[0])
    generate.chat(llm, conversations[:4], first)          # warm-up (grammar compile, first kernels)

    chunks = [conversations[i:i + cli.shard_size] for i in range(0, n, cli.shard_size)]

    def bare() -> tuple[float, int]:
        llm.reset_prefix_cache()
        t = time.perf_counter()
        tokens = 0
        for chunk in chunks:      # the same batches as the job's shards
            tokens += sum(k for _, k in generate.chat(llm, chunk, first))
        return time.perf_counter() - t, tokens

    def job() -> tuple[float, int]:
        llm.reset_prefix_cache()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            t = time.perf_counter()
            shards.check_run(out, {"bench": True}, force=False)
            tokens = enricher.process(items, bench_shards, out)
            shards.assemble(out, bench_shards, items)
            return time.perf_counter() - t, tokens

    runs = {"bare": [], "job": []}
    for _ in range(cli.repeats):
        for name, fn in (("bare", bare), ("job", job)):
            seconds, tokens = fn()
            runs[name].append({"seconds": seconds, "tokens": tokens, "items_per_s": n / seconds,
                               "tokens_per_s": tokens / seconds})
            print(f"  {name:4s} {seconds:7.2f} s  {n / seconds:6.2f} items/s  {tokens / seconds:7.1f} tok/s",
                  file=sys.stderr, flush=True)
    job_breakdown = {k: v / cli.repeats for k, v in enricher.seconds.items()}   # mean s per job run
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "tokens", "items_per_s", "tokens_per_s")}
           for k, v in runs.items()}
    overhead = med["bare"]["items_per_s"] / med["job"]["items_per_s"] - 1.0
    # The attribute stage alone (prompts, vLLM calls incl. retries, validation) against the same bare calls.
    attr_overhead = job_breakdown["generate"] / med["bare"]["seconds"] - 1.0
    result = {
        "benchmark": "enrich job vs bare LLM.chat",
        "device": "cpu" if generate.is_cpu_platform() else "gpu",
        "machine": platform.processor() or platform.machine(),
        "model": llm_dir.name, "items": n, "domains": list(items.domains), "max_tokens": cli.max_tokens,
        "repeats": cli.repeats, "engine_start_s": engine_start, "embed_model_load_s": embed_load,
        "runs": runs, "median": med, "job_breakdown_s": job_breakdown, "job_overhead": overhead, "attribute_stage_overhead": attr_overhead,
        "overhead_limit": 0.15,
    }
    Path(cli.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("\n| side | items | median s | items/s | generated tok/s |\n|---|---|---|---|---|", flush=True)
    for k in ("bare", "job"):
        m = med[k]
        print(f"| {k} LLM.chat | {n} | {m['seconds']:.2f} | {m['items_per_s']:.2f} | {m['tokens_per_s']:.1f} |"
              if k == "bare" else
              f"| {k} (enrich) | {n} | {m['seconds']:.2f} | {m['items_per_s']:.2f} | {m['tokens_per_s']:.1f} |")
    print(f"\njob time per run: generate+retries {job_breakdown['generate']:.2f} s, "
          f"embed {job_breakdown['embed']:.2f} s, rest {med['job']['seconds'] - sum(job_breakdown.values()):.2f} s")
    print(f"job overhead over bare vLLM: {100 * overhead:+.1f}% end to end (with the embedding model), "
          f"{100 * attr_overhead:+.1f}% for the attribute stage alone (limit 15%)")
    print(f"engine start {engine_start:.1f} s; written {cli.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
