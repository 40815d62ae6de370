"""report.md: one section per study (tables + plots), with the profile, hardware and attribute status stated.

Input: a `fedscope reproduce` output (plan.json names the studies and their cells) or any folder of run
directories (single runs and sweeps: one table of every group of runs differing only in the seed, plus the
privacy-utility and convergence plots when the runs allow them).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fedscope_jax.errors import FedscopeError
from fedscope_jax.experiments import plots
from fedscope_jax.experiments.methods import METHODS
from fedscope_jax.experiments.runner import PLAN_FILE
from fedscope_jax.experiments.tables import (Group, below_popularity, breakdown_rows, find_runs, group_runs, load_run,
                                             metric_rows, popularity_rows, run_dirs, vector_rows, write_tables)
from fedscope_jax.utils.io import read_json

COLUMNS = ("dataset", "method", "dp", "unit", "variant", "domain", "HR@10", "NDCG@10", "MRR", "NDCG@10 (full)",
           "eps_spent (median)", "selection", "tested round/epoch", "protocol", "seeds", "attributes")


def _study_groups(root: Path, cells: list[str]) -> tuple[list[Group], list[str]]:
    runs, missing, seen = [], [], set()
    for rel in cells:
        if rel in seen:
            continue
        seen.add(rel)
        dirs = run_dirs(root / rel)
        if not dirs:
            missing.append(rel)
        runs += [load_run(d) for d in dirs]
    return group_runs(runs), missing


def write_report(runs: str | Path, out: str | Path, benchmark: str | Path | None = None) -> Path:
    """Writes tables (md, csv), plots (png) and report.md under `out`; returns report.md's path."""
    root, out = Path(runs), Path(out)
    if not root.is_dir():
        raise FedscopeError(f"--runs {root}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    plan = read_json(root / PLAN_FILE) if (root / PLAN_FILE).is_file() else None
    lines: list[str] = []
    if plan is not None:
        hw = plan.get("hardware", {})
        neg = _sampled_negatives(root, plan)
        hr, ndcg = random_ranking(neg)
        lines += ["# FedSCOPE reproduction report", ""]
        if plan.get("dry_run"):
            lines += ["> **DRY RUN**: every cell ran with a tiny budget (1 round / 1 epoch, tiny model, 120 users, "
                      "one seed) to check the plumbing. These numbers mean nothing.", ""]
        lines += [f"- profile: **{plan['profile']}**" + (" (dry run)" if plan.get("dry_run") else ""),
                  f"- hardware: {hw.get('device', '?')} ({hw.get('platform', '?')}, {hw.get('devices', '?')} "
                  f"device(s), {hw.get('cpu_cores', '?')} CPU cores), jax {hw.get('jax', '?')}",
                  _status_line(plan),
                  f"- attributes root: {plan.get('attributes_root') or 'none given: FedSCOPE ran ID-only '}"
                  + ("" if plan.get("attributes_root") else "(column 'attributes' = none)"),
                  f"- title root (title-only vectors: the ablation's title-only arm, the privacy study's no-ID arm "
                  f"on titles): {plan.get('title_root') or 'none given: those arms not run'}",
                  "",
                  f"Metrics: test split, leave-one-out; HR@10 / NDCG@10 / MRR rank the target against {neg} sampled "
                  "negatives (the 'sampled' protocol; `eval.num_negatives`), '(full)' against every item the user "
                  "never interacted with in the domain. Cells: mean ± sample std over seeds. DP 'n/a': DP does "
                  "not apply (local-only training shares nothing; centralized training pools raw data and is the "
                  "non-private upper bound). unit: what one DP record is, 'user' (one user's whole history; each silo "
                  "runs DP-SGD over its users and eps protects a user against the server and the other silos) or "
                  "'client' (a silo's whole data; eps protects the silo). eps_spent: the median client's spent "
                  "epsilon in that unit (dp-accounting). selection: the model each run tested, 'best valid' "
                  "(the round or epoch of the best validation `train.select_metric`, training stopped after "
                  "`train.patience` validations without gain: centralized, local-only and non-private federated "
                  "runs) or 'final' (the last round: every private run, since choosing a round by the clients' "
                  "held-out data would be a release outside the budget); 'tested round/epoch': that round or "
                  "epoch of each seed. protocol: `eval.protocol`, 'fedscope' (as above) or 'feddcsr' (the FedDCSR code's: "
                  "negatives drawn with replacement from the target's domain, only the target excluded, ties "
                  "counted for the target; set beside that peer's numbers only). "
                  f"A random ranking scores HR@10 = {hr:.3f} and NDCG@10 ~ {ndcg:.4f} under {neg} sampled negatives.",
                  ""]
        lines += _data_lines(plan)
        if plan["profile"] == "quick" and not plan.get("dry_run"):
            lines += ["> **quick profile**: each dataset cut to the item core above (its most-trained items, other "
                      "interactions dropped) and a few thousand users, a small model and up to 40 federated "
                      "rounds (privacy_utility: 10), sized for a 2-core CPU. The models learn, but the numbers are "
                      "not the paper's setting (the `full` profile): compare methods within a table, not with "
                      "published figures.", ""]
        if plan["profile"] == "cpu" and not plan.get("dry_run"):
            lines += ["> **cpu profile**: the whole abxi-food-kitchen (every user and item), the paper's model with "
                      "one transformer block instead of two, 20 power-law silos, up to 60 federated rounds, one seed "
                      "(no std: differences within a few percent are not findings), sized for a 2-core CPU; "
                      "999 sampled negatives and full ranking.", ""]
        for name, info in plan["studies"].items():
            lines += _study_section(root, out, name, info, plan)
    else:
        lines += _generic_section(root, out)
    if benchmark:
        bench = read_json(benchmark)
        png = plots.engine_scaling(bench, out / "engine_scaling.png")
        lines += ["## Engine scaling", "", f"From {benchmark} (device: {bench.get('device', '?')}).", ""]
        if "sweep_speedup" in bench:   # fedscope benchmark --sweep
            lines += [f"Sweep of {bench.get('configs', '?')} configurations as one program: "
                      f"{bench.get('sweep_seconds', float('nan')):.1f} s against "
                      f"{bench.get('one_by_one_seconds', float('nan')):.1f} s one by one "
                      f"(speedup {bench['sweep_speedup']:.2f}x, compile time apart).", ""]
        if png:
            lines += [f"![engine scaling]({png.name})", ""]
        elif "sweep_speedup" not in bench:
            lines += ["_no clients/speedup results in the file_", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def random_ranking(negatives: int, k: int = 10) -> tuple[float, float]:
    """(HR@k, NDCG@k) of a random ranking of a target among `negatives` sampled items."""
    import math

    n = negatives + 1
    return min(k, n) / n, sum(1.0 / math.log2(r + 1) for r in range(1, min(k, n) + 1)) / n


def _sampled_negatives(root: Path, plan: dict[str, Any]) -> int:
    """The sampled protocol's negatives, read from the first finished run (999, the default, when none is)."""
    for info in plan["studies"].values():
        for rel in info.get("cells", []):
            for d in run_dirs(root / rel):
                summary = d / "summary.json"
                if summary.is_file():
                    return int(read_json(summary).get("protocol", {}).get("sampled_negatives", 999))
    return 999


def _status_line(plan: dict[str, Any]) -> str:
    """Status, the time of the last process and of every process on this folder, the compilation cache."""
    status = plan.get("status", "?")
    if status == "running":
        status = "running (or stopped before its end: the timings below cover its finished cells)"
    line = f"- status: {status}"
    if plan.get("seconds_this_process") is not None:
        load = plan.get("load_average_at_end")
        line += (f"; {plan['seconds_this_process']:.0f} s wall / {plan.get('cpu_seconds_this_process', 0):.0f} s CPU "
                 "in the last `fedscope reproduce` process"
                 + (f" (load average at its end: {', '.join(f'{x:.1f}' for x in load)})" if load else ""))
    if plan.get("seconds_total") is not None:
        line += (f"; {plan['seconds_total']:.0f} s wall / {plan.get('cpu_seconds_total', 0):.0f} s CPU in every "
                 "process that worked on this folder")
    compiles = plan.get("xla_compiles_this_process")
    if plan.get("compile_cache") is not None:
        cache = plan["compile_cache"]
        line += ("; XLA compilation cache " + (f"on (`{cache.get('dir')}`)" if cache.get("enabled") else "off")
                 + (f", that process: {compiles['programs']} XLA compilations, {compiles['seconds']:.0f} s compiling "
                    f"or reading them, {compiles['cache_hits']} read from the cache" if compiles else ""))
    return line


def _cell_time_lines(info: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The study's cells that a process trained (plan.json's cells_seconds): count, median, slowest three."""
    timed = {rel: plan["cells_seconds"][rel]["seconds"] for rel in dict.fromkeys(info.get("cells", []))
             if rel in plan.get("cells_seconds", {})}
    if not timed:
        return []
    median = statistics.median(timed.values())
    slow = sorted(timed, key=timed.get, reverse=True)[:3]
    return [f"Per cell ({len(timed)} trained; wall seconds in `plan.json`, `cells_seconds`): median {median:.0f} s, "
            "slowest " + ", ".join(f"`{rel}` ({timed[rel]:.0f} s)" for rel in slow) + ".", ""]


def _data_lines(plan: dict[str, Any]) -> list[str]:
    """One line per dataset (or subset) the reproduction trained on."""
    data = plan.get("data", {})
    if not data:
        return []
    lines = ["Data:"]
    for name, d in sorted(data.items()):
        items = " + ".join(f"{n:,}" for n in d["items"])
        cut = [f"{d['max_users']:,} users drawn" if d.get("max_users") else "",
               f"item core of {d['max_items']:,} per domain" if d.get("max_items") else ""]
        cut_text = "; ".join(c for c in cut if c) or "the whole dataset"
        lines.append(f"- `{name}`: {d['users']:,} users, {items} items, {d['interactions']:,} interactions "
                     f"({cut_text})")
    return lines + [""]


def _study_section(root: Path, out: Path, name: str, info: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    lines = [f"## {info.get('title', name)} (`{name}`)", "", info.get("description", ""), ""]
    if info.get("profile_dp") is not None:   # the profile runs its own DP settings, not the description's
        lines += [f"Under the `{plan.get('profile')}` profile this study runs the DP settings "
                  f"{', '.join(info['profile_dp'])} only (its file's `profiles.{plan.get('profile')}.dp`); "
                  f"cells of other settings in the description are not run, and a method that needs DP has none.",
                  ""]
    if info.get("kind") == "derived":
        source = plan["studies"].get(info.get("reads"), {})
        groups, missing = _study_groups(root, source.get("cells", []))
        groups = [g for g in groups if g.cell.get("dataset") in info.get("datasets", [])]
        lines.append(f"Reads the runs of the `{info.get('reads')}` study.")
        lines.append("")
    else:
        groups, missing = _study_groups(root, info.get("cells", []))
    if info.get("seconds_total") is not None:
        lines += [f"Time spent on this study's cells by the `fedscope reproduce` processes that wrote this folder "
                  f"(cells shared with an earlier study not counted again; finished cells skipped by a resumed "
                  f"process cost nothing): {info['seconds_total']:.0f} s wall, "
                  f"{info.get('cpu_seconds_total', 0):.0f} s CPU.", ""]
    lines += _cell_time_lines(info, plan)
    failed = {k: v for k, v in plan.get("failed", {}).items() if k in set(info.get("cells", []))}
    if failed:
        lines += [f"**{len(failed)} cell(s) FAILED**:", ""] + [f"- `{k}`: {v}" for k, v in failed.items()] + [""]
    not_run = info.get("not_run", [])
    if not_run:   # arms lacking their item vectors (Method.needs_vectors) or repeating FedSCOPE's (skip_without_llm)
        arms = sorted({(r["method"], r["dataset"], r["why"]) for r in not_run})
        lines += [f"**{len(not_run)} cell(s) not run**:", ""] + [
            f"- `{m}` on {d}: {why}" for m, d, why in arms] + [""]
    if missing:
        lines += [f"**{len(missing)} cell(s) not finished**: " + ", ".join(f"`{m}`" for m in missing[:10])
                  + (" ..." if len(missing) > 10 else ""), ""]
    if name == "cold_start":
        return lines + _breakdowns(out, name, groups)
    if name == "convergence":
        return lines + _convergence(out, name, groups)
    if info.get("kind") == "sweep":   # by method, user unit first, then privacy mode, then epsilon (no DP last)
        order = list(METHODS)
        groups.sort(key=lambda g: (str(g.cell.get("dataset")),
                                   order.index(g.cell["method"]) if g.cell.get("method") in order else len(order),
                                   g.runs[0].config.get("privacy", {}).get("unit", "client") != "user",
                                   g.cell.get("privacy_mode") in (None, "off"), str(g.cell.get("privacy_mode")),
                                   g.cell.get("epsilon") or float("inf")))
    rows = metric_rows(groups)
    if info.get("kind") == "cells":
        rows += popularity_rows(groups)
    text = write_tables(rows, out / name, COLUMNS)
    lines += [text, f"Table: [{name}.md]({name}.md), [{name}.csv]({name}.csv)", ""]
    if info.get("kind") == "cells":
        lines += _vectors(out, name, groups)
        lines += _below_popularity(out, name, groups)
    if info.get("kind") == "sweep":
        for ds in sorted({g.cell.get("dataset") for g in groups}):
            png = plots.privacy_utility([g for g in groups if g.cell.get("dataset") == ds],
                                        out / f"{name}_{ds}.png", f"privacy-utility: {ds}")
            if png:
                lines += [f"![privacy-utility {ds}]({png.name})", ""]
    png = plots.variants(groups, out / f"{name}_variants.png", info.get("title", name))
    if png:
        lines += [f"![{name}]({png.name})", ""]
    return lines


def _vectors(out: Path, name: str, groups: list[Group]) -> list[str]:
    """What the item vectors add (LLM attributes, title vectors, ID only), paired by seed (`vector_rows`)."""
    rows = vector_rows(groups)
    if not rows:
        return []
    text = write_tables(rows, out / f"{name}_vectors")
    return ["**What the item vectors add**, paired by seed: FedSCOPE's arms that differ in their item vectors "
            "alone (LLM = the LLM attribute vectors, title = vectors of the raw titles, none = ID only), test "
            "NDCG@10 of each arm (A, B) and the per-seed difference A - B, mean ± sample std over the seeds both "
            "ran; \"full:\" = full ranking.", "", text,
            f"Table: [{name}_vectors.md]({name}_vectors.md), [{name}_vectors.csv]({name}_vectors.csv)", ""]


def _below_popularity(out: Path, name: str, groups: list[Group]) -> list[str]:
    """The cells whose trained model is at or below the popularity ranking, and their validation curves."""
    below = below_popularity(groups)
    if not below:
        return []
    lines = [f"**{len(below)} cell(s) at or below the popularity ranking** (test NDCG@10 against sampled negatives, "
             "mean over seeds; their validation curves follow, also for private runs, which test their last "
             "round):", ""]
    lines += [f"- {plots.group_label(g)} on {g.cell.get('dataset')} {domain}: {mean:.4f} against {ref:.4f}"
              for g, domain, mean, ref in below] + [""]
    for ds in sorted({str(g.cell.get("dataset")) for g, *_ in below}):
        mine = list({id(g): g for g, *_ in below if str(g.cell.get("dataset")) == ds}.values())
        png = plots.convergence(mine, out / f"{name}_below_popularity_{ds}.png", f"at or below popularity: {ds}")
        if png:
            lines += [f"![at or below popularity {ds}]({png.name})", ""]
    return lines


def _breakdowns(out: Path, name: str, groups: list[Group]) -> list[str]:
    lines = []
    for section, label in (("cold_start", "cold-start users (in-domain history length)"),
                           ("long_tail", "long-tail items (target item popularity)")):
        rows = breakdown_rows(groups, section)
        without = [g for g in groups if any(section not in r.summary for r in g.runs)]
        lines += [f"### {label}", ""]
        if without:
            lines += [f"{len(without)} group(s) have no `{section}` breakdown in their summary.json (trainer "
                      "without final_metrics): " + ", ".join(sorted({str(g.cell.get('label')) for g in without})),
                      ""]
        text = write_tables(rows, out / f"{name}_{section}")
        lines += [text, f"Table: [{name}_{section}.md]({name}_{section}.md), "
                  f"[{name}_{section}.csv]({name}_{section}.csv)", ""]
        for ds in sorted({r["dataset"] for r in rows}):
            png = plots.breakdown_bars([r for r in rows if r["dataset"] == ds], out / f"{name}_{section}_{ds}.png",
                                       ds)
            if png:
                lines += [f"![{section} {ds}]({png.name})", ""]
    return lines


def _convergence(out: Path, name: str, groups: list[Group]) -> list[str]:
    lines = []
    for ds in sorted({g.cell.get("dataset") for g in groups}):
        png = plots.convergence([g for g in groups if g.cell.get("dataset") == ds], out / f"{name}_{ds}.png",
                                f"convergence: {ds}")
        if png:
            lines += [f"![convergence {ds}]({png.name})", ""]
    return lines or ["_no validation curves in the runs' metrics.jsonl_", ""]


def _generic_section(root: Path, out: Path) -> list[str]:
    dirs = find_runs(root)
    if not dirs:
        raise FedscopeError(f"--runs {root}: no run directory (a folder with summary.json) found")
    runs = [load_run(d) for d in dirs]
    groups = group_runs(runs)
    devices = sorted({str(r.summary.get("training", {}).get("device")) for r in runs})
    lines = ["# Run report", "", f"- {len(runs)} runs under `{root}` in {len(groups)} groups "
             "(runs whose configs differ only in the seed)", f"- device(s): {', '.join(devices)}",
             "- no plan.json: not a `fedscope reproduce` output; profile unknown", ""]
    if any(r.cell.get("dry_run") for r in runs):
        lines += ["> **contains DRY-RUN cells** (tiny budget, meaningless numbers; grouped apart)", ""]
    text = write_tables(metric_rows(groups), out / "runs", COLUMNS)
    lines += ["## Runs", "", text, "Table: [runs.md](runs.md), [runs.csv](runs.csv)", ""]
    dp_groups = [g for g in groups if g.cell.get("mode") == "federated"]
    if len({g.cell.get("epsilon") for g in dp_groups}) > 1:
        for ds in sorted({g.cell.get("dataset") for g in dp_groups}):
            png = plots.privacy_utility([g for g in dp_groups if g.cell.get("dataset") == ds],
                                        out / f"privacy_utility_{ds}.png", f"privacy-utility: {ds}")
            if png:
                lines += [f"![privacy-utility {ds}]({png.name})", ""]
    lines += ["## Convergence", ""] + _convergence(out, "convergence", groups)
    return lines


__all__ = ["write_report"]
